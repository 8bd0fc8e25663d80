"""Text generation from a checkpoint.

    python -m scalejax.sample --workdir DIR --prompt "ROMEO:" [--tokens 200]
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from scalejax import checkpoint as ckpt
from scalejax import config as config_lib
from scalejax import roles
from scalejax.data import load_tokenizer
from scalejax.model import build_model


def generate(graphdef, params, tokenizer, prompt: str, n_tokens: int, context: int,
             temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
  """Samples `n_tokens` after `prompt`, with a sliding window of `context` tokens."""
  ids = list(tokenizer.encode(prompt)) or [getattr(tokenizer, 'eod_id', 0) or 0]

  @jax.jit
  def next_token(params, window_1xC, pos, key):
    logits = nnx.merge(graphdef, params)(window_1xC)[0, pos]
    if top_k:
      kth = jnp.sort(logits)[-top_k]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / max(temperature, 1e-6))

  key = jax.random.key(seed)
  out = []
  for _ in range(n_tokens):
    window = ids[-context:]
    pos = len(window) - 1
    padded = np.zeros((1, context), np.int32)
    padded[0, :len(window)] = window  # right padding is invisible to a causal model
    key, sub = jax.random.split(key)
    tok = int(next_token(params, padded, pos, sub))
    ids.append(tok)
    out.append(tok)
  return tokenizer.decode(out)


def load_run(workdir: str, step: int | None = None):
  """(config, graphdef, params, tokenizer) from a run directory's newest (or `step`'s) checkpoint."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a scalejax workdir?')
  with open(path) as f:
    saved = json.load(f)
  cfg = ml_collections.ConfigDict(saved)
  tokenizer = load_tokenizer(cfg.data, workdir)
  model_cfg = config_lib.model_config(cfg, tokenizer.vocab_size)
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, cfg.seed))
  graphdef, abstract_params = nnx.split(abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(abstract_params))
  params, _ = ckpt.restore_params(workdir, target, step)
  return cfg, graphdef, params, tokenizer


FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg, graphdef, params, tokenizer = load_run(FLAGS.workdir)
  print(FLAGS.prompt + generate(graphdef, params, tokenizer, FLAGS.prompt, FLAGS.tokens,
                                cfg.train.seq_len, FLAGS.temperature, FLAGS.top_k, FLAGS.seed))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'run directory holding config.json and checkpoints/')
  flags.DEFINE_string('prompt', '\n', 'text to continue')
  flags.DEFINE_integer('tokens', 200, 'tokens to generate')
  flags.DEFINE_float('temperature', 0.8, 'sampling temperature')
  flags.DEFINE_integer('top_k', 0, 'keep only the k most likely tokens (0: all)')
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  flags.mark_flag_as_required('workdir')
  app.run(main)

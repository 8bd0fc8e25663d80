"""Text generation from a checkpoint.

    python -m scalejax.cli.sample --workdir DIR --prompt "ROMEO:" [--tokens 200]
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

from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib
from scalejax.core import roles
from scalejax.data import load_tokenizer
from scalejax.model.decoder import build_model


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

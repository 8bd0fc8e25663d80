"""Autoregressive sampling from a decoder's params (used by train.py and the sample command)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(graphdef, params, tokenizer, prompt: str, n_tokens: int, context: int,
             temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
  """Samples `n_tokens` after `prompt`, with a sliding window of `context` tokens.

  `temperature=0` is greedy decoding: the most likely token every step (no key used)."""
  ids = list(tokenizer.encode(prompt)) or [getattr(tokenizer, 'eod_id', 0) or 0]

  @jax.jit
  def next_token(params, window_1xC, pos, key):
    logits = nnx.merge(graphdef, params)(window_1xC)[0, pos]
    if top_k:
      kth = jnp.sort(logits)[-top_k]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if temperature == 0:
      return jnp.argmax(logits)
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

"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

from pathlib import Path

import jax
from flax import nnx

from scalejax.core import roles
from scalejax.train.config import load_config

ROOT = Path(__file__).parents[1]
SHAKESPEARE = ROOT / 'data' / 'tinyshakespeare.txt'  # ships with the repository


def tiny_config():
  """A fresh ConfigDict of configs/tiny.py (seconds-long synthetic-data runs)."""
  return load_config(ROOT / 'configs' / 'tiny.py')


def randomize_scales(module, seed=1):
  """Set every scale param to a random positive vector (not the init)."""
  state = nnx.state(module, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed), 1000))

  def f(v):
    if v.get_metadata()['role'] in roles.SCALE_ROLES:
      v[...] = jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5)
    return v
  jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, state)

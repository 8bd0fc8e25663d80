"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import jax
from flax import nnx

from scalejax import roles


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

"""Row sums in the form XLA:CPU runs fast (`core/reductions.py`) equal the plain sums."""

import chex
import jax
import jax.numpy as jnp
import pytest

from scalejax.core import reductions, sharding
from scalejax.scales import norms
from scalejax.train import xla_flags


@pytest.mark.parametrize('width,group', [(512, 8), (1365, 7), (682, 11), (341, 11),
                                         (128, 8), (65, 5), (6, 6), (67, 1), (1, 1)])
def test_group_width_is_the_divisor_up_to_32_nearest_8(width, group):
  assert reductions.group_width(width) == group


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
@pytest.mark.parametrize('shape', [(4, 512), (3, 1365), (2, 3, 67), (2, 4, 8, 64), (5, 1)])
def test_row_sums_equal_the_plain_sums(platform, shape, monkeypatch):
  monkeypatch.setattr(sharding, 'platform', lambda: platform)
  y = jax.random.normal(jax.random.key(0), shape)
  v = jax.random.normal(jax.random.key(1), shape[-1:])
  chex.assert_trees_all_close(reductions.row_sum(y), jnp.sum(y, -1, keepdims=True),
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(reductions.row_mean(y), jnp.mean(y, -1, keepdims=True),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(reductions.row_dot(y, v), jnp.sum(y * v, -1, keepdims=True),
                              rtol=1e-5, atol=1e-5)
  r = jax.random.normal(jax.random.key(2), shape[:-1] + (1,))
  chex.assert_trees_all_close(reductions.sum_over_tokens(y, r),
                              jnp.sum(y * r, axis=tuple(range(len(shape) - 1))),
                              rtol=1e-5, atol=1e-5)


def test_row_sum_is_differentiable_like_the_plain_sum():
  y = jax.random.normal(jax.random.key(0), (6, 96))
  cot = jax.random.normal(jax.random.key(1), (6, 1))
  got = jax.vjp(lambda y: reductions.row_sum(jnp.square(y)), y)[1](cot)
  want = jax.vjp(lambda y: jnp.sum(jnp.square(y), -1, keepdims=True), y)[1](cot)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_norms_have_no_reduce_window_on_cpu():
  """XLA:CPU splits a plain sum over a long row into a reduce-window (the slow form);
  the norms' forward and backward passes compile without one."""
  x = jax.random.normal(jax.random.key(0), (64, 512))
  gamma = jnp.ones((512,))
  # with the options a train step is compiled with (xla_flags.py: XLA's own loops for
  # reductions), at XLA's default optimization level (the tests' session runs at -O0)
  options = {**xla_flags.CPU_COMPILE_OPTIONS, 'xla_backend_optimization_level': 2}
  hlo = lambda f, *args: jax.jit(f).lower(*args).compile(options).as_text()
  plain = lambda x: jnp.sum(x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6))
  assert 'reduce-window' in hlo(jax.grad(plain), x)  # what the row sums avoid
  scale = lambda x, g: jnp.sum(norms.rms_scale(x, g, 1e-6) ** 2)
  stats = lambda x: jnp.sum(norms.rms_stats(x, 1e-6) ** 2)
  assert 'reduce-window' not in hlo(jax.grad(scale, argnums=(0, 1)), x, gamma)
  assert 'reduce-window' not in hlo(jax.grad(stats), x)

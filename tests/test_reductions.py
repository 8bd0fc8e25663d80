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


@pytest.mark.parametrize('tokens', [64, 1024])
def test_compiled_norms_have_no_reduce_window_on_cpu(tokens):
  """XLA:CPU splits a plain sum over a long row into a reduce-window (the slow form);
  the norms' forward and backward passes compile without one, for a few tokens and for
  as many as a mid-size step has."""
  x = jax.random.normal(jax.random.key(0), (tokens, 512))
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


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_total_sum_and_global_norm_equal_the_plain_ones(platform, monkeypatch):
  import optax
  monkeypatch.setattr(sharding, 'platform', lambda: platform)
  tree = {'w': jax.random.normal(jax.random.key(0), (8, 64, 65)),
          'odd': jax.random.normal(jax.random.key(1), (67,)), 's': jnp.float32(3.0)}
  for x in jax.tree.leaves(tree):
    chex.assert_trees_all_close(reductions.total_sum(x), jnp.sum(x), rtol=1e-5, atol=1e-4)
  chex.assert_trees_all_close(reductions.global_norm(tree), optax.global_norm(tree), rtol=1e-6)
  for bad in (jnp.inf, jnp.nan):  # one bad element makes the norm non-finite
    broken = dict(tree, odd=tree['odd'].at[5].set(bad))
    assert not jnp.isfinite(reductions.global_norm(broken))
  assert float(reductions.global_norm({})) == 0.0


def test_clip_by_global_norm_equals_optax():
  import optax
  from scalejax.train import optim
  grads = {'a': jax.random.normal(jax.random.key(0), (32, 24)), 'b': jnp.arange(5.0)}
  for max_norm in (0.5, 1e4):  # clipped, and left alone
    want = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())[0]
    got = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())[0]
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(got, grads)  # within the norm: the gradients as they are


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_folded_scale_gradient_equals_autodiff(platform, monkeypatch):
  from scalejax.model.layers import fold_rows
  monkeypatch.setattr(sharding, 'platform', lambda: platform)
  v = jax.random.uniform(jax.random.key(0), (48,), minval=0.5, maxval=1.5)
  w = jax.random.normal(jax.random.key(1), (48, 72))
  cot = jax.random.normal(jax.random.key(2), (48, 72))
  want_out, want = jax.vjp(lambda v, w: v[:, None] * w, v, w)
  got_out, got = jax.vjp(fold_rows, v, w)
  chex.assert_trees_all_equal(got_out, want_out)
  chex.assert_trees_all_close(got(cot), want(cot), rtol=1e-5, atol=1e-5)

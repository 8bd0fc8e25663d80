"""Sums over one axis of an activation, in the form each backend runs fast.

XLA:CPU rewrites every reduction over an axis longer than 32 into a reduce-window of
32 followed by a reduction of the windows, to bound the float error. The reduce-window
is a fusion of its own, so the elementwise work that feeds the sum (the square of a
norm's statistics, the product in its backward pass) is written out first, and the
windows are summed by a scalar loop: a [1024, 512] float32 sum of squares ran about
3x slower than a pass over the same array (PERFORMANCE.md). Two changes avoid both:
sums over groups of at most 32 adjacent elements, which XLA fuses with their producer
and does not rewrite, and a matrix-vector product for what is left, which goes to the
matrix library (XLA's algebraic simplifier turns neither back into one reduction).
Elsewhere the plain reduction, which XLA fuses with its producer (and a float32 dot on
TPU would round through bfloat16 at default precision).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from scalejax.core import sharding

# XLA:CPU's TreeReductionRewriter leaves reductions over at most this many elements alone.
_WINDOW = 32
# The group width the grouped sums run fastest at (a few divisors of each measured width
# in PERFORMANCE.md); a width with no divisor near it takes the nearest one.
_BEST_GROUP = 8


@functools.cache
def group_width(width: int) -> int:
  """The divisor of `width` of at most 32 nearest 8 (on a log scale; larger on a tie):
  how many adjacent elements `row_sum` adds before the matrix-vector product."""
  divisors = [w for w in range(1, min(width, _WINDOW) + 1) if width % w == 0]
  return min(divisors, key=lambda w: (abs(math.log(w / _BEST_GROUP)), -w))


def row_sum(y: jax.Array) -> jax.Array:
  """sum(y, axis=-1, keepdims=True), in y's dtype (callers reduce in float32)."""
  *lead, width = y.shape
  if sharding.platform() != 'cpu' or width <= _WINDOW:  # a short row is not rewritten
    return jnp.sum(y, axis=-1, keepdims=True)
  w = group_width(width)
  groups = jnp.sum(y.reshape(*lead, width // w, w), axis=-1)
  ones = jnp.ones((width // w,), y.dtype)
  return jnp.dot(groups, ones)[..., None]


def row_dot(y: jax.Array, v: jax.Array) -> jax.Array:
  """sum(y * v, axis=-1, keepdims=True) for a vector v over y's last axis: on CPU a
  matrix-vector product, elsewhere the reduction fused with the product."""
  if sharding.platform() != 'cpu':
    return jnp.sum(y * v, axis=-1, keepdims=True)
  return jnp.dot(y, v.astype(y.dtype))[..., None]


def row_mean(y: jax.Array) -> jax.Array:
  """mean(y, axis=-1, keepdims=True) by `row_sum`."""
  return row_sum(y) * jnp.asarray(1 / y.shape[-1], y.dtype)


def total_sum(x: jax.Array) -> jax.Array:
  """The sum of every element of x (a scalar in x's dtype). On CPU by `row_sum` over a
  few rows, then a plain sum of those few: a vector times a vector of ones would be
  simplified back into one long reduction, a matrix times one is not."""
  if sharding.platform() != 'cpu' or x.size <= _WINDOW:
    return jnp.sum(x)
  rows = group_width(x.size)
  return jnp.sum(row_sum(x.reshape(rows, -1)))


def global_norm(tree) -> jax.Array:
  """The L2 norm of every leaf of `tree` together (float32), optax.global_norm's value:
  each leaf's sum of squares by `total_sum`. A leaf with an inf or NaN makes it
  non-finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(total_sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def sum_over_tokens(y: jax.Array, r: jax.Array) -> jax.Array:
  """sum over every axis but the last of y * r (r: [..., 1], one weight per token).

  On CPU a matrix-vector product with r: a sum over the leading (token) axes is lowered
  to a strided reduce-window, about 1 ms per [1024, 512] float32 activation on a Zen 5
  core, several times the product's cost (PERFORMANCE.md); a sum against a constant
  vector of ones would be simplified back into that reduction, r is not constant.
  Elsewhere the reduction, which fuses with the product.
  """
  if sharding.platform() == 'cpu':
    return jnp.dot(r.reshape(-1), y.reshape(-1, y.shape[-1]))
  return jnp.sum(y * r, axis=tuple(range(y.ndim - 1)))

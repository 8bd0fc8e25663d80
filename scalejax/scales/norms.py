"""Normalization with a pluggable scale vector.

`Norm` = deterministic statistics (RMS or LayerNorm, reduced in float32) times one or
more learnable scale vectors. The scale's parameterization is chosen by name from
`SCALE_FORMS`; adding a form means adding one class and one registry entry here.
Every form equals the plain vector gamma = 1 at initialization.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from scalejax.core import reductions, roles, sharding
from scalejax.core.roles import Param


# --- statistics -------------------------------------------------------------------
# Row sums go through `reductions.row_sum`, the form XLA:CPU runs fast, and on CPU the
# RMS forms have backward passes of their own written with it: autodiff's transpose of
# the per-row broadcast of 1/rms would be a plain reduction again.

def _inv_rms(x32: jax.Array, eps: float) -> jax.Array:
  return jax.lax.rsqrt(reductions.row_mean(jnp.square(x32)) + eps)


def rms_stats(x32: jax.Array, eps: float) -> jax.Array:
  """x32 / rms(x32) over the last axis (float32 in and out)."""
  if sharding.platform() == 'cpu':
    return _rms_stats(x32, eps)
  return x32 * _inv_rms(x32, eps)  # elsewhere autodiff's sums fuse with their producers


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _rms_stats(x32, eps):
  return x32 * _inv_rms(x32, eps)


def _rms_stats_fwd(x32, eps):
  r = _inv_rms(x32, eps)
  return x32 * r, (x32, r)


def _rms_stats_bwd(eps, res, g):
  del eps
  x32, r = res
  n = x32 * r
  return (r * (g - n * reductions.row_mean(g * n)),)


_rms_stats.defvjp(_rms_stats_fwd, _rms_stats_bwd)


def layer_stats(x32: jax.Array, eps: float) -> jax.Array:
  centred = x32 - reductions.row_mean(x32)
  return centred * jax.lax.rsqrt(reductions.row_mean(jnp.square(centred)) + eps)


def inv_rms(x: jax.Array, eps: float) -> jax.Array:
  """1/rms(x) over the last axis (float32, [..., 1]), with no gradient: to hand to
  `rms_scale` later, whose backward pass accounts for how it depends on x."""
  return jax.lax.stop_gradient(_inv_rms(x.astype(jnp.float32), eps))


def rms_scale(x: jax.Array, gamma: jax.Array, eps: float,
              inv_rms: jax.Array | None = None) -> jax.Array:
  """`rms_stats(x) * gamma` in x's dtype, keeping only x and 1/rms for the backward.

  Autodiff of the composition would also save the normalized activations (for
  d(gamma)): one more [tokens, d] tensor per norm. The backward recomputes them
  instead, an elementwise pass that XLA fuses into the gradient's own. `inv_rms`: x's
  statistics computed earlier (`inv_rms(x, eps)`), so that a backward pass recomputing
  this norm from x needs no reduction over x to do it.
  """
  if inv_rms is None:
    return _rms_scale(x, gamma, eps)
  return _rms_scale_given(x, gamma, inv_rms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_scale(x, gamma, eps):
  return _rms_scale_fwd(x, gamma, eps)[0]


def _rms_scale_fwd(x, gamma, eps):
  return _rms_scale_given_fwd(x, gamma, _inv_rms(x.astype(jnp.float32), eps))


def _rms_scale_bwd(eps, res, g):
  del eps
  x, r, gamma = res
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  # Both sums read one product: d(gamma) sums g * x * r over tokens, and the row sum
  # the normalization's backward needs, of g * gamma * n, is r times (g * x) . gamma.
  gx = g32 * x32
  d_gamma = reductions.sum_over_tokens(gx, r)
  mean_dn_n = r * reductions.row_dot(gx, gamma) * (1 / x.shape[-1])
  dx = r * (g32 * gamma - x32 * r * mean_dn_n)
  return dx.astype(x.dtype), d_gamma.astype(gamma.dtype)


_rms_scale.defvjp(_rms_scale_fwd, _rms_scale_bwd)


@jax.custom_vjp
def _rms_scale_given(x, gamma, r):
  return _rms_scale_given_fwd(x, gamma, r)[0]


def _rms_scale_given_fwd(x, gamma, r):
  return (x.astype(jnp.float32) * r * gamma).astype(x.dtype), (x, r, gamma)


def _rms_scale_given_bwd(res, g):
  # r is x's statistic: its dependence on x is already in d(x)
  return (*_rms_scale_bwd(None, res, g), jnp.zeros_like(res[1]))


_rms_scale_given.defvjp(_rms_scale_given_fwd, _rms_scale_given_bwd)


STATISTICS: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    'rms': rms_stats,
    'layer': layer_stats,
}


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """How every norm of a model is built (one spec per model)."""
  kind: str = 'rms'          # key of STATISTICS
  eps: float = 1e-6
  bias: bool = False         # LayerNorm-style additive bias (role `other`)
  scale: str = 'vector'      # key of SCALE_FORMS
  storage: str = 'direct'    # 'direct': store gamma; 'delta': store gamma - init (decay pulls to init)

  def __post_init__(self):
    _check_choice('norm kind', self.kind, STATISTICS)
    _check_choice('scale form', self.scale, SCALE_FORMS)
    _check_choice('scale storage', self.storage, ('direct', 'delta'))


def _check_choice(what, value, valid):
  if value not in valid:
    raise ValueError(f'unknown {what} {value!r}; valid: {sorted(valid)}')


# --- scale forms ------------------------------------------------------------------

class _Form(nnx.Module):
  """Base of scale forms: `__call__()` returns gamma (float32, shape [dim]) or None."""

  def __init__(self, dim: int, role: str, storage: str):
    self.dim, self.role, self.storage = dim, role, storage

  def _param(self, init: float, shape: tuple[int, ...], axes, part: str = 'vector') -> Param:
    """`part`: 'magnitude' for a param that only sets gamma's overall size, 'direction'
    for the rest of a form that has one, 'vector' otherwise (weight decay by part and
    the freezing of a function-neutral magnitude read it)."""
    stored = 0.0 if self.storage == 'delta' else init
    return Param(jnp.full(shape, stored, jnp.float32), role=self.role, axes=axes, part=part)

  def _read(self, p: Param, init: float) -> jax.Array:
    return p[...] + init if self.storage == 'delta' else p[...]

  def _store(self, value: jax.Array, init: float) -> jax.Array:
    """The stored value that `_read` turns into `value` (float32)."""
    value = jnp.asarray(value, jnp.float32)
    return value - init if self.storage == 'delta' else value

  def params_for(self, gamma: jax.Array) -> dict[str, jax.Array]:
    """Stored values {param name: array} with which this form's gamma is `gamma`.

    `gamma` is [..., dim]: leading axes are copies of a stacked form (the layers and
    experts of one slice), so one call sets a slice of a stacked form's params. The
    interventions (analysis/interventions.py) edit the effective gamma through this,
    the same way for every form and storage. Exact for `vector` and `magdir` (with
    `delta` storage for gamma >= 0.5, where gamma - 1 is exact in float32), to float32
    rounding for `magdir_unit` (its gamma is computed through a norm).
    """
    raise NotImplementedError(f'{type(self).__name__} cannot be set to a given gamma')

  @classmethod
  def param_count(cls, dim: int) -> int:
    """Params of one form of width `dim`. Counted from an abstract construction, so a
    new form is counted right without declaring anything (storage changes no shape)."""
    return _param_count(cls, dim)


@functools.cache
def _param_count(form_cls: type[_Form], dim: int) -> int:
  form = nnx.eval_shape(lambda: form_cls(dim, roles.INPUT_SCALE, 'direct'))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(form, nnx.Param)))


class NoScale(_Form):
  def __call__(self):
    return None

  def params_for(self, gamma):
    raise ValueError('the `none` scale form has no params: its gamma is not learnable')


class VectorScale(_Form):
  """gamma stored as a vector (init 1)."""

  def __init__(self, dim, role, storage):
    super().__init__(dim, role, storage)
    self.gamma = self._param(1.0, (dim,), ('norm',))

  def __call__(self):
    return self._read(self.gamma, 1.0)

  def params_for(self, gamma):
    return {'gamma': self._store(gamma, 1.0)}


class MagDirScale(_Form):
  """gamma = beta * alpha: scalar magnitude beta (init 1), direction alpha (init 1)."""

  def __init__(self, dim, role, storage):
    super().__init__(dim, role, storage)
    self.beta = self._param(1.0, (), (), part='magnitude')
    self.alpha = self._param(1.0, (dim,), ('norm',), part='direction')

  def __call__(self):
    return self._read(self.beta, 1.0) * self._read(self.alpha, 1.0)

  def params_for(self, gamma):
    # The direction carries gamma, the magnitude stays 1: 1 * gamma is exact.
    gamma = jnp.asarray(gamma, jnp.float32)
    return {'beta': self._store(jnp.ones(gamma.shape[:-1], jnp.float32), 1.0),
            'alpha': self._store(gamma, 1.0)}


class MagDirUnitScale(MagDirScale):
  """gamma = beta * sqrt(d) * alpha / ||alpha||: alpha only sets a direction."""

  def __call__(self):
    alpha = self._read(self.alpha, 1.0)
    unit = alpha * jax.lax.rsqrt(jnp.sum(jnp.square(alpha)) + 1e-12)
    return self._read(self.beta, 1.0) * math.sqrt(self.dim) * unit

  def params_for(self, gamma):
    # alpha = gamma gives the direction, beta = ||gamma|| / sqrt(d) the size. gamma = 1
    # gives beta = sqrt(d) / sqrt(d) = 1 exactly (the init); gamma = 0 gives beta 0.
    gamma = jnp.asarray(gamma, jnp.float32)
    beta = jnp.sqrt(jnp.sum(jnp.square(gamma), axis=-1)) / jnp.float32(math.sqrt(self.dim))
    return {'beta': self._store(beta, 1.0), 'alpha': self._store(gamma, 1.0)}


SCALE_FORMS: dict[str, type[_Form]] = {
    'none': NoScale,
    'vector': VectorScale,
    'magdir': MagDirScale,
    'magdir_unit': MagDirUnitScale,
}


def make_scale(spec: NormSpec, dim: int, role: str) -> _Form:
  return SCALE_FORMS[spec.scale](dim, role, spec.storage)


# --- the norm module --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scaled:
  """`n * gamma` left unmultiplied, for a linear map to fold gamma into its kernel.

  W(gamma * n) = (diag(gamma) W) n: folding costs a [d_in, d_out] multiply per step
  instead of a pass over the activations, gamma's gradient comes from the kernel's
  gradient instead of a reduction over tokens, and HG's branches share one saved
  activation `n` for the backward pass. Same function, different rounding order.
  """
  n: jax.Array                  # normalized activations, in the compute dtype
  gamma: jax.Array | None       # float32 [d]; None for the `none` form

  @property
  def shape(self):
    return self.n.shape

  @property
  def dtype(self):
    return self.n.dtype

  def value(self) -> jax.Array:
    """The product itself, as `Norm.__call__` returns it."""
    if self.gamma is None:
      return self.n
    return (self.n.astype(jnp.float32) * self.gamma).astype(self.n.dtype)


class Norm(nnx.Module):
  """Statistics computed once, then one scale vector per named branch (HG when > 1).

  `__call__(x)` returns one array for a single branch and a tuple (in branch order)
  otherwise, each in x's dtype. Statistics are reduced in float32 so bfloat16
  activations with a large magnitude do not overflow the mean of squares. A single
  branch is stored as `scale` (path `.../scale/gamma`); HG branches by their names
  (`.../q/gamma`, `.../k/gamma`, ...).
  """

  def __init__(self, spec: NormSpec, dim: int, role: str, branches: tuple[str, ...] = ('scale',)):
    if role not in roles.SCALE_ROLES + (roles.UNLABELLED,):
      raise ValueError(f'a norm scale has role input_scale or output_scale, got {role!r}')
    self.spec, self.dim, self.branches = spec, dim, tuple(branches)
    for name in self.branches:
      setattr(self, name, make_scale(spec, dim, role))
      if spec.bias:
        bias = Param(jnp.zeros((dim,), jnp.float32), role=roles.OTHER, axes=('norm',))
        setattr(self, f'{name}_bias', bias)

  def __call__(self, x: jax.Array, inv_rms: jax.Array | None = None):
    """`inv_rms`: `self.inv_rms(x)`, computed earlier (None: computed here)."""
    if self._lean():
      return rms_scale(x, self.gammas()[0], self.spec.eps, inv_rms)
    n = STATISTICS[self.spec.kind](x.astype(jnp.float32), self.spec.eps)
    outs = []
    for name, gamma in zip(self.branches, self.gammas()):
      y = n if gamma is None else n * gamma
      if self.spec.bias:
        y = y + getattr(self, f'{name}_bias')[...]
      outs.append(y.astype(x.dtype))
    return outs[0] if len(outs) == 1 else tuple(outs)

  def _lean(self) -> bool:
    """Whether a call runs `rms_scale` (one RMS branch with a scale, no bias)."""
    return (self.spec.kind == 'rms' and not self.spec.bias and len(self.branches) == 1
            and self.spec.scale != 'none')

  def inv_rms(self, x: jax.Array) -> jax.Array | None:
    """x's statistics for a later call (`norms.inv_rms`), None where that call would not
    take them: a backward pass that recomputes this norm from x then keeps them, a
    [..., 1] array, and runs no reduction over x to recompute it."""
    return inv_rms(x, self.spec.eps) if self._lean() else None

  def scaled(self, x: jax.Array):
    """`__call__` with each branch as `Scaled` (unmultiplied) for linear maps to fold.

    With a bias the output is not a pure product, so it is returned computed.
    """
    if self.spec.bias:
      return self(x)
    n = STATISTICS[self.spec.kind](x.astype(jnp.float32), self.spec.eps).astype(x.dtype)
    outs = tuple(Scaled(n, gamma) for gamma in self.gammas())
    return outs[0] if len(outs) == 1 else outs

  def gammas(self) -> list[jax.Array | None]:
    """Effective scale vector of each branch (None for the `none` form)."""
    return [getattr(self, name)() for name in self.branches]

  def affine(self) -> tuple[jax.Array | None, jax.Array | None]:
    """(gamma, bias) of a single-branch norm, None where it has none: with `normalize`,
    the norm applied with these taken elsewhere (per row, for stacked experts)."""
    if len(self.branches) != 1:
      raise ValueError(f'affine() needs a single-branch norm, this one has {self.branches}')
    bias = getattr(self, f'{self.branches[0]}_bias', None)
    return self.gammas()[0], None if bias is None else bias[...]


def normalize(x: jax.Array, spec: NormSpec, gamma: jax.Array | None,
              bias: jax.Array | None) -> jax.Array:
  """`spec`'s statistics of x (float32) times gamma plus bias, in x's dtype; gamma and
  bias broadcast against x ([d], or [rows, d] for a per-row scale)."""
  y = STATISTICS[spec.kind](x.astype(jnp.float32), spec.eps)
  y = y if gamma is None else y * gamma
  y = y if bias is None else y + bias
  return y.astype(x.dtype)

"""Post-training weight fake-quantization that knows scale vectors by their role.

Numerics are qwix's (`qwix.quantize` / `qwix.dequantize` on plain arrays): symmetric
absmax scaling, round to the integer grid or cast to float8 e4m3, then back to float32.
qwix's integer grids stretch the absmax to qmax + 0.5 and clip to [-2^(b-1), 2^(b-1)-1]
(its +0.5 trick), which is neither symmetric nor idempotent; we pass a calibration
factor (qmax + 0.5) / qmax so absmax lands on qmax exactly: the grid is {-qmax..qmax}
times scale, 2^b - 1 levels, and quantizing twice changes nothing. Group-wise
quantization pads the quantized axis to a multiple of the group with zeros (qwix's
public API needs exact tiling; the model's SwiGLU width 8d/3 rarely divides).

Which tensors are quantized is chosen by role (`MODES`), never by name. Granularity:
  - a kernel [.., d_in, d_out] gets one scale per output column (and per layer),
    reduced over d_in, or per group of `group_size` rows of d_in;
  - an embedding table [vocab, d] gets one scale per row (token), or per group along d;
  - a scale vector [.., dim] gets one scale per vector (per layer), or per group
    along dim; a scalar (magdir's beta) has its own scale and is exact.

Folding (`fold_input_scales`, analysis/folding.py) moves every input-role gamma into the
rows of the kernels it feeds (the model's wiring, scalejax/model/wiring.py: DP/DNP's
output side on v and up included) and resets the scale to the identity, which leaves
the float model's function unchanged; output-role scales have no such map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from scalejax.analysis import folding
from scalejax.core import roles as R


@dataclasses.dataclass(frozen=True)
class Format:
  qtype: object       # what qwix calls the quantized type
  qmax: int | None    # largest integer level; None for float formats
  bits: int

  @property
  def calibration(self) -> str:
    if self.qmax is None:
      return 'absmax'   # scale = absmax / finfo.max: absmax maps onto the largest float
    return f'absmax,{(self.qmax + 0.5) / self.qmax!r}'


FORMATS: dict[str, Format] = {
    'int8': Format(jnp.int8, 127, 8),
    'fp8': Format(jnp.float8_e4m3fn, None, 8),
    'int4': Format(jnp.int4, 7, 4),
    'int3': Format('int3', 3, 3),
    'int2': Format('int2', 1, 2),
}

WEIGHTS = (R.MATRIX, R.EMBEDDING)
SCALES = (R.INPUT_SCALE, R.OUTPUT_SCALE)


@dataclasses.dataclass(frozen=True)
class Mode:
  quantize: tuple[str, ...]   # roles quantized at the chosen format
  fold: bool = False          # fold input-role scales into the next map first
  summary: str = ''


# Role `other` (LayerNorm biases) stays float32 in every mode.
MODES: dict[str, Mode] = {
    'all': Mode(WEIGHTS + SCALES, summary='weights and every scale vector'),
    'except_scales': Mode(WEIGHTS, summary='weights; scale vectors kept float32'),
    'except_input_scales': Mode(WEIGHTS + (R.OUTPUT_SCALE,),
                                summary='weights and output-role scales; input-role float32'),
    'scales_only': Mode(SCALES, summary='scale vectors only; weights float32'),
    'fold': Mode(WEIGHTS, fold=True,
                 summary='input scales folded into the next map, then weights; '
                         'output-role scales float32'),
    'fold_all': Mode(WEIGHTS + SCALES, fold=True,
                     summary='input scales folded, then weights and output-role scales'),
}


def _check(what, value, valid):
  if value not in valid:
    raise ValueError(f'unknown {what} {value!r}; valid: {", ".join(valid)}')


def fake_quant(x: jax.Array, fmt: str, *, axis: int | None, group_size: int = 0) -> jax.Array:
  """Quantize-dequantize `x` symmetrically, one scale per slice along `axis`.

  `axis` is the reduced axis (every other axis is per-channel); None gives every
  element its own scale. `group_size` > 0 splits `axis` into groups of that size.
  """
  _check('quantization format', fmt, FORMATS)
  f = FORMATS[fmt]
  x = jnp.asarray(x, jnp.float32)
  if axis is None:
    return _quant_dequant(x, f, tuple(range(x.ndim)), {})
  axis %= x.ndim
  channels = tuple(a for a in range(x.ndim) if a != axis)
  n = x.shape[axis]
  if not group_size or group_size >= n:
    return _quant_dequant(x, f, channels, {})
  widths = [(0, -n % group_size if a == axis else 0) for a in range(x.ndim)]
  out = _quant_dequant(jnp.pad(x, widths), f, channels, {axis: group_size})
  return jax.lax.slice_in_dim(out, 0, n, axis=axis)


def _quant_dequant(x, f: Format, channels, tiled):
  q = qwix.quantize(x, f.qtype, channelwise_axes=channels, tiled_axes=tiled,
                    calibration_method=f.calibration)
  return qwix.dequantize(q).astype(jnp.float32)


def quant_axis(role: str, axes: tuple[str | None, ...]) -> int | None:
  """The reduced axis of a param, from its role and logical axes (see module doc)."""
  own = [i for i, a in enumerate(axes) if a != 'layers']
  if not own:
    return None
  return own[0] if role == R.MATRIX else own[-1]


def quantize_params(params, roles, axes, fmt: str, quantize_roles, group_size: int = 0):
  """Fake-quantizes the params whose role is in `quantize_roles`; the rest are unchanged."""
  def one(p, role, ax):
    if role not in quantize_roles:
      return p
    return fake_quant(p, fmt, axis=quant_axis(role, ax), group_size=group_size)
  return jax.tree.map(one, params, roles, axes)  # axes leaves (tuples) pass whole


def fold_input_scales(model) -> tuple[dict, list[str]]:
  """(params with every foldable input-role gamma moved into the kernels it feeds,
  names of input scales left in place: a tied-embedding model's final norm)."""
  folded, left = folding.fold_input_scales(model)
  return R.params_of(folded), left


def apply_mode(graphdef, params, roles, axes, mode: str, fmt: str, group_size: int = 0):
  """(params for `mode` at `fmt`, input scales a fold left in place)."""
  _check('quantization mode', mode, MODES)
  m = MODES[mode]
  left = []
  if m.fold:
    params, left = fold_input_scales(nnx.merge(graphdef, params))
  return quantize_params(params, roles, axes, fmt, m.quantize, group_size), left

r"""Scale-vector interventions: edit one scale's effective gamma, measure what changes.

A *target* is one scale vector: a scale record of the wiring (`wiring.scales`: a norm's
branch, or DP's bare output scale) in one layer (the `layers` logical axis of its
stack; the final norm has none). An *edit* replaces that layer's effective gamma:

    reset      gamma <- 1
    zero       gamma <- 0
    direction  gamma <- gamma / rms(gamma): the magnitude reset to 1, the direction kept
    topk:K     the K channels with the largest |gamma - 1| reset to 1 (topk:P%: P percent
               of the layer's channels, at least one)

Edits act on the effective gamma, whatever the form: each form says which of its
params give a target gamma (`params_for` in scales/norms.py), so `magdir`'s beta *
alpha and `magdir_unit`'s normalized alpha are edited like a plain vector. A layer
of an expert-stacked scale (DP on the experts' maps) is one target: its experts'
vectors are edited together (top-k over all their channels, `direction` per expert).

On the command line one edit is written `SCALE[@layerN]=EDIT` (`EDIT_GRAMMAR`), e.g.
`blocks/attn_norm/scale@layer2=zero` or `final_norm/scale=topk:8`.

`fold_reset` is the comparison for input-role scales: fold the scale into its
consumers' kernels (analysis/folding.py), then divide the target layer's kernel rows
by gamma, i.e. replace the preconditioned weights diag(gamma) W by W. Pre-Norm's
W(gamma * n) = (diag(gamma) W) n makes this the same function as `reset`: what a
reset of an input scale does belongs as much to the kernel rows it multiplies as to
the scale. (With a norm bias the two differ: the fold leaves b / gamma beside W.)

`make_evaluator` measures each edit by the held-out loss and the mean over tokens of
KL(p_orig || p_edit) of the next-token distributions, with one compiled program for
every edit (params are its argument).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalejax.core import roles as R
from scalejax.model import wiring
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import cross_entropy
from scalejax.analysis import folding
from scalejax.scales.norms import make_scale

GAMMA_EDITS = ('reset', 'zero', 'direction', 'topk')
FOLD = 'fold_reset'  # the kernel-row edit of `fold_reset`, as results name it
EDIT_GRAMMAR = ('SCALE[@layerN]=EDIT with EDIT one of reset, zero, direction, topk:K, '
                'topk:P% (e.g. blocks/attn_norm/scale@layer2=zero)')
# Reference log-probs of the unedited model are kept when they take at most this
# much memory; above it (a large vocabulary), each evaluation recomputes them.
CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Target:
  """One scale vector: a scale record in one layer (None: the scale has no layers)."""
  scale: wiring.Scale
  layer: int | None = None

  @property
  def name(self) -> str:
    return self.scale.name + ('' if self.layer is None else f'@layer{self.layer}')

  @property
  def foldable(self) -> bool:
    """`fold_reset` applies: the scale folds, and not into a tied table (which is also
    the input embedding)."""
    return self.scale.folds and not any(c.transposed for c in self.scale.consumers)


@dataclasses.dataclass(frozen=True)
class Edit:
  """An edit of a target's gamma: `kind` in GAMMA_EDITS; for topk, `k` channels or
  `percent` of them."""
  kind: str
  k: int = 0
  percent: float = 0.0

  @property
  def label(self) -> str:
    if self.kind != 'topk':
      return self.kind
    return f'topk:{self.k}' if self.k else f'topk:{self.percent:g}%'

  def channels(self, n: int) -> int:
    """How many of a layer's n channels a topk edit resets."""
    if self.k:
      return min(self.k, n)
    return min(n, max(1, round(self.percent / 100 * n)))


def parse_edit_kind(text: str) -> Edit:
  """'reset' | 'zero' | 'direction' | 'topk:K' | 'topk:P%' -> Edit."""
  kind, _, arg = text.strip().partition(':')
  if kind in ('reset', 'zero', 'direction') and not arg:
    return Edit(kind)
  if kind == 'topk' and arg:
    try:
      edit = (Edit('topk', percent=float(arg[:-1])) if arg.endswith('%')
              else Edit('topk', k=int(arg)))
    except ValueError:
      edit = None
    if edit is not None and (edit.k >= 1 or 0 < edit.percent <= 100):
      return edit
    raise ValueError(f'bad edit {text!r}: topk takes a count K >= 1 or a percentage '
                     '0 < P <= 100 of the channels (topk:8, topk:10%)')
  raise ValueError(f'unknown edit {text!r}; valid: reset, zero, direction, topk:K, topk:P%')


def targets(config: ModelConfig) -> list[Target]:
  """Every scale vector with learnable params: one per layer of a scale stacked over
  layers (the wiring's `stack`), one for an unstacked scale."""
  if config.norm_spec.scale == 'none':
    return []
  out = []
  for s in wiring.scales(config):
    if 'layers' in s.stack:
      out += [Target(s, i) for i in range(config.n_layers)]
    else:
      out.append(Target(s))
  return out


def parse_edit(spec: str, config: ModelConfig) -> tuple[Target, Edit]:
  """`SCALE[@layerN]=EDIT` -> (Target, Edit); a ValueError of one line otherwise."""
  where, eq, kind = spec.partition('=')
  if not eq or not where.strip() or not kind.strip():
    raise ValueError(f'edit {spec!r} is not {EDIT_GRAMMAR}')
  edit = parse_edit_kind(kind)
  name, at, layer_text = where.strip().partition('@')
  if not targets(config):
    raise ValueError(f'variant {config.variant!r} has no learnable scales to edit')
  by_name = {s.name: s for s in wiring.scales(config)}
  if name not in by_name:
    raise ValueError(f'unknown scale {name!r}; valid: {", ".join(by_name)}')
  scale = by_name[name]
  layered = 'layers' in scale.stack
  if not at:
    if layered:
      raise ValueError(f'{name} is stacked over {config.n_layers} layers: name one, e.g. '
                       f'{name}@layer0={kind.strip()}')
    return Target(scale), edit
  m = re.fullmatch(r'layer(\d+)', layer_text)
  if not layered:
    raise ValueError(f'{name} has no layers: drop "@{layer_text}"')
  if m is None:
    raise ValueError(f'bad layer {layer_text!r} in {spec!r}: write @layerN, N in '
                     f'0..{config.n_layers - 1}')
  layer = int(m.group(1))
  if layer >= config.n_layers:
    raise ValueError(f'layer {layer} out of range: {name} has layers 0..{config.n_layers - 1}')
  return Target(scale, layer), edit


# --- gammas and params -----------------------------------------------------------

def _layer_index(target: Target, stack_axes: tuple[str, ...]) -> tuple:
  """Index of the target's layer in an array whose leading axes are `stack_axes`."""
  if target.layer is None:
    return ()
  return (slice(None),) * stack_axes.index('layers') + (target.layer,)


def gamma_of(model, target: Target) -> np.ndarray:
  """The target's effective gamma: [dim], or [experts, dim] for an expert-stacked scale."""
  gamma = wiring.form_gamma(wiring.module_at(model, target.scale.path))
  if gamma is None:
    raise ValueError(f'{target.scale.name} has no learnable scale (the `none` form)')
  return np.asarray(gamma, np.float32)[_layer_index(target, target.scale.stack)]


# The edits below work on the host, in NumPy: the vectors are small, and device ops
# would compile one program per op and shape.

def edited_gamma(gamma, edit: Edit) -> np.ndarray:
  """The gamma an edit gives ([..., dim] -> same shape, float32)."""
  gamma = np.asarray(gamma, np.float32)
  if edit.kind == 'reset':
    return np.ones_like(gamma)
  if edit.kind == 'zero':
    return np.zeros_like(gamma)
  if edit.kind == 'direction':
    rms = np.sqrt(np.mean(np.square(gamma), axis=-1, keepdims=True))
    return np.where(rms > 0, gamma / np.where(rms > 0, rms, 1), gamma).astype(np.float32)
  if edit.kind == 'topk':
    # Stable: channels of equal deviation are taken in order, so the choice is
    # reproducible.
    flat = gamma.reshape(-1).copy()
    top = np.argsort(-np.abs(flat - 1.0), kind='stable')[:edit.channels(flat.size)]
    flat[top] = 1.0
    return flat.reshape(gamma.shape)
  raise ValueError(f'unknown edit {edit.kind!r}; valid: {", ".join(GAMMA_EDITS)}')


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _replaced(tree: dict, path: tuple[str, ...], value) -> dict:
  """A copy of the nested dict with `value` at `path`; the rest is shared, not copied."""
  if not path:
    return value
  return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}


def with_gamma(graphdef, params: dict, target: Target, gamma: np.ndarray) -> dict:
  """New params (pure dict, as `nnx.split` gives them) in which the target's effective
  gamma is `gamma`; every other param, other layers of the same scale included, is the
  same array."""
  model = nnx.merge(graphdef, params)
  # A fresh (unstacked) form of the model's kind says which stored values give gamma.
  fresh = make_scale(model.config.norm_spec, target.scale.dim, target.scale.role)
  values = fresh.params_for(gamma)
  axes = _get(R.axes_tree(model), target.scale.path)
  for name, value in values.items():
    path = target.scale.path + (name,)
    new = np.array(_get(params, path))  # a copy: the caller's params stay as they are
    new[_layer_index(target, axes[name])] = np.asarray(value)
    params = _replaced(params, path, new)
  return params


def apply_edit(graphdef, params: dict, target: Target, edit: Edit) -> tuple[dict, int]:
  """(edited params, how many of the target's channels changed beyond float32 rounding:
  `magdir_unit` recomputes its norm, which moves the untouched channels by an ulp)."""
  gamma = gamma_of(nnx.merge(graphdef, params), target)
  new = edited_gamma(gamma, edit)
  edited = with_gamma(graphdef, params, target, new)
  after = gamma_of(nnx.merge(graphdef, edited), target)
  return edited, int(np.sum(~np.isclose(after, gamma, rtol=1e-6, atol=0)))


def fold_reset(graphdef, params: dict, target: Target) -> dict:
  """Params in which the target's gamma is folded into its consumers' kernel rows and
  those rows are then divided by gamma: diag(gamma) W replaced by W.

  The whole scale (every layer) is folded, which leaves the function unchanged, then
  the target layer's rows are reset. A channel with gamma = 0 keeps its (zero) rows:
  its W cannot be recovered from diag(gamma) W.
  """
  if not target.foldable:
    raise ValueError(f'{target.scale.name} does not fold into untied kernels (role '
                     f'{target.scale.role}, consumers {[c.ops for c in target.scale.consumers]})')
  model = folding.copy_model(nnx.merge(graphdef, params))
  gamma = gamma_of(model, target)  # [(experts,) dim]
  folding.fold_scale(model, target.scale)
  for c in target.scale.consumers:
    kernel = wiring.module_at(model, c.kernel.path)
    rows = np.asarray(c.to_rows(gamma))[..., :, None]  # [(experts,) d_in, 1]
    w = np.array(kernel.get_value())  # [*stack, (experts,) d_in, d_out]
    index = _layer_index(target, kernel.get_metadata()['axes'])
    w[index] = w[index] / np.where(rows == 0, 1.0, rows)
    kernel.set_value(jnp.asarray(w))
  return nnx.to_pure_dict(nnx.state(model))


def changed_params(before: dict, after: dict) -> list[str]:
  """'/'-joined paths of the leaves that differ (for checks and the edit's record)."""
  flat = lambda t: {'/'.join(str(getattr(k, 'key', k)) for k in p): v
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  a, b = flat(before), flat(after)
  return sorted(k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k])))


# --- measuring ---------------------------------------------------------------------

def _log_probs(graphdef, params, inputs_BxL):
  return jax.nn.log_softmax(nnx.merge(graphdef, params)(inputs_BxL), axis=-1)


def _terms(graphdef, params, ref_logp_BxLxV, inputs_BxL, targets_BxL):
  """(cross-entropy, mean KL(p_ref || p)) of one batch."""
  logits_BxLxV = nnx.merge(graphdef, params)(inputs_BxL)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  kl_BxL = jnp.sum(jnp.exp(ref_logp_BxLxV) * (ref_logp_BxLxV - logp_BxLxV), axis=-1)
  return cross_entropy(logits_BxLxV, targets_BxL), jnp.mean(kl_BxL)


# One program per model structure (graphdef, static) and batch shape, shared by every
# edit and every evaluator of the same model.
@functools.partial(jax.jit, static_argnums=0)
def _reference(graphdef, params, inputs_NxBxL):
  return jax.lax.map(lambda x: _log_probs(graphdef, params, x), inputs_NxBxL)


@functools.partial(jax.jit, static_argnums=0)
def _measure_cached(graphdef, params, ref_NxBxLxV, inputs_NxBxL, targets_NxBxL):
  loss_N, kl_N = jax.lax.map(lambda b: _terms(graphdef, params, *b),
                             (ref_NxBxLxV, inputs_NxBxL, targets_NxBxL))
  return jnp.mean(loss_N), jnp.mean(kl_N)


@functools.partial(jax.jit, static_argnums=0)
def _measure_recomputed(graphdef, params, ref_params, inputs_NxBxL, targets_NxBxL):
  def one(b):
    x, y = b
    return _terms(graphdef, params, _log_probs(graphdef, ref_params, x), x, y)
  loss_N, kl_N = jax.lax.map(one, (inputs_NxBxL, targets_NxBxL))
  return jnp.mean(loss_N), jnp.mean(kl_N)


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def make_evaluator(graphdef, ref_params: dict, batches: list[dict],
                   cache_bytes: int = CACHE_BYTES) -> Callable[[dict], tuple[float, float]]:
  """params -> (mean held-out loss, mean KL(p_ref || p) over the batches' tokens).

  `batches`: [{'inputs', 'targets'}] of equal shapes [B, L] (a run's eval batches).
  The reference log-probs [N, B, L, V] are computed once when they fit `cache_bytes`,
  else alongside every evaluation (twice the compute, memory of one batch).
  """
  if not batches:
    raise ValueError('no held-out batches to evaluate on')
  inputs = jnp.stack([jnp.asarray(b['inputs']) for b in batches])
  targets = jnp.stack([jnp.asarray(b['targets']) for b in batches])
  vocab = nnx.merge(graphdef, ref_params).config.vocab_size
  if 4 * math.prod(inputs.shape) * vocab <= cache_bytes:
    ref = _reference(graphdef, ref_params, inputs)
    run = lambda p: _measure_cached(graphdef, p, ref, inputs, targets)
  else:
    run = lambda p: _measure_recomputed(graphdef, p, ref_params, inputs, targets)
  return lambda params: tuple(map(float, run(params)))


def measure(graphdef, params: dict, batches: list[dict], edits: list[Edit],
            fold: bool = True, log: Callable[[str], None] | None = None) -> dict:
  """Every target of the model under every edit (and `fold_reset` where it applies).

  Returns {'base_loss', 'base_kl', 'eval_tokens', 'results': [{target, scale, layer,
  role, neutral, dim, deviation, direction_deviation, edit, loss, delta, kl, changed}]}:
  `deviation` = rms(gamma - 1), `direction_deviation` the same of gamma / rms(gamma)
  (what a function-neutral magnitude leaves to matter).
  """
  evaluate = make_evaluator(graphdef, params, batches)
  base_loss, base_kl = evaluate(params)
  model = nnx.merge(graphdef, params)
  out = []
  for t in targets(model.config):
    gamma = gamma_of(model, t)
    common = dict(target=t.name, scale=t.scale.name, layer=t.layer, role=t.scale.role,
                  neutral=t.scale.neutral, dim=int(gamma.size),
                  deviation=_rms(gamma - 1),
                  direction_deviation=_rms(edited_gamma(gamma, Edit('direction')) - 1))
    runs = [(e.label, lambda e=e: apply_edit(graphdef, params, t, e)) for e in edits]
    if fold and t.foldable:
      # Its rows change where the reset changes gamma.
      runs.append((FOLD, lambda: (fold_reset(graphdef, params, t), int(np.sum(gamma != 1)))))
    for label, edit in runs:
      edited, changed = edit()
      loss, kl = evaluate(edited)
      out.append(dict(common, edit=label, loss=loss, delta=loss - base_loss, kl=kl,
                      changed=changed))
      if log:
        log(f'  {t.name:36s} {label:10s} loss {loss:.4f} ({loss - base_loss:+.4f}) '
            f'KL {kl:.4g}')
  return dict(base_loss=base_loss, base_kl=base_kl, results=out,
              eval_tokens=len(batches) * math.prod(np.shape(batches[0]['inputs'])))

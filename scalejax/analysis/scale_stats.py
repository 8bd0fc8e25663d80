"""Summary statistics of scale vectors: per role, param and layer; effective gammas; the
preconditioner bounds of input-role scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalejax.core import roles as R
from scalejax.model import wiring
from scalejax.scales.norms import SCALE_FORMS


def scale_statistics(params, roles, axes) -> dict[str, dict[str, float]]:
  """{'<path>[/layer<i>]': {role, mean, std, min, max, norm}} for every scale param.

  A param stacked over layers (logical axis `layers`) is split into one entry per
  layer, found from its axes metadata rather than from its rank. Only scale params
  are fetched to the host (they are small and replicated).
  """
  out = {}
  flat = jax.tree_util.tree_leaves_with_path(params)
  for (path, p), role, ax in zip(flat, jax.tree.leaves(roles),
                                 jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    if role not in R.SCALE_ROLES:
      continue
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    p = np.asarray(jax.device_get(p), np.float32)
    if 'layers' in ax:
      layer_axis = ax.index('layers')
      slices = [(f'{name}/layer{i}', np.take(p, i, axis=layer_axis))
                for i in range(p.shape[layer_axis])]
    else:
      slices = [(name, p)]
    for key, v in slices:
      out[key] = dict(role=role, **summary(v))
  return out


def summary(v) -> dict[str, float]:
  # On the host, in NumPy: the vectors are small, and device ops here would compile
  # and sync once per statistic and shape at every eval.
  v = np.asarray(v, np.float32)
  return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
              max=float(v.max()), norm=float(np.linalg.norm(v.ravel())))


def role_means(stats: dict) -> dict[str, float]:
  """Mean of each statistic over the entries of each role (for TensorBoard)."""
  acc: dict[str, list[float]] = {}
  for entry in stats.values():
    for k in ('mean', 'std', 'min', 'max', 'norm'):
      acc.setdefault(f'{entry["role"]}/{k}', []).append(entry[k])
  return {k: sum(v) / len(v) for k, v in acc.items()}


# --- effective scale vectors and the preconditioner of input-role scales -----------
#
# A scale form's params (gamma, or beta and alpha) are not the scale the model applies;
# `effective_scales` asks each form for its gamma, so every form and storage is read
# the same way. An input-role scale gamma feeding a linear map W (math layout
# [d_out, d_in]) induces, under gradient flow, the preconditioner
# P_j = gamma_j^2 I + w_j w_j^T on column j of the product W diag(gamma); its
# eigenvalues are gamma_j^2 and gamma_j^2 + ||w_j||^2. When one gamma feeds several
# maps (q, k and v without HG), W is their concatenation along d_out.

# Which kernels each input-role scale feeds comes from the model's wiring
# (scalejax/model/wiring.py), checked there against the roles.


def effective_scales(model) -> dict[str, tuple[str, jax.Array]]:
  """'<module path>' -> (role, gamma) for every scale form with a learnable scale."""
  forms = tuple(SCALE_FORMS.values())  # read now: a form registered later is a form too
  out = {}
  for path, mod in nnx.iter_modules(model):
    gamma = wiring.form_gamma(mod) if isinstance(mod, forms) else None
    if gamma is not None:
      out['/'.join(map(str, path))] = (mod.role, gamma)
  return dict(sorted(out.items()))


def effective_scale_statistics(model) -> dict[str, dict[str, float]]:
  """Like `scale_statistics`, on the effective gammas: {'<path>[/layer<i>]': {role, ...}}."""
  out = {}
  for name, (role, gamma) in effective_scales(model).items():
    for key, v in _per_layer(name, gamma, gamma.ndim > 1):  # [layers, (experts,) dim]
      out[key] = dict(role=role, **summary(v))
  return out


def column_sq_norms(model, scale: wiring.Scale) -> jax.Array:
  """||w_j||^2 of the map a scale feeds: [layers, d_in] if stacked, else [d_in]."""
  total = 0.0
  for c in scale.folds_into:
    w = jnp.asarray(wiring.module_at(model, c.kernel.path)[...], jnp.float32)
    # Linear kernels are [..., d_in, d_out]; the tied table is [vocab, d] = [d_out, d_in].
    sq = jnp.sum(jnp.square(w), axis=-2 if c.transposed else -1)
    # One MLP norm feeds every expert: their kernels are parts of one concatenated W.
    sq = jnp.sum(sq, axis=wiring.extra_stack_axes(scale, c))
    # v's output side reaches the W_o rows of every query head of its group.
    total = total + c.from_rows(sq)
  return total


def preconditioner_bounds(model) -> dict[str, tuple[jax.Array, jax.Array]]:
  """'<norm>/<branch>' -> (gamma^2, gamma^2 + ||w_j||^2), the eigenvalue bounds of P_j."""
  out = {}
  for s in wiring.scales(model.config):
    if not s.folds:
      continue  # the bounds are those of W diag(gamma); this gamma is not one
    gamma = wiring.form_gamma(wiring.module_at(model, s.path))
    if gamma is None:
      continue
    g2 = jnp.square(gamma)
    out[s.name] = (g2, g2 + column_sq_norms(model, s))
  return out


def _per_layer(name: str, v: jax.Array, layered: bool):
  if not layered:
    return [(name, v)]
  return [(f'{name}/layer{i}', v[i]) for i in range(v.shape[0])]


def _bound_summaries(graphdef, state) -> dict[str, dict[str, jax.Array]]:
  """Per scale, the statistics over j of each layer's bounds ([layers] or scalars)."""
  out = {}
  for name, (g2, upper) in preconditioner_bounds(nnx.merge(graphdef, state)).items():
    if upper.ndim > 2:  # [layers, experts, dim]: per layer, over every expert's channels
      g2, upper = (x.reshape(x.shape[0], -1) for x in (g2, upper))
    out[name] = dict(mean=upper.mean(-1), std=upper.std(-1), min=upper.min(-1),
                     max=upper.max(-1), gamma2_mean=g2.mean(-1))
  return out


# One compiled program per model structure (graphdef), reused at every eval: op by op,
# each statistic would compile and sync on its own. Only reductions over j come back,
# which are replicated however the kernels are sharded.
_jitted_summaries = jax.jit(_bound_summaries, static_argnums=0)


def preconditioner_statistics(model) -> dict[str, dict[str, float]]:
  """{'<norm>/<branch>[/layer<i>]': stats of the upper bound gamma_j^2 + ||w_j||^2 over j}.

  `spread` = max / min over j (how anisotropic the preconditioner is across columns);
  `gamma2_mean` is the mean lower bound gamma_j^2, for comparison. Every scale that
  folds is listed (Post-Norm's norms, which also multiply the residual stream, are not).
  """
  out = {}
  graphdef, state = nnx.split(model)
  for name, stats in jax.device_get(_jitted_summaries(graphdef, state)).items():
    table = np.stack([np.asarray(stats[k], np.float32)  # [layers, 5] or [5]
                      for k in ('mean', 'std', 'min', 'max', 'gamma2_mean')], axis=-1)
    for key, row in _per_layer(name, table, table.ndim == 2):
      mean, std, lo, hi, g2 = map(float, row)
      out[key] = dict(mean=mean, std=std, min=lo, max=hi, spread=hi / lo, gamma2_mean=g2)
  return out


def precond_means(pstats: dict) -> dict[str, float]:
  """Mean over scales and layers of each preconditioner statistic (for TensorBoard)."""
  acc: dict[str, list[float]] = {}
  for entry in pstats.values():
    for k, v in entry.items():
      acc.setdefault(f'precond/{k}', []).append(v)
  return {k: sum(v) / len(v) for k, v in acc.items()}

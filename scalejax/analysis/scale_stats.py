"""Summary statistics of scale vectors: per role, param and layer; effective gammas; the
preconditioner bounds of input-role scales."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalejax.core import roles as R
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
  v = jnp.asarray(v, jnp.float32)
  return dict(mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
              max=float(v.max()), norm=float(jnp.linalg.norm(v.ravel())))


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

# Which linear maps the output of each input-role norm feeds, as module paths, in a
# Pre-Norm or sandwich model. A norm with the single branch `scale` feeds all its maps;
# an HG branch feeds the map of its own name. `head` absent (tied embeddings): the final
# norm feeds the embedding table, used transposed.
FEEDS = {
    ('blocks', 'attn_norm'): (('blocks', 'attn', 'q'), ('blocks', 'attn', 'k'),
                              ('blocks', 'attn', 'v')),
    ('blocks', 'mlp_norm'): (('blocks', 'mlp', 'gate'), ('blocks', 'mlp', 'up')),
    ('final_norm',): (('head',),),
}
TIED_HEAD = ('embed',)


@dataclasses.dataclass(frozen=True)
class Consumer:
  """One input-role scale (a norm's branch) and the kernels of the map it feeds.

  `kernels` are param paths; a kernel stored [d_in, d_out] (Linear) has `transposed`
  False, the tied embedding table [vocab, d] used as the head has it True.
  """
  norm: tuple[str, ...]
  branch: str
  kernels: tuple[tuple[str, ...], ...]
  transposed: bool = False

  @property
  def name(self) -> str:
    return '/'.join(self.norm + (self.branch,))


def module_at(model, path):
  for p in path:
    model = getattr(model, p)
  return model


def input_scale_consumers(model) -> list[Consumer]:
  """Every input-role scale of `model` with the kernels it feeds, checked against roles.

  Roles are the data: the input-role params of the model must be exactly those of the
  norms in FEEDS, so a new input norm without a FEEDS entry is an error, not a skip.
  """
  if model.config.placement == 'post':
    raise ValueError('input-scale consumers are defined for model.placement=pre or '
                     'sandwich; a Post-Norm scale also multiplies the residual stream')
  role_flat = _flat(R.role_tree(model))
  input_norms = {path[:-2] for path, role in role_flat.items() if role == R.INPUT_SCALE}
  unknown = input_norms - set(FEEDS)
  if unknown:
    raise ValueError(f'input-role scales {sorted(map("/".join, unknown))} have no entry in '
                     'scale_stats.FEEDS; add the linear maps their output feeds')
  out = []
  for norm_path, maps in FEEDS.items():
    norm = module_at(model, norm_path)
    if norm is None:
      continue
    if norm_path not in input_norms:
      if all(isinstance(getattr(norm, b), SCALE_FORMS['none']) for b in norm.branches):
        continue  # the `none` form: normalization only, nothing to report or fold
      raise ValueError(f'{"/".join(norm_path)} is listed in FEEDS but its params do not '
                       'have role input_scale')
    transposed = False
    if maps == (('head',),) and model.head is None:
      maps, transposed = (TIED_HEAD,), True
    for branch in norm.branches:
      fed = maps if branch == 'scale' else tuple(m for m in maps if m[-1] == branch)
      if not fed:
        raise ValueError(f'HG branch {branch!r} of {"/".join(norm_path)} names no map in FEEDS')
      kernels = tuple(m + (('table',) if transposed else ('kernel',)) for m in fed)
      out.append(Consumer(norm_path, branch, kernels, transposed))
  return out


def _flat(tree) -> dict[tuple[str, ...], object]:
  return {tuple(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def is_stacked(module) -> bool:
  """Whether the module's params carry a leading `layers` axis (stacked blocks)."""
  axes = jax.tree.leaves(R.axes_tree(module), is_leaf=lambda x: isinstance(x, tuple))
  stacked = {'layers' in a for a in axes}
  if len(stacked) != 1 or any('layers' in a and a.index('layers') != 0 for a in axes):
    raise ValueError('expected all params of a scale form to be stacked on axis 0 or none')
  return stacked.pop()


def form_gamma(form) -> jax.Array | None:
  """Effective gamma of one scale form: [layers, dim] if stacked, else [dim]."""
  graphdef, state = nnx.split(form)
  pure = nnx.to_pure_dict(state)
  if is_stacked(form):
    return jax.vmap(lambda s: nnx.merge(graphdef, s)())(pure)
  return form()


_LEARNED_FORMS = tuple(f for name, f in SCALE_FORMS.items() if name != 'none')


def effective_scales(model) -> dict[str, tuple[str, jax.Array]]:
  """'<module path>' -> (role, gamma) for every scale form with a learnable scale."""
  out = {}
  for path, mod in nnx.iter_modules(model):
    if isinstance(mod, _LEARNED_FORMS):
      out['/'.join(map(str, path))] = (mod.role, form_gamma(mod))
  return dict(sorted(out.items()))


def effective_scale_statistics(model) -> dict[str, dict[str, float]]:
  """Like `scale_statistics`, on the effective gammas: {'<path>[/layer<i>]': {role, ...}}."""
  out = {}
  for name, (role, gamma) in effective_scales(model).items():
    for key, v in _per_layer(name, gamma, gamma.ndim == 2):
      out[key] = dict(role=role, **summary(v))
  return out


def column_sq_norms(model, consumer: Consumer) -> jax.Array:
  """||w_j||^2 of the map a consumer feeds: [layers, d_in] if stacked, else [d_in]."""
  total = 0.0
  for path in consumer.kernels:
    w = jnp.asarray(module_at(model, path)[...], jnp.float32)
    # Linear kernels are [..., d_in, d_out]; the tied table is [vocab, d] = [d_out, d_in].
    total = total + jnp.sum(jnp.square(w), axis=-2 if consumer.transposed else -1)
  return total


def preconditioner_bounds(model) -> dict[str, tuple[jax.Array, jax.Array]]:
  """'<norm>/<branch>' -> (gamma^2, gamma^2 + ||w_j||^2), the eigenvalue bounds of P_j."""
  out = {}
  for c in input_scale_consumers(model):
    gamma = form_gamma(getattr(module_at(model, c.norm), c.branch))
    if gamma is None:
      continue
    g2 = jnp.square(gamma)
    out[c.name] = (g2, g2 + column_sq_norms(model, c))
  return out


def _per_layer(name: str, v: jax.Array, layered: bool):
  if not layered:
    return [(name, v)]
  return [(f'{name}/layer{i}', v[i]) for i in range(v.shape[0])]


def preconditioner_statistics(model) -> dict[str, dict[str, float]]:
  """{'<norm>/<branch>[/layer<i>]': stats of the upper bound gamma_j^2 + ||w_j||^2 over j}.

  `spread` = max / min over j (how anisotropic the preconditioner is across columns);
  `gamma2_mean` is the mean lower bound gamma_j^2, for comparison. Empty for Post-Norm
  models, whose input-role scales also multiply the residual stream.
  """
  out = {}
  if model.config.placement == 'post':
    return out
  for name, (g2, upper) in preconditioner_bounds(model).items():
    layered = upper.ndim == 2
    for key, u in _per_layer(name, upper, layered):
      out[key] = dict(mean=float(u.mean()), std=float(u.std()), min=float(u.min()),
                      max=float(u.max()), spread=float(u.max() / u.min()))
    for key, g in _per_layer(name, g2, layered):
      out[key]['gamma2_mean'] = float(g.mean())
  return out


def precond_means(pstats: dict) -> dict[str, float]:
  """Mean over scales and layers of each preconditioner statistic (for TensorBoard)."""
  acc: dict[str, list[float]] = {}
  for entry in pstats.values():
    for k, v in entry.items():
      acc.setdefault(f'precond/{k}', []).append(v)
  return {k: sum(v) / len(v) for k, v in acc.items()}

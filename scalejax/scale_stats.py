"""Summary statistics of scale-vector params, per role, param and layer."""

from __future__ import annotations

import jax
import numpy as np

from scalejax import roles as R


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
      out[key] = dict(role=role, mean=float(v.mean()), std=float(v.std()),
                      min=float(v.min()), max=float(v.max()),
                      norm=float(np.linalg.norm(v.ravel())))
  return out


def role_means(stats: dict) -> dict[str, float]:
  """Mean of each statistic over the entries of each role (for TensorBoard)."""
  acc: dict[str, list[float]] = {}
  for entry in stats.values():
    for k in ('mean', 'std', 'min', 'max', 'norm'):
      acc.setdefault(f'{entry["role"]}/{k}', []).append(entry[k])
  return {k: sum(v) / len(v) for k, v in acc.items()}

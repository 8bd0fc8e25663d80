"""Parameter roles carried as data.

Every parameter scalejax creates is a `Param` whose metadata names its role and its
logical axes. Optimizer masks, weight decay, sharding and the inspection tools read
these fields; nothing downstream guesses a role from a name or a tensor rank, so the
answer stays right when layers are stacked (a stacked scale vector is rank 2).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

INPUT_SCALE = 'input_scale'    # folds into the linear maps it feeds (Input-Norm)
OUTPUT_SCALE = 'output_scale'  # does not fold: QK-norm, sub-layer output norms, u on q/k/gate
MATRIX = 'matrix'              # weights of linear maps, the LM head included
EMBEDDING = 'embedding'        # token embedding table
OTHER = 'other'                # biases and anything else
# A scale built inside a decoder before the decoder labels it from its wiring
# (model/wiring.py, `label_roles`); `role_tree` refuses it, so it never reaches an optimizer.
UNLABELLED = 'unlabelled'

ROLES = (INPUT_SCALE, OUTPUT_SCALE, MATRIX, EMBEDDING, OTHER)
SCALE_ROLES = (INPUT_SCALE, OUTPUT_SCALE)


class Param(nnx.Param):
  """An `nnx.Param` with `role` and logical `axes` metadata.

  Stacking transforms (`nnx.vmap` with a partition name) call `add_axis`; we insert
  the new axis name into `axes` so that logical axes always match the array's rank.
  """

  def __init__(self, value: Any, *, role: str, axes: tuple[str | None, ...], **kw):
    if role not in ROLES + (UNLABELLED,):
      raise ValueError(f'unknown role {role!r}; valid roles: {ROLES}')
    if len(axes) != jax.numpy.ndim(value):
      raise ValueError(f'axes {axes} do not match a value of shape {jax.numpy.shape(value)}')
    super().__init__(value, role=role, axes=tuple(axes), **kw)

  def add_axis(self, index, axis_name):
    axes = list(self.get_metadata()['axes'])
    axes.insert(index, axis_name)
    self.set_metadata(axes=tuple(axes))
    super().add_axis(index, axis_name)

  def remove_axis(self, index, axis_name):
    axes = list(self.get_metadata()['axes'])
    del axes[index]
    self.set_metadata(axes=tuple(axes))
    super().remove_axis(index, axis_name)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _metadata_tree(module: nnx.Module, key: str, default: Any = None):
  """Pure-dict tree, matching `params_of(module)`, of one metadata field per param."""

  def get(path, v):
    meta = v.get_metadata()
    if key in meta:
      return meta[key]
    if default is not None:
      return default
    name = '/'.join(str(p) for p in path)
    raise ValueError(
        f'param {name} carries no {key!r} metadata; create it as scalejax.roles.Param '
        f'or pass default= to label foreign params explicitly')

  state = nnx.state(module, nnx.Param)
  return nnx.to_pure_dict(jax.tree_util.tree_map_with_path(get, state, is_leaf=_is_var))


def role_tree(module: nnx.Module, default: str | None = None, *,
              unlabelled_ok: bool = False) -> dict:
  """Role of every parameter, as a pure dict with the structure of `params_of(module)`.

  `default` labels params created by other code (e.g. `nnx.Linear` in a user's model)
  that carry no role; without it such params are an error, never a silent guess. A
  scale still `unlabelled` (built outside a model that labels it) is an error too.
  """
  tree = _metadata_tree(module, 'role', default)
  if not unlabelled_ok:
    left = [path for path, r in jax.tree_util.tree_leaves_with_path(tree) if r == UNLABELLED]
    if left:
      names = ', '.join(jax.tree_util.keystr(p, simple=True, separator='/') for p in left[:3])
      raise ValueError(f'scale params {names} have no role: a scale form built inside '
                       'Attention/MLP/Block gets its role from the decoder\'s wiring; '
                       'give a standalone Norm an explicit role')
  return tree


def frozen_tree(module: nnx.Module) -> dict:
  """True for every param the optimizer must leave unchanged (metadata `frozen`)."""
  return _metadata_tree(module, 'frozen', False)


def part_tree(module: nnx.Module) -> dict:
  """Which part of its scale form each param is: 'magnitude' / 'direction' for a
  two-part form (magdir), 'vector' for a plain one, '' for non-scale params."""
  return _metadata_tree(module, 'part', '')


def axes_tree(module: nnx.Module) -> dict:
  """Logical axis names of every parameter (a tuple per param)."""
  return _metadata_tree(module, 'axes')


def params_of(module: nnx.Module) -> dict:
  """The module's parameters as a pure dict of arrays (what optimizers and checkpoints see)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def role_summary(params: dict, roles: dict) -> dict[str, tuple[int, int]]:
  """role -> (number of tensors, number of scalars)."""
  out = {r: (0, 0) for r in ROLES}
  for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(roles)):
    n, size = out[r]
    out[r] = (n + 1, size + int(p.size))
  return out

"""Device mesh and the one table that maps logical axis names to mesh axes.

Every param carries logical `axes` metadata (roles.py); activations are constrained
with the same names. Change parallelism by editing `LOGICAL_RULES` or the mesh shape,
never the model.
"""

from __future__ import annotations

import logging
import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': ('data', 'fsdp', 'expert'),
    'seq': None,
    'embed': ('fsdp', 'expert'),  # dense params are also FSDP-sharded over the expert axis
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'vocab': 'tensor',
    'expert': 'expert',
    'norm': None,
    'layers': None,
    # activations (sharding.constrain): FSDP shards params, never an activation's features
    'act_batch': ('data', 'fsdp', 'expert'),
    'act_seq': None,
    'act_embed': None,
    'act_vocab': 'tensor',
    'act_expert': 'expert',
    'act_heads': 'tensor',     # attention's per-head activations (a fused kernel's shard_map)
    'act_kv_heads': 'tensor',
}


def default_config() -> ml_collections.ConfigDict:
  # -1 takes whatever the other axes leave of the device count.
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError('at most one mesh axis may be -1; set the others to sizes')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n_devices % known:
      raise ValueError(f'mesh axes {dict(zip(MESH_AXES, sizes))} fix {known} devices, '
                       f'which does not divide the {n_devices} devices; change mesh.*')
    sizes[fill[0]] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but '
                     f'{n_devices} are available; make the product of mesh.* equal '
                     f'{n_devices} (or set one axis to -1)')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes, shape=None, mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical `axes`; a mesh axis that does not divide its dim is dropped."""
  out, used = [], set()
  for i, name in enumerate(axes):
    target = LOGICAL_RULES.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    if mesh is not None:
      targets = tuple(t for t in targets if mesh.shape[t] > 1)
      size = math.prod(mesh.shape[t] for t in targets)
      if shape is not None and targets and shape[i] % size:
        logging.info('dim %d of %s (%s) not divisible by mesh %s: replicated',
                     shape[i], axes, shape, targets)
        targets = ()
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*out)


def tree_shardings(axes_tree, abstract_tree, mesh: Mesh):
  """NamedShardings for a tree of arrays given the matching tree of logical axes."""
  return jax.tree.map(
      lambda ax, a: NamedSharding(mesh, logical_spec(ax, a.shape, mesh)),
      axes_tree, abstract_tree, is_leaf=lambda x: isinstance(x, tuple))


def platform() -> str:
  """The backend the current trace compiles for: the context mesh's, else the default
  (an ahead-of-time compile for a TPU topology on a CPU host traces for 'tpu')."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def constrain(x: jax.Array, axes) -> jax.Array:
  """Pins an activation's layout by logical names inside `jax.set_mesh`; a no-op without one.

  Used where GSPMD's propagation alone may pick a layout that costs a collective per
  layer (the residual stream, logits, MoE dispatch buffers).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(('batch', 'seq')))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assemble per-process numpy batches into global jax arrays sharded over `batch`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}

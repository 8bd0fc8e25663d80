"""Orbax checkpoints of the train state plus the data iterator's position."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int = 3, async_save: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Returns (state, data_state) with `abstract_state`'s shardings."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out['state'], out['data']


def steps(workdir: str) -> list[int]:
  """Steps of the checkpoints kept in a run directory, oldest first."""
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  return sorted(mngr.all_steps())


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """Params only, from the newest (or the given step's) checkpoint of another run."""
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  if step is None:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'init_from={workdir!r} has no checkpoint under '
                              f'{workdir}/checkpoints; point it at a finished run')
  elif step not in mngr.all_steps():
    raise ValueError(f'{workdir} has no checkpoint at step {step}; kept steps: '
                     f'{sorted(mngr.all_steps())}')
  saved = mngr.item_metadata(step)['state']['params']
  _check_same_shapes(abstract_params, saved, workdir)
  target = {'params': abstract_params}
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
  return out['state']['params'], step


def _check_same_shapes(want, saved, workdir):
  want_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
  saved_flat = {jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_leaves_with_path(saved)}
  for name, w in want_flat.items():
    if name not in saved_flat:
      raise ValueError(f'init_from={workdir}: param {name} is not in the checkpoint '
                       '(different variant or model shape?)')
    s = saved_flat[name]
    if tuple(s.shape) != tuple(w.shape):
      raise ValueError(f'init_from={workdir}: param {name} has shape {tuple(s.shape)} in '
                       f'the checkpoint but {tuple(w.shape)} in this model')

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


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{path: shape} with tuples, namedtuples and dicts written alike, as Orbax stores them."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return f'[{getattr(k, attr)!r}]'
    return str(k)
  return {''.join(name(k) for k in path): tuple(getattr(v, 'shape', ()))
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_opt_state(mngr: ocp.CheckpointManager, step: int, abstract_opt, optimizer: str) -> None:
  """A clear error when the saved optimizer state is not the one this config builds.

  Switching optimizer (or a setting that changes its state, e.g. grad_clip on/off) on
  resume would otherwise fail deep inside Orbax, or restore moments into the wrong slots.
  """
  saved = _leaf_shapes(mngr.item_metadata(step)['state']['opt_state'])
  want = _leaf_shapes(abstract_opt)
  if saved != want:
    diff = sorted(set(saved.items()) ^ set(want.items()))
    raise ValueError(
        f'checkpoint step {step} in {mngr.directory} holds an optimizer state of a different '
        f'structure than optimizer.name={optimizer!r} builds ({len(saved)} vs {len(want)} '
        f'arrays; first mismatch: opt_state{diff[0][0]}): resume with the optimizer settings '
        'it was saved with, or train in a new workdir with --config.init_from=<this workdir> '
        'to take its params only with a fresh optimizer state')


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Returns (state, data_state) with `abstract_state`'s shardings."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out['state'], out['data']


def restore_params(workdir: str, abstract_params):
  """Params only, from the newest checkpoint of another run (`init_from`)."""
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'init_from={workdir!r} has no checkpoint under '
                            f'{workdir}/checkpoints; point it at a finished run')
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

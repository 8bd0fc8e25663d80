"""Orbax checkpoints of the train state plus the data iterator's position.

Crash safety comes from Orbax: a step is written to a temporary directory and renamed
into place when complete (the commit), and old steps beyond `keep` are deleted only
after a newer one has committed. What Orbax cannot know is whether a committed step
was damaged later (a truncated file, a missing item): `restore_latest` tries the
newest step first, moves a step that fails to `damaged_checkpoints/` with a warning
naming the error, and falls back to the next older one.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from scalejax.train import preemption
from scalejax.core import treepath

log = logging.getLogger('scalejax')


def manager(workdir: str, keep: int = 3, async_save: bool = False) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save cut short by a kill leaves a temporary directory
  # that is never a checkpoint; remove it when the run restarts.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_dir(workdir), options=options, item_handlers=handlers)


def _dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


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
  """Returns (state, data_state) with `abstract_state`'s shardings (any mesh)."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return out['state'], out['data']


def steps(workdir: str) -> list[int]:
  """Steps of the checkpoints kept in a run directory, oldest first."""
  return sorted(ocp.CheckpointManager(_dir(workdir)).all_steps())


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, workdir: str,
                   optimizer: str = '', defaults: dict | None = None):
  """(step, state, data_state) from the newest undamaged step, or None if none exist.

  `defaults`: top-level state entries that checkpoints written before they existed
  lack; such a checkpoint restores with these values.

  A step whose saved shapes differ from `abstract_state` is a config problem, not
  damage: that raises ValueError naming the param and both shapes. A step that fails
  to read is moved to WORKDIR/damaged_checkpoints/STEP (never deleted) and the next
  older step is tried; if every step fails, ValueError lists them all.
  """
  problems = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved = mngr.item_metadata(step)['state']
      if saved is None:
        raise FileNotFoundError('the state item is missing')
    except Exception as e:  # pylint: disable=broad-except
      problem = _describe(e)
    else:
      where = f'checkpoint {_dir(workdir)}/{step}'
      absent = {k: v for k, v in (defaults or {}).items() if k not in saved}
      want = {k: v for k, v in abstract_state.items() if k not in absent}
      # Params first (a model change names its param), then the optimizer's structure
      # (a switched optimizer gets its own advice), then every leaf.
      check_shapes({'params': want['params']}, saved, where, params_only=True)
      check_opt_state(mngr, step, want['opt_state'], optimizer)
      check_shapes(want, saved, where)
      try:
        state, data_state = restore(mngr, step, want)
        state = {**state, **absent}
        problem = None
      except Exception as e:  # pylint: disable=broad-except
        problem = _describe(e)
    if preemption.all_hosts_agree(problem is None):
      if problems:
        log.warning('resuming from step %d, the newest undamaged checkpoint', step)
      return step, state, data_state
    problem = problem or 'another host could not read it'
    moved = _quarantine(mngr, step, workdir)
    log.warning('checkpoint step %d in %s is damaged (%s); moved it to %s and trying an '
                'older one', step, _dir(workdir), problem, moved)
    problems.append(f'step {step}: {problem}')
  if problems:
    raise ValueError(f'no readable checkpoint in {_dir(workdir)} ({"; ".join(problems)}); '
                     'they were moved to damaged_checkpoints/; rerun to start from step 0 '
                     'or restore a backup')
  return None


def _describe(e: Exception) -> str:
  first = str(e).strip().split('\n')[0]
  return f'{type(e).__name__}: {first[:200]}'


def _quarantine(mngr: ocp.CheckpointManager, step: int, workdir: str) -> str:
  dest = os.path.join(os.path.abspath(workdir), 'damaged_checkpoints', str(step))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.replace(os.path.join(_dir(workdir), str(step)), dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'scalejax_quarantine_{step}')
  mngr.reload()
  return dest


def restore_params(workdir: str, abstract_params, step: int | None = None):
  """Params only, from the newest (or the given step's) checkpoint of another run."""
  mngr = ocp.CheckpointManager(_dir(workdir),
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
  check_shapes(abstract_params, saved, f'init_from={workdir}', params_only=True)
  target = {'params': abstract_params}
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
  return out['state']['params'], step


def check_shapes(want, saved, where: str, params_only: bool = False) -> None:
  """ValueError naming the first leaf of `want` that `saved` lacks or shapes differently.

  Leaves are matched by path ("['params']['blocks']['attn']['q']['kernel']"), so the
  error names the param; a dtype difference is only logged (the restore casts).
  With `params_only`, leaves of `saved` that `want` lacks are fine.
  """
  what = 'param ' if params_only else ''
  want_flat, saved_flat = _by_path(want), _by_path(saved)
  # Params first: their name is the one that explains a mismatch in the optimizer state.
  for name, w in sorted(want_flat.items(), key=lambda kv: not kv[0].startswith("['params']")):
    if name not in saved_flat:
      raise ValueError(f'{where}: {what}{name} is not in the checkpoint (different variant, '
                       'model shape or optimizer?)')
    s = saved_flat[name]
    if tuple(s.shape) != tuple(w.shape):
      raise ValueError(f'{where}: {what}{name} has shape {tuple(s.shape)} in the checkpoint but '
                       f'{tuple(w.shape)} in this model')
    if s.dtype is not None and s.dtype != w.dtype:
      log.warning('%s: %s is %s in the checkpoint, %s here: cast on restore', where, name,
                  s.dtype, w.dtype)
  extra = sorted(set(saved_flat) - set(want_flat))
  if extra and not params_only:
    raise ValueError(f'{where}: the checkpoint has {extra[0]}, which this run lacks '
                     '(different variant, model shape or optimizer?)')


def _by_path(tree) -> dict:
  return {treepath.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}

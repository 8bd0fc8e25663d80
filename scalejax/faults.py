"""Faults during training: stop requests (signals, preemption), non-finite steps, and
keeping the workdir's record files consistent with the checkpoint a run resumes from.

The trainer uses three pieces:
- `StopRequest`: SIGTERM / SIGINT become "finish this step, save, exit"; on several
  hosts JAX's preemption sync point picks the one step at which every host stops.
- `guard_step` (inside the jitted step) and `NonFiniteWatch` (on the host): a step
  whose loss, gradients or updates are not finite leaves params and optimizer state
  as they were; `train.max_bad_steps` such steps in a row stop the run.
- `truncate_records`: a rerun drops the metric records of steps it will redo.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger('scalejax')

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# --- signals and preemption -------------------------------------------------------

class StopRequest:
  """Context manager: SIGTERM/SIGINT ask the loop to stop after the current step.

  One process: Python handlers set a flag; `should_stop` reads it. Several processes:
  JAX's preemption service owns SIGTERM (it installs its own handler when
  `jax.distributed.initialize` runs) and `should_stop` is True on every host after the
  same step (`reached_preemption_sync_point`, called by every host at every step);
  SIGINT is forwarded to it as a SIGTERM. A second signal of the same kind gets its
  previous handler at once (SIGINT: KeyboardInterrupt; SIGTERM: exit).
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._multihost = jax.process_count() > 1
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      log.warning('train() runs outside the main thread: SIGTERM/SIGINT are not handled')
      return self
    if self._multihost and not jax.config.jax_enable_preemption_service:
      # Hosts stopping on their own would wait forever for each other in the save.
      log.warning('jax_enable_preemption_service is off: on several hosts, SIGTERM and '
                  'SIGINT end the run without a checkpoint')
      self._multihost = False
      return self
    for sig in _SIGNALS:
      if self._multihost and sig == signal.SIGTERM:
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name == name:  # asked twice: stop now, the way this signal would
      previous = self._previous.pop(signum, signal.SIG_DFL)
      signal.signal(signum, previous)
      if callable(previous):
        previous(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    self.signal_name = self.signal_name or name
    log.warning('%s received: finishing the current step, then saving a checkpoint '
                '(send it again to stop at once, without saving)', name)
    if self._multihost and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # let JAX's preemption service coordinate

  def should_stop(self, calls: int) -> bool:
    """Whether to stop now; `calls` counts this process's checks: 0 before the first step,
    then 1, 2, ... after each step (the same on every host).

    The count, not the train step, is JAX's sync-point id: a notice that arrives before
    the first check sets the sync point one past the last id seen, and ids that start
    at 0 reach it where train steps resumed from a checkpoint would not.
    """
    if self._multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      stop = multihost_utils.reached_preemption_sync_point(calls)
      if stop and self.signal_name is None:
        self.signal_name = 'preemption notice'
      return stop
    return self.signal_name is not None


# --- non-finite steps -------------------------------------------------------------

def counters() -> dict:
  """The train-state entries guard_step keeps: bad steps in a row and in all."""
  return {'bad_streak': jnp.zeros((), jnp.int32), 'bad_steps': jnp.zeros((), jnp.int32)}


def bad_step_limit(train_cfg) -> int:
  """Non-finite steps in a row that stop the run."""
  return 1 if train_cfg.nan_policy == 'stop' else train_cfg.max_bad_steps


def guard_step(state: dict, new: dict, loss, grads, updates, limit: int):
  """(kept, metrics): `new` (params, opt_state) if the step is finite, else state's.

  Runs inside the jitted step. The test is a few reductions and the select fuses into
  the update, so good steps cost next to nothing; which gradients went bad is computed
  under `lax.cond`, on bad steps only. Once `limit` bad steps in a row have happened
  no update is applied at all, so the state stays the last good one while the host,
  which reads the verdict a step late, stops the run. `kept` carries the counters.
  """
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(updates)
  ok = finite & (state['bad_streak'] < limit)
  kept = {k: jax.tree.map(lambda n, o: jnp.where(ok, n, o), v, state[k]) for k, v in new.items()}
  kept['bad_streak'] = jnp.where(ok, 0, state['bad_streak'] + 1)
  kept['bad_steps'] = state['bad_steps'] + (~finite).astype(jnp.int32)
  bad_leaves = jax.lax.cond(
      finite, lambda g: jax.tree.map(lambda x: jnp.zeros((), bool), g),
      lambda g: jax.tree.map(lambda x: ~jnp.all(jnp.isfinite(x)), g), grads)
  metrics = {'bad_streak': kept['bad_streak'], 'bad_steps': kept['bad_steps'],
             'bad_leaves': bad_leaves}
  return kept, metrics


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFiniteWatch:
  """Reads each step's verdict one step late, so the loop never waits on the device.

  `push(step, metrics)` after dispatching a step returns a stop message once the
  previous step ended a run of `limit` non-finite steps; `flush()` does the same for
  the last step. Every skipped step is logged with the params whose gradients went bad.
  """

  def __init__(self, train_cfg):
    self.policy, self.max_bad_steps = train_cfg.nan_policy, train_cfg.max_bad_steps
    self.limit = bad_step_limit(train_cfg)
    self._pending = None

  def push(self, step: int, metrics: dict) -> str | None:
    previous = self._pending
    self._pending = (step, {k: metrics[k] for k in ('loss', 'bad_streak', 'bad_steps',
                                                    'bad_leaves')})
    return self._check(previous)

  def flush(self) -> str | None:
    previous, self._pending = self._pending, None
    return self._check(previous)

  def _check(self, pending) -> str | None:
    if pending is None:
      return None
    step, m = pending
    streak = int(m['bad_streak'])
    if not streak:
      return None
    m = jax.device_get(m)
    bad = [path_name(p) for p, flag in jax.tree_util.tree_leaves_with_path(m['bad_leaves']) if flag]
    where = (f'non-finite gradients in {_names(bad)}' if bad
             else 'gradients finite but the optimizer update was not')
    what = f'step {step}: loss {float(m["loss"])}, {where}'
    if streak < self.limit:
      log.warning('%s; update skipped (%d in a row, %d in this run)', what,
                  streak, int(m['bad_steps']))
      return None
    first = step - streak + 1
    return (f'{what}; {streak} non-finite step(s) in a row (steps {first}-{step}; '
            f'train.nan_policy={self.policy}, train.max_bad_steps={self.max_bad_steps}), '
            f'so training stopped. Params and optimizer state are those after step '
            f'{first - 1}, the last good one, and are saved; fix the cause (e.g. lower '
            'optimizer.lr, raise optimizer.warmup_steps, check the data) and rerun to '
            'resume (a changed config needs --config.train.allow_config_change=True)')


def path_name(path) -> str:
  """keystr-style name with dict keys and attributes alike: "['opt_state'][1]['mu']".

  A namedtuple field and the dict key Orbax saves it under get the same name.
  """
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.SequenceKey):
      parts.append(f'[{k.idx}]')
    else:
      parts.append(f'[{str(getattr(k, "key", getattr(k, "name", k)))!r}]')
  return ''.join(parts)


def _names(names: list[str], show: int = 4) -> str:
  more = len(names) - show
  return ', '.join(names[:show]) + (f' and {more} more' if more > 0 else '')


class NonFiniteError(RuntimeError):
  """Training stopped after too many non-finite steps; the message says why."""


# --- record files after a crash ---------------------------------------------------

def truncate_records(workdir: str, step: int) -> None:
  """Drops records with 'step' > `step` from the workdir's *.jsonl files.

  A run resumed from the checkpoint at `step` redoes the later steps and writes their
  records again; dropping the old ones first keeps every record exactly once, as an
  uninterrupted run writes it. A torn last line (a kill mid-write) is dropped too.
  Each file is replaced atomically, so a kill here loses nothing.
  """
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if not name.endswith('.jsonl') or not os.path.isfile(path):
      continue
    with open(path) as f:
      lines = f.read().split('\n')
    kept = [line for line in lines if _keep(line, step)]
    if len(kept) != len([l for l in lines if l]):
      atomic_write(path, ''.join(line + '\n' for line in kept))


def _keep(line: str, step: int) -> bool:
  if not line:
    return False
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return not isinstance(record, dict) or not record.get('step', 0) > step


def atomic_write(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def all_hosts_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one small allgather on several hosts)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

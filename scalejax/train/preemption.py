"""Stop requests: SIGTERM / SIGINT (a TPU preemption notice is a SIGTERM) become "finish
this step, save, exit"; on several hosts JAX's preemption sync point picks the one step
at which every host stops."""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np

log = logging.getLogger('scalejax')

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def all_hosts_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one small allgather on several hosts)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

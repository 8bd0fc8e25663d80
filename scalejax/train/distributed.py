"""Multi-process start-up: `jax.distributed.initialize()` when the environment asks for it.

It must run before anything touches a JAX backend (`jax.devices()`,
`jax.process_index()`, the first jit), so `trainer.train` calls it first.

When it initializes:
- `SCALEJAX_DISTRIBUTED=1` forces it and `=0` forbids it;
- `JAX_COORDINATOR_ADDRESS` is set (host:port of process 0), with `JAX_NUM_PROCESSES`
  and `JAX_PROCESS_ID` (read here; JAX's cluster detection fills in what is missing);
- a Cloud TPU VM: JAX then reads the slice's workers and this worker's id from the
  TPU metadata, so every worker of a pod runs the same command with no arguments.
Otherwise (a laptop, one GPU box, CI) it does nothing: one process, local devices.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger('scalejax')


def _on_cloud_tpu_vm() -> bool:
  # `import jax` sets this when libtpu is installed and TPU chips are on the PCI bus.
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # a JAX without the module: only the explicit switches apply
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def wanted() -> str | None:
  """Why this process should join a multi-process run, or None."""
  force = os.environ.get('SCALEJAX_DISTRIBUTED', '')
  if force not in ('', '0', '1'):
    raise ValueError(f'SCALEJAX_DISTRIBUTED={force!r}; set it to 1 (initialize), '
                     '0 (never) or leave it unset (detect)')
  if force:
    return 'SCALEJAX_DISTRIBUTED=1' if force == '1' else None
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS is set'
  if _on_cloud_tpu_vm():
    return 'running on a Cloud TPU VM'
  return None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer; set it to a process count/id') from None


def maybe_initialize() -> bool:
  """Initializes jax.distributed if `wanted()` and not done yet; True if now initialized."""
  if jax.distributed.is_initialized():
    return True
  reason = wanted()
  if reason is None:
    return False
  jax.distributed.initialize(num_processes=_env_int('JAX_NUM_PROCESSES'),
                             process_id=_env_int('JAX_PROCESS_ID'))
  log.info('jax.distributed initialized (%s): process %d of %d, %d local / %d devices',
           reason, jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True

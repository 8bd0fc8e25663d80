"""Settings that make XLA fast on CPU: `apply()` for the process, before JAX starts, and
`compiler_options()` for each compiled step. All are about how work is executed,
never about what is computed:

- **Allocator.** XLA:CPU allocates each step's scratch buffer (tens of MiB) afresh.
  glibc serves blocks this large with `mmap` (or from per-thread heaps it unmaps when
  empty), so every step pays a page fault for each 4 KiB page it touches: on our 2-core
  VM about 12,000 faults and ~25 ms of kernel time in a 100 ms step. `apply()` asks
  glibc (via `mallopt`) to serve everything from one heap and never give it back to the
  OS, which makes the faults disappear after the first step. Memory that the process
  frees is kept for reuse instead of returned; the peak is unchanged.
- **XLA flags** appended to `XLA_FLAGS` (a flag the user already set wins).
- **Compile options** of the train and eval steps (`compiler_options(platform)`; the
  trainer passes them to `jax.jit`): `CPU_COMPILE_OPTIONS` on CPU, per step rather than in
  `XLA_FLAGS`, which every backend's XLA parses (a TPU runtime built from another XLA
  may not know a CPU option). An option the user set in `XLA_FLAGS` wins.

`SCALEJAX_NO_TUNING=1` turns all of them off. `SCALEJAX_CPUS=0-3,6` (a CPU list as `taskset -c`
takes it) pins the process to those CPUs before JAX sizes its thread pools, so trials
run side by side do not share cores (the ablation harness's `--parallel`). Calling
`apply()` after JAX has created its CPU client still helps the allocator partly, so it
is safe but later is worse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Flags for every platform's XLA, appended unless the user set the same flag.
XLA_FLAGS: tuple[str, ...] = ()

# XLA:CPU's options for the jitted train and eval steps. By default XLA:CPU hands dots and
# also reductions (with the elementwise ops feeding them) to YNNPACK; on this project's
# models those reduction fusions (attention's softmax backward, the norms' statistics,
# DNP's row sums) ran slower than XLA's own loops. YNNPACK for the dots alone made
# `unified`'s step 0.95x (configs/shakespeare_char.py) and 0.90x (configs/bench_mid.py) as
# long on a Zen 5 CPU, the baseline's 0.95-1.01x, with the same losses to float32
# rounding (`python -m scalejax.cli.bench --call=compiled,untuned` measures it in one
# process; figures in docs/PERFORMANCE.md).
CPU_COMPILE_OPTIONS: dict[str, object] = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT',
}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied: dict[str, bool] = {}


def _tune_glibc_malloc() -> bool:
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return False
  ok = mallopt(_M_MMAP_MAX, 0)                   # no per-allocation mmap/munmap
  ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)    # never hand the heap top back (C int max)
  ok &= mallopt(_M_ARENA_MAX, 1)                 # no per-thread heaps (unmapped when empty)
  return bool(ok)


def _append_xla_flags(flags) -> list[str]:
  current = os.environ.get('XLA_FLAGS', '')
  set_names = {f.split('=')[0] for f in current.split()}
  added = [f for f in flags if f.split('=')[0] not in set_names]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added


def tuning_off() -> bool:
  return os.environ.get('SCALEJAX_NO_TUNING', '') not in ('', '0')


def compiler_options(platform: str) -> dict[str, object] | None:
  """The XLA options a step compiled for `platform` ('cpu', 'gpu', 'tpu') is given:
  `CPU_COMPILE_OPTIONS` on CPU, less those the user set in XLA_FLAGS; None elsewhere
  or with SCALEJAX_NO_TUNING."""
  if platform != 'cpu' or tuning_off():
    return None
  user = {f.split('=')[0].lstrip('-') for f in os.environ.get('XLA_FLAGS', '').split()}
  options = {k: v for k, v in CPU_COMPILE_OPTIONS.items() if k not in user}
  return options or None


def parse_cpus(spec: str) -> set[int]:
  """'0-3,6' -> {0, 1, 2, 3, 6}."""
  cpus = set()
  try:
    for part in filter(None, spec.replace(' ', '').split(',')):
      lo, _, hi = part.partition('-')
      cpus.update(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    cpus = set()
  if not cpus:
    raise ValueError(f'SCALEJAX_CPUS={spec!r} is not a CPU list; write it as taskset -c '
                     'does, e.g. 0 or 0-3,6')
  return cpus


def _pin() -> bool:
  """Pins to $SCALEJAX_CPUS. A speed setting: a bad value is one line on stderr (naming
  the fix) and the process runs unpinned rather than not at all."""
  spec = os.environ.get('SCALEJAX_CPUS', '')
  if not spec or not hasattr(os, 'sched_setaffinity'):
    return False
  try:
    cpus = parse_cpus(spec)
    os.sched_setaffinity(0, cpus)
  except (ValueError, OSError) as e:
    why = e if isinstance(e, ValueError) else f'SCALEJAX_CPUS={spec!r}: {e.strerror}'
    allowed = ','.join(map(str, sorted(os.sched_getaffinity(0))))
    sys.stderr.write(f'scalejax: not pinned: {why} (this process may use CPUs {allowed})\n')
    return False
  return True


def apply() -> dict[str, bool]:
  """Tunes this process once; returns what was applied (for logs and benchmarks)."""
  if _applied:
    return dict(_applied)
  if _pin():  # asked for by name, so not undone by SCALEJAX_NO_TUNING
    _applied['cpus'] = True
  if tuning_off():
    _applied.update(malloc=False, xla_flags=False)
    return dict(_applied)
  _applied['malloc'] = _tune_glibc_malloc()
  _applied['xla_flags'] = bool(_append_xla_flags(XLA_FLAGS))
  return dict(_applied)

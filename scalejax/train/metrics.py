"""Metric sinks (JSONL + TensorBoard, process 0 only), device peaks and MFU."""

from __future__ import annotations

import json
import os
import platform
import sys
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, matched against `device_kind` (first hit wins).
PEAK_FLOPS = (
    ('v6', 918e12), ('v5p', 459e12), ('v5 lite', 197e12), ('v5e', 197e12),
    ('v5', 459e12), ('v4', 275e12), ('v3', 123e12), ('h200', 989e12), ('h100', 989e12),
    ('gh200', 989e12), ('a100', 312e12), ('l4', 121e12),
)


def matmul_probe(n: int = 1024):
  """A compiled float32 n x n matmul; returns a callable(repeats) -> best FLOP/s."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()

  def probe(repeats: int = 3) -> float:
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
  return probe


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or what `platform` knows of it."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if 'model name' in l)
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


class ProbeRecord:
  """The last `keep` CPU matmul probes that scalejax processes took on this machine.

  A JSON file in the user's cache (`$SCALEJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/scalejax`
  or `~/.cache/scalejax`), keyed by what the probe's speed depends on: CPU model, the
  number of CPUs the process may use, JAX version and XLA flags. `train.py` and the
  bench both read and extend it, so their MFU divides by one figure: the same step time
  gives the same MFU in either, even when one of them probed in a busy second. A cache
  that cannot be written leaves each process with its own probes.
  """

  def __init__(self, path: str | None = None, keep: int = 64):
    root = os.environ.get('SCALEJAX_CACHE_DIR') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'scalejax')
    self.path = path or os.path.join(root, 'cpu_probe.json')
    self.keep = keep
    # The CPUs this process may use, not the machine's: a run pinned to one core
    # (SCALEJAX_CPUS) probes one core's speed and keeps a record of its own.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    self.key = ' | '.join([cpu_model(), f'{usable} cores', f'jax {jax.__version__}',
                           os.environ.get('XLA_FLAGS', '')])

  def _load(self) -> dict:
    try:
      with open(self.path) as f:
        data = json.load(f)
      return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
      return {}

  def read(self) -> list[float]:
    values = self._load().get(self.key, [])
    return [float(v) for v in values if isinstance(v, (int, float)) and v > 0][-self.keep:]

  def add(self, value: float) -> None:
    data = self._load()
    data[self.key] = [*self.read(), value][-self.keep:]
    try:  # write whole, then rename: a reader never sees half a file
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      tmp = f'{self.path}.{os.getpid()}.tmp'
      with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
      os.replace(tmp, self.path)
    except OSError:
      pass


class Peak:
  """Peak FLOP/s per device, the denominator of MFU.

  TPU/GPU: the dense bf16 figure of `PEAK_FLOPS`. CPU: the median of float32 matmul
  probes (`matmul_probe`, each the best of 3): this process's (`first` at start and one
  more at every `sample()`) together with the recent ones of other runs on this machine
  (`ProbeRecord`). One probe reads whatever load the machine had in that second; the
  median of many does not follow one busy second, and the bench and `train.py` share
  the record, so the two report one MFU for one step time.
  """

  def __init__(self, device=None, first: int = 5, record: ProbeRecord | None = None):
    device = device or jax.devices()[0]
    self.samples: list[float] = []
    self._probe = matmul_probe() if device.platform == 'cpu' else None
    if self._probe is None:
      kind = device.device_kind.lower()
      self._fixed, self._source = next(
          ((peak, f'{device.device_kind} bf16 dense peak') for key, peak in PEAK_FLOPS
           if key in kind), (float('nan'), f'unknown device {device.device_kind}'))
      self.earlier: list[float] = []
    else:
      self._record = record or ProbeRecord()
      self.earlier = self._record.read()  # other runs' probes, read once
      for _ in range(first):
        self.sample()

  @property
  def source(self) -> str:
    """Where the figure comes from (on CPU: how many probes it is the median of)."""
    if self._probe is None:
      return self._source
    return (f'cpu float32 matmul probe, median of {len(self.samples)} probes of this run and '
            f'{len(self.earlier)} earlier ones on this machine')

  def sample(self) -> None:
    """One more probe (CPU only; a no-op elsewhere)."""
    if self._probe is not None:
      self.samples.append(self._probe())
      self._record.add(self.samples[-1])

  @property
  def flops(self) -> float:
    if self._probe is None:
      return self._fixed
    readings = self.earlier + self.samples
    return statistics.median(readings) if readings else float('nan')

  def total(self, n_devices: int) -> float:
    """Peak of `n_devices` devices: a CPU probe already measures the whole machine
    (emulated host devices share its cores), an accelerator's figure is per chip."""
    return self.flops if self._probe is not None else self.flops * n_devices


def device_peak_flops(device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the figure comes from)."""
  peak = Peak(device)
  return peak.flops, peak.source


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed (the `[hf]` extra brings it), only
  to accept torch tensors: about 5 s at every start of a run, for scalars that are
  Python floats here. Marking torch absent for that one import skips it; a process that
  has already imported torch keeps it.
  """
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class Writer:
  """Appends JSON records to DIR/NAME.jsonl and scalars to TensorBoard.

  `purge_step`: TensorBoard drops events at or after this step from earlier event
  files (a resumed run redoes them).
  """

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = _summary_writer()(workdir, purge_step=purge_step)

  def write(self, record: dict, name: str = 'metrics') -> None:
    if not self.enabled:
      return
    record = plain(record)
    with open(os.path.join(self.workdir, f'{name}.jsonl'), 'a') as f:
      f.write(json.dumps(record) + '\n')
    step = record.get('step', 0)
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)) and np.isfinite(v):
        self._tb.add_scalar(f'{name}/{k}' if name != 'metrics' else k, v, step)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def write_json(path: str, obj) -> None:
  """`obj` as indented JSON at `path` (folders made), through `plain`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(plain(obj), f, indent=2)


def plain(v):
  """JSON-safe copy: numpy scalars to Python, NaN/inf to null (JSON has no NaN; null
  reads as "not measured")."""
  if isinstance(v, dict):
    return {str(k): plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [plain(x) for x in v]
  if isinstance(v, (np.generic, jax.Array)):
    v = v.item()
  if isinstance(v, float) and not np.isfinite(v):
    return None
  return v

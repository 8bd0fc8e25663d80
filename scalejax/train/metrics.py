"""Metric sinks (JSONL + TensorBoard, process 0 only), device peaks and MFU."""

from __future__ import annotations

import json
import os
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


class Peak:
  """Peak FLOP/s per device, the denominator of MFU.

  TPU/GPU: the dense bf16 figure of `PEAK_FLOPS`. CPU: the median of float32 matmul
  probes (`matmul_probe`, each the best of 3), `first` of them at start and one more at
  every `sample()`. One probe reads whatever load the machine had in that second; the
  median of several taken over a run does not follow one busy second. The bench takes
  the same probe once per round and the same median, so the two report one MFU for one
  step time.
  """

  def __init__(self, device=None, first: int = 5):
    device = device or jax.devices()[0]
    self.samples: list[float] = []
    self._probe = matmul_probe() if device.platform == 'cpu' else None
    if self._probe is None:
      kind = device.device_kind.lower()
      self._fixed, self.source = next(
          ((peak, f'{device.device_kind} bf16 dense peak') for key, peak in PEAK_FLOPS
           if key in kind), (float('nan'), f'unknown device {device.device_kind}'))
    else:
      self.source = 'cpu float32 matmul probe, median of repeated probes'
      for _ in range(first):
        self.sample()

  def sample(self) -> None:
    """One more probe (CPU only; a no-op elsewhere)."""
    if self._probe is not None:
      self.samples.append(self._probe())

  @property
  def flops(self) -> float:
    if self._probe is None:
      return self._fixed
    return statistics.median(self.samples) if self.samples else float('nan')

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

"""Metric sinks (JSONL + TensorBoard, process 0 only), device peaks and MFU."""

from __future__ import annotations

import functools
import json
import os
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


@functools.lru_cache(maxsize=None)
def cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on this CPU: the CPU's practical peak."""
  return matmul_probe(n)(repeats)


def device_peak_flops(device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the figure comes from)."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_matmul_peak(), 'cpu float32 matmul probe'
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak, f'{device.device_kind} bf16 dense peak'
  return float('nan'), f'unknown device {device.device_kind}'


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
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(workdir, purge_step=purge_step)

  def write(self, record: dict, name: str = 'metrics') -> None:
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
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


def _plain(v):
  if isinstance(v, (np.generic, jax.Array)):
    v = v.item()
  if isinstance(v, float) and not np.isfinite(v):
    return None  # JSON has no NaN; null reads as "not measured"
  return v

"""Batches of fixed windows over one in-memory token array.

Window i is tokens[i*L : i*L + L + 1]: stride L, so the last token of a window
is the first of the next and every next-token pair of the stream is trained on
exactly once per epoch. Everything is random access (grain.MapDataset), so the
iterator state is a single index and any process can read its own rows of a
global batch without touching the others.
"""

from __future__ import annotations

import grain
import numpy as np


def mix_seed(seed: int, salt: int = 0) -> int:
  # Grain shuffles epoch e with seed + e, so raw seeds s and s+1 would replay
  # each other's epochs shifted by one; hashing the seed first avoids that.
  return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0])


def to_example(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
  return {
      'inputs': np.ascontiguousarray(windows_BxL1[:, :-1]),
      'targets': np.ascontiguousarray(windows_BxL1[:, 1:]),
  }


def num_windows(num_tokens: int, seq_len: int) -> int:
  return max(num_tokens - 1, 0) // seq_len


def windows(tokens_N: np.ndarray, seq_len: int) -> grain.MapDataset:
  """int32[L+1] windows at stride L; a tail shorter than a window is unused."""
  def window(i):
    return tokens_N[i * seq_len:i * seq_len + seq_len + 1]
  return grain.MapDataset.range(num_windows(len(tokens_N), seq_len)).map(window)


def local_batches(ds: grain.MapDataset, *, batch_size: int,
                  process_index: int, process_count: int) -> grain.MapDataset:
  """This process's rows of each global batch of `batch_size` windows.

  Global batch b is windows [b*B, (b+1)*B); process i's rows are its i-th
  block of B/n, i.e. the (b*n + i)-th batch of B/n windows. Concatenating the
  processes' batches in process order gives the single-process batch.
  """
  local = batch_size // process_count
  ds = ds.batch(local, drop_remainder=True)
  return ds[process_index::process_count].map(to_example)


def train_iter(tokens_N: np.ndarray, *, seq_len: int, batch_size: int,
               seed: int, shuffle: bool, process_index: int,
               process_count: int) -> grain.DatasetIterator:
  """Infinite, reshuffled every epoch; batches may straddle epochs."""
  ds = windows(tokens_N, seq_len)
  if shuffle:
    ds = ds.shuffle(seed=mix_seed(seed))
  ds = local_batches(ds.repeat(), batch_size=batch_size,
                     process_index=process_index, process_count=process_count)
  # The data is in memory: threads would only fight over the GIL.
  read = grain.ReadOptions(num_threads=0)
  return iter(ds.to_iter_dataset(read))


def eval_batches(tokens_N: np.ndarray, *, seq_len: int, batch_size: int,
                 num_batches: int, process_index: int,
                 process_count: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of the split, in order."""
  ds = windows(tokens_N, seq_len)[:num_batches * batch_size]
  ds = local_batches(ds, batch_size=batch_size, process_index=process_index,
                     process_count=process_count)
  return [ds[i] for i in range(len(ds))]

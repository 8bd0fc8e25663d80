"""Streamed document packing for TFDS: tokenize, concatenate, then chunk.

Documents are tokenized lazily, each followed by the end-of-document id, and
Grain's ConcatThenSplitIterDataset cuts the stream into windows of L+1 tokens
with no padding (a document may span windows). Windows do not overlap, so one
next-token pair per window (across its border) goes untrained: 1/(L+1) of the
pairs, the price of reusing Grain's packer and its checkpointable state.

Every process packs the whole global stream and keeps its own rows of each
global batch: the union over processes is then exactly the single-process
batch, at the cost of each process tokenizing all of it.
"""

from __future__ import annotations

import grain
import numpy as np

from scalejax.data import windows as windows_lib

# Windows are mixed across this many consecutive windows, so that the rows of
# a batch are not mostly neighbouring pieces of the same long document.
SHUFFLE_WINDOWS = 1024


def _tokenize(tokenizer):
  def encode(text: str) -> dict[str, np.ndarray]:
    ids_N = tokenizer.encode_array(text)
    return {'tokens': np.append(ids_N, tokenizer.eod_id).astype(np.int32)}
  return encode


def packed_batches(docs: grain.MapDataset, tokenizer, *, seq_len: int,
                   batch_size: int, process_index: int, process_count: int,
                   train: bool, seed: int = 0,
                   shuffle: bool = False) -> grain.IterDataset:
  """Batches {'inputs', 'targets'} of this process's rows."""
  if train:
    if shuffle:
      docs = docs.shuffle(seed=windows_lib.mix_seed(seed))
    docs = docs.repeat()
  docs = docs.map(_tokenize(tokenizer))
  ds = docs.to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=256))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': seq_len + 1})
  # Only the last window of a finite (eval) stream can be padded: drop it.
  ds = ds.filter(lambda ex: ex['tokens_segment_ids'][-1] > 0)
  ds = ds.map(lambda ex: ex['tokens'])
  if train and shuffle:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=SHUFFLE_WINDOWS, seed=windows_lib.mix_seed(seed, 1))
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.map(lambda windows_BxL1: windows_lib.to_example(windows_BxL1[rows]))


def _tuples(state):
  """JSON turns tuples into lists, but ConcatThenSplit compares its slices
  with a tuple sentinel: restore the tuples so a saved state round-trips."""
  if isinstance(state, dict):
    return {k: (_as_tuples(v) if k == 'remainder_slices' else _tuples(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_tuples(v) for v in state]
  return state


def _as_tuples(slices):
  return {k: tuple(v) for k, v in slices.items()}


class JsonStateIterator(grain.DatasetIterator):
  """Passes through its parent; accepts states that went through JSON."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_tuples(state))

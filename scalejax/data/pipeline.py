"""The LM pre-training input pipeline: config, entry point and its result."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np

from scalejax.data import packing
from scalejax.data import sources
from scalejax.data import tokenizers
from scalejax.data import windows


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of the training config."""
  return ml_collections.ConfigDict(dict(
      source='text_files',  # text_files | tfds | synthetic
      path='',  # text_files: a file, a directory or a glob
      tokenizer='byte',  # byte | char | sentencepiece (synthetic: ignored)
      spm_model='',  # sentencepiece: path to a .model
      eval_fraction=0.1,  # text_files/synthetic: the last 10% is held out
      eval_batches=8,  # fixed eval batches (0: none)
      tfds_name='',
      tfds_data_dir='',  # '': TFDS's default data_dir
      tfds_train_split='train',
      tfds_eval_split='validation',
      tfds_text_key='text',
      synthetic_vocab=256,
      shuffle=True,
      max_bytes=0,  # cap on corpus bytes read (0: no cap); synthetic: tokens
  ))


@dataclasses.dataclass
class Data:
  """What the trainer consumes.

  Batches are {'inputs': int32[B_local, L], 'targets': int32[B_local, L]} with
  B_local = batch_size // process_count; targets are inputs shifted by one.
  `train_tokens` / `eval_tokens` count the splits' tokens; a streamed TFDS
  train split reports 0 (unknown) and its eval split the tokens its batches
  cover.
  """
  tokenizer: Any
  train_iter: grain.DatasetIterator
  eval_batches: list[dict[str, np.ndarray]]
  train_tokens: int
  eval_tokens: int


def build_data(data_cfg: ml_collections.ConfigDict, *, seq_len: int,
               batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, workdir: str | None = None) -> Data:
  """Builds tokenizer, train iterator and eval batches from the data config.

  `batch_size` is global: this process gets rows
  [process_index * B_local, (process_index + 1) * B_local) of every batch.
  """
  _check(data_cfg, seq_len, batch_size, process_index, process_count)
  shard = dict(batch_size=batch_size, process_index=process_index,
               process_count=process_count)
  if sources.get(data_cfg).documents is not None:
    return _documents(data_cfg, seq_len=seq_len, seed=seed, workdir=workdir,
                      **shard)

  train_N, eval_N, tokenizer = _in_memory_splits(data_cfg, seed, workdir)
  if len(train_N) < seq_len + 1:
    raise ValueError(
        f'The train split has {len(train_N)} tokens, fewer than one window of '
        f'seq_len+1={seq_len + 1}; use a bigger corpus, a smaller seq_len or '
        'a smaller data.eval_fraction.')
  train_iter = windows.train_iter(train_N, seq_len=seq_len, seed=seed,
                                  shuffle=data_cfg.shuffle, **shard)
  evals = []
  if data_cfg.eval_batches and data_cfg.eval_fraction:
    available = windows.num_windows(len(eval_N), seq_len) // batch_size
    if not available:
      raise ValueError(
          f'The eval split has {len(eval_N)} tokens, fewer than one batch '
          f'(batch_size*seq_len+1={batch_size * seq_len + 1}); use a bigger '
          'corpus, a larger data.eval_fraction or a smaller batch.')
    if available < data_cfg.eval_batches:
      logging.warning('The eval split fills only %d of data.eval_batches=%d '
                      'batches; evaluating on %d.', available,
                      data_cfg.eval_batches, available)
    evals = windows.eval_batches(eval_N, seq_len=seq_len,
                                 num_batches=min(available, data_cfg.eval_batches),
                                 **shard)
  return Data(tokenizer=tokenizer, train_iter=train_iter, eval_batches=evals,
              train_tokens=len(train_N), eval_tokens=len(eval_N))


def _check(data_cfg, seq_len, batch_size, process_index, process_count):
  if (sources.get(data_cfg).tokenizer is None
      and data_cfg.tokenizer not in tokenizers.TOKENIZERS):
    raise ValueError(
        f'Unknown data.tokenizer {data_cfg.tokenizer!r}; set it to one of '
        f'{", ".join(tokenizers.TOKENIZERS)}.')
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be '
                     'positive.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in '
                     f'[0, process_count={process_count}).')
  if batch_size % process_count:
    raise ValueError(
        f'batch_size={batch_size} is not divisible by process_count='
        f'{process_count}; use a batch size that is a multiple of it.')
  if not 0 <= data_cfg.eval_fraction < 1:
    raise ValueError(f'data.eval_fraction={data_cfg.eval_fraction} must lie in '
                     '[0, 1).')


def _in_memory_splits(data_cfg, seed, workdir):
  """(train int32[N], eval int32[M], tokenizer): the eval split is the last
  eval_fraction of the corpus, cut in characters (bytes for `byte`) as nanoGPT
  cuts tinyshakespeare, then each side tokenized on its own."""
  corpus = sources.get(data_cfg).corpus(data_cfg, seed)
  tokenizer = sources.load_tokenizer(
      data_cfg, workdir, text=corpus if isinstance(corpus, str) else None)
  encode = (tokenizer.encode_array if isinstance(corpus, (str, bytes))
            else lambda ids: ids)  # a source's own ids need no tokenizing
  cut = int(len(corpus) * (1 - data_cfg.eval_fraction))
  return encode(corpus[:cut]), encode(corpus[cut:]), tokenizer


def _documents(data_cfg, *, seq_len, batch_size, seed, process_index,
               process_count, workdir):
  read = sources.get(data_cfg).documents
  tokenizer = sources.load_tokenizer(data_cfg, workdir)
  if tokenizer.eod_id is None:
    raise ValueError(
        f'The {tokenizer.name} tokenizer has no end-of-document id to '
        'separate TFDS documents; train the SentencePiece model with an eos '
        'piece, or delete a char_vocab.json built without one.')
  shard = dict(seq_len=seq_len, batch_size=batch_size,
               process_index=process_index, process_count=process_count)
  train_docs = read(data_cfg, data_cfg.tfds_train_split)
  train = packing.packed_batches(train_docs, tokenizer, train=True, seed=seed,
                                 shuffle=data_cfg.shuffle, **shard)
  evals = []
  if data_cfg.eval_batches:
    eval_docs = read(data_cfg, data_cfg.tfds_eval_split)
    batches = iter(packing.packed_batches(eval_docs, tokenizer, train=False,
                                          **shard))
    evals = list(itertools.islice(batches, data_cfg.eval_batches))
    batches.close()  # stops its reader threads
    if not evals:
      raise ValueError(
          f'TFDS split {data_cfg.tfds_name}/{data_cfg.tfds_eval_split} has fewer tokens '
          f'than one batch (batch_size*(seq_len+1)={batch_size * (seq_len + 1)}'
          '); set data.tfds_eval_split to a bigger split or use a smaller '
          'batch.')
    if len(evals) < data_cfg.eval_batches:
      logging.warning('The eval split fills only %d of data.eval_batches=%d '
                      'batches.', len(evals), data_cfg.eval_batches)
  return Data(tokenizer=tokenizer,
              train_iter=packing.JsonStateIterator(iter(train)),
              eval_batches=evals, train_tokens=0,
              eval_tokens=len(evals) * batch_size * (seq_len + 1))

"""Where text comes from: local text files, prepared TFDS datasets, or a
synthetic token stream."""

from __future__ import annotations

import glob
from pathlib import Path

import grain
import numpy as np

from scalejax.data import tokenizers

SOURCES = ('text_files', 'tfds', 'synthetic')
SYNTHETIC_TOKENS = 1 << 20  # default size; data.max_bytes overrides it


def resolve_paths(path: str) -> list[Path]:
  """Files named by a file, a directory (recursively) or a glob; sorted."""
  if not path:
    raise FileNotFoundError(
        'data.path is empty; set it to a text file, a directory or a glob.')
  if glob.has_magic(path):
    files = [Path(p) for p in glob.glob(path, recursive=True)]
    files = sorted(p for p in files if p.is_file())
    if not files:
      raise FileNotFoundError(
          f'data.path glob {path!r} matches no files; fix the pattern.')
    return files
  p = Path(path)
  if p.is_file():
    return [p]
  if p.is_dir():
    files = sorted(f for f in p.rglob('*') if f.is_file())
    if not files:
      raise FileNotFoundError(
          f'data.path directory {path!r} holds no files; put text files in '
          'it or point data.path elsewhere.')
    return files
  raise FileNotFoundError(
      f'data.path {path!r} does not exist; set data.path to a text file, a '
      'directory or a glob.')


def read_text_files(path: str, *, max_bytes: int = 0,
                    decode: bool = True) -> str | bytes:
  """The files' contents concatenated in sorted path order.

  With `decode`, each file must be UTF-8 (the char and sentencepiece
  tokenizers need text); without it raw bytes come back and nothing can fail.
  """
  parts, total = [], 0
  for f in resolve_paths(path):
    data = f.read_bytes()
    truncated = bool(max_bytes) and total + len(data) > max_bytes
    if truncated:
      data = data[:max_bytes - total]
    total += len(data)
    parts.append(_decode(data, f, truncated) if decode else data)
    if truncated:
      break
  corpus = ''.join(parts) if decode else b''.join(parts)
  if not corpus:
    raise ValueError(
        f'data.path {path!r}: the corpus is empty; add text to the files.')
  return corpus


def _decode(data: bytes, path: Path, truncated: bool) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    cut_short = e.reason == 'unexpected end of data' and e.end == len(data)
    if truncated and cut_short:
      # data.max_bytes cut a multi-byte character in half: drop that piece.
      return data[:e.start].decode('utf-8')
    raise ValueError(
        f'{path}: not valid UTF-8 at byte offset {e.start} ({e.reason}); '
        'convert the file to UTF-8 or use data.tokenizer=byte.') from None


def synthetic_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
  """A learnable stream: runs that walk a fixed random cycle of the vocab.

  Inside a run the next token is a fixed function of the current one (a
  bigram model predicts it), and runs restart at random places (mean length
  16), so the loss of a model falls from log(vocab) to about log(vocab) / 16.
  """
  if vocab < 2:
    raise ValueError(f'data.synthetic_vocab={vocab}; set it to at least 2.')
  rng = np.random.default_rng(seed)
  cycle = rng.permutation(vocab)
  lengths = rng.geometric(1 / 16, size=n // 8 + 64)
  while lengths.sum() < n:
    lengths = np.concatenate([lengths, rng.geometric(1 / 16, size=n // 8 + 64)])
  starts = rng.integers(vocab, size=len(lengths))
  run_start_N = np.repeat(np.cumsum(lengths) - lengths, lengths)[:n]
  offset_N = np.arange(n) - run_start_N
  pos_N = (np.repeat(starts, lengths)[:n] + offset_N) % vocab
  return cycle[pos_N].astype(np.int32)


def tfds_docs(data_cfg, split: str) -> grain.MapDataset:
  """The documents (str) of a prepared TFDS split, as a random-access dataset.

  Reads array_record through `tfds.data_source`, so TensorFlow is not needed.
  With `data.max_bytes`, only the leading documents that fit are kept.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = data_cfg.tfds_name, data_cfg.tfds_data_dir or None
  if not name:
    raise ValueError('data.source=tfds needs data.tfds_name (e.g. lm1b).')
  where = data_dir or 'the default TFDS data_dir'
  prepare = (f'prepare it with `tfds build {name} --file_format=array_record'
             f'{" --data_dir=" + data_dir if data_dir else ""}`, or set '
             'data.tfds_data_dir to where it is prepared')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in {where}; {prepare}.'
    ) from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in {where}; {prepare}.')
  if split not in builder.info.splits:
    raise ValueError(
        f'TFDS dataset {name!r} has no split {split!r}; set data.tfds_*_split '
        f'to one of {sorted(builder.info.splits)}.')
  features = builder.info.features
  key = data_cfg.tfds_text_key
  if key not in features:
    raise ValueError(
        f'TFDS dataset {name!r} has no feature {key!r}; set '
        f'data.tfds_text_key to one of {sorted(features)}.')
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:
    raise ValueError(
        f'TFDS dataset {name!r} in {where} is not stored as array_record or '
        f'parquet (TFRecord has no random access); {prepare}.') from None
  docs = grain.MapDataset.source(source).map(lambda ex: _as_str(ex[key]))
  if data_cfg.max_bytes:
    docs = docs[:_docs_within(docs, data_cfg.max_bytes)]
  if not len(docs):
    raise ValueError(
        f'TFDS split {name}/{split} has no documents; pick another split.')
  return docs


def _as_str(text) -> str:
  if isinstance(text, bytes):
    return text.decode('utf-8', errors='replace')
  return str(text)


def _docs_within(docs: grain.MapDataset, max_bytes: int) -> int:
  total = 0
  for i in range(len(docs)):
    total += len(docs[i].encode('utf-8'))
    if total >= max_bytes:
      return i + 1
  return len(docs)


def corpus_text(data_cfg) -> str:
  """The whole corpus as one string, for building a char vocabulary."""
  if data_cfg.source == 'text_files':
    return read_text_files(data_cfg.path, max_bytes=data_cfg.max_bytes)
  if data_cfg.source == 'tfds':
    # The EOD character joins documents, so it enters the vocabulary.
    splits = [data_cfg.tfds_train_split]
    if data_cfg.eval_batches:
      splits.append(data_cfg.tfds_eval_split)
    return ''.join(doc + tokenizers.EOD_CHAR for split in splits
                   for doc in tfds_docs(data_cfg, split))
  raise ValueError(
      f'Unknown data.source {data_cfg.source!r}; set it to one of '
      f'{", ".join(SOURCES)}.')

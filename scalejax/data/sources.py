"""Where text comes from: local text files, prepared TFDS datasets, or a
synthetic token stream, registered by name in `SOURCES` (`data.source`).

A source is either a *corpus* (one stream, held in memory, whose last
`data.eval_fraction` is the eval split) or a set of *documents* per split
(packed into windows, streamed). Adding a source is one `Source` entry.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Callable

import grain
import numpy as np

from scalejax.data import tokenizers

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


def _tfds_text(data_cfg) -> str:
  # The EOD character joins documents, so it enters the vocabulary.
  splits = [data_cfg.tfds_train_split]
  if data_cfg.eval_batches:
    splits.append(data_cfg.tfds_eval_split)
  return ''.join(doc + tokenizers.EOD_CHAR for split in splits
                 for doc in tfds_docs(data_cfg, split))


def _text_files_corpus(data_cfg, seed: int) -> str | bytes:
  del seed  # files are read in sorted path order
  return read_text_files(data_cfg.path, max_bytes=data_cfg.max_bytes,
                         decode=data_cfg.tokenizer != 'byte')


def _synthetic_corpus(data_cfg, seed: int) -> np.ndarray:
  return synthetic_tokens(data_cfg.max_bytes or SYNTHETIC_TOKENS,
                          data_cfg.synthetic_vocab, seed)


@dataclasses.dataclass(frozen=True)
class Source:
  """One `data.source`: how its data is read and what tokenizes it.

  Exactly one of `corpus` (data_cfg, seed -> str, bytes or token ids) and
  `documents` (data_cfg, split -> grain.MapDataset of str) is set. `text`
  (data_cfg -> str) is the text a char vocabulary is built from; `tokenizer`
  (data_cfg -> tokenizer) is set for a source with ids of its own, which then
  ignores `data.tokenizer`.
  """
  corpus: Callable | None = None
  documents: Callable | None = None
  text: Callable | None = None
  tokenizer: Callable | None = None


SOURCES: dict[str, Source] = {
    'text_files': Source(
        corpus=_text_files_corpus,
        text=lambda c: read_text_files(c.path, max_bytes=c.max_bytes)),
    'tfds': Source(documents=tfds_docs, text=_tfds_text),
    'synthetic': Source(
        corpus=_synthetic_corpus,
        tokenizer=lambda c: tokenizers.IdTokenizer(c.synthetic_vocab)),
}


def get(data_cfg) -> Source:
  if data_cfg.source not in SOURCES:
    raise ValueError(f'Unknown data.source {data_cfg.source!r}; set it to one '
                     f'of {", ".join(SOURCES)}.')
  return SOURCES[data_cfg.source]


def load_tokenizer(data_cfg, workdir=None, *, text: str | None = None):
  """The tokenizer a run with `data_cfg` uses (see tokenizers.load_tokenizer).

  A char vocabulary not yet saved in `workdir` is built from `text`, or else
  from the source's whole text.
  """
  source = get(data_cfg)
  if source.tokenizer is not None:
    return source.tokenizer(data_cfg)
  corpus = (lambda: text) if text is not None else (
      lambda: source.text(data_cfg))
  return tokenizers.load_tokenizer(data_cfg, workdir, corpus=corpus)

"""Tokenizers: byte, char (nanoGPT-style, corpus vocabulary) and SentencePiece.

Each has `name`, `vocab_size`, `eod_id` (end-of-document id used to separate
TFDS documents, None if the vocabulary has none), `encode(str) -> list[int]`,
`decode(list[int]) -> str`, and `encode_array(text) -> int32[N]`, a fast path
for whole corpora.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

CHAR_VOCAB_FILE = 'char_vocab.json'
EOD_CHAR = '\0'  # NUL never occurs in real text, so it is free to mark doc ends


class ByteTokenizer:
  """UTF-8 bytes; needs no files and never fails to encode."""

  name = 'byte'
  vocab_size = 256
  eod_id = 0  # the NUL byte, see EOD_CHAR

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_array(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode('utf-8')
    return np.frombuffer(text, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode('utf-8', errors='replace')


class CharTokenizer:
  """One id per character; ids follow the sorted characters (nanoGPT)."""

  name = 'char'

  def __init__(self, chars: str):
    self.chars = ''.join(sorted(set(chars)))
    self.vocab_size = len(self.chars)
    # Sorted code points let encode_array map a whole corpus by searchsorted.
    self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
    self.eod_id = self.chars.find(EOD_CHAR) if EOD_CHAR in self.chars else None

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    if not text:
      raise ValueError('char tokenizer: the corpus is empty; give data.path '
                       'a non-empty text file.')
    codes = np.unique(_code_points(text))
    return cls(''.join(map(chr, codes)))

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    codes_N = _code_points(text)
    ids_N = np.searchsorted(self._codes, codes_N)
    ids_N = np.minimum(ids_N, self.vocab_size - 1)
    bad = np.flatnonzero(self._codes[ids_N] != codes_N)
    if bad.size:
      raise ValueError(
          f'char tokenizer: character {text[bad[0]]!r} at position {bad[0]} '
          f'is not in the {self.vocab_size}-character vocabulary; delete a '
          f'stale {CHAR_VOCAB_FILE} or rebuild the vocabulary from a corpus '
          'that contains it.')
    return ids_N.astype(np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.chars[int(i)] for i in ids)

  def save(self, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    # A list of one-char strings keeps the file readable and escape-safe.
    tmp.write_text(json.dumps({'tokenizer': 'char', 'chars': list(self.chars)}))
    tmp.replace(path)  # atomic, so a crash never leaves half a vocabulary

  @classmethod
  def load(cls, path: str | os.PathLike) -> CharTokenizer:
    return cls(''.join(json.loads(Path(path).read_text())['chars']))


class SentencePieceTokenizer:
  """A trained SentencePiece model (see `python -m scalejax.cli.train_spm`)."""

  name = 'sentencepiece'
  _BLOCK_CHARS = 1 << 20

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not model_path or not Path(model_path).is_file():
      raise FileNotFoundError(
          f'SentencePiece model {str(model_path)!r} not found; set '
          'data.spm_model to a .model file (train one with `python -m '
          'scalejax.cli.train_spm`).')
    self.model_path = str(model_path)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size = self._sp.get_piece_size()
    eos = self._sp.eos_id()
    self.eod_id = eos if eos >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    # Encode ~1 MB blocks cut at newlines, in parallel; a cut only matters for
    # models that add a dummy prefix, and then only once per block.
    blocks = _blocks(text, self._BLOCK_CHARS)
    ids = self._sp.encode(blocks, num_threads=os.cpu_count() or 1)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


class IdTokenizer:
  """Ids written as numbers, for the synthetic source (it has no text)."""

  name = 'synthetic'
  eod_id = None

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids) -> str:
    return ' '.join(str(int(i)) for i in ids)


def _code_points(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)


def _blocks(text: str, size: int) -> list[str]:
  blocks, start = [], 0
  while start < len(text):
    cut = text.find('\n', start + size)
    end = len(text) if cut < 0 else cut + 1
    blocks.append(text[start:end])
    start = end
  return blocks


def _char(data_cfg, workdir, corpus):
  vocab_file = Path(workdir) / CHAR_VOCAB_FILE if workdir else None
  if vocab_file is not None and vocab_file.is_file():
    return CharTokenizer.load(vocab_file)
  tok = CharTokenizer.from_text(corpus())
  if vocab_file is not None:
    tok.save(vocab_file)
  return tok


TOKENIZERS = {
    'byte': lambda data_cfg, workdir, corpus: ByteTokenizer(),
    'char': _char,
    'sentencepiece': lambda data_cfg, workdir, corpus: SentencePieceTokenizer(
        data_cfg.spm_model),
}


def load_tokenizer(data_cfg, workdir=None, *, corpus: Callable[[], str]):
  """The `data.tokenizer` named tokenizer.

  For `char`, `workdir/char_vocab.json` wins when present (resumed runs and the
  sampler then need no corpus); otherwise the vocabulary is built from
  `corpus()` and saved there. Callers go through `sources.load_tokenizer`,
  which knows where a source's text comes from.
  """
  if data_cfg.tokenizer not in TOKENIZERS:
    raise ValueError(
        f'Unknown data.tokenizer {data_cfg.tokenizer!r}; set it to one of '
        f'{", ".join(TOKENIZERS)}.')
  return TOKENIZERS[data_cfg.tokenizer](data_cfg, workdir, corpus)

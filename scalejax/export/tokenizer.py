"""Our tokenizers as Hugging Face tokenizer files that give the same ids both ways.

- byte (ids = UTF-8 bytes): a `tokenizers` BPE model whose whole vocabulary is the 256
  byte tokens `<0x00>`..`<0xFF>` (id = byte value), no merges, byte fallback on. No
  character is in the vocabulary, so every one falls back to its UTF-8 bytes: the ids
  of `ByteTokenizer.encode`. The ByteFallback decoder joins the bytes back into text;
  valid UTF-8 decodes as ours does (invalid bytes become U+FFFD in both, though the
  number of replacement characters may differ).
- char (ids = the sorted characters): a WordLevel model over single code points (the
  pre-tokenizer splits before every one), vocabulary in our order. A character outside
  it fails to encode, as in `CharTokenizer`; the decoder fuses tokens with no space.
- sentencepiece: the model file itself as `tokenizer.model`; transformers builds its
  fast tokenizer from it on load (its SentencePiece converter, which needs the
  `sentencepiece` and `protobuf` packages there) and adds no BOS/EOS, as ours. Text
  that spells a special piece (`<s>`, `</s>`, `<unk>`) is read as that special token
  by transformers but as plain characters by SentencePiece; an unknown piece decodes
  as `<unk>` there and as ` ⁇ ` in SentencePiece.
- synthetic ids (no text): no files.

No special tokens are declared: the byte and char vocabularies have none (their
end-of-document id is the NUL character), and declaring one would make transformers
read its spelling inside text as the special token. The end-of-document id goes to
the model's `generation_config.json` instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_JSON, TOKENIZER_CONFIG = 'tokenizer.json', 'tokenizer_config.json'
SPM_MODEL = 'tokenizer.model'
FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPM_MODEL)  # everything `save` may write
# The character vocabulary's unknown token: more than one character, so never in it,
# and WordLevel then refuses an unknown character instead of mapping it to an id.
_NO_UNK = '<unk>'


def byte_tokenizer() -> Tokenizer:
  vocab = {f'<0x{b:02X}>': b for b in range(256)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
  tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  return tok


def char_tokenizer(chars: str) -> Tokenizer:
  tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=_NO_UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
  tok.decoder = decoders.Fuse()
  return tok


def save(tokenizer, out: str | os.PathLike, *, model_max_length: int) -> list[str]:
  """Writes the HF files of one of our tokenizers into `out`; returns their names."""
  out = Path(out)
  config = {'tokenizer_class': 'TokenizersBackend', 'clean_up_tokenization_spaces': False,
            'model_max_length': model_max_length}
  if tokenizer.name == 'byte':
    byte_tokenizer().save(str(out / TOKENIZER_JSON))
    written = [TOKENIZER_JSON]
  elif tokenizer.name == 'char':
    char_tokenizer(tokenizer.chars).save(str(out / TOKENIZER_JSON))
    written = [TOKENIZER_JSON]
  elif tokenizer.name == 'sentencepiece':
    shutil.copyfile(tokenizer.model_path, out / SPM_MODEL)
    written = [SPM_MODEL]
  else:
    return []  # synthetic ids: no text to tokenize
  (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + '\n')
  return written + [TOKENIZER_CONFIG]

"""Trains a SentencePiece model on local text for LM pre-training.

  python -m scalejax.cli.train_spm --input FILE_OR_GLOB --vocab_size N \
      --model_prefix OUT

Writes OUT.model and OUT.vocab. Text is kept as is (identity normalization,
no dummy prefix, whitespace preserved, newline a piece of its own), so that
decode(encode(text)) == text for characters the model covers; --byte_fallback
covers all the others but needs vocab_size > 256 + the number of specials.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import sentencepiece as spm

from scalejax.data import sources


def train(input_path: str, vocab_size: int, model_prefix: str, *,
          model_type: str = 'unigram', byte_fallback: bool = False,
          input_sentence_size: int = 0) -> str:
  """Trains the model and returns the path of the .model file."""
  files = sources.resolve_paths(input_path)
  Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
  spm.SentencePieceTrainer.train(
      input=[str(f) for f in files],
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=1.0,  # small corpora: no character becomes unknown
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      # The trainer reads lines, so it never sees a newline: add it by hand.
      user_defined_symbols=['\n'],
      byte_fallback=byte_fallback,
      # Its ids are SentencePiece's defaults, made explicit: the pipeline uses
      # eos as the end-of-document separator.
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      hard_vocab_limit=False,  # tiny corpora may not fill the vocabulary
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  return model_prefix + '.model'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--input', required=True,
                      help='a text file, a directory or a glob')
  parser.add_argument('--vocab_size', type=int, required=True)
  parser.add_argument('--model_prefix', required=True,
                      help='writes MODEL_PREFIX.model and MODEL_PREFIX.vocab')
  parser.add_argument('--model_type', default='unigram',
                      choices=['unigram', 'bpe', 'char', 'word'])
  parser.add_argument('--byte_fallback', action='store_true')
  parser.add_argument('--input_sentence_size', type=int, default=0,
                      help='sample this many lines (0: all)')
  args = parser.parse_args(argv)
  path = train(args.input, args.vocab_size, args.model_prefix,
               model_type=args.model_type, byte_fallback=args.byte_fallback,
               input_sentence_size=args.input_sentence_size)
  print(path)


if __name__ == '__main__':
  main()

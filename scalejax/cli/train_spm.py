r"""Trains a SentencePiece model on local text for LM pre-training.

  python -m scalejax.cli.train_spm --input FILE_OR_GLOB --vocab_size N \
      --model_prefix OUT

Writes OUT.model and OUT.vocab. Text is kept as is (identity normalization,
no dummy prefix, whitespace preserved, newline a piece of its own), so that
decode(encode(text)) == text for characters the model covers; --byte_fallback
covers all the others but needs vocab_size > 256 + the number of specials.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm
from absl import flags

from scalejax.cli import common
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


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('input', None, 'a text file, a directory or a glob', flag_values=fv)
  flags.DEFINE_integer('vocab_size', None, 'pieces in the model', flag_values=fv)
  flags.DEFINE_string('model_prefix', None, 'writes MODEL_PREFIX.model and MODEL_PREFIX.vocab',
                      flag_values=fv)
  flags.DEFINE_enum('model_type', 'unigram', ['unigram', 'bpe', 'char', 'word'],
                    'SentencePiece model type', flag_values=fv)
  flags.DEFINE_bool('byte_fallback', False, 'unknown characters as UTF-8 bytes',
                    flag_values=fv)
  flags.DEFINE_integer('input_sentence_size', 0, 'sample this many lines (0: all)',
                       flag_values=fv)
  flags.mark_flags_as_required(['input', 'vocab_size', 'model_prefix'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  print(train(fv.input, fv.vocab_size, fv.model_prefix, model_type=fv.model_type,
              byte_fallback=fv.byte_fallback, input_sentence_size=fv.input_sentence_size))


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

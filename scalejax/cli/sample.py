"""Text generation from a checkpoint.

    python -m scalejax.cli.sample --workdir DIR --prompt "ROMEO:" [--tokens 200]
"""

from __future__ import annotations

from absl import flags

from scalejax.cli import common
from scalejax.model.sampling import generate
from scalejax.train.runs import load_run


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'run directory holding config.json and checkpoints/',
                      flag_values=fv)
  flags.DEFINE_string('prompt', '\n', 'text to continue', flag_values=fv)
  flags.DEFINE_integer('tokens', 200, 'tokens to generate', flag_values=fv)
  flags.DEFINE_float('temperature', 0.8, 'sampling temperature (0: greedy)', flag_values=fv)
  flags.DEFINE_integer('top_k', 0, 'keep only the k most likely tokens (0: all)', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'sampling seed', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  cfg, graphdef, params, tokenizer = load_run(fv.workdir)
  print(fv.prompt + generate(graphdef, params, tokenizer, fv.prompt, fv.tokens,
                             cfg.train.seq_len, fv.temperature, fv.top_k, fv.seed))


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

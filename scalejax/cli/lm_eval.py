r"""lm-eval-harness's own command line, with the `scalejax` model type registered.

    python -m scalejax.cli.lm_eval --model scalejax \
        --model_args workdir=DIR[,step=N,batch_size=B] --tasks hellaswag,piqa \
        [--include_path DIR] [--limit N] [--num_fewshot K] [--output_path OUT] ...

(`scalejax-lm-eval` is the same.) Every flag and subcommand of lm-eval's `lm-eval` and
none of its own: `run --help` lists the flags, `ls tasks` the tasks. lm-eval's own
command knows only the model types of its fixed table (lm_eval/models/__init__.py) and
has no way to load one from another package, hence this wrapper; `scalejax-eval` is the
short form through lm-eval's Python API.
"""

from __future__ import annotations

import sys

from absl import flags

from scalejax.cli import common
from scalejax.eval import harness
from scalejax.train.runs import load_run

_HELP = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')


def define_flags(fv: flags.FlagValues) -> None:
  """None of its own: the whole command line is lm-eval's."""
  del fv


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  """Runs lm-eval's command line `argv[1:]` with the scalejax model type known."""
  del fv
  harness.register(load_run)
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  saved, sys.argv = sys.argv, [sys.argv[0], *argv[1:]]  # lm-eval parses sys.argv itself
  try:
    cli_evaluate()
  except ValueError as e:
    if str(e).startswith('Tasks not found'):
      raise ValueError(f'{e}; `scalejax-lm-eval ls tasks` lists the known tasks, and '
                       '--include_path DIR adds a folder of task YAML files') from None
    raise
  finally:
    sys.argv = saved


def run() -> None:
  # A lone --help is this command's (its docstring); `run --help` is lm-eval's. No absl
  # parsing: lm-eval's flags are not absl flags.
  if len(sys.argv) == 2 and sys.argv[1] in _HELP:
    sys.stdout.write(common.usage(__doc__, define_flags))
    sys.exit(0)
  try:
    main(sys.argv)
  except common.USER_ERRORS as e:
    common.fail(e)


if __name__ == '__main__':
  run()

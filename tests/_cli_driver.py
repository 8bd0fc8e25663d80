"""Runs many command lines of the scalejax commands in one Python process.

    python tests/_cli_driver.py CASES.json RESULTS.json

CASES.json is a list of argv lists, each as a shell would start it without the
interpreter: `['-m', 'scalejax.cli.bench', '--help']` or `['train.py', '--config', ...]`.
RESULTS.json gets, per case, {'rc', 'stdout', 'stderr'}. Each command line runs as
`python ARGV` would (`runpy`, `__main__`, its own sys.argv, absl parsing its flags), so
the tests see the exit status and the output a user sees; what one process saves is
JAX's import, a few seconds of CPU per command line. Between command lines the flags
the previous command defined (its `define_flags`, and the `--config.KEY` overrides
ml_collections adds) are removed, as a fresh process would not have them; libraries'
own flags (Grain's, absl's) stay, as they are defined once at their import.
"""

import contextlib
import importlib
import io
import json
import runpy
import sys

from absl import app, flags, logging  # noqa: F401  (their flags belong to every process)


def run_one(argv: list[str]) -> dict:
  out, err = io.StringIO(), io.StringIO()
  sys.argv = list(argv[1:]) if argv[0] == '-m' else list(argv)
  rc = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      if argv[0] == '-m':
        sys.argv[0] = argv[1]
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
      else:
        runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return dict(rc=rc, stdout=out.getvalue(), stderr=err.getvalue())


def command_flags(argv: list[str]) -> set[str]:
  """The names a command line's command defines (train.py is scalejax.cli.train)."""
  name = argv[1] if argv[0] == '-m' else 'scalejax.cli.train'
  loaded = name in sys.modules
  fv = flags.FlagValues()
  importlib.import_module(name).define_flags(fv)
  if not loaded:  # `python -m` of it next would find it imported (runpy warns then)
    del sys.modules[name]
  return set(fv)


def forget(names: set[str]) -> None:
  prefixes = tuple(f'{n}.' for n in names)
  for name in list(flags.FLAGS):
    if name in names or name.startswith(prefixes):
      delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def main(cases_path: str, results_path: str) -> None:
  cases = json.loads(open(cases_path).read())
  results = []
  for argv in cases:
    results.append(run_one(argv))
    forget(command_flags(argv))
  with open(results_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])

"""What every command shares (a helper, not a command): flags, `--help`, one-line errors.

A command is a module with `define_flags(fv)`, `main(argv, fv=flags.FLAGS)` and

    def run():
      common.run(main, define_flags, __doc__)

Flags are defined when the command runs, never at import: two command modules imported
into one process (tests, a notebook) would otherwise both define `--config` and collide
(absl's DuplicateFlagError). Bad flags, a bad config file or override, and the errors a
command names as the user's input end the process with `PROG: error: MESSAGE`, one line
on stderr, exit status 1; any other error keeps its traceback.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app, flags

# Flags defined through define_list belong to the command that calls it, in --help too.
flags.disclaim_key_flags()

# Errors that mean bad input (flags, config, data) when a command's main raises them.
USER_ERRORS: tuple[type[BaseException], ...] = (app.UsageError, ValueError, FileNotFoundError)

# What absl's parser and ml_collections' config flags raise for a bad flag, config
# file or `--config.KEY=VALUE` override.
_PARSE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
                 SyntaxError)

# absl's own --help exits 1 and lists only the flags of sys.argv[0]'s module (none for
# train.py, whose flags live here in the package), so these are answered before it.
_HELP = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')


def prog() -> str:
  """How this process was started: the module for `python -m` (`scalejax.cli.bench`),
  else the file (`train.py`, `scalejax-train`)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def command_line() -> list[str]:
  """The command line that started this process, to print for a rerun."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None:  # `python -m`: the module's file alone would miss the package
    return [sys.executable, '-m', spec.name, *sys.argv[1:]]
  return [sys.executable, *sys.argv]


def message(e: BaseException) -> str:
  """The error as one line, with ml_collections' wording of config errors made plain."""
  msg = str(e)
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  if len(lines) > 1 and 'Traceback' in msg:  # an error inside a config file: keep its last line
    msg = f'{lines[0].split("Traceback")[0]} {lines[-1]}'
  if isinstance(e, KeyError) or msg[:1] in '"\'':  # ml_collections quotes KeyError text
    try:
      msg = str(ast.literal_eval(msg))
    except (ValueError, SyntaxError):
      pass
  msg = ' '.join(msg.split()).replace(' Did you mean', '; did you mean')
  msg = re.sub(r' Other fields present: ".*?"', '', msg)  # the whole section, on one line
  missing = re.search(r"Failed loading config file .*No such file or directory: '(.*?)'", msg)
  if missing:
    msg = f'--config {missing.group(1)}: no such config file'
  if isinstance(e, (AttributeError, KeyError)) and msg.startswith("'"):
    msg = f'unknown config key {msg}'
  return msg


def fail(e: BaseException) -> NoReturn:
  """Exits 1 with `PROG: error: MESSAGE` on one line, no traceback."""
  print(f'{prog()}: error: {message(e)}', file=sys.stderr)
  sys.exit(1)


def no_arguments(argv) -> None:
  """Commands take flags only; a stray word is more likely a flag missing its `--`."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')


def loaded_config(fv: flags.FlagValues, name: str = 'config'):
  """The ConfigDict of a config-file flag (None if unset). ml_collections defers a
  failed load to the config's first use; here it is a ValueError naming the file."""
  cfg = fv[name].value
  try:
    getattr(cfg, 'keys', None)
  except OSError as e:
    raise ValueError(message(e)) from None
  return cfg


class _ListOf(flags.ListParser):
  """absl's comma-separated list, with every item converted by `item` (int, float)."""

  def __init__(self, item: Callable):
    super().__init__()
    self._item = item

  def parse(self, argument):
    return [self._item(x) for x in super().parse(argument)]

  def flag_type(self):
    return f'comma-separated list of {self._item.__name__}'


def define_list(name: str, default, help: str, item: Callable = int,
                flag_values: flags.FlagValues = flags.FLAGS):
  """Like `flags.DEFINE_list`, but a value like `--seeds 0,1,2` arrives as [0, 1, 2]; an
  item that does not convert is a flag error."""
  return flags.DEFINE(_ListOf(item), name, default, help, flag_values,
                      flags.CsvListSerializer(','))


def usage(doc: str, define_flags: Callable[[flags.FlagValues], None]) -> str:
  """The command's docstring and its own flags (not absl's or other libraries')."""
  fv = flags.FlagValues()
  define_flags(fv)
  rendered = fv.get_help(include_special_flags=False).splitlines()
  # get_help heads each defining module's flags with its name: one module, no heading.
  return (f'{doc.strip()}\n\nflags:\n' + '\n'.join(l for l in rendered if l.startswith(' '))
          + '\n')


def parse_flags(define_flags: Callable[[flags.FlagValues], None], argv) -> flags.FlagValues:
  """The command's flags parsed from `argv` (no program name) on a FlagValues of their
  own, for a caller in this process (a test) that must leave the global FLAGS alone.
  Config overrides (`--config.KEY=VALUE`) are not seen: ml_collections reads them from
  sys.argv."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv([prog(), *argv])
  return fv


def run(main: Callable, define_flags: Callable[[flags.FlagValues], None], doc: str,
        errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
  """Defines the command's flags, parses sys.argv and runs `main(argv)` under absl;
  `--help` prints `doc` and the flags (exit 0); bad flags and `errors` are one line."""
  def parse(argv):
    try:
      # Defining a config flag loads its default file and applies the overrides in
      # argv, so a bad override can fail here already.
      define_flags(flags.FLAGS)
      if any(a in _HELP for a in itertools.takewhile(lambda a: a != '--', argv[1:])):
        sys.stdout.write(usage(doc, define_flags))
        sys.exit(0)
      return flags.FLAGS(argv)
    except _PARSE_ERRORS as e:
      fail(e)

  def guarded(argv):
    try:
      main(argv)  # its return value is for callers in one process, not an exit status
    except errors as e:
      fail(e)

  app.run(guarded, flags_parser=parse)

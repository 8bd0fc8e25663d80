"""Another revision of this package, loaded into the running process and built there, so
that the bench times its steps in the same rounds as this tree's (`--against`).

Between processes a step's time on a shared CPU moves by a few percent (the load, where
the process's memory lies), more than a small change to the code does. Steps compiled in
one process and run in interleaved rounds share all of that, so their ratio resolves
the change itself.

The other revision is a git revision of the repository this package lies in (extracted
with `git archive`) or a directory holding a `scalejax/` package. Its modules are
imported under their own names while its cases are built, then this tree's modules are
put back: its compiled steps need none of them to run, and its `Case` objects keep their
own module's functions. Its config is the same config file at that revision (this run's
file where the revision has none), with this run's command-line overrides applied.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import subprocess
import sys
import tarfile
import tempfile

from scalejax.train.config import load_config  # this tree's (the other's is imported by name)

PACKAGE = 'scalejax'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_tree(rev: str, into: str, repo: str = ROOT) -> str:
  """A directory holding revision `rev`'s `scalejax/` package: `rev` itself when it is
  such a directory, else `git archive rev` of `repo` extracted under `into`."""
  if os.path.isfile(os.path.join(rev, PACKAGE, '__init__.py')):
    return os.path.abspath(rev)
  try:
    archive = subprocess.run(['git', '-C', repo, 'archive', '--format=tar', rev],
                             capture_output=True, check=False)
  except FileNotFoundError:
    raise ValueError(f'--against {rev}: git is not installed; pass a directory holding '
                     f'a {PACKAGE}/ package instead') from None
  if archive.returncode:
    why = archive.stderr.decode(errors='replace').strip().splitlines()
    raise ValueError(f'--against {rev}: neither a directory holding a {PACKAGE}/ package nor '
                     f'a revision of {repo} ({why[-1] if why else "git archive failed"})')
  tree = tempfile.mkdtemp(prefix='against-', dir=into)
  with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
    # the 'data' filter (Python 3.11.4 on) refuses links and paths out of `tree`
    tar.extractall(tree, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
  if not os.path.isfile(os.path.join(tree, PACKAGE, '__init__.py')):
    raise ValueError(f'--against {rev}: that revision has no {PACKAGE}/ package')
  return tree


def _ours(name: str) -> bool:
  return name == PACKAGE or name.startswith(PACKAGE + '.')


@contextlib.contextmanager
def imported_from(tree: str):
  """Inside: `import scalejax...` imports `tree`'s package. After: this tree's again."""
  saved = {k: m for k, m in sys.modules.items() if _ours(k)}
  for k in saved:
    del sys.modules[k]
  sys.path.insert(0, tree)
  importlib.invalidate_caches()
  try:
    yield
  finally:
    sys.path.remove(tree)
    for k in [k for k in sys.modules if _ours(k)]:
      del sys.modules[k]
    sys.modules.update(saved)


def flat(cfg, prefix: str = '') -> dict:
  """A ConfigDict (or nested dict) as {dotted key: value}."""
  items = cfg.items() if hasattr(cfg, 'items') else ()
  out = {}
  for k, v in items:
    if hasattr(v, 'items'):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def overrides(cfg, config_path: str) -> dict:
  """{dotted key: value} where `cfg` differs from the config file loaded afresh: what the
  command line set."""
  fresh = flat(load_config(config_path))
  return {k: v for k, v in flat(cfg).items() if k not in fresh or fresh[k] != v}


def cases_at(rev: str, cfg, config_path: str, plan, n_batches: int) -> list:
  """Revision `rev`'s benchmark cases for the config `cfg` was loaded as (the file at
  `config_path` plus the command line's overrides), built in this process. `plan`:
  (variant, call, name) of each case, as this tree's bench builds them."""
  changes = overrides(cfg, config_path)
  with tempfile.TemporaryDirectory(prefix='scalejax-against-') as tmp:
    # imported modules keep their code: the files can go once the cases are built
    return build_cases(rev, source_tree(rev, tmp), config_path, changes, plan, n_batches)


def build_cases(rev: str, tree: str, config_path: str, changes: dict, plan,
                n_batches: int) -> list:
  """`tree`'s benchmark cases of `plan` ((variant, call, name) each), named 'NAME@REV',
  from its own copy of the config file with `changes`."""
  rel = os.path.relpath(os.path.abspath(config_path), ROOT)
  own = os.path.join(tree, rel)
  path = own if not rel.startswith('..') and os.path.isfile(own) else config_path
  with imported_from(tree):
    benchmark = importlib.import_module(f'{PACKAGE}.train.benchmark')
    config = importlib.import_module(f'{PACKAGE}.train.config')
    cfg = config.load_config(path)
    missing = sorted(set(changes) - set(flat(cfg)))  # the update below would skip them
    if missing:
      raise ValueError(f'--against {rev}: its config has no {missing[0]} (set on this '
                       'command line); drop that override or pick a later revision')
    cfg.update_from_flattened_dict(changes)
    takes = inspect.signature(benchmark.build_case).parameters
    if not {'n_batches', 'call', 'name'} <= set(takes):
      raise ValueError(f'--against {rev}: its benchmark.build_case takes ({", ".join(takes)}), '
                       'not this bench\'s n_batches, call and name; pick a later revision')
    return [benchmark.build_case(cfg, variant, n_batches=n_batches, call=call,
                                 name=f'{name}@{rev}') for variant, call, name in plan]

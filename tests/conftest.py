"""Suite-wide settings: fast XLA:CPU compiles and one persistent compilation cache.

The README's command runs the suite on two pytest-xdist workers, one test file per
worker at a time (`--dist loadfile`, so a module's fixtures are built once).

Most tests train the same tiny programs again and again (a run, its resumed twin, a
subprocess that is killed and rerun); each distinct program compiles once per test
session and later runs load it. The cache lives in a temporary directory made for the
session, and the environment variables carry it into subprocesses (train.py, the
commands, multi-host workers). Compiled programs are deterministic functions of the
HLO and the flags, so a loaded executable computes what a fresh compile computes: the
bit-exact resume tests hold either way.
"""

import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from _util import FAST_COMPILE

# Read when the CPU backend starts, which is after this: set at import, not in a fixture.
if FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE}'.strip()

_SETTINGS = {
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
}


@pytest.fixture(scope='session', autouse=True)
def compile_once(tmp_path_factory):
  # Under pytest-xdist every worker's base directory sits in one session directory:
  # the workers share the cache there (JAX writes each entry once, under its key).
  if os.environ.get('PYTEST_XDIST_WORKER'):
    cache = tmp_path_factory.getbasetemp().parent / 'xla_cache'
    cache.mkdir(exist_ok=True)
  else:
    cache = tmp_path_factory.mktemp('xla_cache')
  settings = {'jax_compilation_cache_dir': str(cache), **_SETTINGS}
  # The CPU peak's shared probe record (metrics.ProbeRecord) of the tests' runs stays in
  # the session's directory, out of the user's cache.
  os.environ['SCALEJAX_CACHE_DIR'] = str(cache.parent / 'scalejax_cache')
  before = {k: getattr(jax.config, k) for k in settings}
  env_before = {k.upper(): os.environ.get(k.upper()) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
    os.environ[k.upper()] = str(v)
  compilation_cache.reset_cache()
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  for k, v in env_before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  compilation_cache.reset_cache()


# The two workers take whole files in collection order. The slowest files (a minute
# or more of a 2-core machine each, mostly subprocesses and trainings) go first, so
# that no worker is still on a long one when the other has run out of files.
SLOW_FIRST = ('test_train.py', 'test_fault_tolerance.py', 'test_sharding.py', 'test_bench.py',
              'test_roles.py', 'test_multihost.py', 'test_study.py', 'test_aot.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable

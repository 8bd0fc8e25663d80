"""Suite-wide settings: one persistent XLA compilation cache for every test.

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

_SETTINGS = {
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': 0,
}


@pytest.fixture(scope='session', autouse=True)
def compile_once(tmp_path_factory):
  settings = {'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('xla_cache')),
              **_SETTINGS}
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

"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
from flax import nnx

from scalejax.core import roles
from scalejax.train.config import load_config

ROOT = Path(__file__).parents[1]
# Tests compile hundreds of small programs and run each for a few steps: LLVM's -O0
# roughly halves XLA:CPU's compile time of a train step and changes nothing the tests
# check (a run is compared with runs compiled the same way). conftest.py sets it for the
# whole session, subprocesses included.
FAST_COMPILE = '--xla_backend_optimization_level=0'
SHAKESPEARE = ROOT / 'data' / 'tinyshakespeare.txt'  # ships with the repository


def tiny_config():
  """A fresh ConfigDict of configs/tiny.py (seconds-long synthetic-data runs)."""
  return load_config(ROOT / 'configs' / 'tiny.py')


def randomize_scales(module, seed=1):
  """Set every scale param to a random positive vector (not the init)."""
  state = nnx.state(module, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed), 1000))

  def f(v):
    if v.get_metadata()['role'] in roles.SCALE_ROLES:
      v[...] = jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5)
    return v
  jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, state)


def count_eqns(jaxpr, predicate) -> int:
  """Equations of a (closed) jaxpr, nested ones included (scan bodies, custom
  derivatives' functions), for which `predicate(eqn)` holds."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += bool(predicate(eqn))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
          n += count_eqns(sub, predicate)
  return n


def is_matrix_product(eqn) -> bool:
  """A dot_general of two operands of rank 2 or more (not the matrix-vector products
  that sum rows on CPU, `reductions.row_sum`)."""
  return (eqn.primitive.name == 'dot_general'
          and all(v.aval.ndim >= 2 for v in eqn.invars))


def child_xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a subprocess: the session's flags, with `devices` emulated CPU devices."""
  own = f' --xla_force_host_platform_device_count={devices}' if devices else ''
  return (os.environ.get('XLA_FLAGS', FAST_COMPILE) + own).strip()


def run_command_lines(cases: list[list[str]], env: dict | None = None) -> list[dict]:
  """[{'rc', 'stdout', 'stderr'}] of each command line, all run in one fresh Python
  process from the repository's top (tests/_cli_driver.py says how)."""
  with tempfile.TemporaryDirectory() as tmp:
    cases_path, results_path = os.path.join(tmp, 'cases.json'), os.path.join(tmp, 'out.json')
    with open(cases_path, 'w') as f:
      json.dump(cases, f)
    proc = subprocess.run([sys.executable, str(ROOT / 'tests' / '_cli_driver.py'), cases_path,
                           results_path], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(results_path) as f:
      return json.load(f)

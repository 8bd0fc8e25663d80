"""Helpers the study commands share (not a command itself): run labels, paired statistics."""

from __future__ import annotations

import ast
import math
import os

import numpy as np


# The repository (this file is three levels down): trials run there, commands name
# files relative to it.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_sets(items) -> dict:
  """['KEY=VALUE', ...] (a `config.` prefix allowed) -> {KEY: the value as a literal}."""
  out = {}
  for item in items or ():
    if '=' not in item:
      raise ValueError(f'--set {item!r} is not KEY=VALUE (e.g. --set train.steps=300)')
    k, v = item.split('=', 1)
    out[k.removeprefix('config.')] = _parse_value(v)
  return out


def parse_runs(spec: str) -> dict[str, str]:
  """'label=dir,label=dir' (or bare dirs, labelled by their basename) -> {label: dir}."""
  out = {}
  for item in filter(None, spec.split(',')):
    label, _, path = item.rpartition('=')
    out[label or os.path.basename(os.path.normpath(path))] = path
  if not out:
    raise ValueError('--runs is empty; pass label=workdir[,label=workdir...]')
  return out


def t_critical(dof: int, level: float = 0.95) -> float:
  from scipy import stats  # jax's own dependency
  return float(stats.t.ppf(0.5 + level / 2, dof))


def paired_difference(x, base) -> dict:
  """Mean of x - base over paired seeds, its 95% CI and whether it excludes 0."""
  d = np.asarray(x, float) - np.asarray(base, float)
  n = len(d)
  out = {'n': n, 'diff': float(d.mean()) if n else math.nan}
  if n < 2:
    return {**out, 'sd': math.nan, 'ci': math.nan, 't': math.nan, 'beyond_noise': False}
  sd = float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  ci = t_critical(n - 1) * se
  t = out['diff'] / se if se > 0 else (math.inf if out['diff'] else 0.0) * np.sign(out['diff'])
  return {**out, 'sd': sd, 'ci': ci, 't': float(t), 'beyond_noise': bool(abs(out['diff']) > ci)}

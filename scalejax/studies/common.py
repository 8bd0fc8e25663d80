"""Helpers the study commands share (not a command itself)."""

from __future__ import annotations

import os


def parse_runs(spec: str) -> dict[str, str]:
  """'label=dir,label=dir' (or bare dirs, labelled by their basename) -> {label: dir}."""
  out = {}
  for item in filter(None, spec.split(',')):
    label, _, path = item.rpartition('=')
    out[label or os.path.basename(os.path.normpath(path))] = path
  if not out:
    raise ValueError('--runs is empty; pass label=workdir[,label=workdir...]')
  return out

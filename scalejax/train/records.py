"""The workdir's record files (`*.jsonl`, config.json) kept consistent with the checkpoint
a run resumes from: atomic writes, and records of steps a rerun redoes dropped first."""

from __future__ import annotations

import json
import os


def truncate_records(workdir: str, step: int) -> None:
  """Drops records with 'step' > `step` from the workdir's *.jsonl files.

  A run resumed from the checkpoint at `step` redoes the later steps and writes their
  records again; dropping the old ones first keeps every record exactly once, as an
  uninterrupted run writes it. A torn last line (a kill mid-write) is dropped too.
  Each file is replaced atomically, so a kill here loses nothing.
  """
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if not name.endswith('.jsonl') or not os.path.isfile(path):
      continue
    with open(path) as f:
      lines = f.read().split('\n')
    kept = [line for line in lines if _keep(line, step)]
    if len(kept) != len([l for l in lines if l]):
      atomic_write(path, ''.join(line + '\n' for line in kept))


def _keep(line: str, step: int) -> bool:
  if not line:
    return False
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return not isinstance(record, dict) or not record.get('step', 0) > step


def atomic_write(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

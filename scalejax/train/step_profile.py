"""Where a compiled step's time goes on CPU: XLA's own trace of its thunks, summed by
kind of work, by phase and by how many threads are busy at once.

XLA:CPU runs a compiled program as a sequence of thunks (a fused loop, a library dot,
a copy); independent thunks may run side by side, and a thunk may split itself over
the intra-op threads. Compiled with `TRACE_OPTION`, each thunk's run is an event in
the profiler's trace, named as its instruction in the compiled HLO. `profile` traces a
few steps and `summarize` reduces the events to, per step:

- `by_kind`: thread milliseconds of each kind of work (`KINDS`, read off the ops inside
  each fused computation), and the busiest thunks;
- `by_phase`: the same split by forward pass, backward pass and update (`PHASES`, read
  off the op names autodiff leaves, or for an instruction without one, off its
  operands'), with each phase's thunk count;
- `busy`: milliseconds during which 0, 1, 2, ... threads ran a thunk. A library that
  splits one thunk's work over the pool (YNNPACK a large dot) runs the helpers' share
  outside any thunk event, so this is a lower bound on the concurrency;
- `by_source`: the same thread time by the line of code each thunk's ops were traced
  from (`sources`: JAX records each op's Python frame in the module; this package's
  lines, or an installed library's such as Optax's), so that a variant's extra time
  reads as lines of code: the table prints each case's lines against the first case's.

The bench prints them (`python -m scalejax.cli.bench --profile_steps N`). Tracing slows
the step: compare the split, not the traced wall with an untraced one.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

# Compile option (a DebugOptions field) that makes XLA:CPU emit one trace event per thunk.
TRACE_OPTION = {'xla_cpu_enable_xprof_traceme': True}

KINDS = ('dot', 'reduce', 'transpose', 'movement', 'elementwise', 'other')
PHASES = ('forward', 'backward', 'update')
# Ops that only move or reinterpret data (no arithmetic).
_MOVEMENT = {'parameter', 'constant', 'copy', 'bitcast', 'reshape', 'broadcast', 'slice',
             'concatenate', 'dynamic-slice', 'dynamic-update-slice', 'pad', 'tuple',
             'get-tuple-element', 'iota', 'reverse', 'gather', 'scatter'}
# Thunks that run other thunks: their events enclose their body's, so they are neither
# summed by kind nor counted as busy time.
_CONTROL = {'while', 'conditional', 'call', 'async-start', 'async-done'}

_INSTRUCTION = re.compile(r'\s*(?:ROOT\s+)?%([^\s=]+) = ')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r'stack_frame_id=(\d+)')
# The module's tables of Python source locations (printed ahead of its computations):
# each line of a table is `id value`.
_SOURCE_TABLES = ('FileNames', 'FileLocations', 'StackFrames')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')
_LOCATION = re.compile(r'file_name_id=(\d+) .*\bline=(\d+)')
_STACK_FRAME = re.compile(r'file_location_id=(\d+)')
PACKAGE = 'scalejax'  # `sources` prints paths in this package from its root
# a computation's first line ('ENTRY %main ... {' or '%fused_computation.3 (...) -> ... {')
COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([^\s(]+)\s.*\{\s*$')


def _op_and_calls(rest: str) -> tuple[str, str | None, list[str]]:
  """(opcode, called computation or None, operand names) of an instruction's text after
  ' = '."""
  if rest.startswith('('):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  op = re.match(r'\s*([a-z][a-z0-9\-]*)\(([^)]*)\)', rest)
  calls = re.search(r'calls=%([^\s,]+)', rest)
  operands = re.findall(r'%([^\s,]+)', op.group(2)) if op else []
  return (op.group(1) if op else ''), (calls.group(1) if calls else None), operands


def _kind(ops: set[str]) -> str:
  """The kind of a thunk running `ops`: a dot or a reduction (with whatever elementwise
  work is fused into it), a transpose or a copy that computes nothing, else elementwise."""
  if ops & {'dot', 'convolution'}:
    return 'dot'
  if ops & {'reduce', 'reduce-window'}:
    return 'reduce'
  if ops & _CONTROL or 'custom-call' in ops:
    return 'other'
  if ops <= _MOVEMENT | {'transpose'}:
    return 'transpose' if 'transpose' in ops else 'movement'
  return 'elementwise'


def _parse(hlo_text: str):
  """[(name, op, called computation, op_name, operands, stack frame id)] of every
  instruction, and per computation the set of its ops, the first op_name and the first
  stack frame id in it."""
  bodies: dict[str, set[str]] = collections.defaultdict(set)
  body_op_name: dict[str, str] = {}
  body_frame: dict[str, str] = {}
  instructions = []
  current = None
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op, calls, operands = _op_and_calls(line[m.end():])
      op_name = _OP_NAME.search(line)
      op_name = op_name.group(1) if op_name else ''
      frame = _FRAME.search(line)
      frame = frame.group(1) if frame else ''
      instructions.append((m.group(1), op, calls, op_name, operands, frame))
      if current is not None:
        bodies[current].add(op)
        if op_name:
          body_op_name.setdefault(current, op_name)
        if frame:
          body_frame.setdefault(current, frame)
      continue
    m = COMPUTATION.match(line)
    if m:
      current = m.group(1)
  return instructions, bodies, body_op_name, body_frame


def classify(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
  """({instruction name: kind}, {instruction name: phase}) for every instruction of a
  compiled module's text (`compiled.as_text()`).

  Kind: a fusion's from the ops of the computation it calls, any other instruction's
  from its own op ('control' for loops, conditionals and calls). Phase (PHASES): from
  the op_name JAX records on each op: under autodiff's transpose the backward pass,
  under its jvp alone the forward pass, anything else (the optimizer's update,
  clipping, the non-finite guard) the update; a fusion without an op_name of its own
  takes the first one inside it. An instruction with none, in it or inside it (half of a
  reduction XLA split in two, a copy), takes the phase of its first operand that has
  one; with none there either, the update.
  """
  instructions, bodies, body_op_name, _ = _parse(hlo_text)
  # kinds, and the op_name each phase is read from (in HLO text an instruction's
  # operands precede it)
  kinds, named = {}, {}
  for name, op, calls, op_name, operands, _ in instructions:
    if op in _CONTROL:
      kinds[name] = 'control'
    elif op == 'fusion' and calls is not None:
      kinds[name] = _kind(bodies.get(calls, set()))
    else:
      kinds[name] = _kind({op})
    named[name] = op_name or body_op_name.get(calls, '') or next(
        (named[a] for a in operands if named.get(a)), '')
  return kinds, {name: _phase(source) for name, source in named.items()}


def sources(hlo_text: str) -> dict[str, str]:
  """{instruction name: the line of code its ops were traced from} for a compiled
  module's text: the location of the op's own stack frame (JAX records the innermost
  frame outside JAX), as 'model/layers.py:126' for this package's files (the path
  inside the package), 'optax/_src/transform.py:300' for an installed library's (the
  path inside site-packages), else the file's name. The ops of a custom VJP's rules
  carry the line that calls the function.

  A fusion without a frame of its own takes the first one inside it; an instruction
  with none, in it or inside it (half of a reduction XLA split in two, a copy), takes
  that of its first operand that has one (as `classify` reads phases); with none there
  either, ''.
  """
  tables = {t: {} for t in _SOURCE_TABLES}
  table = None
  for line in hlo_text.splitlines():
    if line in tables:
      table = tables[line]
      continue
    row = _TABLE_ROW.match(line) if table is not None else None
    if row is None:
      table = None
      continue
    table[row.group(1)] = row.group(2)
  files = {i: _short_path(name.strip('"')) for i, name in tables['FileNames'].items()}
  locations = {}
  for i, text in tables['FileLocations'].items():
    m = _LOCATION.search(text)
    if m:
      locations[i] = f'{files.get(m.group(1), "?")}:{m.group(2)}'
  frame_line = {}
  for i, text in tables['StackFrames'].items():
    m = _STACK_FRAME.search(text)
    if m and m.group(1) in locations:
      frame_line[i] = locations[m.group(1)]

  instructions, _, _, body_frame = _parse(hlo_text)
  out: dict[str, str] = {}
  for name, _, calls, _, operands, frame in instructions:
    out[name] = frame_line.get(frame or body_frame.get(calls, ''), '') or next(
        (out[a] for a in operands if out.get(a)), '')
  return out


def _short_path(path: str) -> str:
  """A source file's path as `sources` prints it: inside this package, inside
  site-packages, else the file's name."""
  for marker in (f'/{PACKAGE}/', '/site-packages/'):
    cut = path.rfind(marker)
    if cut >= 0:
      return path[cut + len(marker):]
  return os.path.basename(path)


def _phase(op_name: str) -> str:
  if 'transpose(jvp' in op_name:  # autodiff's transpose of the forward: the backward pass
    return 'backward'
  if 'jvp(' in op_name:
    return 'forward'
  return 'update'


@dataclasses.dataclass
class StepProfile:
  """Per step, in milliseconds: `wall` of the traced steps, `by_kind` thread time of
  each kind (KINDS), `busy` time with n threads running a thunk, `by_phase` each phase's
  (PHASES) thread time, `phase_busy` its time with n >= 1 threads running one of its
  thunks and `phase_thunks` its thunks run per step; `top` the busiest thunks as (name,
  kind, thread ms); `by_source` thread time by (source line, phase, kind), the largest
  first."""
  steps: int
  wall: float
  by_kind: dict[str, float]
  busy: dict[int, float]
  top: list[tuple[str, str, float]]
  by_phase: dict[str, float] = dataclasses.field(default_factory=dict)
  phase_busy: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
  phase_thunks: dict[str, float] = dataclasses.field(default_factory=dict)
  by_source: list[tuple[str, str, str, float]] = dataclasses.field(default_factory=list)

  @property
  def thunk_ms(self) -> float:
    return sum(self.by_kind.values())

  def to_dict(self) -> dict:
    return dict(steps=self.steps, wall_ms=self.wall, thunk_ms=self.thunk_ms,
                by_kind_ms=self.by_kind, busy_ms={str(k): v for k, v in self.busy.items()},
                by_phase_ms=self.by_phase,
                phase_busy_ms={p: {str(k): v for k, v in b.items()}
                               for p, b in self.phase_busy.items()},
                phase_thunks=self.phase_thunks,
                top=[dict(name=n, kind=k, ms=ms) for n, k, ms in self.top],
                by_source=[dict(where=w, phase=p, kind=k, ms=ms)
                           for w, p, k, ms in self.by_source])


def _threads_busy(intervals: dict[object, list[tuple[float, float]]]) -> dict[int, float]:
  """{n: microseconds during which n threads are inside one of their intervals}, n >= 1,
  from each thread's (start, end) intervals (nested or overlapping ones count once)."""
  edges = []
  for spans in intervals.values():
    merged = []
    for start, end in sorted(spans):
      if merged and start <= merged[-1][1]:
        merged[-1][1] = max(merged[-1][1], end)
      else:
        merged.append([start, end])
    edges += [(s, 1) for s, _ in merged] + [(e, -1) for _, e in merged]
  busy: collections.Counter = collections.Counter()
  running, last = 0, None
  for t, change in sorted(edges):
    if last is not None and t > last and running:
      busy[running] += t - last
    running, last = running + change, t
  return dict(sorted(busy.items()))


def summarize(events: list[dict], kinds: dict[str, str], steps: int, wall_s: float,
              top: int = 8, phases: dict[str, str] | None = None,
              where: dict[str, str] | None = None) -> StepProfile:
  """A StepProfile of trace `events` (Chrome trace 'X' events: name, tid, ts, dur in
  microseconds) of `steps` steps that took `wall_s` seconds. Events whose name is not
  an instruction in `kinds` (the runtime's own, Python's) are left out; `phases`
  ({name: phase}, `classify`'s second half) adds the split by phase, `where` ({name:
  source line}, `sources`) the split by source line."""
  per_thunk: collections.Counter = collections.Counter()
  runs: collections.Counter = collections.Counter()
  intervals = collections.defaultdict(list)
  phase_intervals = collections.defaultdict(lambda: collections.defaultdict(list))
  phase_of = (lambda name: phases.get(name, 'update')) if phases is not None else None
  for e in events:
    kind = kinds.get(e.get('name'))
    if e.get('ph') != 'X' or kind is None or kind == 'control':
      continue
    per_thunk[e['name']] += e['dur']
    runs[e['name']] += 1
    span = (e['ts'], e['ts'] + e['dur'])
    intervals[e['tid']].append(span)
    if phase_of:
      phase_intervals[phase_of(e['name'])][e['tid']].append(span)
  ms = lambda us: us / steps / 1e3
  by_kind = {k: 0.0 for k in KINDS}
  by_phase = {p: 0.0 for p in PHASES} if phase_of else {}
  phase_thunks = dict.fromkeys(by_phase, 0.0)
  for name, us in per_thunk.items():
    by_kind[kinds[name]] += ms(us)
    if phase_of:
      by_phase[phase_of(name)] += ms(us)
      phase_thunks[phase_of(name)] += runs[name] / steps
  busy = {n: ms(us) for n, us in _threads_busy(intervals).items()}
  # the traced steps' time with no thunk running (dispatch, waits): 0 threads busy
  busy = {0: max(0.0, wall_s * 1e3 / steps - sum(busy.values())), **busy}
  phase_busy = {p: {n: ms(us) for n, us in _threads_busy(phase_intervals[p]).items()}
                for p in by_phase}
  busiest = [(n, kinds[n], ms(us)) for n, us in per_thunk.most_common(top)]
  by_source: collections.Counter = collections.Counter()
  if where is not None:
    for name, us in per_thunk.items():
      phase = phase_of(name) if phase_of else ''
      by_source[(where.get(name) or '?', phase, kinds[name])] += ms(us)
  return StepProfile(steps, wall_s * 1e3 / steps, by_kind, busy, busiest, by_phase,
                     phase_busy, phase_thunks,
                     [(*key, v) for key, v in by_source.most_common()])


def profile(step, state, batches: list, steps: int, hlo_text: str):
  """Traces `steps` calls of `step` (an executable compiled with TRACE_OPTION) from
  `state`; returns (StepProfile, the state after them)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
      t = time.perf_counter()
      for i in range(steps):
        state, m = step(state, batches[i % len(batches)])
      jax.block_until_ready(m)
      wall = time.perf_counter() - t
    finally:
      jax.profiler.stop_trace()
    found = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
    if not found:
      raise RuntimeError(f'the profiler wrote no perfetto trace under {trace_dir}')
    with gzip.open(found[0]) as f:
      events = json.load(f)['traceEvents']
  kinds, phases = classify(hlo_text)
  return summarize(events, kinds, steps, wall, phases=phases, where=sources(hlo_text)), state


def table(profiles: dict[str, dict]) -> str:
  """One line per case (`StepProfile.to_dict()`s, as the bench's JSON holds them): wall
  and thunk time per step, thread time by kind, and the time during which 0, 1, 2, ...
  threads are busy; then each case's thread time by phase, and its busiest thunks."""
  threads = sorted({int(n) for p in profiles.values() for n in p['busy_ms']})
  head = (f'{"variant":<16} {"wall ms":>8} {"thunk ms":>9} '
          + ' '.join(f'{k:>11}' for k in KINDS)
          + ' | ms with n threads busy: ' + ' '.join(f'{n:>7}' for n in threads))
  lines = [head, '-' * len(head)]
  for name, p in profiles.items():
    lines.append(f'{name:<16} {p["wall_ms"]:8.2f} {p["thunk_ms"]:9.2f} '
                 + ' '.join(f'{p["by_kind_ms"][k]:11.2f}' for k in KINDS)
                 + ' | ' + ' ' * 24 + ' '.join(f'{p["busy_ms"].get(str(n), 0.0):7.2f}'
                                             for n in threads))
  for name, p in profiles.items():
    if not p['by_phase_ms']:
      continue
    lines.append(f'{name}, by phase (thread ms in thunks per step; ms with 1, 2, ... threads '
                 'busy): ' + '; '.join(
        f'{phase} {ms:.2f} in {p["phase_thunks"][phase]:.0f} (' + ', '.join(
            f'{v:.2f}' for _, v in sorted(p['phase_busy_ms'][phase].items(),
                                          key=lambda kv: int(kv[0]))) + ')'
        for phase, ms in p['by_phase_ms'].items()))
  for name, p in profiles.items():
    lines.append(f'{name}, busiest thunks (thread ms per step): '
                 + ', '.join(f'{t["name"]} ({t["kind"]}) {t["ms"]:.2f}' for t in p['top']))
  lines += source_lines(profiles)
  return '\n'.join(lines)


def source_lines(profiles: dict[str, dict], top: int = 12) -> list[str]:
  """The first case's `top` source lines by thread time, then each other case's `top`
  largest differences from it, line by line (a line one case lacks counts as 0 there)."""
  keyed = {name: {(e['where'], e['phase'], e['kind']): e['ms'] for e in p.get('by_source', [])}
           for name, p in profiles.items()}
  keyed = {name: rows for name, rows in keyed.items() if rows}
  if not keyed:
    return []
  first, *others = keyed
  row = lambda key, ms, sign='': f'  {ms:{sign}9.2f}  {key[1]:<8} {key[2]:<11} {key[0]}'
  out = [f'{first}, by source line (thread ms per step; phase, kind, line of code):']
  out += [row(k, ms) for k, ms in sorted(keyed[first].items(), key=lambda kv: -kv[1])[:top]]
  for name in others:
    diff = {k: keyed[name].get(k, 0.0) - keyed[first].get(k, 0.0)
            for k in keyed[name].keys() | keyed[first].keys()}
    total = sum(keyed[name].values()) - sum(keyed[first].values())
    out.append(f'{name} - {first}, by source line ({total:+.2f} thread ms per step in all; '
               'the largest differences):')
    out += [row(k, ms, '+') for k, ms in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]]
  return out

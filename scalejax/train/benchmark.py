"""Timing train steps side by side: variants (and calls) measured in interleaved rounds.

The machinery of `scalejax.cli.bench` (and of the one-accelerator script,
`scalejax.cli.gpu_bench`): every case is compiled in one process, then `rounds` rounds
each run `steps` steps of every case in turn, so load from other processes falls on
all of them alike and the ratios stay meaningful on a shared machine. What is
reported, field by field: the bench command's docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax

from scalejax.core import sharding
from scalejax.model import counting
from scalejax.train import (matmuls, metrics, nonfinite, revisions, step_profile,
                            torch_reference, trainer, xla_flags)

CALLS = ('compiled', 'jit', 'loop', 'untuned')  # what a timed step calls (--call)

FIELDS = ('variant', 'compile_s', 'step_ms', 'step_ms_min', 'cpu_ms', 'page_faults',
          'tokens_per_s', 'flops_per_step', 'mfu', 'peak_bytes', 'device_peak_bytes', 'step_ratio',
          'memory_ratio', 'loss')


@dataclasses.dataclass
class Case:
  """One variant, compiled and ready to step."""
  name: str
  step: object
  state: dict
  batches: list
  tokens_per_step: int
  flops_per_step: float
  compile_s: float
  peak_bytes: int
  wall: list = dataclasses.field(default_factory=list)
  cpu: list = dataclasses.field(default_factory=list)
  faults: list = dataclasses.field(default_factory=list)  # minor page faults per step
  loss: float = float('nan')
  vocab: int = 0
  mesh: object = None  # set: steps run inside jax.set_mesh, as the train loop runs them
  lowered: object = None  # the lowered step, to compile again with other options

  def clocks(self) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of the process that steps, so far; a minor
    fault is a fresh page touched (allocator churn)."""
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

  def close(self) -> None:
    pass

  def run(self, n: int) -> float:
    m = None
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for i in range(n):
        self.state, m = self.step(self.state, self.batches[i % len(self.batches)])
      jax.block_until_ready(m)
    return float(m['loss'])


def compiled_bytes(compiled) -> int:
  """Bytes the compiled step holds at its peak, by XLA's buffer assignment."""
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def build_case(cfg, variant: str, n_batches: int, call: str = 'compiled',
               name: str | None = None) -> Case:
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.variant = variant
  name = name or variant
  run, state = trainer.build_run(cfg, workdir=None)
  batches = [sharding.global_batch(next(run.data.train_iter), run.mesh)
             for _ in range(n_batches)]
  # 'untuned': the compiled step with XLA's default options instead of the project's
  jitted = trainer.make_train_step(run, tuned=call != 'untuned')
  with jax.set_mesh(run.mesh):
    t = time.perf_counter()
    lowered = jitted.lower(state, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    if call in ('jit', 'loop'):  # ahead-of-time compiling does not fill jit's cache: its first call
      state, m = jitted(state, batches[0])  # compiles again, here and untimed
      jax.block_until_ready(m)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  flops = counting.flops_per_token(run.model_cfg, cfg.train.seq_len) * tokens
  args = (state, batches, tokens, flops, compile_s, compiled_bytes(compiled))
  if call == 'loop':
    return LoopCase(name, jitted, *args, vocab=run.model_cfg.vocab_size, mesh=run.mesh,
                    run_=run, watch=nonfinite.NonFiniteWatch(cfg.train))
  return Case(name, jitted if call == 'jit' else compiled, *args,
              vocab=run.model_cfg.vocab_size, mesh=run.mesh if call == 'jit' else None,
              lowered=None if call == 'jit' else lowered)


@dataclasses.dataclass
class LoopCase(Case):
  """Steps as `train.py` takes them (`trainer.advance`): the next batch from the data
  pipeline put on the mesh, the jitted step, earlier steps' verdicts read in turn."""
  run_: object = None
  watch: object = None
  steps_done: int = 0  # step numbers go on across rounds, as the watch expects

  def run(self, n: int) -> float:
    m = None
    with jax.set_mesh(self.mesh):
      for _ in range(n):
        self.steps_done += 1
        self.state, m, _ = trainer.advance(self.run_, self.step, self.state, self.watch,
                                           self.steps_done, -1)
      jax.block_until_ready(m)
    return float(m['loss'])


def measure(cases: list[Case], rounds: int, steps: int, warmup: int, probe=None) -> None:
  """Times `rounds` rounds of `steps` steps of every case, calling `probe()` after each."""
  for case in cases:
    if warmup:  # run(0) has no step whose loss it could return
      case.run(warmup)
  for _ in range(rounds):
    for case in cases:
      c, f = case.clocks()
      t = time.perf_counter()
      case.loss = case.run(steps)
      case.wall.append((time.perf_counter() - t) / steps)
      c2, f2 = case.clocks()
      case.cpu.append((c2 - c) / steps)
      case.faults.append((f2 - f) / steps)
    if probe is not None:
      probe()




@dataclasses.dataclass
class TorchReference(Case):
  """nanoGPT's model and step in PyTorch (`torch_reference.py`), in its own process,
  timed like a variant: `run(n)` asks it for n steps; its CPU time and page faults are
  its process's own."""
  proc: subprocess.Popen = None
  answer: dict = dataclasses.field(default_factory=dict)

  def _ask(self, message: dict) -> dict:
    self.proc.stdin.write(json.dumps(message) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch reference process exited with code {self.proc.wait()} '
                         '(its error is printed above)')
    return json.loads(line)

  def run(self, n: int) -> float:
    self.answer = self._ask({'steps': n})
    return self.answer['loss']

  def matmul(self, product, calls: int) -> float:
    """Seconds of `calls` calls of torch.matmul on `product` (a `matmuls.Product`)."""
    p = product
    return self._ask({'matmul': [p.batch, p.m, p.k, p.n, p.dtype], 'calls': calls})['seconds']

  def clocks(self) -> tuple[float, int]:
    return self.answer['cpu_s'], self.answer['minor_faults']

  def close(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=30)


def nanogpt_torch_case(cfg, vocab: int) -> TorchReference:
  """nanoGPT's CPU run at this config's shape and optimizer settings, in PyTorch."""
  if importlib.util.find_spec('torch') is None:  # found, not imported: that is the child's
    raise SystemExit('--nanogpt_torch needs PyTorch: pip install -e ".[hf]" '
                     '(or pip install torch)')
  o = cfg.optimizer
  shape = dict(d_model=cfg.model.d_model, n_heads=cfg.model.n_heads,
               n_layers=cfg.model.n_layers, batch=cfg.train.batch_size,
               seq_len=cfg.train.seq_len, vocab=vocab, lr=o.lr, b1=o.b1, b2=o.b2,
               weight_decay=o.weight_decay, grad_clip=o.grad_clip, seed=cfg.seed)
  proc = subprocess.Popen([sys.executable, '-m', 'scalejax.train.torch_reference'],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  case = TorchReference('nanogpt_torch', None, None, [], shape['batch'] * shape['seq_len'],
                        torch_reference.flops_per_step(shape), 0.0, -1, proc=proc)
  case.answer = case._ask(shape)  # built and ready, with its clocks so far
  return case


def device_peak_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get('peak_bytes_in_use', -1))


def report(cases: list[Case], peak: float, peak_source: str, rev: str = '') -> list[dict]:
  """One row per case. With `rev` (`--against`), a case of this tree that has a
  counterpart 'NAME@REV' also gets its step and memory over that counterpart's."""
  rows = []
  by_name = {c.name: c for c in cases}
  base = next((c for c in cases if c.name == 'baseline'), None)
  base_ms = statistics.median(base.wall) if base else None
  for c in cases:
    step_s = statistics.median(c.wall)
    row = dict(
        variant=c.name, compile_s=c.compile_s, step_ms=1e3 * step_s,
        step_ms_min=1e3 * min(c.wall), cpu_ms=1e3 * statistics.median(c.cpu),
        page_faults=statistics.median(c.faults),
        tokens_per_s=c.tokens_per_step / step_s, flops_per_step=c.flops_per_step,
        mfu=c.flops_per_step / step_s / peak if peak > 0 else float('nan'),
        peak_bytes=c.peak_bytes, device_peak_bytes=device_peak_bytes(),
        step_ratio=step_s / base_ms if base else float('nan'),
        memory_ratio=c.peak_bytes / base.peak_bytes if base and min(c.peak_bytes, base.peak_bytes) > 0
        else float('nan'),
        loss=c.loss,
        # within-round ratios: each round's step time over baseline's in that round
        step_ratio_rounds=[w / b for w, b in zip(c.wall, base.wall)] if base else [],
        step_ms_rounds=[1e3 * w for w in c.wall],
    )
    other = by_name.get(f'{c.name}@{rev}') if rev else None
    if other is not None:
      row.update(against=rev, against_step_ratio=step_s / statistics.median(other.wall),
                 against_step_ratio_rounds=[w / o for w, o in zip(c.wall, other.wall)],
                 against_memory_ratio=c.peak_bytes / other.peak_bytes
                 if min(c.peak_bytes, other.peak_bytes) > 0 else float('nan'))
    rows.append(row)
  return rows


def against_table(rows: list[dict]) -> str:
  """This tree's steps over the other revision's (`--against`), one line per case."""
  lines = []
  for r in rows:
    if 'against' in r:
      lines.append(f'{r["variant"]:<12} this tree / {r["against"]}: step '
                   f'{r["against_step_ratio"]:.3f}x (median of per-round ratios '
                   f'{statistics.median(r["against_step_ratio_rounds"]):.3f}x), memory '
                   f'{r["against_memory_ratio"]:.3f}x')
  return '\n'.join(lines)


def table(rows: list[dict]) -> str:
  w = max([12] + [len(r['variant']) for r in rows])
  head = (f'{"variant":<{w}} {"compile s":>9} {"step ms":>8} {"min ms":>7} {"cpu ms":>7} {"faults":>7} '
          f'{"tok/s":>8} {"MFU":>6} {"peak MiB":>9} {"step x":>7} {"mem x":>6}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(
        f'{r["variant"]:<{w}} {r["compile_s"]:9.2f} {r["step_ms"]:8.2f} '
        f'{r["step_ms_min"]:7.2f} {r["cpu_ms"]:7.2f} {r["page_faults"]:7.0f} '
        f'{r["tokens_per_s"]:8.0f} '
        f'{r["mfu"]:6.1%} {r["peak_bytes"] / 2**20:9.2f} {r["step_ratio"]:7.3f} '
        f'{r["memory_ratio"]:6.3f}')
  return '\n'.join(lines)


def machine() -> dict:
  dev = jax.devices()[0]
  info = dict(platform=dev.platform, device_kind=dev.device_kind,
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              processor=platform.processor() or platform.machine(),
              jax=jax.__version__, python=platform.python_version(),
              xla_flags=os.environ.get('XLA_FLAGS', ''), tuning=xla_flags.apply(),
              compile_options=xla_flags.compiler_options(dev.platform))
  info['cpu_model'] = metrics.cpu_model()
  return info


def loadavg() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def profile_cases(cases: list[Case], steps: int) -> dict[str, step_profile.StepProfile]:
  """Each compiled case (not the loop's, jit's or the reference's steps) compiled again
  with XLA's per-thunk trace on and `steps` of its steps traced (`step_profile`)."""
  out = {}
  for case in cases:
    if case.lowered is None:  # the loop's, jit's and the reference's cases keep none
      continue
    traced = case.lowered.compile(compiler_options=step_profile.TRACE_OPTION)
    for i in range(2):  # warm: the first calls of a fresh executable allocate
      case.state, _ = traced(case.state, case.batches[i % len(case.batches)])
    out[case.name], case.state = step_profile.profile(traced, case.state, case.batches, steps,
                                                      traced.as_text())
  return out


def time_step_products(cases: list[Case], rounds: int) -> tuple[str, list[dict]]:
  """(variant, `matmuls.time_products` rows) of the first compiled case's step, against
  the PyTorch reference when it is among `cases`."""
  case = next(c for c in cases if c.lowered is not None)
  reference = next((c for c in cases if isinstance(c, TorchReference)), None)
  found = matmuls.products(case.step.as_text())
  return case.name, matmuls.time_products(found, rounds, calls=50, reference=reference)


def run_benchmark(cfg, variants: list[str], rounds: int, steps: int, warmup: int,
                  reference: bool = False, call: str | list[str] = 'compiled',
                  profile_steps: int = 0, matmul_rounds: int = 0,
                  against: str = '', config_path: str = '') -> dict:
  """`call`: one of CALLS, or several: every variant is then timed once per call, named
  'VARIANT@CALL' after the first (`baseline@loop` against `baseline`: the loop's cost).
  `profile_steps` > 0: after timing, each compiled case's steps are traced that many
  times and summed by kind of work and threads busy (`profiles` in the result).
  `matmul_rounds` > 0: then the first compiled variant's matrix products are timed
  alone in that many rounds, in XLA and (with `reference`) in PyTorch (`matmuls`).
  `against`: a git revision or a directory with another `scalejax/` package, whose
  cases ('NAME@REV', from its copy of `config_path` with this config's overrides) are
  built in this process and timed in the same rounds (`revisions`)."""
  if profile_steps > 0 and jax.default_backend() != 'cpu':
    raise ValueError(f"--profile_steps reads XLA:CPU's per-thunk trace; this run is on "
                     f'{jax.default_backend()} (profile it with jax.profiler and TensorBoard)')
  load_start = loadavg()
  calls = [call] if isinstance(call, str) else list(call)
  bad = [c for c in calls if c not in CALLS]
  if bad or not calls:
    raise ValueError(f'unknown --call {bad}; valid: {", ".join(CALLS)}')
  if matmul_rounds > 0 and not {'compiled', 'untuned'} & set(calls):
    raise ValueError('--matmuls reads the products off a compiled step; add compiled to '
                     '--call')
  if against and not config_path:
    raise ValueError('--against needs the config file this run loaded (config_path)')
  plan = [(v, c, v if i == 0 else f'{v}@{c}') for i, c in enumerate(calls) for v in variants]
  cases = [build_case(cfg, v, n_batches=min(steps, 16), call=c, name=name)
           for v, c, name in plan]
  if against:
    cases += revisions.cases_at(against, cfg, config_path, plan, n_batches=min(steps, 16))
  if reference:
    cases.append(nanogpt_torch_case(cfg, cases[0].vocab))
  # The trainer's measure of the peak: on CPU one probe per round, their median.
  peak = metrics.Peak(first=0)
  try:
    measure(cases, rounds, steps, warmup, peak.sample)
    profiles = profile_cases(cases, profile_steps) if profile_steps > 0 else {}
    products = time_step_products(cases, matmul_rounds) if matmul_rounds > 0 else None
  finally:
    for case in cases:
      case.close()
  peak_source = peak.source + (' (one per round)' if peak.samples else '')
  rows = report(cases, peak.total(jax.device_count()), peak_source, against)
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      machine=machine(), load_avg_start=load_start, load_avg_end=loadavg(),
      peak_flops=peak.total(jax.device_count()), peak_source=peak_source,
      probe_flops_rounds=peak.samples, rounds=rounds, steps_per_round=steps, warmup=warmup,
      call=','.join(calls), against=against,
      batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
      model=cfg.model.to_dict(), results=rows,
      profiles={name: p.to_dict() for name, p in profiles.items()},
      matmuls={} if products is None else dict(variant=products[0], rows=products[1],
                                               totals=matmuls.totals(products[1])))

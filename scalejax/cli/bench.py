r"""Benchmark train steps: compile time, step time, tokens/s, memory, MFU, overhead.

    python -m scalejax.cli.bench --config configs/shakespeare_char.py \
        --variants baseline,unified --json bench.json [--config.KEY=VALUE ...]

Every variant is built from the same config and measured in one process. Steps are
timed in rounds: each round runs `--steps` steps of every variant in turn (and, on
CPU, the matmul probe), so load from other processes falls on all of them alike and
the ratios stay meaningful on a shared machine. Reported per variant:

- compile_s: lowering plus XLA compilation of the train step;
- step_ms: median over rounds of the mean step time (after `--warmup` steps), with
  the min and the process CPU time per step (robust to other processes' load);
- tokens_per_s, flops_per_step (analytic, `counting.flops_per_token`), mfu: achieved
  FLOP/s over the device peak (bf16 dense peak on TPU/GPU; on CPU the float32 matmul
  probe measured in the same rounds);
- peak_bytes: XLA's own account of the compiled step (arguments + outputs - aliased +
  temporaries) and, where the device reports it, the allocator's peak;
- step_ratio and memory_ratio to `baseline` (when measured).

Data come from the config's pipeline, fetched before timing. `--nanogpt_torch` adds
nanoGPT's model and optimizer step in PyTorch (if installed) to the same rounds: an
external reference measured under the same load.

`--call=jit` times each step as a call of the jitted function inside the mesh context
(its cache lookup and dispatch included) instead of a call of the compiled executable;
`--call=loop` times the train loop's own step (`trainer.advance`: the next batch from
the data pipeline put on the mesh, the jitted step, the previous step's verdict read).
Several calls time every variant once per call in the same rounds, so the ratio of
`baseline@loop` to `baseline` is the loop's cost over the step, under one load:

    python -m scalejax.cli.bench --config configs/shakespeare_char.py \
        --variants baseline --call=compiled,loop --rounds 7 --steps 20
"""

from __future__ import annotations

from scalejax.train import xla_flags

xla_flags.apply()  # before JAX creates its CPU client

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from scalejax.cli import common  # noqa: E402
from scalejax.core import sharding  # noqa: E402
from scalejax.model import counting  # noqa: E402
from scalejax.scales.variants import VARIANTS  # noqa: E402
from scalejax.train import metrics, nonfinite, trainer  # noqa: E402

CALLS = ('compiled', 'jit', 'loop')  # what a timed step calls (--call)

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
  jitted = trainer.make_train_step(run)
  with jax.set_mesh(run.mesh):
    t = time.perf_counter()
    compiled = jitted.lower(state, batches[0]).compile()
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
              vocab=run.model_cfg.vocab_size, mesh=run.mesh if call == 'jit' else None)


@dataclasses.dataclass
class LoopCase(Case):
  """Steps as `train.py` takes them (`trainer.advance`): the next batch from the data
  pipeline put on the mesh, the jitted step, the previous step's verdict read."""
  run_: object = None
  watch: object = None

  def run(self, n: int) -> float:
    m = None
    with jax.set_mesh(self.mesh):
      for i in range(n):
        self.state, m, _ = trainer.advance(self.run_, self.step, self.state, self.watch,
                                           i + 1, -1)
      jax.block_until_ready(m)
    return float(m['loss'])


def measure(cases: list[Case], rounds: int, steps: int, warmup: int, probe=None) -> None:
  """Times `rounds` rounds of `steps` steps of every case, calling `probe()` after each."""
  for case in cases:
    if warmup:  # run(0) has no step whose loss it could return
      case.run(warmup)
  for _ in range(rounds):
    for case in cases:
      t, c, f = time.perf_counter(), time.process_time(), _minor_faults()
      case.loss = case.run(steps)
      case.wall.append((time.perf_counter() - t) / steps)
      case.cpu.append((time.process_time() - c) / steps)
      case.faults.append((_minor_faults() - f) / steps)
    if probe is not None:
      probe()


def _minor_faults() -> int:
  """This process's minor page faults so far: a fresh page touched (allocator churn)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def nanogpt_torch_case(cfg, vocab: int) -> Case:
  """nanoGPT's model and AdamW step in PyTorch (eager, CPU), timed like a variant.

  GPT-2 style: learned positions, LayerNorm with bias, fused qkv with bias, causal
  `scaled_dot_product_attention`, GELU MLP of width 4d, tied head, no dropout; the
  shape (layers, heads, width, context, batch) and optimizer settings come from `cfg`.
  Written here from the architecture's description, for timing only: it runs in the
  same rounds as the JAX variants, so both see the same load on a shared machine.
  """
  # OpenMP workers that spin while idle steal the cores from XLA's threads in between.
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  import torch
  import torch.nn.functional as F
  from torch import nn

  d, h, n_layers = cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers
  b, l = cfg.train.batch_size, cfg.train.seq_len

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
      heads = lambda t: t.view(b, l, h, d // h).transpose(1, 2)
      a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
      x = x + self.proj(a.transpose(1, 2).reshape(b, l, d))
      return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(l, d)
      self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
      self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(l))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T

  torch.manual_seed(cfg.seed)
  model = GPT()
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  o = cfg.optimizer
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=o.lr, betas=(o.b1, o.b2))
  gen = torch.Generator().manual_seed(cfg.seed)
  batches = [torch.randint(0, vocab, (b, l + 1), generator=gen) for _ in range(8)]

  def step(state, tokens):
    loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or float('inf'))
    opt.step()
    return state, loss

  class TorchCase(Case):
    def run(self, n):
      for i in range(n):
        _, loss = step(None, batches[i % len(batches)])
      return loss.item()

  matmul = n_layers * 12 * d * d + vocab * d
  flops = (6 * matmul + 12 * n_layers * d * l) * b * l
  return TorchCase('nanogpt_torch', None, None, batches, b * l, flops, 0.0, -1)


def device_peak_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get('peak_bytes_in_use', -1))


def report(cases: list[Case], peak: float, peak_source: str) -> list[dict]:
  rows = []
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
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  head = (f'{"variant":<12} {"compile s":>9} {"step ms":>8} {"min ms":>7} {"cpu ms":>7} {"faults":>7} '
          f'{"tok/s":>8} {"MFU":>6} {"peak MiB":>9} {"step x":>7} {"mem x":>6}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(
        f'{r["variant"]:<12} {r["compile_s"]:9.2f} {r["step_ms"]:8.2f} '
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
              xla_flags=os.environ.get('XLA_FLAGS', ''), tuning=xla_flags.apply())
  try:
    with open('/proc/cpuinfo') as f:
      info['cpu_model'] = next(l.split(':', 1)[1].strip() for l in f if 'model name' in l)
  except (OSError, StopIteration):
    pass
  return info


def loadavg() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def run_benchmark(cfg, variants: list[str], rounds: int, steps: int, warmup: int,
                  reference: bool = False, call: str | list[str] = 'compiled') -> dict:
  """`call`: one of CALLS, or several: every variant is then timed once per call, named
  'VARIANT@CALL' after the first (`baseline@loop` against `baseline`: the loop's cost)."""
  load_start = loadavg()
  calls = [call] if isinstance(call, str) else list(call)
  bad = [c for c in calls if c not in CALLS]
  if bad or not calls:
    raise ValueError(f'unknown --call {bad}; valid: {", ".join(CALLS)}')
  cases = [build_case(cfg, v, n_batches=min(steps, 16), call=c,
                      name=v if i == 0 else f'{v}@{c}')
           for i, c in enumerate(calls) for v in variants]
  if reference:
    cases.append(nanogpt_torch_case(cfg, cases[0].vocab))
  # The trainer's measure of the peak: on CPU one probe per round, their median.
  peak = metrics.Peak(first=0)
  measure(cases, rounds, steps, warmup, peak.sample)
  peak_source = peak.source + (', one per round' if peak.samples else '')
  rows = report(cases, peak.total(jax.device_count()), peak_source)
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      machine=machine(), load_avg_start=load_start, load_avg_end=loadavg(),
      peak_flops=peak.total(jax.device_count()), peak_source=peak_source,
      probe_flops_rounds=peak.samples, rounds=rounds, steps_per_round=steps, warmup=warmup,
      call=','.join(calls),
      batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
      model=cfg.model.to_dict(), results=rows)


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', 'configs/shakespeare_char.py',
                                  'config file (configs/*.py)', flag_values=fv, lock_config=True)
  flags.DEFINE_list('variants', ['baseline', 'unified'], 'comma-separated model.variant names',
                    flag_values=fv)
  flags.DEFINE_integer('rounds', 7, 'timed rounds (the median is reported)', flag_values=fv)
  flags.DEFINE_integer('steps', 10, 'steps per variant per round', flag_values=fv)
  flags.DEFINE_integer('warmup', 3, 'untimed steps per variant after compilation',
                       flag_values=fv)
  flags.DEFINE_list('call', ['compiled'], 'what a timed step calls, one or more of '
                    f'{", ".join(CALLS)}: the compiled executable, the jitted function '
                    'inside the mesh, or the train loop\'s step (next batch, step, verdict)',
                    flag_values=fv)
  flags.DEFINE_string('json', '', 'write the results here as JSON', flag_values=fv)
  flags.DEFINE_bool('nanogpt_torch', False, 'also time nanoGPT\'s model in PyTorch (needs '
                    'torch) in the same rounds, as an external reference', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  variants = fv.variants
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f'unknown model.variant {bad[0]!r} in --variants; valid: '
                     f'{", ".join(VARIANTS)}')
  if not variants:
    raise ValueError('--variants is empty')
  out = run_benchmark(common.loaded_config(fv), variants, fv.rounds, fv.steps, fv.warmup,
                      fv.nanogpt_torch, fv.call)
  print(f'{out["machine"]["device_kind"]} x{out["machine"]["device_count"]}, '
        f'load {out["load_avg_start"]:.1f}->{out["load_avg_end"]:.1f}, '
        f'peak {out["peak_flops"] / 1e9:.1f} GFLOP/s ({out["peak_source"]}), '
        f'{out["call"]} steps')
  print(table(out['results']))
  if fv.json:
    os.makedirs(os.path.dirname(os.path.abspath(fv.json)), exist_ok=True)
    with open(fv.json, 'w') as fh:
      json.dump(_plain(out), fh, indent=2)
    print(f'wrote {fv.json}')
  return out


def _plain(v):
  """JSON-safe copy: numpy scalars to Python, NaN/inf to null ("not measured")."""
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, (np.generic, jax.Array)):
    v = v.item()
  if isinstance(v, float) and not np.isfinite(v):
    return None
  return v


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

r"""One accelerator, a few minutes: the paper's smallest model, baseline against unified.

    python -m scalejax.cli.gpu_bench --out runs/gpu_bench      # one H100/H200, < 8 min
    python -m scalejax.cli.gpu_bench --smoke --out runs/gpu_smoke  # any machine: toy sizes

Part 1, speed: `configs/paper_dense_120m.py` (bfloat16, full remat, attention
`auto`: cuDNN flash attention on a GPU) at the largest of `--batches` whose compiled
step fits the device (XLA's account of the step against the allocator's limit, less
`--headroom`); then baseline and unified timed in interleaved rounds (the bench):
step time, tokens/s, MFU against the device's dense bf16 peak (`metrics.PEAK_FLOPS`,
989 TFLOP/s for H100/H200), memory, and unified / baseline.

Part 2, the first look at the recipe (when `--budget_s` leaves time for it, judged from
part 1's step time): baseline and unified trained `--curve_steps` steps each at the
same seed and data order on the byte-level corpus of the Python sources installed on
the machine (`--corpus`, tens of MB of `*.py` on a usual install; nothing downloaded),
their eval losses side by side.

Writes OUT/gpu_bench.json (and OUT/curves.png with part 2). `--smoke` shrinks the
model, batches, rounds and steps so that the whole command runs in a minute on a CPU:
the tests run it so.
"""

from __future__ import annotations

from scalejax.train import xla_flags

xla_flags.apply()  # before JAX creates its CPU client

import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402

from scalejax.cli import common  # noqa: E402
from scalejax.core import sharding  # noqa: E402
from scalejax.train import benchmark, metrics, presets, trainer  # noqa: E402

VARIANTS = ('baseline', 'unified')
GIB = 2**30
# --smoke: the same code path at sizes a CPU runs in seconds
SMOKE_MODEL = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=512, max_seq_len=128,
                   dtype='float32')  # XLA:CPU emulates bfloat16 matmuls


def default_corpus(smoke: bool) -> str:
  """Every `*.py` below the running Python's library directory (stdlib and
  site-packages); with `smoke`, the stdlib's top level only."""
  stdlib = sysconfig.get_paths()['stdlib']
  return (os.path.join(stdlib, '*.py') if smoke
          else os.path.join(os.path.dirname(stdlib), '**', '*.py'))


def speed_config(smoke: bool):
  cfg = presets.paper_config('dense_120m')
  cfg.train.update(log_every=10**6, eval_every=0)
  if smoke:
    cfg.model.update(**SMOKE_MODEL, remat='none')
    cfg.data.update(synthetic_vocab=SMOKE_MODEL['vocab_size'])
    cfg.train.update(seq_len=128)
  return cfg


def step_bytes(cfg, batch: int) -> int:
  """Bytes the compiled train step needs at `batch` (XLA's buffer assignment), compiled
  from an abstract state: nothing is allocated."""
  c = cfg.copy_and_resolve_references()
  c.train.batch_size = batch
  run, state = trainer.build_run(c, None, abstract=True)
  tokens = jax.ShapeDtypeStruct((batch, c.train.seq_len), jax.numpy.int32,
                                sharding=sharding.batch_sharding(run.mesh))
  with jax.set_mesh(run.mesh):
    compiled = trainer.make_train_step(run).lower(
        state, {'inputs': tokens, 'targets': tokens}).compile()
  return benchmark.compiled_bytes(compiled)


def device_limit() -> int | None:
  """The allocator's limit on the first device, in bytes (None where it reports none)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def largest_batch(cfg, batches: list[int], limit: int | None, headroom: float):
  """(batch, its step bytes, [(batch, bytes)] tried): the first of `batches` (largest
  first) whose step fits `limit * (1 - headroom)`; a device that reports no limit (a
  CPU) takes the largest, uncompiled (its bytes: None)."""
  tried = []
  for b in sorted(batches, reverse=True):
    if b % jax.device_count():
      continue
    if limit is None:
      return b, None, [(b, None)]
    need = step_bytes(cfg, b)
    tried.append((b, need))
    if limit is None or need <= limit * (1 - headroom):
      return b, need, tried
  raise ValueError(f'no batch of --batches={batches} fits {limit / GIB:.1f} GiB with '
                   f'{headroom:.0%} headroom; add smaller batches')


def curve_config(speed_cfg, batch: int, steps: int, corpus: str, max_mb: int):
  cfg = speed_cfg.copy_and_resolve_references()
  cfg.model.vocab_size = 0  # the byte tokenizer's 256
  cfg.data.update(source='text_files', tokenizer='byte', path=corpus,
                  max_bytes=max_mb * 2**20, eval_fraction=0.02, eval_batches=4)
  cfg.train.update(batch_size=batch, steps=steps, eval_every=max(1, steps // 10),
                   log_every=max(1, steps // 50))
  cfg.optimizer.update(warmup_steps=max(1, steps // 10))
  cfg.checkpoint.update(every=10 * steps, async_save=False)
  return cfg


def read_curve(workdir: str) -> dict:
  train, evals = [], []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'eval_loss' in r:
        evals.append((r['step'], r['eval_loss']))
      elif 'loss' in r:
        train.append((r['step'], r['loss']))
  return dict(train=train, eval=evals)


def plot_curves(curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, c in curves.items():
    steps, losses = zip(*c['eval'])
    ax.plot(steps, losses, marker='o', label=name)
  ax.set_xlabel('step')
  ax.set_ylabel('eval loss (bytes)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('out', 'runs/gpu_bench', 'output directory', flag_values=fv)
  flags.DEFINE_bool('smoke', False, 'toy sizes, a minute on a CPU (the tests run this)',
                    flag_values=fv)
  common.define_list('batches', [256, 192, 128, 96, 64, 48, 32, 16, 8],
                     'candidate global batch sizes, the largest that fits is used',
                     flag_values=fv)
  flags.DEFINE_float('headroom', 0.1, 'share of device memory left free', flag_values=fv)
  flags.DEFINE_integer('rounds', 5, 'timed rounds of the speed part', flag_values=fv)
  flags.DEFINE_integer('steps', 10, 'steps per variant per round', flag_values=fv)
  flags.DEFINE_float('budget_s', 480.0, 'wall-clock budget; part 2 runs only if it fits',
                     flag_values=fv)
  flags.DEFINE_integer('curve_steps', 600, 'training steps per variant in part 2',
                       flag_values=fv)
  flags.DEFINE_integer('curve_batch', 0, 'batch of part 2 (0: part 1\'s)', flag_values=fv)
  flags.DEFINE_string('corpus', '', 'files of part 2 (a glob; default: the installed '
                      'Python sources)', flag_values=fv)
  flags.DEFINE_integer('corpus_mb', 64, 'at most this many MiB of the corpus', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  start = time.perf_counter()
  batches = fv.batches
  rounds, steps, curve_steps = fv.rounds, fv.steps, fv.curve_steps
  if fv.smoke:
    batches, rounds, steps, curve_steps = [b for b in batches if b <= 8] or [8], 1, 2, 2
  os.makedirs(fv.out, exist_ok=True)
  cfg = speed_config(fv.smoke)
  limit = device_limit()
  batch, need, tried = largest_batch(cfg, batches, limit, fv.headroom)
  print(f'batch {batch}' + ('' if need is None else
                            f': step needs {need / GIB:.2f} GiB of {limit / GIB:.1f} GiB'))
  cfg.train.batch_size = batch
  speed = benchmark.run_benchmark(cfg, list(VARIANTS), rounds, steps, warmup=2)
  print(benchmark.table(speed['results']))
  out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             machine=benchmark.machine(), smoke=fv.smoke, batch_size=batch,
             batches_tried=tried, device_bytes_limit=limit, speed=speed)

  step_s = max(r['step_ms'] for r in speed['results']) / 1e3
  curve_batch = fv.curve_batch or batch
  # Two runs: their steps at part 1's pace (scaled by batch), plus compile and evals.
  needed = 2 * (curve_steps * step_s * curve_batch / batch + 60)
  left = fv.budget_s - (time.perf_counter() - start)
  out['curves_skipped'] = None if needed <= left else (
      f'needs about {needed:.0f} s, {left:.0f} s of --budget_s left')
  if out['curves_skipped'] is None:
    corpus = fv.corpus or default_corpus(fv.smoke)
    curves = {}
    for variant in VARIANTS:
      c = curve_config(cfg, curve_batch, curve_steps, corpus, 1 if fv.smoke else fv.corpus_mb)
      c.model.variant = variant
      workdir = os.path.join(fv.out, 'curves', variant)
      final = trainer.train(c, workdir)
      curves[variant] = dict(read_curve(workdir), final_eval_loss=final.get('eval_loss'))
      print(f'{variant}: eval loss {final.get("eval_loss")} after {curve_steps} steps')
    out.update(curves=curves, curve_steps=curve_steps, curve_batch=curve_batch, corpus=corpus)
    plot_curves(curves, os.path.join(fv.out, 'curves.png'))
  else:
    print(f'part 2 skipped: {out["curves_skipped"]}')
  out['wall_s'] = time.perf_counter() - start
  path = os.path.join(fv.out, 'gpu_bench.json')
  metrics.write_json(path, out)
  print(f'wrote {path} ({out["wall_s"]:.0f} s)')
  return out


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

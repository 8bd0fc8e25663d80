r"""Post-training quantization study: eval loss per mode and format against float32.

    python -m scalejax.studies.quant_study --runs baseline=DIR,unified=DIR --out DIR \
        [--formats int8,fp8,int4,int3,int2] [--modes all,except_scales,...] \
        [--group_sizes 0,32] [--step N] [--eval_batches N]
    python -m scalejax.studies.quant_study --out DIR --replot   # tables and plot from results.json

Each run directory is a train.py workdir (config.json + checkpoints/). Writes
results.json (one record per run, granularity, format and mode), results.md (tables of
eval-loss increase over the float32 model, and contrasts between modes),
quant_study.png and quant_vs_float_scales.png (each mode minus `except_scales`).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from scalejax.cli import common
from scalejax.core import roles as R
from scalejax.train.checkpoint import steps as ckpt_steps
from scalejax.data import build_data
from scalejax.model.decoder import cross_entropy
from scalejax.analysis.quant import FORMATS, MODES, apply_mode
from scalejax.studies.common import parse_runs
from scalejax.train.runs import load_run


def _checked(items: list[str], valid, what: str) -> list[str]:
  bad = [s for s in items if s not in valid]
  if bad:
    raise ValueError(f'unknown {what} {bad}; valid: {", ".join(valid)}')
  return items


def make_eval(graphdef, batches: list[dict]):
  """jitted params -> mean loss over the stacked eval batches (one call per eval)."""
  inputs = jnp.stack([b['inputs'] for b in batches])
  targets = jnp.stack([b['targets'] for b in batches])

  @jax.jit
  def loss(params, inputs, targets):
    model = nnx.merge(graphdef, params)
    return jnp.mean(jax.lax.map(lambda b: cross_entropy(model(b[0]), b[1]), (inputs, targets)))

  return lambda params: float(loss(params, inputs, targets))


def study_run(label: str, workdir: str, formats, modes, group_sizes, step=None,
              eval_batches: int = 0, log=print) -> list[dict]:
  cfg, graphdef, params, _ = load_run(workdir, step)
  model = nnx.merge(graphdef, params)
  roles, axes = R.role_tree(model), R.axes_tree(model)
  data = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                    seed=cfg.seed, workdir=workdir)
  batches = data.eval_batches[:eval_batches or None]
  if not batches:
    raise ValueError(f'{workdir}: the run has no eval batches (data.eval_batches=0?)')
  evaluate = make_eval(graphdef, batches)
  base = evaluate(params)
  counts = R.role_summary(params, roles)
  common = dict(run=label, variant=cfg.model.variant, step=step or ckpt_steps(workdir)[-1],
                eval_tokens=len(batches) * cfg.train.batch_size * cfg.train.seq_len,
                params={role: n for role, (_, n) in counts.items()}, fp32_loss=base)
  log(f'{label}: float32 eval loss {base:.4f} over {common["eval_tokens"]:,} tokens')
  out = []
  for g in group_sizes:
    for fmt in formats:
      for mode in modes:
        t = time.perf_counter()
        qparams, left = apply_mode(graphdef, params, roles, axes, mode, fmt, g)
        loss = evaluate(qparams)
        out.append(dict(common, group_size=g, format=fmt, mode=mode, eval_loss=loss,
                        delta=loss - base, unfolded=left))
        log(f'  group={g or "channel"} {fmt:5s} {mode:20s} loss {loss:.4f} '
            f'(+{loss - base:.4f}) [{time.perf_counter() - t:.1f}s]')
  return out


def granularity(g: int) -> str:
  return 'per-channel' if not g else f'groups of {g}'


def markdown(results: list[dict]) -> str:
  """One table per run and granularity: rows modes, columns formats, cells delta loss."""
  lines = []
  runs = list(dict.fromkeys(r['run'] for r in results))
  for run in runs:
    rr = [r for r in results if r['run'] == run]
    head = rr[0]
    for g in dict.fromkeys(r['group_size'] for r in rr):
      cells = {(r['mode'], r['format']): r['delta'] for r in rr if r['group_size'] == g}
      formats = list(dict.fromkeys(f for _, f in cells))
      modes = list(dict.fromkeys(m for m, _ in cells))
      n = head['params']
      scales = n.get(R.INPUT_SCALE, 0) + n.get(R.OUTPUT_SCALE, 0)
      lines += [f'**{run}** (variant `{head["variant"]}`, step {head["step"]}, float32 eval '
                f'loss {head["fp32_loss"]:.4f}; {scales:,} of {sum(n.values()):,} params are '
                f'scales, {n.get(R.OUTPUT_SCALE, 0):,} of them output-role), '
                f'{granularity(g)}: eval-loss increase', '',
                '| mode | ' + ' | '.join(formats) + ' |',
                '|---|' + '---:|' * len(formats)]
      for m in modes:
        lines.append(f'| {m} | ' + ' | '.join(_fmt(cells[m, f]) for f in formats) + ' |')
      lines.append('')
  return '\n'.join(lines)


# Differences of modes that answer one question each (rows: a minus b).
# Output-role contrasts are left out for runs without output-role scales (all zero).
CONTRASTS = (
    ('scales quantized too', 'all', 'except_scales'),
    ('fold instead of float32 scales', 'fold', 'except_scales'),
    ('output-role scales quantized', 'except_input_scales', 'except_scales'),
    ('output-role scales quantized, after folding', 'fold_all', 'fold'),
)


def contrasts(results: list[dict]) -> str:
  """Eval-loss differences between modes, per run, granularity and format."""
  cells = {(r['run'], r['group_size'], r['format'], r['mode']): r['delta'] for r in results}
  keys = list(dict.fromkeys((r['run'], r['group_size']) for r in results))
  formats = list(dict.fromkeys(r['format'] for r in results))
  rows = [c for c in CONTRASTS if any((k + (f, c[1])) in cells and (k + (f, c[2])) in cells
                                      for k in keys for f in formats)]
  if not rows:
    return ''
  lines = ['Mode contrasts (eval loss of the first mode minus the second):', '',
           '| run | granularity | contrast | ' + ' | '.join(formats) + ' |',
           '|---|---|---|' + '---:|' * len(formats)]
  has_output = {r['run']: r['params'].get(R.OUTPUT_SCALE, 0) > 0 for r in results}
  for run, g in keys:
    for name, a, b in rows:
      if 'output-role' in name and not has_output[run]:
        continue
      vals = [cells.get((run, g, f, a), np.nan) - cells.get((run, g, f, b), np.nan)
              for f in formats]
      lines.append(f'| {run} | {granularity(g)} | {name} (`{a}` - `{b}`) | '
                   + ' | '.join('' if np.isnan(v) else _fmt(v) for v in vals) + ' |')
  return '\n'.join(lines + [''])


def _fmt(d: float) -> str:
  return f'{d:+.4f}' if abs(d) < 10 else f'{d:+.1f}'


def plot(results: list[dict], path: str, relative_to: str | None = None) -> None:
  """Eval-loss increase per format, a line per mode, a panel per run and granularity.

  With `relative_to` (a mode), each line is the difference to that mode's loss, for
  the modes that quantize at least the roles it quantizes (like with like).
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  runs = list(dict.fromkeys(r['run'] for r in results))
  groups = list(dict.fromkeys(r['group_size'] for r in results))
  fig, axs = plt.subplots(len(groups), len(runs), figsize=(5.2 * len(runs), 3.6 * len(groups)),
                          squeeze=False, sharey=True)
  for i, g in enumerate(groups):
    for j, run in enumerate(runs):
      ax = axs[i][j]
      rr = [r for r in results if r['run'] == run and r['group_size'] == g]
      formats = list(dict.fromkeys(r['format'] for r in rr))
      delta = {(r['mode'], r['format']): r['delta'] for r in rr}
      for mode in dict.fromkeys(r['mode'] for r in rr):
        if relative_to and (mode == relative_to or not set(MODES[relative_to].quantize)
                            <= set(MODES[mode].quantize)):
          continue
        ys = [delta[mode, f] - (delta[relative_to, f] if relative_to else 0) for f in formats]
        ax.plot(range(len(formats)), ys, marker='o', label=mode)
      ax.set_xticks(range(len(formats)), formats)
      ax.set_yscale('symlog', linthresh=1e-3)
      ax.axhline(0, color='k', lw=0.5)
      ax.set_title(f'{run} ({granularity(g)})', fontsize=10)
      if j == 0:
        ax.set_ylabel(f'eval loss - {relative_to or "float32"} loss')
      ax.grid(alpha=0.3)
  axs[0][-1].legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('runs', '', 'label=workdir[,label=workdir...] of train.py runs',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'output directory', flag_values=fv)
  flags.DEFINE_list('formats', list(FORMATS), 'comma-separated formats', flag_values=fv)
  flags.DEFINE_list('modes', list(MODES), 'comma-separated modes', flag_values=fv)
  common.define_list('group_sizes', [0, 32], 'comma-separated group sizes (0: per-channel)',
                     flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest)', flag_values=fv)
  flags.DEFINE_integer('eval_batches', 0, 'eval batches used (0: all of the run\'s)',
                       flag_values=fv)
  flags.DEFINE_bool('replot', False, 'rebuild results.md and the plot from OUT/results.json',
                    flag_values=fv)
  flags.mark_flags_as_required(['out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs each restore, twice
  os.makedirs(fv.out, exist_ok=True)
  path = os.path.join(fv.out, 'results.json')
  if fv.replot:
    with open(path) as f:
      results = json.load(f)
  else:
    formats = _checked(fv.formats, FORMATS, 'format')
    modes = _checked(fv.modes, MODES, 'mode')
    results = []
    for label, workdir in parse_runs(fv.runs).items():
      results += study_run(label, workdir, formats, modes, fv.group_sizes, fv.step,
                           fv.eval_batches)
    with open(path, 'w') as f:
      json.dump(results, f, indent=1)
  table = markdown(results) + '\n' + contrasts(results)
  with open(os.path.join(fv.out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot(results, os.path.join(fv.out, 'quant_study.png'))
  if 'except_scales' in {r['mode'] for r in results}:
    plot(results, os.path.join(fv.out, 'quant_vs_float_scales.png'), 'except_scales')
  print(table)
  print(f'wrote {fv.out}/results.json, results.md and plots')


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

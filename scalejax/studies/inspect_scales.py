"""Inspect the scale vectors of one or more runs over their kept checkpoints.

    python -m scalejax.studies.inspect_scales --runs baseline=DIR,unified=DIR --out DIR [--steps 250,2000]

Per run, step, scale (module path) and layer: mean, std, min, max and norm of the
effective gamma (beta * alpha etc. for the magdir forms), with its role; per input-role
scale: the preconditioner bounds gamma_j^2 and gamma_j^2 + ||w_j||^2 over the columns j
of the map it feeds, and their spread (max / min). Writes inspect.json, report.md,
heatmap_<run>.png (layers x dims of every gamma at the newest inspected step) and
evolution.png (summary statistics over steps, runs side by side).
The trainer logs the same statistics at eval time (scale_stats.jsonl, TensorBoard).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from scalejax.cli import common
from scalejax.train.checkpoint import steps as ckpt_steps
from scalejax.studies.common import parse_runs
from scalejax.train.runs import load_run
from scalejax.analysis.scale_stats import (effective_scale_statistics, effective_scales, preconditioner_statistics)
from scalejax.model import wiring

STATS = ('mean', 'std', 'min', 'max', 'norm')


def inspect_run(workdir: str, steps: list[int] | None = None) -> dict:
  """{'variant', 'steps': {step: {'scales', 'precond'}}, 'gammas': {path: [L?, d] list}}.

  `gammas` (for the heatmaps) are those of the newest inspected step.
  """
  kept = ckpt_steps(workdir)
  if not kept:
    raise FileNotFoundError(f'{workdir} has no checkpoints under {workdir}/checkpoints')
  missing = sorted(set(steps or ()) - set(kept))
  if missing:
    raise ValueError(f'{workdir} has no checkpoints at steps {missing}; kept: {kept}')
  out = {'steps': {}}
  for step in steps or kept:
    cfg, graphdef, params, _ = load_run(workdir, step)
    model = nnx.merge(graphdef, params)
    out['steps'][step] = {'scales': effective_scale_statistics(model),
                          'precond': preconditioner_statistics(model)}
    out['variant'], out['placement'] = cfg.model.variant, cfg.model.placement
  out['gammas'] = {k: np.asarray(g).tolist() for k, (_, g) in effective_scales(model).items()}
  out['roles'] = {k: r for k, (r, _) in effective_scales(model).items()}
  out['neutral'] = sorted(s.name for s in wiring.scales(model.config) if s.neutral)
  return out


def split_layer(key: str) -> tuple[str, int | None]:
  """'blocks/attn_norm/scale/layer3' -> ('blocks/attn_norm/scale', 3)."""
  head, _, last = key.rpartition('/')
  if last.startswith('layer') and last[5:].isdigit():
    return head, int(last[5:])
  return key, None


def aggregate(entries: dict[str, dict]) -> dict[str, dict[str, float]]:
  """Per scale path, over its layers: min of mins, max of maxes, mean of the rest."""
  groups: dict[str, list[dict]] = {}
  for key, e in entries.items():
    groups.setdefault(split_layer(key)[0], []).append(e)
  out = {}
  for name, es in groups.items():
    agg = {}
    for k in es[0]:
      if k == 'role':
        agg[k] = es[0][k]
        continue
      vals = [e[k] for e in es]
      agg[k] = min(vals) if k == 'min' else max(vals) if k == 'max' else float(np.mean(vals))
    out[name] = agg
  return out


def report(runs: dict[str, dict]) -> str:
  lines = []
  for label, data in runs.items():
    steps = sorted(data['steps'])
    last = data['steps'][steps[-1]]
    lines += [f'## {label} (variant `{data["variant"]}`, placement {data["placement"]}, '
              f'step {steps[-1]})', '', '| scale | role | layer | ' + ' | '.join(STATS) + ' |',
              '|---|---|---:|' + '---:|' * len(STATS)]
    for key, e in last['scales'].items():
      name, layer = split_layer(key)
      lines.append(f'| {name} | {e["role"]} | {"" if layer is None else layer} | '
                   + ' | '.join(f'{e[s]:.4g}' for s in STATS) + ' |')
    if data.get('neutral'):
      lines += ['', 'Function-neutral magnitudes (every consumer renormalizes, so a constant '
                'factor on these gammas changes nothing; their size only sets an effective '
                'LR): ' + ', '.join(f'`{n}`' for n in data['neutral'])]
    if last['precond']:
      lines += ['', 'Preconditioner bounds per input-role scale: gamma_j^2 (mean) and the '
                'upper bound u_j = gamma_j^2 + ||w_j||^2 over columns j:', '',
                '| scale | layer | mean gamma_j^2 | mean u_j | std u_j | min u_j | max u_j '
                '| spread max/min |', '|---|---:|---:|---:|---:|---:|---:|---:|']
      for key, e in last['precond'].items():
        name, layer = split_layer(key)
        lines.append(f'| {name} | {"" if layer is None else layer} | {e["gamma2_mean"]:.4g} | '
                     f'{e["mean"]:.4g} | {e["std"]:.4g} | {e["min"]:.4g} | {e["max"]:.4g} | '
                     f'{e["spread"]:.4g} |')
    lines += ['', f'Evolution over steps (layers aggregated: min of mins, max of maxes, '
              'mean otherwise):', '',
              '| step | scale | mean | std | min | max | precond spread |',
              '|---:|---|---:|---:|---:|---:|---:|']
    for step in steps:
      sc = aggregate(data['steps'][step]['scales'])
      pc = aggregate(data['steps'][step]['precond'])
      for name, e in sc.items():
        spread = pc.get(name, {}).get('spread')
        lines.append(f'| {step} | {name} | {e["mean"]:.4g} | {e["std"]:.4g} | {e["min"]:.4g} '
                     f'| {e["max"]:.4g} | {"" if spread is None else f"{spread:.4g}"} |')
    lines.append('')
  return '\n'.join(lines)


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_heatmaps(data: dict, path: str, title: str = '') -> None:
  """One panel per scale: rows layers, columns dimensions, colour gamma (centred at 1)."""
  from matplotlib.colors import TwoSlopeNorm
  plt = _plt()
  order = sorted(data['gammas'], key=lambda k: (data['roles'][k] != 'input_scale', k))
  gammas = {k: data['gammas'][k] for k in order}  # input-role scales first
  n = len(gammas)
  cols = min(3, n)
  rows = -(-n // cols)
  fig, axs = plt.subplots(rows, cols, figsize=(5.0 * cols, 1.9 * rows + 0.6), squeeze=False)
  for ax, (name, g) in zip(axs.flat, gammas.items()):
    g = np.atleast_2d(np.asarray(g))
    lo, hi = min(g.min(), 1 - 1e-3), max(g.max(), 1 + 1e-3)
    im = ax.imshow(g, aspect='auto', cmap='coolwarm', interpolation='nearest',
                   norm=TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi))
    ax.set_title(f'{name} ({data["roles"][name].split("_")[0]})', fontsize=8)
    ax.set_ylabel('layer', fontsize=7)
    ax.set_yticks(range(g.shape[0]))
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).ax.tick_params(labelsize=6)
  for ax in list(axs.flat)[n:]:
    ax.axis('off')
  fig.suptitle(title or 'gamma: layers x dimensions', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_evolution(runs: dict[str, dict], path: str) -> None:
  """Rows: mean, std, min, max of gamma and the preconditioner spread; columns: runs."""
  plt = _plt()
  rows = [('scales', s) for s in ('mean', 'std', 'min', 'max')] + [('precond', 'spread')]
  fig, axs = plt.subplots(len(rows), len(runs), figsize=(5.5 * len(runs), 2.2 * len(rows)),
                          squeeze=False, sharex='col')
  for j, (label, data) in enumerate(runs.items()):
    steps = sorted(data['steps'])
    per_step = {kind: [aggregate(data['steps'][s][kind]) for s in steps]
                for kind in ('scales', 'precond')}
    for i, (kind, stat) in enumerate(rows):
      ax = axs[i][j]
      names = list(per_step[kind][0]) if per_step[kind] and per_step[kind][0] else []
      ax.set_prop_cycle(color=plt.get_cmap('tab20').colors[:max(len(names), 1)])
      for name in names:
        style = '-' if per_step['scales'][0].get(name, {}).get('role') != 'output_scale' else '--'
        ax.plot(steps, [a[name][stat] for a in per_step[kind]], style, marker='.', label=name)
      ax.set_ylabel(f'{"gamma" if kind == "scales" else "precond"} {stat}', fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      if i == 0:
        ax.set_title(f'{label} ({data["variant"]})', fontsize=10)
    axs[-1][j].set_xlabel('step')
    axs[0][j].legend(fontsize=5, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_outputs(runs: dict[str, dict], out: str) -> list[str]:
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, 'inspect.json'), os.path.join(out, 'report.md')]
  with open(paths[0], 'w') as f:
    json.dump({k: {kk: vv for kk, vv in v.items() if kk != 'gammas'} for k, v in runs.items()},
              f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(report(runs))
  for label, data in runs.items():
    paths.append(os.path.join(out, f'heatmap_{label}.png'))
    plot_heatmaps(data, paths[-1], f'{label} ({data["variant"]}), step {max(data["steps"])}: '
                  'gamma, layers x dimensions')
  paths.append(os.path.join(out, 'evolution.png'))
  plot_evolution(runs, paths[-1])
  return paths


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('runs', None, 'label=workdir[,label=workdir...] of train.py runs',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'output directory', flag_values=fv)
  common.define_list('steps', [], 'comma-separated checkpoint steps (default: all kept)',
                     flag_values=fv)
  flags.DEFINE_bool('print_report', True, 'print report.md to stdout', flag_values=fv)
  flags.mark_flags_as_required(['runs', 'out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs each restore, twice
  steps = fv.steps or None
  runs = {label: inspect_run(workdir, steps) for label, workdir in parse_runs(fv.runs).items()}
  paths = write_outputs(runs, fv.out)
  if fv.print_report:
    print(report(runs))
  print('wrote ' + ', '.join(paths))


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

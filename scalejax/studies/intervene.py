r"""Scale-vector interventions: what each scale vector does to the held-out loss.

    python -m scalejax.studies.intervene --workdir DIR --out OUT [--topk 8,10%] \
        [--eval_batches N] [--step N] [--nofold]
    python -m scalejax.studies.intervene --workdir DIR --out NEWDIR --edit SPEC

Table mode: every scale vector of the run (each layer of a stacked scale on its own)
is reset to 1, zeroed, reduced to its direction (gamma / rms(gamma)) and has its top-k
channels by |gamma - 1| reset to 1; input-role scales that fold are also compared
with resetting the folded kernel rows (diag(gamma) W -> W, the same function in
Pre-Norm). Each edit is measured by the change of the held-out loss (the run's own
eval split) and the mean KL(p_orig || p_edit) of the next-token distributions. Writes
OUT/interventions.json, interventions.md and interventions.png (layers x scales, one
panel per edit).

Edit mode (--edit): applies one edit, SCALE[@layerN]=EDIT with EDIT one of reset,
zero, direction, topk:K, topk:P% (e.g. blocks/attn_norm/scale@layer2=zero,
final_norm/scale=topk:8), and saves a new workdir at --out (config.json, the
tokenizer's files, a checkpoint of the params at the source's step, and
intervention.json) that scalejax-sample, the exporter and load_run read like a
trained run. It holds no optimizer state: train on from it with
--config.init_from=NEWDIR.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from scalejax.analysis import interventions as I
from scalejax.cli import common
from scalejax.data import build_data
from scalejax.data.tokenizers import CHAR_VOCAB_FILE
from scalejax.train import checkpoint as ckpt
from scalejax.train.runs import load_run

ORDER = ('reset', 'zero', 'direction')  # then the topk edits, then fold_reset


def eval_batches(cfg, workdir: str, n: int = 0) -> list[dict]:
  """The run's own held-out batches (its first `n`; 0: all), as the trainer builds them."""
  data = build_data(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                    seed=cfg.seed, workdir=workdir)
  batches = data.eval_batches[:n or None]
  if not batches:
    raise ValueError(f'{workdir}: the run has no eval batches (data.eval_batches=0?)')
  return batches


def study(workdir: str, edits: list[I.Edit], step: int | None = None, n_batches: int = 0,
          fold: bool = True, log=print) -> dict:
  """{'run': what was measured, 'results': one record per target and edit}."""
  start = time.perf_counter()
  cfg, graphdef, params, _ = load_run(workdir, step)
  batches = eval_batches(cfg, workdir, n_batches)
  step = step or ckpt.steps(workdir)[-1]
  log(f'{workdir} (variant {cfg.model.variant}, step {step}): {len(batches)} eval batches')
  out = I.measure(graphdef, params, batches, edits, fold=fold, log=log)
  run = dict(workdir=workdir, variant=cfg.model.variant, placement=cfg.model.placement,
             step=step, n_layers=cfg.model.n_layers, eval_tokens=out.pop('eval_tokens'),
             base_loss=out.pop('base_loss'), edits=[e.label for e in edits]
             + ([I.FOLD] if fold else []), seconds=round(time.perf_counter() - start, 1))
  out.pop('base_kl')
  return dict(run=run, results=out['results'])


# --- the table and the plot ------------------------------------------------------

def _columns(data: dict) -> list[str]:
  return list(data['run']['edits'])


def _rows(data: dict) -> list[dict]:
  """One row per target: its description and {edit: record}."""
  rows = {}
  for r in data['results']:
    row = rows.setdefault(r['target'], dict(r, by={}))
    row['by'][r['edit']] = r
  return list(rows.values())


def _cell(rec: dict | None, key: str) -> str:
  if rec is None:
    return ''
  v = rec[key]
  return f'{v:+.4f}' if key == 'delta' else f'{v:.3g}'


def markdown(data: dict) -> str:
  run, cols, rows = data['run'], _columns(data), _rows(data)
  lines = [f'## `{os.path.basename(os.path.normpath(run["workdir"]))}` (variant '
           f'`{run["variant"]}`, placement {run["placement"]}, step {run["step"]})', '',
           f'Held-out loss {run["base_loss"]:.4f} over {run["eval_tokens"]:,} tokens. '
           'Edits: `reset` gamma = 1, `zero` gamma = 0, `direction` gamma / rms(gamma), '
           '`topk:K` the K channels of largest |gamma - 1| reset to 1, `fold_reset` (input '
           'scales that fold) the folded kernel rows diag(gamma) W reset to W. `neutral`: '
           'the magnitude is function-neutral (every consumer renormalizes). `dev`: '
           'rms(gamma - 1); `dir dev`: rms(gamma / rms(gamma) - 1), what is left of it '
           'once the magnitude is set to 1.', '']
  head = ('| scale | layer | role | neutral | dev | dir dev | '
          + ' | '.join(f'`{c}`' for c in cols))
  rule = '|---|---:|---|---|---:|---:|' + '---:|' * len(cols)
  for key, title in (('delta', 'Change of the held-out loss'),
                     ('kl', 'Mean KL(p_orig || p_edit) per token (nats)')):
    lines += [f'{title}:', '', head + ' |', rule]
    for row in rows:
      layer = '' if row['layer'] is None else row['layer']
      lines.append(f'| `{row["scale"]}` | {layer} | {row["role"].split("_")[0]} | '
                   f'{"yes" if row["neutral"] else ""} | {row["deviation"]:.3g} | '
                   f'{row["direction_deviation"]:.3g} | '
                   + ' | '.join(_cell(row['by'].get(c), key) for c in cols) + ' |')
    lines.append('')
  pairs = [(r['by']['reset'], r['by'][I.FOLD]) for r in rows
           if 'reset' in r['by'] and I.FOLD in r['by']]
  if pairs:
    gap = max(abs(a['loss'] - b['loss']) for a, b in pairs)
    kl = max(abs(a['kl'] - b['kl']) for a, b in pairs)
    lines += [f'`fold_reset` vs `reset` over the {len(pairs)} foldable input-scale vectors: '
              f'largest loss difference {gap:.2g}, largest KL difference {kl:.2g} (equal by '
              'construction: W(gamma * n) = (diag(gamma) W) n).', '']
  for edit in ('reset', 'zero'):
    top = sorted((r['by'][edit] for r in rows if edit in r['by']),
                 key=lambda r: -r['kl'])[:5]
    if top:
      lines.append(f'Largest KL under `{edit}`: ' + ', '.join(
          f'`{r["target"]}` ({r["kl"]:.3g}, loss {r["delta"]:+.4f})' for r in top) + '.')
  lines += ['', f'{run["seconds"]} s.', '']
  return '\n'.join(lines)


def _grid(data: dict, edit: str, key: str) -> tuple[np.ndarray, list[str], list[str]]:
  """[layers + 1, scales] of one metric: scales stacked over layers first (rows: their
  layers), then the unstacked ones (the final norm) in the last row; NaN where a scale
  has no value."""
  rows = _rows(data)
  scales = list(dict.fromkeys(r['scale'] for r in sorted(rows, key=lambda r: r['layer'] is None)))
  n = data['run']['n_layers']
  grid = np.full((n + 1, len(scales)), np.nan)
  for r in rows:
    rec = r['by'].get(edit)
    if rec is not None:
      grid[n if r['layer'] is None else r['layer'], scales.index(r['scale'])] = rec[key]
  first = {r['scale']: r for r in rows}
  labels = [f'{s.removeprefix("blocks/").removesuffix("/scale")} '
            f'({first[s]["role"][:-len("put_scale")]}{"*" if first[s]["neutral"] else ""})'
            for s in scales]
  return grid, labels, [f'layer {i}' for i in range(n)] + ['unstacked']


def plot(data: dict, path: str) -> None:
  """Rows: loss change and KL; columns: the gamma edits; each a layers x scales map."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm, SymLogNorm
  edits = [e for e in _columns(data) if e != I.FOLD]  # fold_reset equals reset
  grids = {(e, k): _grid(data, e, k) for e in edits for k in ('delta', 'kl')}
  n_scales = len(grids[edits[0], 'delta'][1])
  fig, axs = plt.subplots(2, len(edits), squeeze=False, layout='constrained',
                          figsize=((0.3 * n_scales + 0.6) * len(edits) + 1.5, 6.2))
  for i, (key, title) in enumerate((('delta', 'loss change'), ('kl', 'KL(orig || edit)'))):
    values = np.concatenate([grids[e, key][0].ravel() for e in edits])
    values = values[np.isfinite(values)]
    if key == 'delta':
      top = max(float(np.abs(values).max()), 1e-3)
      norm, cmap = SymLogNorm(linthresh=1e-3, vmin=-top, vmax=top), 'RdBu_r'
    else:  # KL >= 0; float noise (|KL| < 1e-6) shows as the floor
      norm, cmap = LogNorm(vmin=1e-6, vmax=max(float(values.max()), 1e-4)), 'viridis'
    for j, edit in enumerate(edits):
      grid, xlabels, ylabels = grids[edit, key]
      shown = np.clip(grid, 1e-6, None) if key == 'kl' else grid
      ax = axs[i][j]
      im = ax.imshow(np.ma.masked_invalid(shown), aspect='auto', cmap=cmap, norm=norm,
                     interpolation='nearest')
      ax.set_title(f'{edit}: {title}', fontsize=8)
      ax.set_xticks(range(len(xlabels)), xlabels if i else [''] * len(xlabels),
                    rotation=90, fontsize=6)
      ax.set_yticks(range(len(ylabels)), ylabels if j == 0 else [''] * len(ylabels),
                    fontsize=6)
    fig.colorbar(im, ax=list(axs[i]), fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
  run = data['run']
  fig.suptitle(f'{os.path.basename(os.path.normpath(run["workdir"]))} ({run["variant"]}, '
               f'step {run["step"]}, held-out loss {run["base_loss"]:.4f}): one scale vector '
               'edited per cell; (in/out) its role, * magnitude function-neutral', fontsize=8)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_outputs(data: dict, out: str) -> list[str]:
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'interventions.{ext}') for ext in ('json', 'md', 'png')]
  with open(paths[0], 'w') as f:
    json.dump(data, f, indent=1)
  with open(paths[1], 'w') as f:
    f.write(markdown(data))
  plot(data, paths[2])
  return paths


# --- one edit, saved as a workdir ----------------------------------------------------

def save_edited(workdir: str, out: str, spec: str, step: int | None = None,
                n_batches: int = 0, log=print) -> dict:
  """Applies one edit and writes `out` as a workdir that `load_run` reads; returns
  the record written to out/intervention.json."""
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError('--out must be a new directory, not the source workdir')
  if os.path.isdir(os.path.join(out, 'checkpoints')):
    raise ValueError(f'{out} already holds checkpoints; pick a new --out')
  cfg, graphdef, params, _ = load_run(workdir, step)
  step = step or ckpt.steps(workdir)[-1]
  model = nnx.merge(graphdef, params)
  target, edit = I.parse_edit(spec, model.config)
  before = I.gamma_of(model, target)
  edited, changed = I.apply_edit(graphdef, params, target, edit)
  record = dict(source=workdir, step=step, spec=spec, target=target.name, edit=edit.label,
                changed_channels=changed, changed_params=I.changed_params(params, edited),
                gamma_before=np.asarray(before).tolist(),
                gamma_after=np.asarray(I.gamma_of(nnx.merge(graphdef, edited), target)).tolist())
  if cfg.data.eval_batches:
    batches = eval_batches(cfg, workdir, n_batches)
    evaluate = I.make_evaluator(graphdef, params, batches)
    (base, _), (loss, kl) = evaluate(params), evaluate(edited)
    record.update(base_loss=base, loss=loss, delta=loss - base, kl=kl)
  os.makedirs(out, exist_ok=True)
  for name in ('config.json', CHAR_VOCAB_FILE):  # the tokenizer's file, when it has one
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  mngr = ckpt.manager(out, keep=1, async_save=False)
  ckpt.save(mngr, step, {'params': edited, 'step': np.int32(step)}, {})
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(out, 'intervention.json'), 'w') as f:
    json.dump(record, f, indent=1)
  summary = f'{target.name}={edit.label}: {changed} channel(s) changed'
  if 'loss' in record:
    summary += (f'; held-out loss {record["base_loss"]:.4f} -> {record["loss"]:.4f} '
                f'({record["delta"]:+.4f}), KL {record["kl"]:.4g}')
  log(summary)
  return record


# --- the command -----------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'train.py workdir (config.json + checkpoints/)',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'output directory (with --edit: the new workdir)',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest)', flag_values=fv)
  flags.DEFINE_integer('eval_batches', 0, "held-out batches used (0: all of the run's)",
                       flag_values=fv)
  flags.DEFINE_list('topk', ['8'], 'top-k edits: K channels or P% of them (e.g. 8,10%)',
                    flag_values=fv)
  flags.DEFINE_bool('fold', True, 'also reset the folded kernel rows of input-role scales',
                    flag_values=fv)
  flags.DEFINE_string('edit', '', 'apply one edit SCALE[@layerN]=EDIT and save a new '
                      'workdir at --out (EDIT: reset, zero, direction, topk:K, topk:P%)',
                      flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs each restore, twice
  if fv.edit:
    return save_edited(fv.workdir, fv.out, fv.edit, fv.step, fv.eval_batches)
  edits = [I.parse_edit_kind(k) for k in ORDER] + [I.parse_edit_kind(f'topk:{k}')
                                                   for k in fv.topk]
  data = study(fv.workdir, edits, fv.step, fv.eval_batches, fv.fold)
  paths = write_outputs(data, fv.out)
  print('wrote ' + ', '.join(paths))
  return data


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

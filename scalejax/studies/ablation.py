r"""The ablation harness: a named suite of variants over seeds, optimizers and schedules.

    python -m scalejax.studies.ablation --config configs/shakespeare_char.py --suite paper \
        --seeds 0,1,2 --optimizers adamw,muon --schedules cosine,wsd \
        --out runs/study_shakespeare [--parallel 2] [--set train.steps=500 ...]

Each trial is its own training process (`python -m scalejax.cli.train`, which `train.py`
runs) writing into OUT/trials/<id>/. Rerunning the same command resumes the suite:
finished trials are not rerun, an unfinished one resumes from its newest checkpoint, and
a crashed trial is retried once (then reported as failed). Trials whose resolved configs
are identical are run once and shared: e.g. `decay_none` and `baseline` (whose default
scale decay is already 'none'), or `decay_iwd` and `decay_all` on a plain Pre-Norm
model, whose scales are all Input-Norms. `--reuse DIR,...` copies a trial that another
study already ran with the same training command (e.g. seed 0 of an LR sweep's winner)
instead of rerunning it. `--restore DIR,...` rebuilds a trial from a published copy of
a study (a folder holding its summary.json, e.g. under docs/results/) instead of
training it: the trial folders are not committed, so a study continued on another
machine starts from what was published. `--parallel N` runs N trials at once, each
pinned to its own share of the CPUs. After the runs, OUT/results.md, OUT/summary.json
and OUT/*.png hold the aggregate:

  * per variant: mean and sample std (ddof=1) over seeds of the final eval loss;
  * the paired difference to `baseline` of the same (optimizer, schedule, lr, placement)
    group, seed by seed (same seed = same data order and, where shapes match, the same
    init), with its 95% confidence interval from Student's t on n-1 degrees of freedom;
    a difference is marked as beyond seed noise when that interval excludes 0
    (a two-sided paired t-test at 5%).

summary.json also lists every finished trial under "trials" (its result, with the
training command as any checkout runs it, and its eval curve): enough to restore it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import flags

from scalejax.cli import common
from scalejax.scales import variants as variants_lib
from scalejax.studies.common import ROOT, paired_difference, parse_sets

BASELINE = 'baseline'


# --- suites ---------------------------------------------------------------------

def _v(name):
  return {'model.variant': name}


# The paper's ablation: every variant is a set of config overrides on the same run.
PAPER = {
    'baseline': {},
    'no_scale': _v('no_scale'),
    'decay_all': {'optimizer.norm_decay': 'all'},
    'decay_none': {'optimizer.norm_decay': 'none'},
    'decay_iwd': {'optimizer.norm_decay': 'iwd'},
    'hg': _v('hg'),
    'dp': _v('dp'),
    'dnp': _v('dnp'),
    'magdir': _v('magdir'),
    'magdir_unit': _v('magdir_unit'),
    'unified': _v('unified'),
    'unified_nohg': _v('unified_nohg'),
    # beta frozen where DNP makes it function-neutral: does its dead magnitude matter?
    'unified_frozen': _v('unified_frozen'),
}


def _with_post(suite: dict) -> dict:
  """Adds `NAME@post` (model.placement=post) for every variant valid with Post-Norm."""
  out = dict(suite)
  for name, over in suite.items():
    if not variants_lib.get_variant(over.get('model.variant', 'baseline')).hg:
      out[f'{name}@post'] = {**over, 'model.placement': 'post'}
  return out


# In a plain Pre-Norm decoder every scale feeds a linear map (all are Input-Norms), so
# the policies `all` and `iwd` coincide there. `@qk` repeats the decay policies on a
# model with QK-norm, whose scales are Output-Norms, as in the Gemma runs of the paper.
DECAY_QK = {f'{name}@qk': {**PAPER[name], 'model.qk_norm': True}
            for name in ('baseline', 'decay_all', 'decay_none', 'decay_iwd')}

# The full-budget study (docs/RESULTS.md): every cell it names, in one suite.
_PRE = ('baseline', 'no_scale', 'hg', 'dp', 'dnp', 'magdir', 'magdir_unit', 'unified',
        'unified_nohg', 'unified_frozen')
_SANDWICH_QK = {'model.placement': 'sandwich', 'model.qk_norm': True}
FULL = {
    **{k: PAPER[k] for k in _PRE},
    # DNP against QK-norm: what DNP adds beyond normalizing q and k
    **{f'{k}@qk': {**PAPER[k], 'model.qk_norm': True} for k in ('baseline', 'dnp', 'unified')},
    'dnp_no_qk': {**PAPER['dnp'], 'model.dual_targets': ('v', 'gate', 'up')},
    # IWD where the paper tested it: Output-Norms after every sub-layer, and QK-norm
    **{f'{k}@sandwich': {**PAPER[k], **_SANDWICH_QK}
       for k in ('baseline', 'decay_none', 'decay_all', 'decay_iwd')},
    **{f'{k}@post': {**PAPER[k], 'model.placement': 'post'}
       for k in ('baseline', 'no_scale', 'decay_none', 'decay_all', 'decay_iwd', 'unified_nohg')},
}

SUITES: dict[str, dict] = {
    'paper': PAPER,
    'full': FULL,
    'paper_post': {**_with_post(PAPER), **DECAY_QK},  # + Post-Norm and QK-norm counterparts
    'core': {k: PAPER[k] for k in ('baseline', 'no_scale', 'decay_iwd', 'unified')},
    'tiny': {k: PAPER[k] for k in ('baseline', 'no_scale')},
}


# --- trials -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trial:
  variant: str
  seed: int
  optimizer: str
  schedule: str
  lr: float | None          # None: the config's
  overrides: tuple           # ((key, value), ...) passed to training as --config.KEY=VALUE

  @property
  def placement(self) -> str:
    return dict(self.overrides).get('model.placement', 'pre')

  @property
  def group(self) -> str:
    """Trials compared with each other: same optimizer, schedule, lr and placement."""
    lr = '' if self.lr is None else f'-lr{self.lr:g}'
    post = '' if self.placement == 'pre' else f'@{self.placement}'
    return f'{self.optimizer}-{self.schedule}{lr}{post}'

  @property
  def baseline_variant(self) -> str:
    return BASELINE if self.placement == 'pre' else f'{BASELINE}@{self.placement}'


def make_trials(suite: dict, variants, seeds, optimizers, schedules, lrs, sets: dict):
  unknown = [v for v in variants if v not in suite]
  if unknown:
    raise ValueError(f'unknown variants {unknown} for this suite; valid: {", ".join(suite)}')
  trials = []
  for opt, sched, lr, name, seed in itertools.product(optimizers, schedules, lrs, variants,
                                                       seeds):
    over = {**sets, **suite[name], 'seed': seed, 'optimizer.name': opt,
            'optimizer.schedule': sched}
    if lr is not None:
      over['optimizer.lr'] = lr
    trials.append(Trial(name, seed, opt, sched, lr, tuple(sorted(over.items()))))
  return trials


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('study_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def resolved_key(base_cfg, trial: Trial) -> str:
  """Canonical JSON of the trial's full config; equal keys are the same run."""
  cfg = base_cfg.copy_and_resolve_references()
  cfg.unlock()
  cfg.update_from_flattened_dict(dict(trial.overrides))
  # The decay policy matters only through the rates of the roles the model has: in a
  # plain Pre-Norm model (no Output-Norm scales) 'iwd' and 'all' are the same run.
  from scalejax.train import optim
  present = _roles_present(json.dumps(cfg.model.to_dict(), sort_keys=True, default=list))
  rates = optim.role_rates(cfg.optimizer,
                           variants_lib.get_variant(cfg.model.variant).norm_decay)
  cfg.optimizer.norm_decay = json.dumps({r: rates[r] for r in sorted(present)})
  return json.dumps(cfg.to_dict(), sort_keys=True, default=list)


@functools.lru_cache(maxsize=None)
def _roles_present(model_json: str) -> frozenset:
  import jax
  from flax import nnx
  from scalejax.core import roles
  from scalejax.model.config import ModelConfig
  from scalejax.model.decoder import build_model
  fields = json.loads(model_json)
  fields['vocab_size'] = fields['vocab_size'] or 8  # roles do not depend on the vocabulary
  model_cfg = ModelConfig(**fields)
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, 0))
  return frozenset(jax.tree.leaves(roles.role_tree(abstract)))


def run_dir_name(trial: Trial) -> str:
  lr = '' if trial.lr is None else f'-lr{trial.lr:g}'
  return f'{trial.variant}-{trial.optimizer}-{trial.schedule}{lr}-s{trial.seed}'


def _cli_value(v) -> str:
  # A tuple as a Python literal, which is how ml_collections parses a tuple field's
  # override ('v,gate,up' would not be three names), written without spaces: a trial's
  # command is stored joined by spaces and split on them again (run_identity).
  if isinstance(v, (tuple, list)):
    return '(' + ','.join(map(repr, v)) + ',)'
  return str(v)


def train_command(config_path: str, workdir: str, trial: Trial) -> list[str]:
  cmd = [sys.executable, '-m', 'scalejax.cli.train', f'--config={config_path}',
         f'--workdir={workdir}']
  cmd += [f'--config.{k}={_cli_value(v)}' for k, v in trial.overrides]
  return cmd


def portable_command(command: list[str]) -> list[str]:
  """The training command as any checkout runs it: no interpreter, no workdir, and the
  config file relative to the repository."""
  args = []
  for a in command[1:]:
    if a.startswith('--workdir='):
      continue
    path = a.removeprefix('--config=')
    if path != a and os.path.isabs(path):
      a = f'--config={os.path.relpath(path, ROOT)}'
    args.append(a)
  return args


def run_identity(command: list[str]) -> str:
  """What makes two runs the same: the training command without interpreter and workdir
  (the same on every machine)."""
  return ' '.join(portable_command(command))


def finished_runs(study_dirs) -> dict[str, str]:
  """{run identity: trial folder} of every finished trial in other studies' folders."""
  found = {}
  for study in study_dirs:
    root = os.path.join(study, 'trials')
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
      path = os.path.join(root, name, 'result.json')
      if os.path.exists(path):
        with open(path) as f:
          found.setdefault(run_identity(json.load(f)['command'].split(' ')),
                           os.path.join(root, name))
  return found


def reuse_trial(source: str, workdir: str) -> None:
  """Copies a finished trial (not its checkpoints: the run is over) into this study."""
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns('checkpoints'),
                  dirs_exist_ok=True)


def load_published(folders) -> list[tuple[str, dict]]:
  """(path, content) of the summary.json in each folder; a missing or unreadable one is
  the user's error."""
  out = []
  for folder in folders:
    path = os.path.join(folder, 'summary.json')
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'--restore {folder}: no such folder')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'--restore {folder}: no summary.json in it')
    try:
      with open(path) as f:
        doc = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'--restore {path}: not valid JSON ({e})') from None
    if not isinstance(doc, dict) or 'summary' not in doc:
      raise ValueError(f'--restore {path}: not the summary.json of a study')
    out.append((os.path.abspath(path), doc))
  return out


def find_published(published, trial: Trial, command: list[str]):
  """(summary path, result, eval curve) of the trial in a published summary, or None.

  A summary with "trials" matches by run identity, so a different LR, config or
  override never matches. An older one holds only the final loss per (group, variant,
  seed): it matches by those (the overrides shared by the whole study are not recorded
  there) and restores the final loss alone.
  """
  key = run_identity(command)
  for path, doc in published:
    if 'trials' in doc:
      for entry in doc['trials'].values():
        if run_identity(entry['result']['command'].split(' ')) == key:
          return path, entry['result'], entry['curve']
    else:
      losses = doc['summary'].get(trial.group, {}).get(trial.variant, {}).get('losses', {})
      if str(trial.seed) in losses:
        return path, {'final_eval_loss': losses[str(trial.seed)], 'final_step': None}, {}
  return None


def restore_trial(workdir: str, command: list[str], source: str, result: dict,
                  curve: dict) -> None:
  """Rebuilds a finished trial from its published record: its eval records and result
  (written last: its presence means finished), with the command this checkout runs."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:  # replaces a partial run's
    for step, loss in sorted((int(s), l) for s, l in curve.items()):
      f.write(json.dumps({'step': step, 'eval_loss': loss}) + '\n')
  result = {**result, 'command': ' '.join(command),
            'restored_from': os.path.relpath(source, ROOT)}
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def cpu_slots(parallel: int) -> list[set[int] | None]:
  """One set of CPUs per trial slot: this process's CPUs split evenly (None: no pinning).
  A trial is pinned to its slot's CPUs through `SCALEJAX_CPUS` (`xla_flags.apply`).

  Two unpinned trials on 2 cores each size XLA's thread pools to both cores and fight
  over them (about half the throughput of one trial alone, measured); pinned to a core
  each, two trials gave 1.39x the throughput of one on the 2-core CPU of
  docs/RESULTS.md's full study. XLA:CPU computes the same bits with one thread or two
  (a run's eval loss is bit-identical pinned or not), so pinning changes only speed.
  """
  if parallel <= 1 or not hasattr(os, 'sched_getaffinity'):
    return [None] * max(parallel, 1)
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < parallel:
    return [None] * parallel
  return [set(cpus[i * len(cpus) // parallel:(i + 1) * len(cpus) // parallel])
          for i in range(parallel)]


def run_trial(config_path: str, workdir: str, trial: Trial, max_attempts: int = 2,
              cpus: set[int] | None = None) -> dict:
  """Runs one trial to completion (resuming if it was interrupted); returns its result.

  The result file is written last, so its presence means "finished". Attempts are
  counted on disk, so a crash is retried once across harness invocations too.
  """
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  os.makedirs(workdir, exist_ok=True)
  attempts_path = os.path.join(workdir, 'attempts')
  attempts = int(open(attempts_path).read()) if os.path.exists(attempts_path) else 0
  cmd = train_command(config_path, workdir, trial)
  while attempts < max_attempts:
    attempts += 1
    with open(attempts_path, 'w') as f:
      f.write(str(attempts))
    start = time.time()
    with open(os.path.join(workdir, f'log{attempts}.txt'), 'w') as log:
      env = dict(os.environ, SCALEJAX_CPUS=','.join(map(str, sorted(cpus)))) if cpus else None
      rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=env).returncode
    wall = time.time() - start
    evals = [r for r in read_metrics(workdir) if 'eval_loss' in r]
    if rc == 0 and evals:
      tps = [r['tokens_per_sec'] for r in read_metrics(workdir)
             if r.get('tokens_per_sec') is not None]
      result = {'final_eval_loss': evals[-1]['eval_loss'], 'final_step': evals[-1]['step'],
                'wall_s': wall, 'attempts': attempts,
                'tokens_per_sec': float(np.median(tps)) if tps else None,
                'command': ' '.join(cmd)}
      with open(result_path, 'w') as f:
        json.dump(result, f, indent=1)
      return result
  return {'failed': True, 'attempts': attempts, 'command': ' '.join(cmd)}


# --- aggregation ------------------------------------------------------------------

def aggregate(results: dict) -> dict:
  """results: {group: {variant: {seed: {'final_eval_loss', 'tokens_per_sec', ...}}}}."""
  summary = {}
  for group, by_variant in results.items():
    rows = {}
    for variant, by_seed in by_variant.items():
      base_variant = (BASELINE if '@' not in variant else f'{BASELINE}@{variant.split("@")[1]}')
      losses = {s: r['final_eval_loss'] for s, r in by_seed.items()}
      vals = np.array(list(losses.values()), float)
      row = {'n': len(vals), 'mean': float(vals.mean()) if len(vals) else math.nan,
             'std': float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
             'losses': losses}
      speeds = [r['tokens_per_sec'] for r in by_seed.values() if r.get('tokens_per_sec')]
      row['tokens_per_sec'] = float(np.mean(speeds)) if speeds else math.nan
      base = by_variant.get(base_variant)
      if base is not None and variant != base_variant:
        seeds = sorted(set(losses) & set(base))
        row['vs'] = base_variant
        row.update(paired_difference([losses[s] for s in seeds],
                                     [base[s]['final_eval_loss'] for s in seeds]))
        base_speeds = [r['tokens_per_sec'] for r in base.values() if r.get('tokens_per_sec')]
        if speeds and base_speeds:
          row['slowdown'] = float(np.mean(base_speeds) / np.mean(speeds))
      rows[variant] = row
    summary[group] = rows
  return summary


def _fmt(x, spec='.4f'):
  return '—' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(summary: dict) -> str:
  lines = []
  for group, rows in summary.items():
    lines += [f'### {group}', '',
              '| variant | seeds | final eval loss (mean ± std) | Δ vs baseline (paired) '
              '| 95% CI | beyond seed noise | time vs baseline |',
              '|---|---|---|---|---|---|---|']
    for variant, r in rows.items():
      if 'vs' in r:
        diff = f'{r["diff"]:+.4f}'
        ci = f'±{_fmt(r["ci"])}'
        mark = 'yes' if r['beyond_noise'] else 'no'
        slow = f'{r["slowdown"]:.2f}x' if 'slowdown' in r else '—'
      else:
        diff, ci, mark, slow = '(reference)', '', '', '1.00x'
      lines.append(f'| {variant} | {r["n"]} | {_fmt(r["mean"])} ± {_fmt(r["std"])} | {diff} '
                   f'| {ci} | {mark} | {slow} |')
    lines.append('')
  return '\n'.join(lines)


def plot(summary: dict, curves: dict, out: str) -> list[str]:
  """Per group: eval-loss curves (mean over seeds) and a bar chart of paired differences."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  for group, rows in summary.items():
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for variant in rows:
      by_seed = curves.get(group, {}).get(variant, {})
      if not by_seed:
        continue
      # the seeds that have a curve (one restored from an older summary has none)
      seeds = [c for c in by_seed.values() if c]
      if not seeds:
        continue
      steps = sorted(set.intersection(*(set(c) for c in seeds)))
      mean = [np.mean([c[s] for c in seeds]) for s in steps]
      ax.plot(steps, mean, marker='.', label=variant,
              linestyle='--' if '@' in variant else '-')
    ax.set(xlabel='step', ylabel='eval loss (mean over seeds)', title=f'eval loss: {group}')
    ax.legend(fontsize=7, ncol=2)
    lo = min((r['mean'] for r in rows.values() if not math.isnan(r['mean'])), default=None)
    if lo is not None:  # the end of training is where variants differ; zoom on it
      hi = max(r['mean'] for r in rows.values() if not math.isnan(r['mean']))
      ax.set_ylim(lo - 0.1, hi + 0.6)
    fig.tight_layout()
    paths.append(os.path.join(out, f'curves_{group}.png'))
    fig.savefig(paths[-1])
    plt.close(fig)

    diffs = [(v, r) for v, r in rows.items() if 'vs' in r]
    if not diffs:
      continue
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(diffs) + 1.4), dpi=90)
    names = [v for v, _ in diffs]
    vals = [r['diff'] for _, r in diffs]
    errs = [0.0 if math.isnan(r['ci']) else r['ci'] for _, r in diffs]
    colors = ['tab:red' if r['beyond_noise'] and r['diff'] > 0 else
              'tab:green' if r['beyond_noise'] else 'tab:gray' for _, r in diffs]
    ax.barh(names, vals, xerr=errs, color=colors, capsize=3)
    ax.axvline(0, color='k', lw=0.8)
    ax.invert_yaxis()
    ax.set(xlabel='final eval loss − baseline (paired over seeds; bars: 95% CI)',
           title=f'difference to baseline: {group}')
    fig.tight_layout()
    paths.append(os.path.join(out, f'diffs_{group}.png'))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def collect(trials, dirs: dict, out: str):
  """Results and eval curves per group / variant / seed from the trial folders."""
  results, curves, failed = {}, {}, []
  for t in trials:
    wd = dirs[t]
    path = os.path.join(wd, 'result.json')
    if not os.path.exists(path):
      failed.append(run_dir_name(t))
      continue
    with open(path) as f:
      r = json.load(f)
    results.setdefault(t.group, {}).setdefault(t.variant, {})[t.seed] = r
    curve = {m['step']: m['eval_loss'] for m in read_metrics(wd) if 'eval_loss' in m}
    if curve:  # a trial restored from an older summary has its final loss only
      curves.setdefault(t.group, {}).setdefault(t.variant, {})[t.seed] = curve
  return results, curves, failed


def published_trials(trials, dirs: dict) -> dict:
  """{run folder: its trial, result and eval curve} of every finished trial, with the
  command as any checkout runs it: what `--restore` needs to rebuild the folder."""
  out = {}
  for t in trials:
    wd = dirs[t]
    name = os.path.basename(wd)
    path = os.path.join(wd, 'result.json')
    if name in out or not os.path.exists(path):  # a shared run is listed once
      continue
    with open(path) as f:
      r = json.load(f)
    r['command'] = ' '.join(['python', *portable_command(r['command'].split(' '))])
    curve = {m['step']: m['eval_loss'] for m in read_metrics(wd) if 'eval_loss' in m}
    out[name] = {'group': t.group, 'variant': t.variant, 'seed': t.seed, 'result': r,
                 'curve': curve}
  return out


def report(trials, dirs, out: str, header: str = '') -> dict:
  results, curves, failed = collect(trials, dirs, out)
  summary = aggregate(results)
  table = markdown_table(summary)
  pngs = plot(summary, curves, out)
  notes = ['Final eval loss per variant; Δ is the mean over seeds of (variant − baseline) '
           'for the same seed; 95% CI from Student\'s t with n−1 dof; "beyond seed noise" '
           '= the CI excludes 0 (two-sided paired t-test, 5%). Time vs baseline = baseline '
           'tokens/s ÷ variant tokens/s.']
  if failed:
    notes.append(f'Missing or failed trials ({len(failed)}): {", ".join(failed)}')
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n\n'.join([header, *notes, table]) if header else '\n\n'.join([*notes, table]))
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    # no machine paths: this file is published (docs/results/) and restored from
    json.dump({'summary': summary, 'failed': failed,
               'plots': [os.path.basename(p) for p in pngs],
               'trials': published_trials(trials, dirs)}, f, indent=1, default=str)
  return {'summary': summary, 'table': table, 'plots': pngs, 'failed': failed}


# --- command line -----------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  # A path, not a config flag: every trial loads the file itself, and the overrides it
  # shares go through --set so that each trial records them.
  flags.DEFINE_string('config', None, 'config file, e.g. configs/shakespeare_char.py',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'output folder (resumable)', flag_values=fv)
  flags.DEFINE_enum('suite', 'paper', sorted(SUITES), 'the named suite of variants',
                    flag_values=fv)
  flags.DEFINE_list('variants', None, 'comma list, a subset of the suite (default: all of it)',
                    flag_values=fv)
  common.define_list('seeds', [0, 1, 2], 'comma list of seeds', flag_values=fv)
  flags.DEFINE_list('optimizers', ['adamw'], 'comma list of optimizer.name values',
                    flag_values=fv)
  flags.DEFINE_list('schedules', ['cosine'], 'comma list of optimizer.schedule values',
                    flag_values=fv)
  common.define_list('lrs', None, 'comma list of learning rates (default: the config\'s)',
                     item=float, flag_values=fv)
  flags.DEFINE_integer('parallel', 1, 'trials run at once, each pinned to its share of the '
                       'CPUs', flag_values=fv)
  flags.DEFINE_multi_string('set', [], 'config override KEY=VALUE for every trial, repeated: '
                            '--set train.steps=300 --set train.eval_every=60', flag_values=fv)
  flags.DEFINE_list('reuse', [], 'other study folders: a trial whose training command '
                    '(but for its workdir) ran to the end there is copied, not rerun',
                    flag_values=fv)
  flags.DEFINE_list('restore', [], 'published copies of studies (folders holding a '
                    'summary.json, e.g. docs/results/full/pre_shakespeare_char): a trial they '
                    'list is rebuilt from them, not trained', flag_values=fv)
  flags.DEFINE_bool('aggregate_only', False, 'only rebuild the report (of the finished trials '
                    'and those --restore holds); train nothing', flag_values=fv)
  flags.mark_flags_as_required(['config', 'out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  from scalejax.train import optim
  for names, valid in ((fv.optimizers, optim.OPTIMIZERS), (fv.schedules, optim.SCHEDULES)):
    bad = [n for n in names if n not in valid]
    if bad:
      raise ValueError(f'unknown {bad}; valid: {", ".join(valid)}')
  suite = SUITES[fv.suite]
  variants = fv.variants or list(suite)
  if BASELINE not in variants and any('@' not in v for v in variants):
    # every difference needs its reference; a study of tagged variants only (X@sandwich)
    # has its own (below), and the plain baseline would be a trial no row reads
    variants = [BASELINE] + variants
  for tag in sorted({v.split('@')[1] for v in variants if '@' in v}):
    if f'{BASELINE}@{tag}' not in variants:  # e.g. X@post compares with baseline@post
      variants.append(f'{BASELINE}@{tag}')
  config_path = os.path.abspath(fv.config)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'--config {fv.config}: no such config file')
  published = load_published(fv.restore)  # before any trial: a bad folder stops here
  trials = make_trials(suite, variants, fv.seeds, fv.optimizers, fv.schedules,
                       fv.lrs or [None], parse_sets(fv.set))
  base_cfg = load_config(config_path)
  out = os.path.abspath(fv.out)  # the trials run in ROOT, wherever this was started
  trial_root = os.path.join(out, 'trials')
  first_dir, dirs = {}, {}
  for t in trials:  # identical resolved configs share one run folder
    key = resolved_key(base_cfg, t)
    dirs[t] = first_dir.setdefault(key, os.path.join(trial_root, run_dir_name(t)))
  unique = {}
  for t in trials:
    unique.setdefault(dirs[t], t)
  os.makedirs(out, exist_ok=True)
  # Published trials are restored first, also for --aggregate_only: a report rebuilt
  # from a partly run folder then still lists every trial the published one had.
  todo = [(d, t) for d, t in unique.items() if not os.path.exists(os.path.join(d, 'result.json'))]
  restored = 0
  for d, t in todo:
    cmd = train_command(config_path, d, t)
    if found := find_published(published, t, cmd):
      restore_trial(d, cmd, *found)
      restored += 1
  if not fv.aggregate_only:
    todo = [(d, t) for d, t in todo if not os.path.exists(os.path.join(d, 'result.json'))]
    done_elsewhere = finished_runs([os.path.abspath(r) for r in fv.reuse])
    copies = [(d, done_elsewhere[key]) for d, t in todo
              if (key := run_identity(train_command(config_path, d, t))) in done_elsewhere]
    for d, source in copies:
      reuse_trial(source, d)
    todo = [(d, t) for d, t in todo if d not in dict(copies)]
    kept = (f', {restored} restored from --restore' if fv.restore else '') + \
           (f', {len(copies)} copied from --reuse' if fv.reuse else '')
    print(f'{len(trials)} trials, {len(unique)} distinct runs{kept}, {len(todo)} to run',
          flush=True)

    slots = queue.SimpleQueue()  # each running trial holds one slot's CPUs
    for cpus in cpu_slots(fv.parallel):
      slots.put(cpus)

    def go(item):
      d, t = item
      cpus = slots.get()
      try:
        r = run_trial(config_path, d, t, cpus=cpus)
      finally:
        slots.put(cpus)
      state = 'FAILED' if r.get('failed') else f'eval_loss={r["final_eval_loss"]:.4f} ' \
                                               f'({r["wall_s"]:.0f}s)'
      print(f'{os.path.basename(d)}: {state}', flush=True)
      return r

    with ThreadPoolExecutor(max(fv.parallel, 1)) as pool:
      list(pool.map(go, todo))
  header = (f'Suite `{fv.suite}` on `{os.path.relpath(config_path, ROOT)}`; seeds '
            f'{fv.seeds}; overrides: {" ".join(fv.set) or "none"}.')
  rep = report(trials, dirs, out, header)
  print(rep['table'])
  return rep


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

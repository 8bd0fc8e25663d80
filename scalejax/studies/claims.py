r"""The claims table of the full-budget study: each claim of the paper, measured.

    python -m scalejax.studies.claims --out runs/full [--markdown runs/full/claims.md] \
        [--results docs/RESULTS.md]

Reads the study folders `scripts/run_full_study.sh` writes under OUT (each with the
`summary.json` of `scalejax.studies.ablation`) and compares cells *across* them, which
one ablation run cannot: "after retuning" puts a variant at its own best LR (from the
LR sweep) against the baseline at the baseline's best LR. Every comparison is paired by
seed (same seed = same data order). Per row:

  * the mean paired difference Δ = variant − reference with its 95 % CI (Student's t,
    n − 1 dof) and the two-sided p of the paired t-test;
  * the effect size: Δ in units of the reference's seed std;
  * Holm's step-down correction over every row of the same table (the family) that has
    at least two seeds; the verdict uses the corrected p: "supports" when the sign is the
    one the paper predicts, "against" when it is the opposite, "not resolved" otherwise;
  * for the sandwich rows, the decay budget prod_t(1 − lr_t·wd) of the decayed scales.

`--results FILE` also rewrites the block of FILE between the lines `RESULTS_BEGIN` and
`RESULTS_END`: how many comparisons have run and one table of those rows, so a report's
copy of the table is never edited by hand.

The power note gives, per corpus, the smallest |Δ| a paired t-test on n seeds detects
with 80 % power at 5 % (two-sided), from the median std of the paired differences
measured on that corpus. Cells that have not run yet are listed as such and left out of
the correction.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re

import ml_collections
import numpy as np
from absl import flags

from scalejax.cli import common
from scalejax.studies.common import paired_difference

CORPORA = ('shakespeare_char', 'study_stdlib')
SWEPT = ('baseline', 'no_scale', 'unified')  # the variants with an LR sweep of their own


# --- what is compared -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
  """One variant's runs: in study folder `stage` ('{c}' is the corpus), at `lr`:
  'base' = the baseline's best LR on the corpus, 'own' = the variant's own best, None =
  the only LR that folder has."""
  stage: str
  variant: str
  lr: str | None = 'base'


@dataclasses.dataclass(frozen=True)
class Row:
  claim: str       # the paper's claim (or open question) the row tests
  what: str        # the comparison, in words
  corpus: str
  x: Cell
  ref: Cell
  expect: int      # the sign of x − ref the paper predicts: +1 higher loss, −1 lower
  budget: bool = False  # report the decay budget of the scales x decays


REMOVAL = 'removing the scale vectors hurts'
IWD = 'IWD beats decaying all scales and decaying none, with Output-Norms present'
EACH = 'each improvement (HG, DP/DNP, OR) lowers the loss'
QK = 'DNP helps beyond normalizing q and k'
UNIFIED = 'the unified recipe beats a tuned baseline'


def claim_rows(decays=None) -> list[Row]:
  """The claims table; `decays` maps a corpus to the scale-decay rates its IWD stages ran
  at (`sandwich_decays`)."""
  rows = []
  for c in CORPORA:
    pre = f'pre_{c}'
    rows += [
        Row(REMOVAL, 'no_scale − baseline, both at the baseline\'s best LR', c,
            Cell(pre, 'no_scale'), Cell(pre, 'baseline'), +1),
        Row(REMOVAL, 'no_scale at its best LR − baseline at its best LR', c,
            Cell(f'retuned_no_scale_{c}', 'no_scale', 'own'), Cell(pre, 'baseline'), +1),
        *[Row(EACH, f'{v} − baseline', c, Cell(pre, v), Cell(pre, 'baseline'), -1)
          for v in ('hg', 'dp', 'dnp', 'magdir', 'magdir_unit')],
        Row(UNIFIED, 'unified − baseline, both at the baseline\'s best LR', c,
            Cell(pre, 'unified'), Cell(pre, 'baseline'), -1),
        Row(UNIFIED, 'unified at its best LR − baseline at its best LR', c,
            Cell(f'retuned_unified_{c}', 'unified', 'own'), Cell(pre, 'baseline'), -1),
    ]
  for c in CORPORA:
    for wd in (decays or {}).get(c, ()):
      stage = sandwich_stage(c, wd)
      rows += [
          Row(IWD, f'iwd − all @sandwich, scale decay {wd}', c,
              Cell(stage, 'decay_iwd@sandwich'), Cell(stage, 'decay_all@sandwich'), -1, True),
          Row(IWD, f'iwd − none @sandwich, scale decay {wd}', c,
              Cell(stage, 'decay_iwd@sandwich'), Cell(stage, 'baseline@sandwich'), -1, True),
      ]
  for c in CORPORA:
    qk = f'qk_{c}'
    rows += [
        Row(QK, 'dnp@qk − baseline@qk (both with QK-norm)', c,
            Cell(qk, 'dnp@qk'), Cell(qk, 'baseline@qk'), -1),
        Row(QK, 'dnp_no_qk − baseline (DNP on v, gate, up only)', c,
            Cell(qk, 'dnp_no_qk'), Cell(qk, 'baseline'), -1),
        Row(QK, 'unified@qk − baseline@qk', c, Cell(qk, 'unified@qk'), Cell(qk, 'baseline@qk'),
            -1),
    ]
  return rows


def sandwich_stage(corpus: str, wd) -> str:
  """The folder of the IWD stage on `corpus` at scale decay `wd` (the script's name)."""
  return f'sandwich_{corpus}_wd{wd}'


def sandwich_decays(out: str) -> dict[str, list[str]]:
  """{corpus: the scale-decay rates of its IWD stages under OUT}, each sorted."""
  names = os.listdir(out) if os.path.isdir(out) else []
  return {c: sorted((d.removeprefix(sandwich_stage(c, '')) for d in names
                     if d.startswith(sandwich_stage(c, ''))), key=float) for c in CORPORA}


POST = 'Post-Norm (the paper is Pre-Norm)'
BATCH = 'the gap at a larger global batch (same tokens)'
ABLATE = 'ablations of the recipe'
QK_ALONE = 'QK-norm alone (the reference of the DNP rows)'


def open_rows(batches=()) -> list[Row]:
  """Questions the paper leaves open; a family of its own for Holm."""
  post, sh = 'post_shakespeare_char', 'shakespeare_char'
  # With Post-Norm's scales labelled input scales (model.post_norm_role, the default)
  # IWD decays every scale: decay_iwd@post is decay_all@post's run, one row, not two.
  rows = [Row(POST, what, sh, Cell(post, f'{v}@post'), Cell(post, 'baseline@post'), sign)
          for v, what, sign in (
              ('no_scale', 'no_scale@post − baseline@post', +1),
              ('decay_all', 'decay_all@post (≡ decay_iwd@post) − baseline@post', +1),
              ('unified_nohg', 'unified_nohg@post − baseline@post', -1))]
  for c in CORPORA:
    rows += [Row(ABLATE, f'{v} − baseline', c, Cell(f'pre_{c}', v), Cell(f'pre_{c}', 'baseline'),
                 -1) for v in ('unified_nohg', 'unified_frozen')]
  rows += [Row(QK_ALONE, 'baseline@qk − baseline', c, Cell(f'qk_{c}', 'baseline@qk'),
               Cell(f'qk_{c}', 'baseline'), -1) for c in CORPORA]
  for b in batches:
    rows += [Row(BATCH, f'{v} − baseline, batch {b}', sh, Cell(f'batch{b}', v, None),
                 Cell(f'batch{b}', 'baseline', None), sign)
             for v, sign in (('no_scale', +1), ('unified', -1))]
  return rows


# --- reading the study ------------------------------------------------------------

def group_lr(group: str) -> float | None:
  """The LR in a harness group name such as 'adamw-cosine-lr0.001@sandwich'."""
  return float(group.split('-lr')[1].split('@')[0]) if '-lr' in group else None


class Study:
  """The study folders under OUT, read once."""

  def __init__(self, out: str):
    self.out = out
    self._summaries = {}

  def summary(self, stage: str) -> dict:
    if stage not in self._summaries:
      path = os.path.join(self.out, stage, 'summary.json')
      self._summaries[stage] = json.load(open(path))['summary'] if os.path.exists(path) else {}
    return self._summaries[stage]

  def sweep(self, corpus: str) -> dict[str, dict[float, float]]:
    """{variant: {lr: final eval loss}} of the corpus's LR sweep (seed 0)."""
    out = {}
    for group, rows in self.summary(f'sweep_{corpus}').items():
      for v, r in rows.items():
        out.setdefault(v, {})[group_lr(group)] = r['mean']
    return out

  def best_lr(self, corpus: str, variant: str) -> float | None:
    losses = self.sweep(corpus).get(variant)
    return min(losses, key=losses.get) if losses else None

  def lr_of(self, cell: Cell, corpus: str) -> float | None:
    if cell.lr == 'base':
      return self.best_lr(corpus, 'baseline')
    if cell.lr == 'own':
      return self.best_lr(corpus, cell.variant)
    if cell.lr is None:  # the folder's only LR for this variant (e.g. a batch size's)
      lrs = {group_lr(g) for g, rows in self.summary(cell.stage).items() if cell.variant in rows}
      return lrs.pop() if len(lrs) == 1 else None
    return float(cell.lr)

  def losses(self, cell: Cell, corpus: str) -> dict[int, float]:
    """{seed: final eval loss} of a cell; {} when it has not run (yet)."""
    summary = self.summary(cell.stage)
    lr = self.lr_of(cell, corpus)
    if cell.lr is not None and lr is None:
      return {}
    groups = [g for g, rows in summary.items() if cell.variant in rows
              and (cell.lr is None or (group_lr(g) is not None
                                       and math.isclose(group_lr(g), lr, rel_tol=1e-6)))]
    if len(groups) != 1:  # none, or an LR-free cell in a folder with several LRs
      return {}
    return {int(s): v for s, v in summary[groups[0]][cell.variant]['losses'].items()}

  def decay_budget(self, cell: Cell) -> float | None:
    """prod_t(1 − lr_t · wd) of the decayed scales of the cell's first trial: from its
    saved config, or (a published stage holds no trial folders) from the config its
    command in summary.json names, with that command's overrides."""
    from scalejax.core import roles
    from scalejax.train import optim
    cfg = None
    for path in sorted(glob.glob(os.path.join(self.out, cell.stage, 'trials', '*', 'config.json'))):
      cfg = ml_collections.ConfigDict(json.load(open(path)))
      break
    if cfg is None:
      cfg = self._config_of_command(cell)
    if cfg is None:
      return None
    opt = cfg.optimizer
    # the rate a policy gives the scales it decays: the optimizer's own rule
    rate = optim.role_rates(opt, 'all')[roles.INPUT_SCALE]
    return optim.decay_budget(opt, cfg.train.steps, rate * opt.scale_lr_mult)

  def _config_of_command(self, cell: Cell):
    from scalejax.studies.common import ROOT, parse_sets
    from scalejax.train.config import load_config
    path = os.path.join(self.out, cell.stage, 'summary.json')
    if not os.path.exists(path):
      return None
    trials = json.load(open(path)).get('trials', {})
    for trial in sorted(trials.values(), key=lambda t: t.get('seed', 0)):
      command = (trial.get('result') or {}).get('command', '').split()
      if trial.get('variant') != cell.variant or not command:
        continue
      args = [a.removeprefix('--') for a in command if a.startswith('--config')]
      config = next(a.split('=', 1)[1] for a in args if a.startswith('config='))
      cfg = load_config(os.path.join(ROOT, config))
      cfg.update_from_flattened_dict(parse_sets([a for a in args if not a.startswith('config=')]))
      return cfg
    return None


# --- statistics -------------------------------------------------------------------

def p_value(t: float, dof: int) -> float:
  from scipy import stats
  return float(2 * stats.t.sf(abs(t), dof)) if math.isfinite(t) else 0.0


def holm(p_values) -> list[float]:
  """Holm's step-down adjusted p-values, in the input's order (family-wise error)."""
  p = np.asarray(p_values, float)
  order = np.argsort(p)
  m = len(p)
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
  """The smallest |mean difference| a two-sided paired t-test on n pairs with this std of
  the differences detects with this power: solved exactly on the noncentral t (the
  usual (t_{1-a/2} + t_power) * sd / sqrt(n) is a few percent low at 5 seeds)."""
  from scipy import optimize, stats
  dof, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

  def shortfall(nc):
    # the wrong-sign tail vanishes for a large nc, where scipy returns NaN for it
    return stats.nct.sf(crit, dof, nc) + np.nan_to_num(stats.nct.cdf(-crit, dof, nc)) - power

  if n < 2:
    return math.nan
  nc = optimize.brentq(shortfall, 0.0, 100.0, xtol=1e-10)
  return float(nc * sd / math.sqrt(n))


def measure(study: Study, rows: list[Row]) -> list[dict]:
  """Each row's paired difference, effect size, p and Holm-adjusted p (one family)."""
  out = []
  for row in rows:
    x, ref = study.losses(row.x, row.corpus), study.losses(row.ref, row.corpus)
    seeds = sorted(set(x) & set(ref))
    d = paired_difference([x[s] for s in seeds], [ref[s] for s in seeds])
    ref_sd = float(np.std([ref[s] for s in seeds], ddof=1)) if len(seeds) > 1 else math.nan
    r = {'claim': row.claim, 'what': row.what, 'corpus': row.corpus, 'expect': row.expect,
         'lr_x': study.lr_of(row.x, row.corpus), 'lr_ref': study.lr_of(row.ref, row.corpus),
         'seeds': seeds, **d,
         'effect': d['diff'] / ref_sd if ref_sd > 0 else math.nan,
         'p': p_value(d['t'], d['n'] - 1) if d['n'] > 1 else math.nan}
    if row.budget:
      r['decay_budget'] = study.decay_budget(row.x)
    out.append(r)
  tested = [r for r in out if r['n'] > 1]
  for r, adj in zip(tested, holm([r['p'] for r in tested])):
    r['p_holm'] = adj
    if adj < 0.05:
      r['verdict'] = 'supports' if np.sign(r['diff']) == r['expect'] else 'against'
    else:
      r['verdict'] = 'not resolved'
  for r in out:
    r.setdefault('verdict', 'not run yet' if r['n'] == 0 else 'one seed')
  return out


def power_note(measured: list[dict]) -> dict[str, dict]:
  """Per corpus: the median std of the paired differences of the rows with the most
  seeds (the design's count; rows still filling in are left out) and the smallest
  effect that many seeds resolve."""
  note = {}
  for corpus in sorted({r['corpus'] for r in measured}):
    rows = [r for r in measured if r['corpus'] == corpus and r['n'] > 1]
    if not rows:
      continue
    n = max(r['n'] for r in rows)
    sd = float(np.median([r['sd'] for r in rows if r['n'] == n]))
    note[corpus] = {'sd_diff': sd, 'n': n, 'rows': sum(r['n'] == n for r in rows),
                    'detectable': detectable_effect(sd, n)}
  return note


# --- report -----------------------------------------------------------------------

def _f(x, spec='+.4f'):
  return '—' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(measured: list[dict], title: str) -> str:
  return '\n'.join([f'### {title}', '', *table_lines(measured)]) + '\n'


def table_lines(measured: list[dict]) -> list[str]:
  lines = ['| claim | comparison | corpus | LR (x / ref) | seeds | Δ ± 95 % CI | effect (ref std) '
           '| p | Holm p | verdict |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in measured:
    lrs = f'{_f(r["lr_x"], "g")} / {_f(r["lr_ref"], "g")}'
    delta = '—' if r['n'] == 0 else f'{_f(r["diff"])} ± {_f(r["ci"], ".4f")}'
    what = r['what'] + (f' (decay budget {r["decay_budget"]:.3f})'
                        if r.get('decay_budget') is not None else '')
    lines.append(f'| {r["claim"]} | {what} | {r["corpus"]} | {lrs} | {r["n"]} | {delta} '
                 f'| {_f(r["effect"], "+.2f")} | {_f(r["p"], ".3g")} | {_f(r.get("p_holm"), ".3g")} '
                 f'| {r["verdict"]} |')
  return lines


RESULTS_BEGIN = '<!-- claims table: begin (python -m scalejax.studies.claims --results) -->'
RESULTS_END = '<!-- claims table: end -->'


def update_results(path: str, measured: list[dict]) -> None:
  """Rewrites the block of `path` between RESULTS_BEGIN and RESULTS_END with the rows of
  `measured` that have run; a file without the block is left as it is (ValueError)."""
  with open(path) as f:
    text = f.read()
  begin, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
  if begin < 0 or end < begin:
    raise ValueError(f'--results {path} has no claims block; put the lines {RESULTS_BEGIN} '
                     f'and {RESULTS_END} where the table goes')
  ran = [r for r in measured if r['n'] > 0]
  block = [RESULTS_BEGIN, '', f'{len(ran)} of the {len(measured)} comparisons have run.', '',
           *table_lines(ran), '']
  with open(path, 'w') as f:
    f.write(text[:begin] + '\n'.join(block) + '\n' + text[end:])


def sweep_markdown(study: Study) -> str:
  lines = []
  for c in CORPORA:
    sweep = study.sweep(c)
    if not sweep:
      continue
    lrs = sorted({lr for v in sweep.values() for lr in v})
    lines += [f'### LR sweep, `{c}` (seed 0)', '',
              '| variant | ' + ' | '.join(f'{lr:g}' for lr in lrs) + ' | best |',
              '|---|' + '---|' * (len(lrs) + 1)]
    for v, losses in sweep.items():
      best = min(losses, key=losses.get)
      edge = ' (edge of the grid)' if best in (lrs[0], lrs[-1]) else ''
      cells = [('**%.4f**' if lr == best else '%.4f') % losses[lr] if lr in losses else '—'
               for lr in lrs]
      lines.append(f'| {v} | ' + ' | '.join(cells) + f' | {best:g}{edge} |')
    lines.append('')
  return '\n'.join(lines)


def cells_markdown(study: Study) -> str:
  """Every cell of every stage folder under OUT but the sweeps: its seeds and final eval
  loss (mean ± seed std), the absolute numbers the paired rows are differences of."""
  stages = sorted((d for d in os.listdir(study.out) if not d.startswith('sweep_')
                   and os.path.isfile(os.path.join(study.out, d, 'summary.json'))),
                  key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', d)])
  lines = ['### Cells', '', '| folder | group (optimizer-schedule-LR) | variant | seeds '
           '| final eval loss (mean ± std) |', '|---|---|---|---|---|']
  for stage in stages:
    for group, rows in study.summary(stage).items():
      for variant, r in rows.items():
        losses = list(r['losses'].values())
        sd = f' ± {np.std(losses, ddof=1):.4f}' if len(losses) > 1 else ''
        lines.append(f'| {stage} | {group} | {variant} | {len(losses)} '
                     f'| {np.mean(losses):.4f}{sd} |')
  return '\n'.join(lines + [''])


def plot(measured: list[dict], path: str) -> str:
  """Forest plot: every row's Δ with its CI, coloured by verdict."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [r for r in measured if r['n'] > 1]
  fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(rows) + 1.5), dpi=90)
  colors = {'supports': 'tab:green', 'against': 'tab:red', 'not resolved': 'tab:gray'}
  labels = [f'{r["what"]} [{r["corpus"].split("_")[0]}]' for r in rows]
  ax.errorbar([r['diff'] for r in rows], range(len(rows)), xerr=[r['ci'] for r in rows],
              fmt='none', ecolor='k', capsize=2, lw=0.8)
  ax.scatter([r['diff'] for r in rows], range(len(rows)),
             c=[colors[r['verdict']] for r in rows], zorder=3)
  ax.set_yticks(range(len(rows)), labels, fontsize=6)
  ax.axvline(0, color='k', lw=0.6)
  ax.invert_yaxis()
  ax.set(xlabel='final eval loss: x − reference (paired over seeds, 95 % CI)',
         title='claims: green supports, red against, grey not resolved (Holm)')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_batch_trend(measured: list[dict], path: str) -> str | None:
  """The batch-size question: each gap to the baseline against the global batch."""
  rows = [r for r in measured if r['claim'] == BATCH and r['n'] > 1]
  if not rows:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
  for variant in sorted({r['what'].split(' − ')[0] for r in rows}):
    mine = sorted((int(r['what'].rsplit(' ', 1)[1]), r) for r in rows
                  if r['what'].startswith(f'{variant} − '))
    ax.errorbar([b for b, _ in mine], [r['diff'] for _, r in mine],
                yerr=[r['ci'] for _, r in mine], marker='o', capsize=3, label=variant)
  ax.axhline(0, color='k', lw=0.6)
  ax.set_xscale('log', base=2)
  ax.set(xlabel='global batch (sequences; same tokens per run)',
         ylabel='final eval loss − baseline (95 % CI)', title='the gap against the batch size')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def report(out: str, md_path: str | None = None, results: str | None = None) -> dict:
  study = Study(out)
  batches = sorted((int(d[5:]) for d in os.listdir(out) if d[5:].isdigit()
                    and d.startswith('batch')) if os.path.isdir(out) else [])
  claims = measure(study, claim_rows(sandwich_decays(out)))
  extra = measure(study, open_rows(batches))
  if results:  # first: a file without the block stops the command before it writes
    update_results(results, claims + extra)
  power = power_note(claims + extra)
  parts = [sweep_markdown(study), markdown(claims, 'The paper\'s claims'),
           markdown(extra, 'Beyond the paper'), cells_markdown(study), '### Power', '']
  parts += [f'- `{c}`: the {p["rows"]} comparisons with {p["n"]} seeds have a median std of '
            f'the paired differences of {p["sd_diff"]:.4f}; the smallest |Δ| that {p["n"]} '
            f'seeds detect with 80 % power at 5 % is {p["detectable"]:.4f} (uncorrected; '
            'Holm asks for more).' for c, p in power.items()]
  header = ('Built by `python -m scalejax.studies.claims --out OUT` from the study folders '
            'that `bash scripts/run_full_study.sh OUT` writes (rerun that command to redo '
            'any cell). Final eval loss at the last step; Δ = x − reference, paired by seed; '
            'Holm over the rows of each table that have seeds.')
  text = '\n'.join([header, '', *parts]) + '\n'
  md_path = md_path or os.path.join(out, 'claims.md')
  os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
  with open(md_path, 'w') as f:
    f.write(text)
  folder = os.path.dirname(os.path.abspath(md_path))
  pngs = [plot(claims + extra, os.path.join(folder, 'claims.png'))] if any(
      r['n'] > 1 for r in claims + extra) else []
  pngs += filter(None, [plot_batch_trend(extra, os.path.join(folder, 'batch_trend.png'))])
  result = {'claims': claims, 'beyond': extra, 'power': power,
            'plots': [os.path.basename(p) for p in pngs]}  # next to the markdown
  with open(os.path.splitext(md_path)[0] + '.json', 'w') as f:
    json.dump(result, f, indent=1, default=str)
  return {**result, 'markdown': text}


# --- command line -----------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('out', None, 'the full study\'s folder (scripts/run_full_study.sh OUT)',
                      flag_values=fv)
  flags.DEFINE_string('markdown', None, 'where the table goes (default OUT/claims.md; a '
                      '.json and claims.png are written next to it)', flag_values=fv)
  flags.DEFINE_string('results', None, 'also rewrite the claims block of this file (e.g. '
                      'docs/RESULTS.md): the rows that have run', flag_values=fv)
  flags.mark_flags_as_required(['out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  if not os.path.isdir(fv.out):
    raise FileNotFoundError(f'--out {fv.out}: no such folder; run scripts/run_full_study.sh '
                            f'{fv.out} first')
  if fv.results and not os.path.isfile(fv.results):
    raise FileNotFoundError(f'--results {fv.results}: no such file')
  rep = report(fv.out, fv.markdown, fv.results)
  print(rep['markdown'])
  return rep


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

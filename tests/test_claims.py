"""The claims table: Holm, power, and comparisons across study folders (after retuning)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from scalejax.cli import common
from scalejax.studies import claims
from scalejax.train import optim
from scalejax.train.config import load_config

ROOT = Path(__file__).parents[1]


def test_holm_on_known_numbers():
  # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> 0.06 (monotone).
  np.testing.assert_allclose(claims.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(claims.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
  assert claims.holm([0.02]) == [0.02]


def test_p_value_and_the_detectable_effect():
  # t(4) = 2.776 is the 97.5 % point: p = 0.05 two-sided.
  assert claims.p_value(2.7764451, 4) == pytest.approx(0.05, abs=1e-6)
  assert claims.p_value(-2.7764451, 4) == pytest.approx(0.05, abs=1e-6)
  # The detectable effect is where the exact power of the paired t-test (noncentral t,
  # noncentrality effect * sqrt(n) / sd) is 80 %; the textbook shortcut
  # (t_0.975 + t_0.8) * sd / sqrt(n) falls a little short of it at few seeds.
  for n in (3, 5, 10):
    mde = claims.detectable_effect(0.01, n)
    crit = stats.t.ppf(0.975, n - 1)
    nc = mde * math.sqrt(n) / 0.01
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-6), (n, power)
    shortcut = (crit + stats.t.ppf(0.8, n - 1)) * 0.01 / math.sqrt(n)
    assert shortcut < mde < 1.1 * shortcut
  assert claims.detectable_effect(0.02, 5) == pytest.approx(2 * claims.detectable_effect(0.01, 5))


def _summary(folder, groups):
  """A study folder's summary.json as the harness writes it (seeds as string keys)."""
  folder.mkdir(parents=True, exist_ok=True)
  summary = {g: {v: {'n': len(l), 'mean': float(np.mean(l)),
                     'losses': {str(s): x for s, x in enumerate(l)}} for v, l in rows.items()}
             for g, rows in groups.items()}
  (folder / 'summary.json').write_text(json.dumps({'summary': summary}))


BASE = [1.70, 1.71, 1.69, 1.72, 1.70]


@pytest.fixture
def study(tmp_path):
  """A full-study folder: sweep (baseline best 1e-3, no_scale 2e-3, unified 5e-4), the
  Pre-Norm suite at 1e-3, the retuned runs, one sandwich stage."""
  out = tmp_path / 'full'
  _summary(out / 'sweep_shakespeare_char', {
      'adamw-cosine-lr0.0005': {'baseline': [1.75], 'no_scale': [1.80], 'unified': [1.60]},
      'adamw-cosine-lr0.001': {'baseline': [1.70], 'no_scale': [1.75], 'unified': [1.62]},
      'adamw-cosine-lr0.002': {'baseline': [1.72], 'no_scale': [1.74], 'unified': [1.65]}})
  _summary(out / 'pre_shakespeare_char', {'adamw-cosine-lr0.001': {
      'baseline': BASE,
      'no_scale': [b + 0.03 for b in BASE],                       # clearly worse
      'hg': [b - d for b, d in zip(BASE, (0.01, -0.01, 0.0, 0.005, -0.004))],  # noise
      'dnp': [b + 0.02 + 0.001 * i for i, b in enumerate(BASE)]}})  # worse: against
  # The retuned runs sit at their own LR; their seeds pair with the Pre-Norm baseline's.
  _summary(out / 'retuned_no_scale_shakespeare_char', {'adamw-cosine-lr0.002': {
      'baseline': [1.72] * 5, 'no_scale': [b + 0.01 for b in BASE[:4]]}})
  _summary(out / 'sandwich_shakespeare_char_wd0.3', {'adamw-cosine-lr0.001@sandwich': {
      'baseline@sandwich': BASE, 'decay_all@sandwich': BASE,
      'decay_iwd@sandwich': [b - 0.002 for b in BASE]}})
  for b, gap in ((12, 0.03), (48, 0.02)):  # each batch at its own (scaled) LR
    _summary(out / f'batch{b}', {f'adamw-cosine-lr{1e-3 * (b / 12) ** 0.5:g}': {
        'baseline': BASE[:3], 'no_scale': [x + gap for x in BASE[:3]],
        'unified': [x - gap + 0.001 * i for i, x in enumerate(BASE[:3])]}})
  trial = (out / 'sandwich_shakespeare_char_wd0.3' / 'trials'
           / 'decay_iwd@sandwich-adamw-cosine-lr0.001-s0')
  trial.mkdir(parents=True)
  opt = {**optim.default_config().to_dict(), 'schedule': 'constant', 'warmup_steps': 0,
         'scale_decay': 0.3}
  (trial / 'config.json').write_text(json.dumps({'optimizer': opt, 'train': {'steps': 2000}}))
  return out


def _row(measured, what, corpus='shakespeare_char'):
  [row] = [r for r in measured if r['what'] == what and r['corpus'] == corpus]
  return row


def test_claims_compare_across_folders_pair_by_seed_and_correct_for_the_family(study):
  rep = common.parse_flags(claims.define_flags, ['--out', str(study)])
  rep = claims.main(['claims'], rep)
  rows = rep['claims']

  same = _row(rows, "no_scale − baseline, both at the baseline's best LR")
  assert same['n'] == 5 and same['diff'] == pytest.approx(0.03) and same['sd'] < 1e-12
  assert same['verdict'] == 'supports' and same['lr_x'] == same['lr_ref'] == 1e-3

  # After retuning: no_scale at its own best LR (2e-3, from the sweep) against the
  # baseline at its best (1e-3, the Pre-Norm folder), on the 4 seeds both have.
  retuned = _row(rows, 'no_scale at its best LR − baseline at its best LR')
  assert (retuned['lr_x'], retuned['lr_ref'], retuned['seeds']) == (2e-3, 1e-3, [0, 1, 2, 3])
  assert retuned['diff'] == pytest.approx(0.01)

  dnp = _row(rows, 'dnp − baseline')
  assert dnp['diff'] == pytest.approx(0.022) and dnp['verdict'] == 'against'
  hg = _row(rows, 'hg − baseline')
  d = np.array([-0.01, 0.01, 0.0, -0.005, 0.004])
  assert hg['diff'] == pytest.approx(d.mean())
  assert hg['effect'] == pytest.approx(d.mean() / np.std(BASE, ddof=1))
  t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
  assert hg['p'] == pytest.approx(2 * stats.t.sf(abs(t), 4))

  # Holm over the rows that have seeds: hg's p times the family's size at its rank.
  tested = [r for r in rows if r['n'] > 1]
  assert len(tested) == 6  # no_scale x2, hg, dnp, iwd − all, iwd − none
  assert hg['p_holm'] == pytest.approx(claims.holm([r['p'] for r in tested])[tested.index(hg)])
  assert hg['p_holm'] >= hg['p'] and hg['verdict'] == 'not resolved'

  iwd = _row(rows, 'iwd − all @sandwich, scale decay 0.3')
  assert iwd['diff'] == pytest.approx(-0.002) and iwd['verdict'] == 'supports'
  assert iwd['decay_budget'] == pytest.approx((1 - 1e-3 * 0.3) ** 2000, rel=1e-6)

  # What has not run is listed, not dropped and not counted in the correction.
  assert _row(rows, 'magdir − baseline')['verdict'] == 'not run yet'
  assert _row(rows, 'dp − baseline', 'study_stdlib')['lr_x'] is None

  # The batch sweep: each folder's only LR, 3 seeds, a family of its own with the other
  # open questions; the trend is plotted.
  batch = {r['what']: r for r in rep['beyond'] if r['claim'] == claims.BATCH}
  assert list(batch) == ['no_scale − baseline, batch 12', 'unified − baseline, batch 12',
                         'no_scale − baseline, batch 48', 'unified − baseline, batch 48']
  assert batch['no_scale − baseline, batch 48']['diff'] == pytest.approx(0.02)
  assert batch['unified − baseline, batch 48']['lr_x'] == pytest.approx(2e-3)  # its folder's LR
  assert batch['unified − baseline, batch 12']['n'] == 3
  assert (study / 'batch_trend.png').read_bytes()[:4] == b'\x89PNG'

  text = (study / 'claims.md').read_text()
  assert '| unified | **1.6000** | 1.6200 | 1.6500 | 0.0005 (edge of the grid) |' in text
  assert '| removing the scale vectors hurts | no_scale at its best LR − baseline at its best ' \
         'LR | shakespeare_char | 0.002 / 0.001 | 4 | +0.0100 ± 0.0000 |' in text
  assert '(decay budget 0.549)' in text
  # Every cell's absolute numbers, the sweeps left out (their table is above).
  assert (f'| pre_shakespeare_char | adamw-cosine-lr0.001 | no_scale | 5 | '
          f'{np.mean(BASE) + 0.03:.4f} ± {np.std(BASE, ddof=1):.4f} |') in text
  assert '| batch48 | adamw-cosine-lr0.002 | baseline | 3 |' in text
  assert not [l for l in text.splitlines() if l.startswith('| sweep_')]
  assert (study / 'claims.png').read_bytes()[:4] == b'\x89PNG'
  saved = json.loads((study / 'claims.json').read_text())
  assert saved['claims'][0]['verdict'] == 'supports'
  # Power from the rows with the design's 5 seeds (the 4-seed retuned row is left out).
  full = [r for r in rows if r['n'] == 5 and r['corpus'] == 'shakespeare_char']
  power = rep['power']['shakespeare_char']
  assert power['n'] == 5 and power['rows'] == len(full) == 5
  assert power['sd_diff'] == pytest.approx(np.median([r['sd'] for r in full]))
  assert power['detectable'] == pytest.approx(claims.detectable_effect(power['sd_diff'], 5))
  assert 'shakespeare_char' in saved['power'] and saved['plots'] == ['claims.png', 'batch_trend.png']


def test_the_iwd_and_qk_stages_of_each_corpus_are_rows_of_that_corpus(study):
  # The second corpus's IWD stage (its own folder per scale decay) and its DNP-against-
  # QK-norm stage compare at that corpus's baseline LR, paired by seed as on the first.
  _summary(study / 'sweep_study_stdlib', {
      'adamw-cosine-lr0.0005': {'baseline': [1.30]}, 'adamw-cosine-lr0.001': {'baseline': [1.22]},
      'adamw-cosine-lr0.002': {'baseline': [1.25]}})
  stdlib = [1.22, 1.23, 1.21, 1.22, 1.24]
  _summary(study / 'sandwich_study_stdlib_wd1.0', {'adamw-cosine-lr0.001@sandwich': {
      'baseline@sandwich': stdlib, 'decay_all@sandwich': [b + 0.05 for b in stdlib],
      'decay_iwd@sandwich': [b + 0.01 for b in stdlib]}})
  _summary(study / 'qk_study_stdlib', {'adamw-cosine-lr0.001': {
      'baseline': [b + 0.02 for b in stdlib], 'baseline@qk': stdlib,
      'dnp@qk': [b - 0.004 for b in stdlib]}})
  assert claims.sandwich_decays(str(study)) == {'shakespeare_char': ['0.3'],
                                                'study_stdlib': ['1.0']}
  rep = claims.main(['claims'], common.parse_flags(claims.define_flags, ['--out', str(study)]))
  rows = rep['claims']
  # QK-norm alone, the reference of the DNP rows: a question of its own family.
  alone = _row(rep['beyond'], 'baseline@qk − baseline', 'study_stdlib')
  assert alone['diff'] == pytest.approx(-0.02) and alone['claim'] == claims.QK_ALONE
  all_ = _row(rows, 'iwd − all @sandwich, scale decay 1.0', 'study_stdlib')
  none = _row(rows, 'iwd − none @sandwich, scale decay 1.0', 'study_stdlib')
  assert (all_['diff'], none['diff']) == (pytest.approx(-0.04), pytest.approx(0.01))
  assert (all_['verdict'], none['verdict'], all_['lr_x']) == ('supports', 'against', 1e-3)
  assert not [r for r in rows if r['what'].endswith('scale decay 1.0')
              and r['corpus'] == 'shakespeare_char']
  qk = _row(rows, 'dnp@qk − baseline@qk (both with QK-norm)', 'study_stdlib')
  assert qk['n'] == 5 and qk['diff'] == pytest.approx(-0.004)
  assert _row(rows, 'unified@qk − baseline@qk', 'study_stdlib')['verdict'] == 'not run yet'


def test_decay_budget_of_a_published_stage_comes_from_its_commands(study):
  # A published stage has summary.json but no trial folders: the budget is that of the
  # config its command names, with the command's overrides (cosine schedule, warmup).
  import shutil
  shutil.rmtree(study / 'sandwich_shakespeare_char_wd0.3' / 'trials')
  summary = json.loads((study / 'sandwich_shakespeare_char_wd0.3' / 'summary.json').read_text())
  command = ('python -m scalejax.cli.train --config=configs/shakespeare_char.py '
             '--config.model.placement=sandwich --config.optimizer.lr=0.002 '
             '--config.optimizer.norm_decay=iwd --config.optimizer.scale_decay=0.3 '
             '--config.optimizer.schedule=constant --config.optimizer.warmup_steps=0 '
             '--config.seed=1 --config.train.steps=400')
  summary['trials'] = {'decay_iwd@sandwich-adamw-cosine-lr0.002-s1': {
      'variant': 'decay_iwd@sandwich', 'seed': 1, 'result': {'command': command}}}
  (study / 'sandwich_shakespeare_char_wd0.3' / 'summary.json').write_text(json.dumps(summary))
  rep = claims.main(['claims'], common.parse_flags(claims.define_flags, ['--out', str(study)]))
  iwd = _row(rep['claims'], 'iwd − all @sandwich, scale decay 0.3')
  # the constant LR 0.002 for 400 steps, the config file's scale LR multiplier
  mult = load_config(ROOT / 'configs' / 'shakespeare_char.py').optimizer.scale_lr_mult
  assert iwd['decay_budget'] == pytest.approx((1 - 0.002 * 0.3 * mult) ** 400, rel=1e-6)


def test_a_missing_study_folder_is_one_clear_error(tmp_path):
  fv = common.parse_flags(claims.define_flags, ['--out', str(tmp_path / 'nowhere')])
  with pytest.raises(FileNotFoundError, match='run scripts/run_full_study.sh'):
    claims.main(['claims'], fv)


def test_results_block_is_rewritten_with_the_rows_that_ran(study, tmp_path):
  report = tmp_path / 'RESULTS.md'
  before, after = '# Results\n\nProse above.\n\n', '\nProse below.\n'
  report.write_text(f'{before}{claims.RESULTS_BEGIN}\nan old table\n{claims.RESULTS_END}{after}')
  fv = common.parse_flags(claims.define_flags, ['--out', str(study), '--results', str(report)])
  rep = claims.main(['claims'], fv)
  text = report.read_text()
  assert text.startswith(before) and text.endswith(claims.RESULTS_END + after)
  assert 'an old table' not in text
  rows = rep['claims'] + rep['beyond']
  ran = [r for r in rows if r['n'] > 0]
  assert f'{len(ran)} of the {len(rows)} comparisons have run.' in text
  table = [l for l in text.splitlines() if l.startswith('| ')]
  assert len(table) == 1 + len(ran)  # the header and one line per row that ran
  assert any("no_scale − baseline, both at the baseline's best LR" in l for l in table)
  assert not any('not run yet' in l for l in table)


def test_results_file_without_the_block_is_one_error_and_left_as_it_is(study, tmp_path):
  report = tmp_path / 'RESULTS.md'
  report.write_text('# Results\n')
  fv = common.parse_flags(claims.define_flags, ['--out', str(study), '--results', str(report),
                                                '--markdown', str(tmp_path / 'c.md')])
  with pytest.raises(ValueError, match='has no claims block; put the lines'):
    claims.main(['claims'], fv)
  assert report.read_text() == '# Results\n' and not (tmp_path / 'c.md').exists()

"""The ablation harness: suites, dedup, aggregation math, resume/retry, table and PNGs."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from absl import flags

from scalejax.cli import common
from scalejax.studies import ablation as study

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / 'configs' / 'tiny.py')


def _flags(argv):
  """The command's flags as `python -m scalejax.studies.ablation ARGV` parses them, on a
  FlagValues of their own (this process's global flags stay untouched)."""
  return common.parse_flags(study.define_flags, argv)


def _main(argv):
  return study.main(['ablation'], _flags(argv))


def test_paired_difference_on_known_numbers():
  # d = [0.1, 0.1, 0.2]: mean 0.13333, sd 0.057735, se 0.033333, t = 4.0;
  # t_0.975 with 2 dof = 4.302653, so the CI half-width 0.143422 covers 0.
  r = study.paired_difference([2.0, 2.1, 2.3], [1.9, 2.0, 2.1])
  assert r['n'] == 3
  assert r['diff'] == pytest.approx(0.133333, abs=1e-6)
  assert r['sd'] == pytest.approx(0.057735, abs=1e-6)
  assert r['t'] == pytest.approx(4.0, abs=1e-6)
  assert r['ci'] == pytest.approx(0.143422, abs=1e-6)
  assert not r['beyond_noise']
  # d = [0.10, 0.11, 0.12]: sd 0.01, se 0.0057735, CI 0.024841, t 19.05: beyond noise.
  r = study.paired_difference([1.10, 1.21, 1.32], [1.0, 1.1, 1.2])
  assert r['ci'] == pytest.approx(0.024841, abs=1e-6)
  assert r['t'] == pytest.approx(19.0526, abs=1e-3)
  assert r['beyond_noise']
  # Negative differences are marked too; one seed gives no interval and no mark.
  assert study.paired_difference([0.9, 0.99, 1.08], [1.0, 1.1, 1.2])['beyond_noise']
  one = study.paired_difference([2.0], [1.0])
  assert one['diff'] == 1.0 and math.isnan(one['ci']) and not one['beyond_noise']


def test_aggregate_on_known_numbers():
  r = lambda loss, tps: {'final_eval_loss': loss, 'tokens_per_sec': tps}
  summary = study.aggregate({'adamw-cosine': {
      'baseline': {0: r(1.9, 100.0), 1: r(2.0, 100.0), 2: r(2.1, 100.0)},
      'no_scale': {0: r(2.0, 50.0), 1: r(2.2, 50.0)},       # seed 2 missing: 2 pairs
      'baseline@post': {0: r(3.0, 80.0), 1: r(3.2, 80.0)},
      'no_scale@post': {0: r(3.1, 80.0), 1: r(3.3, 80.0)},
  }})['adamw-cosine']
  b = summary['baseline']
  assert b['n'] == 3 and b['mean'] == pytest.approx(2.0) and b['std'] == pytest.approx(0.1)
  assert 'vs' not in b
  ns = summary['no_scale']
  assert ns['vs'] == 'baseline' and ns['n'] == 2
  assert ns['mean'] == pytest.approx(2.1) and ns['std'] == pytest.approx(0.141421, abs=1e-6)
  assert ns['diff'] == pytest.approx(0.15)  # (0.1 + 0.2) / 2 over the paired seeds 0, 1
  assert ns['slowdown'] == pytest.approx(2.0)
  post = summary['no_scale@post']
  assert post['vs'] == 'baseline@post'  # Post-Norm variants compare with Post-Norm
  assert post['diff'] == pytest.approx(0.1) and post['sd'] == pytest.approx(0.0, abs=1e-12)
  table = study.markdown_table({'adamw-cosine': summary})
  assert '| no_scale | 2 | 2.1000 ± 0.1414 | +0.1500 |' in table


def test_the_full_suite_holds_every_cell_of_the_full_budget_study():
  full = study.SUITES['full']
  cfg = study.load_config(TINY)
  trials = study.make_trials(full, list(full), [0], ['adamw'], ['cosine'], [None], {})
  key = {t.variant: study.resolved_key(cfg, t) for t in trials}
  # Sandwich placement has Output-Norms after each sub-layer: iwd and all differ there,
  # and none is the baseline's own default.
  assert key['decay_iwd@sandwich'] != key['decay_all@sandwich']
  assert key['decay_none@sandwich'] == key['baseline@sandwich'] != key['baseline']
  by_name = {t.variant: t for t in trials}
  assert by_name['decay_iwd@sandwich'].baseline_variant == 'baseline@sandwich'
  assert dict(by_name['decay_iwd@sandwich'].overrides)['model.qk_norm'] is True
  # DNP without q/k: the normalizations that QK-norm does not also do
  assert dict(by_name['dnp_no_qk'].overrides)['model.dual_targets'] == ('v', 'gate', 'up')
  assert key['dnp_no_qk'] != key['dnp'] and key['dnp@qk'] != key['dnp']
  assert by_name['unified_nohg@post'].baseline_variant == 'baseline@post'
  # Shared runs: `none` is the baseline's default decay, and Post-Norm's norms are all
  # input scales under the default post_norm_role, so there iwd is all.
  assert key['decay_none@post'] == key['baseline@post']
  assert key['decay_iwd@post'] == key['decay_all@post']
  assert len(set(key.values())) == len(key) - 3


def test_train_command_overrides_parse_to_the_trial_values(monkeypatch):
  # What a trial's process sees: each --config.KEY=VALUE parsed by the train command's
  # flags, a tuple field included (DNP on v, gate, up only).
  from scalejax.cli import train as train_cli
  trial, = [t for t in study.make_trials(study.SUITES['full'], ['dnp_no_qk'], [0], ['adamw'],
                                         ['cosine'], [None], {})]
  command = study.train_command(TINY, '/tmp/x', trial)
  assert ' '.join(command).split(' ') == command  # stored joined by spaces, split again
  argv = command[3:]  # after python -m scalejax.cli.train
  monkeypatch.setattr(sys, 'argv', ['train', *argv])  # ml_collections reads overrides here
  cfg = common.parse_flags(train_cli.define_flags, argv).config
  for key, value in trial.overrides:
    node = cfg
    for part in key.split('.'):
      node = node[part]
    assert node == value, key
  assert cfg.model.dual_targets == ('v', 'gate', 'up')


def test_suites_and_dedup():
  assert set(study.PAPER) == {'baseline', 'no_scale', 'decay_all', 'decay_none', 'decay_iwd',
                              'hg', 'dp', 'dnp', 'magdir', 'magdir_unit', 'unified',
                              'unified_nohg', 'unified_frozen'}
  post = study.SUITES['paper_post']
  assert {'dp@post', 'no_scale@post', 'baseline@post', 'unified_nohg@post'} <= set(post)
  assert 'hg@post' not in post and 'unified@post' not in post  # HG needs a norm per branch
  trials = study.make_trials(study.PAPER, ['baseline', 'decay_none', 'decay_all'], [0, 1],
                             ['adamw', 'muon'], ['cosine'], [None], {'train.steps': 5})
  assert len(trials) == 12
  cfg = study.load_config(TINY)
  key = {(t.variant, t.seed, t.optimizer): study.resolved_key(cfg, t) for t in trials}
  # baseline's default scale decay is 'none', so decay_none is the same run ...
  assert key['baseline', 0, 'adamw'] == key['decay_none', 0, 'adamw']
  # ... but not the same as another seed, optimizer or policy.
  assert len({key['baseline', 0, 'adamw'], key['baseline', 1, 'adamw'],
              key['baseline', 0, 'muon'], key['decay_all', 0, 'adamw']}) == 4
  # In plain Pre-Norm every scale is an Input-Norm: decay 'iwd' is decay 'all'. With
  # QK-norm (Output-Norm scales) they differ.
  same = study.make_trials(post, ['decay_all', 'decay_iwd', 'decay_all@qk', 'decay_iwd@qk'],
                           [0], ['adamw'], ['cosine'], [None], {})
  k = [study.resolved_key(cfg, t) for t in same]
  assert k[0] == k[1] and k[2] != k[3] and k[0] != k[2]
  with pytest.raises(ValueError, match=r"unknown variants \['hg@post'\]"):
    study.make_trials(post, ['hg@post'], [0], ['adamw'], ['cosine'], [None], {})
  with pytest.raises(ValueError, match='is not KEY=VALUE'):
    study.parse_sets(['train.steps'])
  assert study.parse_sets(['train.steps=5', 'config.model.placement=post']) == {
      'train.steps': 5, 'model.placement': 'post'}


def test_flags_keep_their_names_and_meaning():
  fv = _flags(['--config', TINY, '--out', 'o'])
  assert (fv.suite, fv.variants, fv.seeds, fv.optimizers, fv.schedules, fv.lrs, fv.parallel,
          fv.set, fv.aggregate_only) == ('paper', None, [0, 1, 2], ['adamw'], ['cosine'], None,
                                         1, [], False)
  fv = _flags(['--config', TINY, '--out', 'o', '--suite', 'paper_post', '--variants',
               'baseline,dp@post', '--seeds', '0,1', '--optimizers', 'adamw,muon', '--lrs',
               '1e-3,2e-3', '--set', 'train.steps=4', '--set', 'seed=1', '--aggregate_only'])
  assert fv.variants == ['baseline', 'dp@post'] and fv.seeds == [0, 1]
  assert fv.optimizers == ['adamw', 'muon'] and fv.lrs == [1e-3, 2e-3]
  assert fv.set == ['train.steps=4', 'seed=1'] and fv.aggregate_only
  with pytest.raises(flags.IllegalFlagValueError, match='suite'):
    _flags(['--config', TINY, '--out', 'o', '--suite', 'papr'])
  with pytest.raises(flags.IllegalFlagValueError, match='config'):
    _flags(['--out', 'o'])
  with pytest.raises(ValueError, match=r"unknown \['adamx'\]; valid: "):
    study.main(['ablation'], _flags(['--config', TINY, '--out', 'o', '--optimizers', 'adamx']))


def test_crashed_trial_is_retried_once(tmp_path):
  bad = study.Trial('baseline', 0, 'adamw', 'cosine', None,
                    (('model.placement', 'bogus'), ('seed', 0)))
  r = study.run_trial(TINY, str(tmp_path), bad)
  assert r['failed'] and r['attempts'] == 2
  assert sorted(p.name for p in tmp_path.glob('log*.txt')) == ['log1.txt', 'log2.txt']
  assert 'model.placement must be one of' in (tmp_path / 'log2.txt').read_text()
  assert study.run_trial(TINY, str(tmp_path), bad)['failed']  # not run a third time
  assert not (tmp_path / 'log3.txt').exists()


def test_tiny_suite_writes_table_and_plots_and_resumes(tmp_path, capsys):
  out = tmp_path / 'study'
  argv = ['--config', TINY, '--out', str(out), '--suite', 'tiny', '--seeds', '0,1',
          '--parallel', '2', '--set', 'train.steps=4', '--set', 'train.eval_every=2',
          '--set', 'checkpoint.every=100']
  rep = _main(argv)
  assert rep['failed'] == []
  rows = rep['summary']['adamw-cosine']
  assert set(rows) == {'baseline', 'no_scale'}
  assert rows['baseline']['n'] == rows['no_scale']['n'] == 2
  for v in rows:  # the table's numbers are the trials' last eval
    for seed, loss in rows[v]['losses'].items():
      evals = [json.loads(l) for l in
               (out / 'trials' / f'{v}-adamw-cosine-s{seed}' / 'metrics.jsonl')
               .read_text().splitlines() if 'eval_loss' in l]
      assert [e['step'] for e in evals] == [2, 4]
      assert loss == evals[-1]['eval_loss']
  table = (out / 'results.md').read_text()
  assert '| baseline | 2 |' in table and '| no_scale | 2 |' in table
  for name in ('curves_adamw-cosine.png', 'diffs_adamw-cosine.png'):
    png = (out / name).read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['summary']['adamw-cosine']['no_scale']['vs'] == 'baseline'

  # Rerunning resumes: nothing is trained again, the report is the same.
  stamp = os.path.getmtime(out / 'trials' / 'baseline-adamw-cosine-s0' / 'result.json')
  capsys.readouterr()
  again = _main(argv)
  assert '4 trials, 4 distinct runs, 0 to run' in capsys.readouterr().out
  assert os.path.getmtime(out / 'trials' / 'baseline-adamw-cosine-s0' / 'result.json') == stamp
  assert again['table'] == rep['table']

  # Another study with the same runs copies them from this one (without checkpoints)
  # instead of training them again; its table is built from the copies.
  other = tmp_path / 'other'
  capsys.readouterr()
  copied = _main([*argv[:2], '--out', str(other), *argv[4:6], '--seeds', '0', *argv[8:],
                  '--reuse', str(out)])
  assert '2 trials, 2 distinct runs, 2 copied from --reuse, 0 to run' in capsys.readouterr().out
  for v in ('baseline', 'no_scale'):
    assert copied['summary']['adamw-cosine'][v]['losses'] == {0: rows[v]['losses'][0]}
    assert (other / 'trials' / f'{v}-adamw-cosine-s0' / 'metrics.jsonl').exists()
    assert not (other / 'trials' / f'{v}-adamw-cosine-s0' / 'checkpoints').exists()


def test_parallel_trials_get_disjoint_cpus(monkeypatch):
  monkeypatch.setattr(study.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False)
  assert study.cpu_slots(2) == [{0, 1}, {2, 3}]
  assert study.cpu_slots(3) == [{0}, {1}, {2, 3}]
  assert study.cpu_slots(1) == [None]  # one trial at a time: the whole machine
  assert study.cpu_slots(8) == [None] * 8  # more trials than CPUs: no pinning


def test_a_run_is_reused_only_when_its_command_matches_but_for_the_workdir():
  t = study.Trial('baseline', 0, 'adamw', 'cosine', 1e-3, (('seed', 0),))
  key = study.run_identity(study.train_command(TINY, '/a/trials/x', t))
  assert key == study.run_identity(['/other/python', *study.train_command(TINY, '/b/y', t)[1:]])
  other_seed = study.Trial('baseline', 1, 'adamw', 'cosine', 1e-3, (('seed', 1),))
  assert key != study.run_identity(study.train_command(TINY, '/a/trials/x', other_seed))
  assert '--config.seed=0' in key and '--workdir' not in key


def _sweep_summary(out, losses):
  """A sweep's summary.json as the harness writes it: {group: {variant: {mean}}}."""
  path = out / 'sweep_shakespeare_char'
  path.mkdir(parents=True)
  summary = {f'adamw-cosine-lr{lr:g}': {'baseline': {'n': 1, 'mean': loss}}
             for lr, loss in losses.items()}
  (path / 'summary.json').write_text(json.dumps({'summary': summary}))


@pytest.mark.parametrize('losses, message', [
    ({2.5e-4: 2.0, 5e-4: 1.9, 1e-3: 1.8, 2e-3: 1.7, 4e-3: 1.75}, 'has no result at lr [0.008]'),
    ({2.5e-4: 2.0, 5e-4: 1.9, 1e-3: 1.8, 2e-3: 1.7, 4e-3: 1.65, 8e-3: 1.6},
     'at the edge of the grid'),
])
def test_the_full_study_refuses_a_best_lr_it_cannot_trust(tmp_path, losses, message):
  """Every stage after the sweep reads the winners; a missing cell or a winner at the
  grid's edge stops the script before any trial runs."""
  _sweep_summary(tmp_path, losses)
  proc = subprocess.run(['bash', 'scripts/run_full_study.sh', str(tmp_path), 'pre'], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr
  assert not (tmp_path / 'pre_shakespeare_char').exists()


# --- publishing and restoring a study ------------------------------------------------

def _fake_training(monkeypatch):
  """Trials without training: `run_trial` runs this instead of `train.py`. It writes the
  records a 4-step run would, with losses drawn from the run's identity (the same command
  gives the same curve), in milliseconds. Returns the commands it ran."""
  ran = []

  def run(cmd, stdout=None, stderr=None, cwd=None, env=None):
    workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
    rng = random.Random(study.run_identity(cmd))
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for step in (2, 4):
        f.write(json.dumps({'step': step, 'tokens_per_sec': 1000 + rng.random()}) + '\n')
        f.write(json.dumps({'step': step, 'eval_loss': 3 - step / 10 + rng.random() / 10}) + '\n')
    ran.append(cmd)
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(study, 'subprocess',
                      types.SimpleNamespace(run=run, STDOUT=subprocess.STDOUT))
  return ran


STUDY = ['--config', TINY, '--suite', 'tiny', '--lrs', '1e-3', '--set', 'train.steps=4']
GROUP = 'adamw-cosine-lr0.001'


def _publish(out, published):
  """What scripts/run_full_study.sh commits of a study: no trial folders."""
  published.mkdir(parents=True)
  for p in out.iterdir():
    if p.is_file():
      shutil.copy(p, published)
  return published


def _evals(folder):
  return [json.loads(l) for l in (folder / 'metrics.jsonl').read_text().splitlines()
          if 'eval_loss' in l]


def test_a_published_study_restores_into_an_empty_folder(tmp_path, monkeypatch, capsys):
  ran = _fake_training(monkeypatch)
  rep = _main([*STUDY, '--seeds', '0,1,2', '--out', str(tmp_path / 'a')])
  assert len(ran) == 6 and rep['failed'] == []
  pub = _publish(tmp_path / 'a', tmp_path / 'pub' / 'a')
  doc = json.loads((pub / 'summary.json').read_text())
  assert doc['plots'] == [f'curves_{GROUP}.png', f'diffs_{GROUP}.png']
  entry = doc['trials'][f'no_scale-{GROUP}-s1']
  assert (entry['group'], entry['variant'], entry['seed']) == (GROUP, 'no_scale', 1)
  # The command as any checkout runs it: no interpreter path, workdir or machine path.
  cmd = entry['result']['command']
  assert cmd.startswith('python -m scalejax.cli.train --config=configs/tiny.py --config.')
  assert '--workdir' not in cmd and str(ROOT) not in cmd and '--config.seed=1' in cmd
  assert entry['curve'] == {str(e['step']): e['eval_loss'] for e in
                            _evals(tmp_path / 'a' / 'trials' / f'no_scale-{GROUP}-s1')}

  # Restored into an empty folder (another machine): nothing trained, the same table.
  ran.clear()
  capsys.readouterr()
  again = _main([*STUDY, '--seeds', '0,1,2', '--out', str(tmp_path / 'b'), '--restore', str(pub)])
  assert ran == []
  assert '6 trials, 6 distinct runs, 6 restored from --restore, 0 to run' in capsys.readouterr().out
  assert again['summary'] == rep['summary'] and again['table'] == rep['table']
  trial = tmp_path / 'b' / 'trials' / f'no_scale-{GROUP}-s1'
  result = json.loads((trial / 'result.json').read_text())
  assert result['restored_from'] == os.path.relpath(pub / 'summary.json', ROOT)
  assert result['final_step'] == 4 and f'--workdir={trial}' in result['command']
  assert _evals(trial) == _evals(tmp_path / 'a' / 'trials' / f'no_scale-{GROUP}-s1')


def test_a_study_of_tagged_variants_trains_no_plain_baseline(tmp_path, monkeypatch):
  # X@post compares with baseline@post; a plain baseline would be a trial no row reads.
  ran = _fake_training(monkeypatch)
  rep = _main(['--config', TINY, '--suite', 'paper_post', '--lrs', '1e-3', '--set',
               'train.steps=4', '--variants', 'no_scale@post', '--seeds', '0',
               '--out', str(tmp_path / 'post')])
  assert len(ran) == 2 and all('--config.model.placement=post' in ran_cmd for ran_cmd in
                               (' '.join(c) for c in ran))
  assert list(rep['summary']) == [f'{GROUP}@post']
  # With an untagged variant the plain baseline is back as its reference.
  ran.clear()
  _main(['--config', TINY, '--suite', 'paper_post', '--lrs', '1e-3', '--set', 'train.steps=4',
         '--variants', 'no_scale,no_scale@post', '--seeds', '0', '--out', str(tmp_path / 'mix')])
  assert len(ran) == 4


def test_aggregate_only_reports_the_published_trials_and_trains_nothing(tmp_path, monkeypatch):
  # How a stopped study is published: the report of what finished here and what the
  # published copy already listed, nothing trained (PUBLISH_ONLY=1 in the full study).
  ran = _fake_training(monkeypatch)
  rep = _main([*STUDY, '--seeds', '0,1', '--out', str(tmp_path / 'a')])
  pub = _publish(tmp_path / 'a', tmp_path / 'pub' / 'a')
  ran.clear()
  again = _main([*STUDY, '--seeds', '0,1,2', '--out', str(tmp_path / 'b'), '--restore', str(pub),
                 '--aggregate_only'])
  assert ran == []  # seed 2 neither ran nor was invented
  assert again['summary'] == rep['summary'] and again['table'] == rep['table']
  doc = json.loads((tmp_path / 'b' / 'summary.json').read_text())
  assert sorted(doc['trials']) == sorted(json.loads((pub / 'summary.json').read_text())['trials'])


def test_an_older_summary_restores_the_final_loss_of_each_seed(tmp_path, monkeypatch, capsys):
  """Summaries published before "trials" existed hold the final loss per (group,
  variant, seed) only: that is restored, without a curve; the curves plot draws the
  seeds that have one."""
  ran = _fake_training(monkeypatch)
  rep = _main([*STUDY, '--seeds', '0,1', '--out', str(tmp_path / 'a')])
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'summary.json').write_text(json.dumps({'summary': rep['summary'], 'failed': []}))
  ran.clear()
  drawn = []
  import matplotlib.axes
  plot = matplotlib.axes.Axes.plot
  monkeypatch.setattr(matplotlib.axes.Axes, 'plot', lambda ax, x, y, **kw: (
      drawn.append((kw['label'], list(x))), plot(ax, x, y, **kw))[1])
  capsys.readouterr()
  again = _main([*STUDY, '--seeds', '0,1,2', '--out', str(tmp_path / 'b'), '--restore', str(old)])
  assert '6 trials, 6 distinct runs, 4 restored from --restore, 2 to run' in capsys.readouterr().out
  assert sorted(a for cmd in ran for a in cmd if a.startswith('--config.seed=')) == [
      '--config.seed=2'] * 2
  for v, row in again['summary'][GROUP].items():
    assert row['n'] == 3
    assert {s: row['losses'][s] for s in (0, 1)} == rep['summary'][GROUP][v]['losses']
  trial = tmp_path / 'b' / 'trials' / f'baseline-{GROUP}-s0'
  result = json.loads((trial / 'result.json').read_text())
  assert result['final_step'] is None and result['restored_from'].endswith('old/summary.json')
  assert _evals(trial) == []
  assert drawn == [('baseline', [2, 4]), ('no_scale', [2, 4])]  # seed 2's curve, not blank
  # Republished, the restored seeds keep their final loss (and still have no curve).
  doc = json.loads((tmp_path / 'b' / 'summary.json').read_text())
  assert doc['trials'][f'baseline-{GROUP}-s0']['curve'] == {}
  assert doc['trials'][f'baseline-{GROUP}-s0']['result']['final_eval_loss'] == \
      rep['summary'][GROUP]['baseline']['losses'][0]


@pytest.mark.parametrize('change', [['--lrs', '2e-3'], ['--set', 'train.eval_every=2']])
def test_a_different_run_is_not_restored(tmp_path, monkeypatch, capsys, change):
  ran = _fake_training(monkeypatch)
  _main([*STUDY, '--seeds', '0', '--out', str(tmp_path / 'a')])
  pub = _publish(tmp_path / 'a', tmp_path / 'pub')
  old = tmp_path / 'old'
  old.mkdir()
  doc = json.loads((pub / 'summary.json').read_text())
  (old / 'summary.json').write_text(json.dumps({'summary': doc['summary']}))
  ran.clear()
  capsys.readouterr()
  # Another LR is another group, in either format; another override keeps the group's
  # name, which is all an older summary records: only the new format tells them apart.
  restore = f'{pub},{old}' if change[0] == '--lrs' else str(pub)
  _main([*STUDY, *change, '--seeds', '0', '--out', str(tmp_path / 'b'), '--restore', restore])
  assert '2 trials, 2 distinct runs, 0 restored from --restore, 2 to run' in capsys.readouterr().out
  assert len(ran) == 2


def test_a_bad_restore_folder_is_one_error_line(tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'summary.json').write_text('{"summary": ')
  with pytest.raises(ValueError, match='not valid JSON') as e:
    _main([*STUDY, '--out', str(tmp_path / 'o'), '--restore', str(bad)])
  assert str(bad / 'summary.json') in common.message(e.value)
  missing = tmp_path / 'nowhere'
  proc = subprocess.run([sys.executable, '-m', 'scalejax.studies.ablation', *STUDY, '--out',
                         str(tmp_path / 'o'), '--restore', str(missing)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      f'scalejax.studies.ablation: error: --restore {missing}: no such folder'], proc.stderr
  assert not (tmp_path / 'o' / 'trials').exists()


def _full_study(tmp_path, env=None, prepare=lambda out: None):
  """scripts/run_full_study.sh OUT pre with `python` faked (studies are logged, anything
  else runs) and a published sweep; returns (published folder, OUT, logged commands)."""
  pub, out, log = tmp_path / 'pub', tmp_path / 'out', tmp_path / 'log'
  sweep = {f'adamw-cosine-lr{lr:g}': {v: {'n': 1, 'mean': 1.0 + abs(lr - 1e-3)}
                                      for v in ('baseline', 'no_scale', 'unified')}
           for lr in (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)}
  (pub / 'sweep_shakespeare_char').mkdir(parents=True)
  (pub / 'sweep_shakespeare_char' / 'summary.json').write_text(json.dumps({'summary': sweep}))
  (pub / 'pre_shakespeare_char').mkdir()
  (pub / 'pre_shakespeare_char' / 'summary.json').write_text('{"summary": {}}')
  fake = tmp_path / 'bin' / 'python'
  fake.parent.mkdir()
  fake.write_text(f"""#!/usr/bin/env bash
if [[ $1 == -m && $2 == scalejax.studies.* ]]; then
  echo "$*" >> {log}
  prev=
  for a in "$@"; do
    if [[ $2 == *.ablation && $prev == --out ]]; then
      mkdir -p "$a" && echo '{{"summary": {{}}, "new": 1}}' > "$a/summary.json"
      echo table > "$a/results.md" && echo png > "$a/curves_g.png"
    fi
    prev=$a
  done
  exit 0
fi
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  prepare(out)
  proc = subprocess.run(['bash', 'scripts/run_full_study.sh', str(out), 'pre'], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, PATH=f'{fake.parent}:{os.environ["PATH"]}',
                                 PUBLISHED=str(pub), **(env or {})))
  assert proc.returncode == 0, proc.stderr
  return pub, out, log.read_text().splitlines()


def test_the_full_study_resumes_from_and_publishes_to_published(tmp_path):
  """Each study restores from PUBLISHED/<its folder> when that exists and copies its
  results there; the sweep's winners come from the published sweep when this machine
  has none."""
  pub, out, logged = _full_study(tmp_path)
  pre, no_scale, unified, claims = logged
  assert f'--out {out}/pre_shakespeare_char' in pre and '--lrs 0.001' in pre
  assert f'--restore {pub}/pre_shakespeare_char' in pre
  assert f'--out {out}/retuned_no_scale_shakespeare_char' in no_scale
  assert '--restore' not in no_scale and 'scalejax.studies.claims' in claims
  for name in ('pre_shakespeare_char', 'retuned_no_scale_shakespeare_char',
               'retuned_unified_shakespeare_char'):
    assert sorted(p.name for p in (pub / name).iterdir()) == [
        'curves_g.png', 'results.md', 'summary.json']
    assert json.loads((pub / name / 'summary.json').read_text())['new'] == 1


def test_publish_only_reports_the_studies_that_have_trials_and_trains_nothing(tmp_path):
  pub, out, logged = _full_study(
      tmp_path, env={'PUBLISH_ONLY': '1'},
      prepare=lambda out: (out / 'pre_shakespeare_char' / 'trials').mkdir(parents=True))
  studies = [c for c in logged if 'scalejax.studies.ablation' in c]
  assert len(studies) == 1  # the retuned studies have no trials here: skipped
  assert f'--out {out}/pre_shakespeare_char' in studies[0] and '--aggregate_only' in studies[0]
  assert f'--restore {pub}/pre_shakespeare_char' in studies[0]
  assert json.loads((pub / 'pre_shakespeare_char' / 'summary.json').read_text())['new'] == 1

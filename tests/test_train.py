"""train.py end to end: loss falls, resume is exact, overrides are checked, sampling."""

import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from scalejax.train import trainer
from _util import SHAKESPEARE, run_command_lines, tiny_config



def _records(workdir, key):
  lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines if key in json.loads(l)]


def _shakespeare_cfg(steps=60):
  cfg = tiny_config()
  cfg.data.update(source='text_files', path=str(SHAKESPEARE), tokenizer='char',
                  eval_batches=4, max_bytes=300_000)
  cfg.train.update(steps=steps, batch_size=8, seq_len=32, eval_every=30, log_every=10)
  cfg.model.update(d_model=64, n_heads=4)
  cfg.optimizer.update(lr=5e-3, warmup_steps=5)
  return cfg


def test_shakespeare_loss_falls(tmp_path):
  final = trainer.train(_shakespeare_cfg(), str(tmp_path))
  evals = [r['eval_loss'] for r in _records(tmp_path, 'eval_loss')]
  assert len(evals) == 2
  assert final['eval_loss'] < 3.0 < np.log(65)  # a char model that learned something
  assert evals[-1] < evals[0]
  train = _records(tmp_path, 'tokens_per_sec')
  assert {'step', 'loss', 'lr', 'tokens_per_sec'} <= set(train[-1])
  assert json.loads((tmp_path / 'config.json').read_text())['data']['tokenizer'] == 'char'
  assert list(tmp_path.glob('events.out.tfevents*'))
  assert (tmp_path / 'scale_stats.jsonl').exists()


def test_resume_is_bit_exact(tmp_path):
  cfg = _shakespeare_cfg(steps=24)
  cfg.train.update(eval_every=8, log_every=4)
  cfg.checkpoint.every = 8
  full = trainer.train(cfg, str(tmp_path / 'full'))
  trainer.train(cfg, str(tmp_path / 'cut'), stop_at=12)  # dies after step 12
  resumed = trainer.train(cfg, str(tmp_path / 'cut'))
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), jax.device_get(full['state']))
  for key in ('loss', 'eval_loss'):
    a = {r['step']: r[key] for r in _records(tmp_path / 'full', key)}
    b = {r['step']: r[key] for r in _records(tmp_path / 'cut', key)}
    assert a == b, key


# What the trainer sees of a variant is the shape of its scale params: none, an
# output-side scale (DP), HG branches with magdir parts and DNP norms (unified), a frozen
# magnitude (unified_frozen); one vector (baseline) is the model of every other test. Every
# variant's forward and gradients: test_model.py; its roles and decay: test_roles.py,
# test_weight_decay.py.
TRAINER_VARIANTS = ('no_scale', 'dp', 'unified', 'unified_frozen')


@pytest.mark.parametrize('variant', TRAINER_VARIANTS)
def test_every_kind_of_scale_param_trains(tmp_path, variant):
  cfg = tiny_config()
  cfg.model.variant = variant
  cfg.train.update(steps=6, eval_every=0, log_every=3)
  final = trainer.train(cfg, str(tmp_path))
  assert np.isfinite(final['loss']) and final['step'] == 6


@pytest.mark.parametrize('name', ['muon', 'adafactor'])
def test_structured_optimizer_states_train_checkpoint_and_resume(tmp_path, name):
  # Muon's multi_transform state holds MaskedNodes where a branch owns no param, and
  # Adafactor's factored statistics are not param-shaped: the state shardings and the
  # checkpoint must carry both. (Param-shaped states: test_resume_is_bit_exact, AdamW.)
  cfg = tiny_config()
  cfg.optimizer.name = name
  cfg.train.update(steps=6, eval_every=0, log_every=3)
  cfg.checkpoint.every = 3
  full = trainer.train(cfg, str(tmp_path / 'full'))
  trainer.train(cfg, str(tmp_path / 'cut'), stop_at=3)
  resumed = trainer.train(cfg, str(tmp_path / 'cut'))
  assert np.isfinite(full['loss']) and resumed['step'] == 6
  chex.assert_trees_all_equal(jax.device_get(resumed['state']), jax.device_get(full['state']))


def test_unknown_and_mistyped_overrides_are_clear_errors(tmp_path):
  base = ['train.py', '--config', 'configs/tiny.py', '--workdir', str(tmp_path)]
  key, typed, variant = run_command_lines([
      base + ['--config.train.stepz=3'], base + ['--config.train.steps=many'],
      base + ['--config.model.variant=fancy']])
  assert key['rc'] != 0 and 'stepz' in key['stderr']
  assert typed['rc'] != 0 and 'steps' in typed['stderr']
  assert variant['rc'] != 0 and 'valid: baseline' in variant['stderr']
  assert not (tmp_path / 'checkpoints').exists()


def test_train_py_then_sample_and_init_from(tmp_path):
  src = tmp_path / 'src'
  out, sample = run_command_lines([  # one process, as two command lines of a shell
      ['train.py', '--config', 'configs/tiny.py', '--workdir', str(src),
       '--config.train.steps=10', '--config.train.sample_tokens=5'],
      ['-m', 'scalejax.cli.sample', '--workdir', str(src), '--prompt', '1 2', '--tokens', '4']])
  assert out['rc'] == 0, out['stderr']
  assert '--- sample ---' in out['stdout']
  assert sample['rc'] == 0, sample['stderr']
  assert sample['stdout'].startswith('1 2')

  cfg = tiny_config()
  cfg.train.steps = 2
  cfg.init_from = str(src)
  cfg.optimizer.name = 'lion'  # switching optimizer is what params-only init is for
  final = trainer.train(cfg, str(tmp_path / 'ft'))
  assert final['step'] == 2

  cfg.model.d_model = 48
  with pytest.raises(ValueError, match=r"\['blocks'\]\['attn'\]\['k'\]\['kernel'\] has shape \(2, 32, 32\).*\(2, 48, 48\)"):
    trainer.train(cfg, str(tmp_path / 'bad'))

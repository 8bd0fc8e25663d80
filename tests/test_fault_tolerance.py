"""Faults during training: signals, kill -9, damaged checkpoints, resharding, NaN steps,
changed configs. Each test trains configs/tiny.py-sized models for a few steps."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalejax.train import checkpoint as ckpt
from scalejax.train import nonfinite, preemption
from scalejax.core import sharding
from scalejax.train import trainer
from _util import tiny_config, child_xla_flags

ROOT = Path(__file__).parents[1]

TIMING = ('tokens_per_sec', 'mfu')  # the only fields of a record that depend on the clock


def _cfg(**train):
  cfg = tiny_config()
  cfg.train.update(**{'eval_every': 10, 'log_every': 5, **train})
  cfg.checkpoint.update(every=5, keep=3)
  return cfg


def _records(workdir, name='metrics'):
  path = Path(workdir) / f'{name}.jsonl'
  recs = [json.loads(line) for line in path.read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _assert_same_run(workdir, ref_workdir, state, ref_state):
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(ref_state))
  for name in ('metrics', 'scale_stats'):
    assert _records(workdir, name) == _records(ref_workdir, name), name


def _flags(cfg_overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in cfg_overrides.items()]


def _apply(cfg, overrides: dict):
  for key, value in overrides.items():
    section, name = key.split('.')
    cfg[section][name] = value
  return cfg


def _popen(workdir, overrides, **kw):
  return subprocess.Popen(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py', '--workdir', str(workdir),
       *_flags(overrides)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, **kw)


def _wait_for(pred, proc=None, timeout=240.0, poll=0.002):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if pred():
      return True
    if proc is not None and proc.poll() is not None:
      return False
    time.sleep(poll)
  raise TimeoutError('condition not reached')


def _last_step(workdir) -> int:
  try:
    lines = (Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in lines:
    try:
      steps.append(json.loads(line)['step'])
    except (json.JSONDecodeError, KeyError):
      pass  # a line being written
  return max(steps)


def _committed(workdir) -> list[int]:
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 20-step run with checkpoints at 10, 15, 20 (keep=3)."""
  workdir = tmp_path_factory.mktemp('reference')
  cfg = _cfg(steps=20)
  final = trainer.train(cfg, str(workdir))
  assert _committed(workdir) == [10, 15, 20]
  return cfg, workdir, final['state']


# --- signals ----------------------------------------------------------------------

def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
  overrides = {'train.steps': 200, 'train.eval_every': 50, 'train.log_every': 1,
               'checkpoint.every': 50, 'checkpoint.async_save': True}
  proc = _popen(tmp_path / 'cut', overrides)
  _wait_for(lambda: _last_step(tmp_path / 'cut') >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  stop = int(out.split('stopped by SIGTERM after step ')[1].split(';')[0])
  assert 3 <= stop < 200
  assert 'To resume, rerun the same command' in out and '--workdir' in out
  assert _committed(tmp_path / 'cut')[-1] == stop  # the async save committed before exit
  # Rerunning resumes from that step and ends where an uninterrupted run ends.
  cfg = _apply(tiny_config(), overrides)
  resumed = trainer.train(cfg, str(tmp_path / 'cut'))
  full = trainer.train(cfg, str(tmp_path / 'full'))
  _assert_same_run(tmp_path / 'cut', tmp_path / 'full', resumed['state'], full['state'])


def test_sigint_in_process_stops_after_the_step_and_restores_handlers(tmp_path):
  cfg = _cfg(steps=200, log_every=1, eval_every=0)  # the program of the test above
  cfg.checkpoint.every = 1000

  def interrupt():
    _wait_for(lambda: _last_step(tmp_path) >= 2)
    os.kill(os.getpid(), signal.SIGINT)

  ignore = lambda *_: None  # a SIGINT landing after train() returns must not end pytest
  previous = signal.signal(signal.SIGINT, ignore)
  try:
    threading.Thread(target=interrupt, daemon=True).start()
    final = trainer.train(cfg, str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is ignore  # train() put back what it found
  finally:
    signal.signal(signal.SIGINT, previous)
  assert final['stopped'] == 'SIGINT' and 2 <= final['step'] < 200
  assert _committed(tmp_path) == [final['step']]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_second_signal_stops_at_once_and_a_signal_during_setup_stops_before_step_1(
    tmp_path, monkeypatch):
  # The second signal acts as the handler found on entry would: make that Python's
  # default (earlier tests or libraries may have left another one installed).
  # raise_signal delivers to this (the main) thread; os.kill may pick one of JAX's.
  found = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.StopRequest() as request:
      signal.raise_signal(signal.SIGINT)
      assert request.should_stop(1) and request.signal_name == 'SIGINT'
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        time.sleep(1)  # the handler runs between bytecodes; it raises before this ends
  finally:
    signal.signal(signal.SIGINT, found)

  build = trainer.build_run

  def build_then_signal(*args):
    out = build(*args)
    signal.raise_signal(signal.SIGTERM)
    return out
  monkeypatch.setattr(trainer, 'build_run', build_then_signal)
  final = trainer.train(_cfg(steps=20), str(tmp_path))
  assert final['stopped'] == 'SIGTERM' and final['step'] == 0
  assert _committed(tmp_path) == [] and not (tmp_path / 'metrics.jsonl').exists()


# --- kill -9 ----------------------------------------------------------------------

def test_kill_9_at_random_moments_then_rerun_equals_uninterrupted(tmp_path):
  """Kills during an async save and at random steps; keep=1, so a kill between a new
  save and its commit finds the previous checkpoint still there."""
  overrides = {'train.steps': 200, 'train.eval_every': 20, 'train.log_every': 3,
               'checkpoint.every': 6, 'checkpoint.keep': 1, 'checkpoint.async_save': True}
  cut = tmp_path / 'cut'
  rng = random.Random(0)
  seen = []

  def saving():  # an async save is being written (Orbax's temporary directory exists)
    d = cut / 'checkpoints'
    return d.exists() and any('tmp' in p for p in os.listdir(d)) and _committed(cut)

  for trial, target in enumerate([None, rng.randint(15, 40), rng.randint(50, 80)]):
    proc = _popen(cut, overrides)
    if target is None:
      # The window of an async save is short; a loaded machine's poller may miss every
      # one of them. Start afresh (at most 3 runs) until a kill lands inside a save.
      for attempt in range(3):
        reached = _wait_for(saving, proc)
        if reached or attempt == 2:
          break
        proc.communicate()
        shutil.rmtree(cut)
        proc = _popen(cut, overrides)
    else:
      reached = _wait_for(lambda: _last_step(cut) >= target, proc)
      time.sleep(rng.uniform(0, 0.05))  # anywhere inside a step, an eval or a save
    at_kill = _committed(cut)
    proc.kill()
    _, err = proc.communicate()
    assert reached, f'trial {trial}: the run ended before the kill (rc {proc.returncode}):\n{err[-3000:]}'
    after = _committed(cut)
    # The newest committed checkpoint survives the kill, whatever was being saved.
    assert not at_kill or (after and after[-1] >= at_kill[-1]), (at_kill, after)
    seen.append(after)
  assert seen[0], 'the kill during an async save left no committed checkpoint'

  cfg = _apply(tiny_config(), overrides)
  resumed = trainer.train(cfg, str(cut))
  full = trainer.train(cfg, str(tmp_path / 'full'))
  _assert_same_run(cut, tmp_path / 'full', resumed['state'], full['state'])


# --- damaged checkpoints ----------------------------------------------------------

def _damage_arrays(step_dir: Path):
  files = [p for p in (step_dir / 'state').rglob('d/*') if p.is_file()]
  assert files
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(f.stat().st_size // 2)


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(reference, tmp_path, caplog):
  cfg, ref_dir, ref_state = reference
  caplog.set_level(logging.WARNING, logger='scalejax')

  one = tmp_path / 'truncated'
  shutil.copytree(ref_dir, one)
  _damage_arrays(one / 'checkpoints' / '20')
  final = trainer.train(cfg, str(one))
  assert 'checkpoint step 20' in caplog.text and 'damaged' in caplog.text
  assert 'resuming from step 15' in caplog.text
  assert (one / 'damaged_checkpoints' / '20').is_dir()  # kept for inspection, not deleted
  _assert_same_run(one, ref_dir, final['state'], ref_state)
  assert _committed(one) == [10, 15, 20]

  caplog.clear()
  two = tmp_path / 'missing_item'
  shutil.copytree(ref_dir, two)
  shutil.rmtree(two / 'checkpoints' / '20' / 'data')
  (two / 'checkpoints' / '15' / 'state' / '_METADATA').write_text('{"tree_metad')
  final = trainer.train(cfg, str(two))
  assert 'Item "data" was not found' in caplog.text
  assert 'checkpoint step 15' in caplog.text and 'JSONDecodeError' in caplog.text
  assert 'resuming from step 10' in caplog.text
  _assert_same_run(two, ref_dir, final['state'], ref_state)

  three = tmp_path / 'all_damaged'
  shutil.copytree(ref_dir, three)
  for step in (10, 15, 20):
    shutil.rmtree(three / 'checkpoints' / str(step) / 'state')
  with pytest.raises(ValueError, match=r'no readable checkpoint .*step 20: .*step 10: '):
    trainer.train(cfg, str(three))


def test_shape_mismatch_names_the_param_and_both_shapes(reference, tmp_path):
  cfg, ref_dir, _ = reference
  shutil.copytree(ref_dir, tmp_path / 'w')
  cfg = _cfg(steps=20)
  cfg.model.d_ff = 48
  cfg.train.allow_config_change = True
  with pytest.raises(ValueError, match=r"\['params'\]\['blocks'\]\['mlp'\]\['down'\]\['kernel'\] "
                                       r'has shape \(2, 85, 32\) in the checkpoint but '
                                       r'\(2, 48, 32\) in this model'):
    trainer.train(cfg, str(tmp_path / 'w'))
  assert _committed(tmp_path / 'w') == [10, 15, 20]  # a mismatch is not damage: nothing moved


def test_checkpoint_from_before_the_fault_counters_still_resumes(reference, tmp_path):
  cfg, ref_dir, ref_state = reference
  old = {k: v for k, v in jax.device_get(ref_state).items() if k not in nonfinite.counters()}
  mngr = ckpt.manager(str(tmp_path), 3)
  ckpt.save(mngr, 20, old, {'next_index': 20})
  mngr.close()
  shutil.copy(ref_dir / 'config.json', tmp_path / 'config.json')
  final = trainer.train(cfg, str(tmp_path))
  assert final['step'] == 20 and int(final['state']['bad_steps']) == 0
  chex.assert_trees_all_equal(jax.device_get(final['state']['params']),
                              jax.device_get(ref_state['params']))


_RESHARD = textwrap.dedent('''
    import sys, numpy as np, jax
    from scalejax.train import checkpoint as ckpt, trainer
    from scalejax.train.config import load_config
    workdir, out = sys.argv[1:]
    cfg = load_config('configs/tiny.py')
    cfg.train.update(eval_every=10, log_every=5, steps=22)
    cfg.checkpoint.update(every=5, keep=3)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    assert jax.device_count() == 8
    run, state = trainer.build_run(cfg, workdir)
    mngr = ckpt.manager(workdir, 3)
    step, state, _ = ckpt.restore_latest(mngr, trainer._abstract(state, run.state_shardings),
                                         workdir)
    mngr.close()
    k = state['params']['blocks']['attn']['q']['kernel']
    print('restored', step, len(k.sharding.device_set), k.addressable_shards[0].data.shape)
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in
                     jax.tree_util.tree_leaves_with_path(state)})
    final = trainer.train(cfg, workdir)
    print('trained', final['step'], final['loss'])
''')


def test_restore_on_a_different_mesh_reshards(reference, tmp_path):
  """Saved on 1 device, restored on 8 emulated ones (data 2 x fsdp 2 x tensor 2)."""
  _, ref_dir, ref_state = reference
  shutil.copytree(ref_dir, tmp_path / 'w')
  env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _RESHARD, str(tmp_path / 'w'),
                        str(tmp_path / 'restored.npz')], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # q kernel (layers 2, embed 32, heads*head_dim 32): embed over fsdp, heads over tensor.
  assert 'restored 20 8 (2, 16, 16)' in out.stdout
  restored = np.load(tmp_path / 'restored.npz')
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(ref_state)):
    np.testing.assert_array_equal(restored[jax.tree_util.keystr(path)], leaf)
  trained = out.stdout.split('trained ')[1].split()
  assert trained[0] == '22' and np.isfinite(float(trained[1]))


# --- non-finite steps -------------------------------------------------------------

def test_guard_step_keeps_state_and_names_bad_gradients():
  state = {'params': {'a': jnp.ones(3), 'b': {'c': jnp.ones((2, 2))}},
           'opt_state': (jnp.zeros(3),), **nonfinite.counters()}
  new = {'params': {'a': jnp.full(3, 2.0), 'b': {'c': jnp.full((2, 2), 2.0)}},
         'opt_state': (jnp.ones(3),)}
  grads = {'a': jnp.ones(3), 'b': {'c': jnp.array([[1.0, jnp.inf], [0.0, 0.0]])}}
  guard = jax.jit(nonfinite.guard_step, static_argnums=5)

  kept, m = guard(state, new, jnp.float32(1.0), grads, grads, 3)
  chex.assert_trees_all_equal(kept['params'], state['params'])
  chex.assert_trees_all_equal(kept['opt_state'], state['opt_state'])
  assert int(kept['bad_streak']) == 1 and int(kept['bad_steps']) == 1
  assert jax.device_get(m['bad_leaves']) == {'a': False, 'b': {'c': True}}

  good = {'a': jnp.ones(3), 'b': {'c': jnp.ones((2, 2))}}
  kept2, m2 = guard(kept, new, jnp.float32(1.0), good, good, 3)
  chex.assert_trees_all_equal(kept2['params'], new['params'])
  assert int(kept2['bad_streak']) == 0 and int(kept2['bad_steps']) == 1
  assert not any(jax.tree.leaves(jax.device_get(m2['bad_leaves'])))

  # Once `limit` bad steps in a row have happened, even a finite step changes nothing.
  tripped = dict(state, bad_streak=jnp.int32(3))
  kept3, _ = guard(tripped, new, jnp.float32(1.0), good, good, 3)
  chex.assert_trees_all_equal(kept3['params'], state['params'])
  assert int(kept3['bad_streak']) == 4 and int(kept3['bad_steps']) == 0

  kept4, _ = guard(state, new, jnp.float32(jnp.nan), good, good, 3)  # a NaN loss alone
  chex.assert_trees_all_equal(kept4['params'], state['params'])
  assert int(kept4['bad_streak']) == 1
  bad_update = {'a': jnp.ones(3), 'b': {'c': jnp.array([[1.0, 1.0], [jnp.nan, 0.0]])}}
  kept5, m5 = guard(state, new, jnp.float32(1.0), good, bad_update, 3)  # the update alone
  chex.assert_trees_all_equal(kept5['opt_state'], state['opt_state'])
  assert int(kept5['bad_steps']) == 1
  assert not any(jax.tree.leaves(jax.device_get(m5['bad_leaves'])))  # the gradients were fine
  # finite elements whose norm is past float32's range count as a non-finite gradient
  huge = {'a': jnp.full(3, 3e19), 'b': {'c': jnp.ones((2, 2))}}
  kept6, _ = guard(state, new, jnp.float32(1.0), huge, good, 3)
  chex.assert_trees_all_equal(kept6['params'], state['params'])

def test_watch_reads_verdicts_in_groups_lag_steps_late_in_order(caplog):
  caplog.set_level(logging.WARNING, logger='scalejax')
  cfg = _cfg(max_bad_steps=2)

  def verdict(streak, bad_steps):
    return {'loss': jnp.float32(jnp.nan if streak else 1.0), 'bad_streak': jnp.int32(streak),
            'bad_steps': jnp.int32(bad_steps), 'bad_leaves': {'w': jnp.bool_(streak > 0)}}

  # Steps 1-8: good, bad (skipped), good, good, bad, bad (two in a row: the limit), then
  # two steps the device no longer applies. Read at steps 4 and 8, up to 2 steps back.
  counts = {1: (0, 0), 2: (1, 1), 3: (0, 1), 4: (0, 1), 5: (1, 2), 6: (2, 3), 7: (3, 3),
            8: (4, 3)}
  watch = nonfinite.NonFiniteWatch(cfg.train, lag=2, every=4)
  said = {}
  for step in range(1, 9):
    said[step] = watch.push(step, verdict(*counts[step]))
    if step == 3:
      assert 'loss nan' not in caplog.text  # nothing read before step 4
    if step == 4:  # steps 1 and 2 read, 3 and 4 not yet
      assert 'step 2: loss nan' in caplog.text and 'update skipped (1 in a row, 1 in' in caplog.text
  assert [s for s, stop in said.items() if stop] == [8]  # step 6's verdict, read at 8
  assert 'step 5: loss nan' in caplog.text and 'update skipped (1 in a row, 2 in this run)' in caplog.text
  assert '2 non-finite step(s) in a row (steps 5-6' in said[8] and 'after step 4' in said[8]

  # flush() reads what is pending, oldest first, and stops at the first limit reached.
  watch = nonfinite.NonFiniteWatch(cfg.train, lag=2, every=4)
  assert watch.push(1, verdict(1, 1)) is None and watch.push(2, verdict(2, 2)) is None
  stop = watch.flush()
  assert '(steps 1-2' in stop and 'after step 0' in stop
  assert watch.flush() is None  # nothing left pending
  # lag 1, every step: each step's verdict read as the next is dispatched
  watch = nonfinite.NonFiniteWatch(cfg.train, lag=1, every=1)
  assert watch.push(1, verdict(1, 1)) is None and watch.push(2, verdict(2, 2)) is None
  assert '(steps 1-2' in watch.push(3, verdict(3, 2))


class _Poisoned:
  """The train iterator, with an out-of-range token (a NaN embedding: jnp.take fills)
  in the batches of the given steps."""

  def __init__(self, it, steps, vocab):
    self.it, self.steps, self.vocab, self.step = it, set(steps), vocab, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.it))
    self.step += 1
    if self.step in self.steps:
      batch['inputs'] = batch['inputs'].copy()
      batch['inputs'][0, 0] = self.vocab
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _poison(monkeypatch, steps):
  build = trainer.data_lib.build_data

  def poisoned(cfg, **kw):
    data = build(cfg, **kw)
    data.train_iter = _Poisoned(data.train_iter, steps, data.tokenizer.vocab_size)
    return data
  monkeypatch.setattr(trainer.data_lib, 'build_data', poisoned)


def test_nan_steps_are_skipped_then_k_in_a_row_stop_with_last_good_state(
    tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.WARNING, logger='scalejax')
  _poison(monkeypatch, steps=[3, 8, 9, 10])
  cfg = _cfg(steps=20, max_bad_steps=3, log_every=1)
  cfg.checkpoint.every = 7
  with pytest.raises(nonfinite.NonFiniteError) as err:
    trainer.train(cfg, str(tmp_path))
  msg = str(err.value)
  assert 'step 3: loss nan' in caplog.text and 'update skipped (1 in a row' in caplog.text
  assert '3 non-finite step(s) in a row (steps 8-10' in msg and 'max_bad_steps=3' in msg
  assert "non-finite gradients in ['" in msg and 'more' in msg
  assert 'are those after step 7' in msg and '\n' not in msg
  # The run stopped at step 12 (verdicts are read at every 4th step, those at least 2
  # steps old), saved there, and the saved params are those after step 7: steps 8-12
  # changed nothing (11 and 12 are finite, but come after the limit).
  assert (nonfinite.VERDICT_LAG, nonfinite.VERDICT_EVERY) == (2, 4)
  assert _committed(tmp_path) == [7, 12]
  mngr = ckpt.manager(str(tmp_path), 3)
  meta = mngr.item_metadata(12)['state']
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
  at7, _ = ckpt.restore(mngr, 7, abstract)
  at12, _ = ckpt.restore(mngr, 12, abstract)
  mngr.close()
  chex.assert_trees_all_equal(at12['params'], at7['params'])
  chex.assert_trees_all_equal(at12['opt_state'], at7['opt_state'])
  assert int(at12['bad_steps']) == 4 and int(at12['step']) == 12
  counts = {r['step']: r['bad_steps'] for r in _records(tmp_path) if 'bad_steps' in r}
  assert [counts[s] for s in (2, 3, 7, 10)] == [0, 1, 1, 4]

  # nan_policy=stop: the first bad step stops the run (step 3's verdict is read at step
  # 8, with those of 4-6); a rerun resumes past it.
  _poison(monkeypatch, steps=[3])
  cfg = _cfg(steps=10, nan_policy='stop')
  with pytest.raises(nonfinite.NonFiniteError, match=r'1 non-finite step\(s\) in a row \(steps 3-3'):
    trainer.train(cfg, str(tmp_path / 'stop'))
  assert _committed(tmp_path / 'stop')[-1] == 8
  _poison(monkeypatch, steps=[])
  final = trainer.train(cfg, str(tmp_path / 'stop'))
  assert final['step'] == 10 and np.isfinite(final['loss'])


# --- changed config on resume -----------------------------------------------------

def test_resuming_with_a_changed_config_is_refused_unless_allowed(reference, tmp_path, caplog):
  _, ref_dir, _ = reference
  workdir = tmp_path / 'w'
  shutil.copytree(ref_dir, workdir)
  cfg = _cfg(steps=20)
  cfg.optimizer.lr = 1e-3
  cfg.model.n_layers = 3
  with pytest.raises(ValueError, match=r'different config \(model.n_layers: 2 -> 3; '
                                       r'optimizer.lr: 0.003 -> 0.001\).*allow_config_change'):
    trainer.train(cfg, str(workdir))

  caplog.set_level(logging.WARNING, logger='scalejax')
  cfg = _cfg(steps=22)  # train.steps, logging, checkpointing and the mesh may change
  cfg.checkpoint.every = 11
  final = trainer.train(cfg, str(workdir))
  assert final['step'] == 22 and 'train.steps: 20 -> 22' in caplog.text
  assert 'recomputes the cosine lr schedule' in caplog.text

  cfg.optimizer.lr = 1e-3
  cfg.train.allow_config_change = True
  assert trainer.train(cfg, str(workdir))['step'] == 22  # resumes (at the end: no steps)
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['optimizer']['lr'] == 1e-3
  assert json.loads((workdir / 'config.before_step22.json').read_text())['optimizer']['lr'] == 3e-3

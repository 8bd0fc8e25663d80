"""Optimizers and schedules by name, Muon's partition, the scale LR knob, resume errors."""

import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scalejax.train import optim, trainer
from scalejax.core import roles
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model, cross_entropy
from _util import tiny_config

ROOT = Path(__file__).parents[1]

SMALL = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                    variant='unified')  # every kind of scale: HG, DNP, magdir
TRAIN = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)


def _cfg(**kw):
  c = optim.default_config()
  c.update({'warmup_steps': 2, **kw})
  return c


def _setup(model_cfg=SMALL):
  model = build_model(model_cfg, 0)
  graphdef, _ = nnx.split(model)
  return graphdef, roles.params_of(model), roles.role_tree(model), roles.axes_tree(model)


def _train(c, steps=12):
  """Losses of `steps` updates on one fixed batch (memorising it must lower the loss)."""
  graphdef, params, role_t, axes_t = _setup(TRAIN)
  tx, _, _ = optim.build_optimizer(c, role_t, axes_t, steps)
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, SMALL.vocab_size)

  @jax.jit
  def step(params, opt_state):
    loss, g = jax.value_and_grad(
        lambda p: cross_entropy(nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:]))(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return losses


# Per-optimizer LR of the usual order of magnitude for each (Lion's sign update and
# SGD's raw gradient need very different step sizes from Adam's).
LRS = {'adamw': 1e-2, 'lion': 3e-3, 'sgd': 1.0, 'adafactor': 1e-2, 'muon': 1e-2}


def test_registries_cover_the_documented_optimizers_and_schedules():
  assert set(optim.OPTIMIZERS) == {'adamw', 'lion', 'sgd', 'adafactor', 'muon'}
  assert set(optim.SCHEDULES) == {'cosine', 'wsd', 'linear', 'constant', 'rsqrt'}
  assert set(LRS) == set(optim.OPTIMIZERS)


@pytest.mark.parametrize('name', sorted(optim.OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(name):
  losses = _train(_cfg(name=name, lr=LRS[name]))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.3, losses  # log(32) = 3.47 at init


@pytest.mark.parametrize('schedule', sorted(optim.SCHEDULES))
def test_every_schedule_lowers_the_loss(schedule):
  losses = _train(_cfg(schedule=schedule, lr=1e-2))
  assert losses[-1] < losses[0] - 0.3, losses


def _lrs(total=100, **kw):
  s = optim.make_schedule(_cfg(**{'lr': 1.0, 'min_lr_ratio': 0.1, 'warmup_steps': 10, **kw}),
                          total)
  return np.array([float(s(i)) for i in range(total + 1)])


def test_schedule_shapes():
  # Warmup 10 steps from 0, then 90 post-warmup steps.
  for name in optim.SCHEDULES:
    lr = _lrs(schedule=name)
    np.testing.assert_allclose(lr[:11], np.arange(11) / 10, atol=1e-6, err_msg=name)
  cos = _lrs(schedule='cosine')
  np.testing.assert_allclose(cos[[10, 55, 100]], [1.0, 0.55, 0.1], atol=1e-6)
  assert (np.diff(cos[10:]) <= 1e-7).all()
  lin = _lrs(schedule='linear')
  np.testing.assert_allclose(lin[[10, 55, 100]], [1.0, 0.55, 0.1], atol=1e-6)
  np.testing.assert_allclose(_lrs(schedule='constant')[10:], 1.0)
  rs = _lrs(schedule='rsqrt')
  np.testing.assert_allclose(rs[[10, 40]], [1.0, 0.5], atol=1e-6)  # lr / sqrt(1 + 30/10)
  # WSD: the last 20% of all 100 steps decay linearly to 0.1; before that, the peak.
  wsd = _lrs(schedule='wsd', decay_fraction=0.2)
  np.testing.assert_allclose(wsd[10:81], 1.0, atol=1e-6)
  np.testing.assert_allclose(wsd[[90, 100]], [0.55, 0.1], atol=1e-6)
  wsd5 = _lrs(schedule='wsd', decay_fraction=0.5)
  np.testing.assert_allclose(wsd5[[50, 75, 100]], [1.0, 0.55, 0.1], atol=1e-6)


def test_decay_budget_is_the_product_of_the_scheduled_shrink_factors():
  # Constant LR, no warmup: (1 - lr * wd) ** steps exactly.
  const = _cfg(schedule='constant', warmup_steps=0, lr=2e-3)
  np.testing.assert_allclose(optim.decay_budget(const, 500, 0.3), (1 - 2e-3 * 0.3) ** 500,
                             rtol=1e-6)
  assert optim.decay_budget(const, 500, 0.0) == 1.0
  # Warmup then cosine to 0.1 x, written out from the formula, step by step.
  cos = _cfg(schedule='cosine', warmup_steps=100, lr=1e-3)
  lrs = [1e-3 * t / 100 if t < 100 else
         1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (t - 100) / 1900))) for t in range(2000)]
  np.testing.assert_allclose(optim.decay_budget(cos, 2000, 1.0), np.prod(1 - np.array(lrs)),
                             rtol=1e-5)
  # The LRs sum to 1e-3 * (50 + 1900 * 0.55) = 1.095, so the budget is ~exp(-1.095 wd).
  np.testing.assert_allclose(optim.decay_budget(cos, 2000, 0.1), np.exp(-0.1095), rtol=1e-3)
  np.testing.assert_allclose(optim.decay_budget(cos, 2000, 1.0), np.exp(-1.095), rtol=0.02)


def test_unknown_names_are_clear_errors():
  _, _, role_t, axes_t = _setup()
  with pytest.raises(ValueError, match="unknown optimizer.name 'adam'; valid: adamw"):
    optim.build_optimizer(_cfg(name='adam'), role_t, axes_t, 10)
  with pytest.raises(ValueError, match="unknown optimizer.schedule 'cos'; valid: cosine"):
    optim.build_optimizer(_cfg(schedule='cos'), role_t, axes_t, 10)


def _flat(tree):
  is_axes = lambda x: isinstance(x, tuple)  # an axes tuple is one leaf
  return {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_axes)}


def test_muon_partition_by_role():
  cfg = ModelConfig(**{**SMALL.__dict__, 'tie_embeddings': False})  # a separate LM head
  _, params, role_t, axes_t = _setup(cfg)
  labels, r, ax = _flat(optim.muon_labels(role_t, axes_t)), _flat(role_t), _flat(axes_t)
  scales = [k for k in r if r[k] in roles.SCALE_ROLES]
  assert len(scales) > 10  # HG + DNP + magdir: many scale params, input and output roles
  assert {r[k] for k in scales} == set(roles.SCALE_ROLES)
  assert all(labels[k] == 'adam' for k in scales)
  assert labels["['embed']['table']"] == 'adam'
  assert labels["['head']['kernel']"] == 'adam'  # vocab axis: the LM head stays on Adam
  muon = sorted(k for k, v in labels.items() if v == 'muon')
  assert muon == sorted(k for k in r if r[k] == roles.MATRIX and 'vocab' not in ax[k])
  assert len(muon) == 7  # q k v o gate up down, stacked over layers


def test_muon_branches_behave_as_muon_and_adam():
  """One step: scale vectors move exactly as AdamW moves them; a hidden matrix gets an
  orthogonalised update (all singular values alike), which Adam's update is not."""
  _, params, role_t, axes_t = _setup()
  grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape),
                       params, _keys_like(params))
  def one_step(name):
    tx, _, _ = optim.build_optimizer(_cfg(name=name, warmup_steps=0, weight_decay=0.0,
                                          grad_clip=0.0, lr=1.0), role_t, axes_t, 10)
    return _flat(tx.update(grads, tx.init(params), params)[0])
  muon, adam, r = one_step('muon'), one_step('adamw'), _flat(role_t)
  for k in r:
    if r[k] in roles.SCALE_ROLES:
      chex.assert_trees_all_close(muon[k], adam[k], rtol=1e-6)
  key = "['blocks']['mlp']['gate']['kernel']"
  s_muon = np.linalg.svd(np.asarray(muon[key][0]), compute_uv=False)
  s_adam = np.linalg.svd(np.asarray(adam[key][0]), compute_uv=False)
  assert s_muon.min() / s_muon.max() > 0.5  # Newton-Schulz: near-orthogonal
  assert s_adam.min() / s_adam.max() < 0.4  # sign-like: a random matrix spectrum


def _keys_like(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(0), len(leaves))))


def test_scale_lr_mult_scales_only_scale_vectors():
  _, params, role_t, axes_t = _setup()
  grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), params, _keys_like(params))
  def one_step(mult):
    tx, _, _ = optim.build_optimizer(_cfg(scale_lr_mult=mult, warmup_steps=0), role_t,
                                     axes_t, 10)
    return _flat(tx.update(grads, tx.init(params), params)[0])
  base, boosted, r = one_step(1.0), one_step(3.0), _flat(role_t)
  for k in r:
    want = 3.0 * base[k] if r[k] in roles.SCALE_ROLES else base[k]
    chex.assert_trees_all_close(boosted[k], want, rtol=1e-6)


def test_scale_lr_is_logged_and_optimizer_switch_on_resume_is_an_error(tmp_path):
  cfg = tiny_config()
  cfg.train.update(steps=4, eval_every=0, log_every=2)
  cfg.optimizer.scale_lr_mult = 2.0
  trainer.train(cfg, str(tmp_path), stop_at=2)
  import json
  recs = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert recs[0]['scale_lr'] == pytest.approx(2.0 * recs[0]['lr'])
  cfg.optimizer.name = 'lion'
  with pytest.raises(ValueError, match=r"optimizer.name: 'adamw' -> 'lion'"):
    trainer.train(cfg, str(tmp_path))  # the workdir's config check comes first
  cfg.train.allow_config_change = True  # even when config changes are allowed:
  with pytest.raises(ValueError, match=r"optimizer state of a different structure than "
                     r"optimizer.name='lion'.*--config.init_from"):
    trainer.train(cfg, str(tmp_path))
  assert (tmp_path / 'checkpoints' / '2').exists()  # a mismatch is no damage: kept
  cfg.optimizer.name = 'adamw'  # the optimizer it was saved with resumes
  assert trainer.train(cfg, str(tmp_path))['step'] == 4

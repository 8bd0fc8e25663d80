"""MoE MLP: routing against a per-token reference, capacity dropping, aux losses, roles."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scalejax import moe, roles, trainer
from scalejax.counting import param_counts
from scalejax.model import ModelConfig, build_model
from scalejax.optim import build_optimizer, default_config

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mlp='moe',
                  moe_experts=4, moe_top_k=2, moe_expert_ff=24)


def _layer(cfg, seed=0):
  layer = moe.MoE(cfg, rngs=nnx.Rngs(params=seed))
  # A larger router init spreads the probabilities, so top-k has no near-ties.
  layer.router.kernel[...] = jax.random.normal(jax.random.key(seed + 7), layer.router.kernel.shape)
  return layer


def _expert(layer, e):
  graphdef, state = nnx.split(layer.experts)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[e], state))


def _routing(layer, x_TxD, k):
  probs = jax.nn.softmax(x_TxD.astype(jnp.float32) @ layer.router.kernel[...], axis=-1)
  w, idx = jax.lax.top_k(probs, k)
  return np.asarray(probs), np.asarray(w / w.sum(-1, keepdims=True)), np.asarray(idx)


def test_without_drops_output_is_the_weighted_sum_of_chosen_experts():
  cfg = dataclasses.replace(CFG, moe_capacity_factor=CFG.moe_experts / CFG.moe_top_k,
                            moe_shared_ff=16)
  layer = _layer(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
  y, aux = layer(x, x, x)

  x_TxD = x.reshape(-1, cfg.d_model)
  _, w, idx = _routing(layer, x_TxD, cfg.moe_top_k)
  outs = [_expert(layer, e)(x_TxD, x_TxD) for e in range(cfg.moe_experts)]
  want = np.stack([sum(w[t, j] * outs[idx[t, j]][t] for j in range(cfg.moe_top_k))
                   for t in range(x_TxD.shape[0])])
  want = want + layer.shared(x_TxD, x_TxD)
  chex.assert_trees_all_close(y.reshape(-1, cfg.d_model), want, rtol=1e-5, atol=1e-6)
  assert float(aux['moe_drop_frac']) == 0.0


def test_capacity_keeps_first_choices_before_second_choices_in_token_order():
  cfg = dataclasses.replace(CFG, moe_capacity_factor=0.5)   # capacity ceil(0.5*8*2/4) = 2
  layer = _layer(cfg, seed=3)
  s, n, k = 8, cfg.moe_experts, cfg.moe_top_k
  assert layer.capacity(s) == 2
  x = jax.random.normal(jax.random.key(2), (1, s, cfg.d_model))
  _, combine, aux = layer.route(x)
  _, w, idx = _routing(layer, x[0], k)

  want = np.zeros((s, n, layer.capacity(s)))
  fill = [0] * n
  for j in range(k):               # all first choices, then all second choices
    for t in range(s):
      e = idx[t, j]
      if fill[e] < layer.capacity(s):
        want[t, e, fill[e]] = w[t, j]
        fill[e] += 1
  chex.assert_trees_all_close(combine[0], want, rtol=1e-6, atol=1e-7)
  kept = np.count_nonzero(want)
  assert kept < s * k  # this routing does drop something
  chex.assert_trees_all_close(aux['moe_drop_frac'], 1 - kept / (s * k), rtol=1e-6)

  # A token whose every choice was dropped gets no routed output (no shared expert here).
  y, _ = layer(x, x, x)
  dropped = [t for t in range(s) if not want[t].any()]
  for t in dropped:
    chex.assert_trees_all_close(y[0, t], np.zeros(cfg.d_model))


def test_aux_losses_follow_their_formulas():
  layer = _layer(CFG, seed=5)
  x = jax.random.normal(jax.random.key(4), (3, 8, CFG.d_model))
  _, _, aux = layer.route(x)
  probs, _, idx = _routing(layer, x.reshape(-1, CFG.d_model), CFG.moe_top_k)
  n, k = CFG.moe_experts, CFG.moe_top_k
  share = np.bincount(idx.ravel(), minlength=n) / idx.size
  chex.assert_trees_all_close(aux['moe_lb_loss'], n * np.sum(share * probs.mean(0)), rtol=1e-5)
  logits = x.reshape(-1, CFG.d_model) @ layer.router.kernel[...]
  lse = jax.nn.logsumexp(logits, axis=-1)
  chex.assert_trees_all_close(aux['moe_z_loss'], jnp.mean(lse**2), rtol=1e-5)

  layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])  # uniform router
  _, _, aux = layer.route(x)
  chex.assert_trees_all_close(aux['moe_lb_loss'], 1.0, rtol=1e-6)
  chex.assert_trees_all_close(aux['moe_z_loss'], math.log(n) ** 2, rtol=1e-6)


def test_weighted_aux_losses_are_added_to_the_training_loss():
  cfg = dataclasses.replace(CFG, moe_lb_weight=0.3, moe_z_weight=0.02)
  model = build_model(cfg)
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  total, metrics = trainer.loss_fn(graphdef, nnx.to_pure_dict(state),
                                   {'inputs': tokens, 'targets': tokens})
  want = metrics['loss'] + 0.3 * metrics['moe_lb_loss'] + 0.02 * metrics['moe_z_loss']
  chex.assert_trees_all_close(total, want, rtol=1e-6)
  assert float(metrics['moe_lb_loss']) > 0.5 and float(metrics['moe_z_loss']) > 0.0


def _leaves(model):
  flat = jax.tree_util.tree_leaves_with_path(roles.params_of(model))
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  ax = jax.tree.leaves(roles.axes_tree(model), is_leaf=lambda x: isinstance(x, tuple))
  return dict(zip(names, zip(jax.tree.leaves(roles.role_tree(model)), ax)))


def test_unified_moe_roles_axes_and_weight_decay():
  cfg = dataclasses.replace(CFG, variant='unified', moe_shared_ff=16)
  model = build_model(cfg)
  got = _leaves(model)
  assert got['blocks/mlp/experts/gate/kernel'] == ('matrix', ('layers', 'expert', 'embed', 'mlp'))
  assert got['blocks/mlp/experts/down/kernel'] == ('matrix', ('layers', 'expert', 'mlp', 'embed'))
  assert got['blocks/mlp/router/kernel'] == ('matrix', ('layers', 'embed', None))
  # DNP wraps each expert's gate/up: an output-role scale per expert.
  assert got['blocks/mlp/experts/up/post/scale/alpha'] == ('output_scale',
                                                           ('layers', 'expert', 'norm'))
  assert got['blocks/mlp/shared/gate/post/scale/alpha'] == ('output_scale', ('layers', 'norm'))
  # HG: gate, up and the router each read their own input-role scale of the pre-MLP norm.
  for branch in ('gate', 'up', 'router'):
    assert got[f'blocks/mlp_norm/{branch}/alpha'] == ('input_scale', ('layers', 'norm'))

  # IWD (the unified default): decay matrices and input scales, never output scales.
  params = roles.params_of(model)
  opt = default_config()
  opt.update(weight_decay=0.1, grad_clip=0.0, lr=1.0, warmup_steps=0, schedule='constant')
  tx, _, rates = build_optimizer(opt, roles.role_tree(model), roles.axes_tree(model), 10,
                                 cfg.variant_.norm_decay)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  decayed = {name: bool(jnp.any(u != 0)) for name, u in zip(
      got, jax.tree.leaves(updates))}
  for name, (role, _) in got.items():
    assert decayed[name] == (rates[role] > 0), name
  assert decayed['blocks/mlp/experts/gate/kernel'] and decayed['blocks/mlp_norm/router/alpha']
  assert not decayed['blocks/mlp/experts/up/post/scale/alpha']


def test_muon_orthogonalizes_each_expert_kernel_on_its_own():
  model = build_model(CFG)
  params = roles.params_of(model)
  opt = default_config()
  opt.update(name='muon', weight_decay=0.1, grad_clip=0.0, lr=1.0, warmup_steps=0,
             schedule='constant')
  tx, _, _ = build_optimizer(opt, roles.role_tree(model), roles.axes_tree(model), 10)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)

  g = grads['blocks']['mlp']['experts']['gate']['kernel']          # [L, E, D, F]
  u = updates['blocks']['mlp']['experts']['gate']['kernel']
  single = optax.contrib.scale_by_muon(beta=opt.muon_beta)
  one, _ = single.update(g[1, 2], single.init(g[1, 2]))
  p = params['blocks']['mlp']['experts']['gate']['kernel'][1, 2]
  want = -(0.2 * max(g.shape[-2:]) ** 0.5 * one + 0.1 * p)  # Adam-RMS match, decay, lr 1
  chex.assert_trees_all_close(u[1, 2], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('variant,shared', [('baseline', 0), ('hg', 16), ('dp', 0),
                                            ('unified', 16)])
def test_param_counts_and_active_params_match_the_built_model(variant, shared):
  cfg = dataclasses.replace(CFG, variant=variant, moe_shared_ff=shared)
  model = nnx.eval_shape(lambda: build_model(cfg))
  got = _leaves(model)
  sizes = dict(zip(got, (p.size for p in jax.tree.leaves(roles.params_of(model)))))
  counts = param_counts(cfg)
  assert counts['total'] == sum(sizes.values())
  assert counts['scale'] == sum(s for n, s in sizes.items() if got[n][0] in roles.SCALE_ROLES)
  experts = sum(s for n, s in sizes.items() if '/experts/' in n)
  unused = cfg.moe_experts - cfg.moe_top_k
  assert counts['active'] == counts['total'] - experts * unused // cfg.moe_experts


def test_moe_config_errors_name_the_key():
  with pytest.raises(ValueError, match='model.moe_top_k=5 must be between 1 and model.moe_experts=4'):
    dataclasses.replace(CFG, moe_top_k=5)
  layer = _layer(dataclasses.replace(CFG, moe_group_size=5))
  with pytest.raises(ValueError, match='model.moe_group_size=5 must divide the 16 tokens'):
    x = jnp.zeros((2, 8, CFG.d_model))
    layer(x, x, x)


def test_moe_model_trains_and_logs_router_statistics(tmp_path):
  cfg = tiny.get_config()
  cfg.model.update(mlp='moe', moe_experts=4, moe_top_k=2, moe_expert_ff=32, variant='unified')
  cfg.train.update(steps=6, eval_every=0, log_every=3)
  final = trainer.train(cfg, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'moe_lb_loss' in r]
  assert [r['step'] for r in train] == [3, 6]
  for r in train:
    assert np.isfinite(r['loss']) and r['moe_lb_loss'] > 0
    assert r['moe_z_loss'] > 0 and 0.0 <= r['moe_drop_frac'] < 1.0
  assert np.isfinite(final['eval_loss'])

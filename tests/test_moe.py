"""MoE MLP: routing against a per-token reference, capacity dropping, aux losses, roles."""

import dataclasses
import functools
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

from scalejax.model import moe
from scalejax.core import roles
from scalejax.train import trainer
from scalejax.model.counting import param_counts
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.train.config import validate
from scalejax.train.optim import build_optimizer, default_config
from _util import tiny_config

ROOT = Path(__file__).parents[1]

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mlp='moe',
                  moe_experts=4, moe_top_k=2, moe_expert_ff=24, moe_shared_ff=16)
UNIFIED = dataclasses.replace(CFG, variant='unified')

# Modules are built once per config and run under jit: NNX code run op by op is slow
# on CPU, and building an MoE model compiles its init.


@functools.cache
def _layer():
  @nnx.jit
  def make():
    layer = moe.MoE(CFG, rngs=nnx.Rngs(params=0))
    # A larger router init spreads the probabilities, so top-k has no near-ties.
    layer.router.kernel[...] = jax.random.normal(jax.random.key(7), layer.router.kernel.shape)
    return layer
  return make()


def _with_capacity(factor):
  layer = nnx.clone(_layer())
  layer.capacity_factor = factor
  return layer


@functools.cache
def _model(cfg):
  return nnx.jit(build_model, static_argnums=0)(cfg)


_call = nnx.jit(lambda layer, x: layer(x, x, x))
_route = nnx.jit(lambda layer, x: layer.route(x))
_shared = nnx.jit(lambda layer, x: layer.shared(x, x))


@nnx.jit
def _expert_outputs(layer, x_TxD):
  graphdef, state = nnx.split(layer.experts)
  return jnp.stack([nnx.merge(graphdef, jax.tree.map(lambda a: a[e], state))(x_TxD, x_TxD)
                    for e in range(layer.n_experts)])


def _routing(layer, x_TxD, k):
  probs = jax.nn.softmax(x_TxD.astype(jnp.float32) @ layer.router.kernel[...], axis=-1)
  w, idx = jax.lax.top_k(probs, k)
  return np.asarray(probs), np.asarray(w / w.sum(-1, keepdims=True)), np.asarray(idx)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_without_drops_output_is_the_weighted_sum_of_chosen_experts():
  layer = _with_capacity(CFG.moe_experts / CFG.moe_top_k)   # capacity = group size
  x = _normal(1, (2, 8, CFG.d_model))
  y, aux = _call(layer, x)

  x_TxD = x.reshape(-1, CFG.d_model)
  _, w, idx = _routing(layer, x_TxD, CFG.moe_top_k)
  outs = np.asarray(_expert_outputs(layer, x_TxD))
  want = np.stack([sum(w[t, j] * outs[idx[t, j]][t] for j in range(CFG.moe_top_k))
                   for t in range(x_TxD.shape[0])])
  want = want + _shared(layer, x_TxD)
  chex.assert_trees_all_close(y.reshape(-1, CFG.d_model), want, rtol=1e-5, atol=1e-6)
  assert float(aux['moe_drop_frac']) == 0.0


def test_capacity_keeps_first_choices_before_second_choices_in_token_order():
  layer = _with_capacity(0.5)   # capacity ceil(0.5 * 8 * 2 / 4) = 2 slots per expert
  s, n, k = 8, CFG.moe_experts, CFG.moe_top_k
  assert layer.capacity(s) == 2
  x = _normal(2, (1, s, CFG.d_model))
  _, combine, aux = _route(layer, x)
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

  # A token whose every choice was dropped gets only the shared expert's output.
  y, _ = _call(layer, x)
  routed = y[0] - _shared(layer, x[0])
  dropped = [t for t in range(s) if not want[t].any()]
  assert dropped
  for t in dropped:
    chex.assert_trees_all_close(routed[t], np.zeros(CFG.d_model), atol=1e-7)


def test_aux_losses_follow_their_formulas():
  layer = _with_capacity(CFG.moe_capacity_factor)
  x = _normal(4, (3, 8, CFG.d_model))
  _, _, aux = _route(layer, x)
  probs, _, idx = _routing(layer, x.reshape(-1, CFG.d_model), CFG.moe_top_k)
  n = CFG.moe_experts
  share = np.bincount(idx.ravel(), minlength=n) / idx.size
  chex.assert_trees_all_close(aux['moe_lb_loss'], n * np.sum(share * probs.mean(0)), rtol=1e-5)
  logits = x.reshape(-1, CFG.d_model) @ layer.router.kernel[...]
  lse = jax.nn.logsumexp(logits, axis=-1)
  chex.assert_trees_all_close(aux['moe_z_loss'], jnp.mean(lse**2), rtol=1e-5)

  layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])  # uniform router
  _, _, aux = _route(layer, x)
  chex.assert_trees_all_close(aux['moe_lb_loss'], 1.0, rtol=1e-6)
  chex.assert_trees_all_close(aux['moe_z_loss'], math.log(n) ** 2, rtol=1e-6)


def test_weighted_aux_losses_are_added_to_the_training_loss():
  cfg = dataclasses.replace(UNIFIED, moe_lb_weight=0.3, moe_z_weight=0.02)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg)))  # weights live in cfg
  params = roles.params_of(_model(UNIFIED))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
  total, metrics = jax.jit(trainer.loss_fn, static_argnums=0)(
      graphdef, params, {'inputs': tokens, 'targets': tokens})
  want = metrics['loss'] + 0.3 * metrics['moe_lb_loss'] + 0.02 * metrics['moe_z_loss']
  chex.assert_trees_all_close(total, want, rtol=1e-6)
  assert float(metrics['moe_lb_loss']) > 0.5 and float(metrics['moe_z_loss']) > 0.0


def _leaves(model):
  flat = jax.tree_util.tree_leaves_with_path(roles.params_of(model))
  names = ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  ax = jax.tree.leaves(roles.axes_tree(model), is_leaf=lambda x: isinstance(x, tuple))
  return dict(zip(names, zip(jax.tree.leaves(roles.role_tree(model)), ax)))


def test_unified_moe_roles_axes_and_weight_decay():
  cfg = UNIFIED
  model = _model(cfg)
  got = _leaves(model)
  assert got['blocks/mlp/experts/gate/kernel'] == ('matrix', ('layers', 'expert', 'embed', 'mlp'))
  assert got['blocks/mlp/experts/down/kernel'] == ('matrix', ('layers', 'expert', 'mlp', 'embed'))
  assert got['blocks/mlp/router/kernel'] == ('matrix', ('layers', 'embed', None))
  # DNP wraps each expert's gate/up: a scale per expert, output-role on gate (SiLU
  # follows), input-role on up (it folds into that expert's W_down rows).
  assert got['blocks/mlp/experts/up/post/scale/alpha'] == ('input_scale',
                                                           ('layers', 'expert', 'norm'))
  assert got['blocks/mlp/experts/gate/post/scale/alpha'] == ('output_scale',
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
                                 cfg.variant_spec.norm_decay)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  decayed = {name: bool(jnp.any(u != 0)) for name, u in zip(
      got, jax.tree.leaves(updates))}
  for name, (role, _) in got.items():
    assert decayed[name] == (rates[role] > 0), name
  assert decayed['blocks/mlp/experts/gate/kernel'] and decayed['blocks/mlp_norm/router/alpha']
  assert decayed['blocks/mlp/experts/up/post/scale/alpha']  # input role: folds into W_down
  assert not decayed['blocks/mlp/experts/gate/post/scale/alpha']


def test_muon_orthogonalizes_each_expert_kernel_on_its_own():
  model = _model(UNIFIED)
  params = roles.params_of(model)
  opt = default_config()
  opt.update(name='muon', weight_decay=0.1, grad_clip=0.0, lr=1.0, warmup_steps=0,
             schedule='constant')
  tx, _, _ = build_optimizer(opt, roles.role_tree(model), roles.axes_tree(model), 10)
  grads = jax.tree.map(lambda p: _normal(p.size, p.shape), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

  g = grads['blocks']['mlp']['experts']['gate']['kernel']          # [L, E, D, F]
  u = updates['blocks']['mlp']['experts']['gate']['kernel']
  single = optax.contrib.scale_by_muon(beta=opt.muon_beta)
  one, _ = jax.jit(single.update)(g[1, 2], single.init(g[1, 2]))
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


@functools.cache
def _perturbed_layer(variant):
  """A layer of `variant` whose expert params (scales included) differ per expert."""
  cfg = dataclasses.replace(CFG, variant=variant, moe_capacity_factor=2.0)  # drops nothing

  @nnx.jit
  def make():
    layer = moe.MoE(cfg, rngs=nnx.Rngs(params=0))
    layer.router.kernel[...] = jax.random.normal(jax.random.key(7), layer.router.kernel.shape)
    state = nnx.state(layer.experts, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(layer.experts, jax.tree.unflatten(tree, [
        p + 0.1 * jax.random.normal(key, p.shape) for key, p in zip(keys, leaves)]))
    return layer
  return make()


def _sum_of_squares(layer, xg, xu, xr):
  y, aux = layer(xg, xu, xr)
  return jnp.sum(y ** 2) + aux['moe_lb_loss'] + aux['moe_z_loss']


_value_and_grad = nnx.jit(nnx.value_and_grad(_sum_of_squares, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize('variant', ['baseline', 'dp', 'unified'])
def test_grouped_dispatch_equals_the_capacity_dispatch_when_nothing_drops(variant):
  # DP and DNP (unified) give each expert's gate/up rows that expert's own output scale
  # or norm params; HG (unified) gives gate, up and router different inputs.
  layer = nnx.clone(_perturbed_layer(variant))
  x = _normal(4, (2, 8, CFG.d_model))
  args = (x, 1.1 * x, 0.9 * x)
  want = _value_and_grad(layer, *args)
  _, aux = _call(layer, x)
  assert float(aux['moe_drop_frac']) == 0.0  # the reference drops nothing
  layer.dispatch = 'grouped'
  got = _value_and_grad(layer, *args)
  (loss, grads), (want_loss, want_grads) = got, want
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6 * scale)
  y, aux = _call(layer, x)
  assert float(aux['moe_drop_frac']) == 0.0


def test_grouped_dispatch_drops_nothing_where_capacity_drops():
  layer = nnx.clone(_perturbed_layer('baseline'))
  layer.capacity_factor = 0.5
  x = _normal(5, (2, 8, CFG.d_model))
  _, aux = _call(layer, x)
  assert float(aux['moe_drop_frac']) > 0.2
  layer.dispatch = 'grouped'
  y, aux = _call(layer, x)
  x_TxD = x.reshape(-1, CFG.d_model)
  _, w, idx = _routing(layer, x_TxD, CFG.moe_top_k)
  outs = np.asarray(_expert_outputs(layer, x_TxD))
  want = np.stack([sum(w[t, j] * outs[idx[t, j]][t] for j in range(CFG.moe_top_k))
                   for t in range(x_TxD.shape[0])]) + _shared(layer, x_TxD)
  chex.assert_trees_all_close(y.reshape(-1, CFG.d_model), want, rtol=1e-5, atol=1e-6)
  assert float(aux['moe_drop_frac']) == 0.0


@pytest.mark.parametrize('sizes', [(5, 0, 8, 3), (16, 0, 0, 0), (2, 6, 4, 4)])
def test_megablox_kernel_equals_ragged_dot_with_uneven_and_empty_groups(sizes):
  # TPU's kernel, run by the Pallas interpreter: forward and both gradients
  rows, d, f = sum(sizes), 32, 48
  x = _normal(6, (rows, d))
  w = _normal(7, (len(sizes), d, f))
  sizes = jnp.asarray(sizes, jnp.int32)
  out_ct = _normal(8, (rows, f))

  def run(kernel):
    fn = lambda x, w: moe.grouped_matmul(x, w, sizes, kernel, interpret=True)
    y, vjp = jax.vjp(fn, x, w)
    return y, vjp(out_ct)
  got, want = run('megablox'), run('ragged_dot')
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # and ragged_dot is the per-group product
  ends = np.cumsum(np.asarray(sizes))
  for e, (lo, hi) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
    chex.assert_trees_all_close(want[0][lo:hi], x[lo:hi] @ w[e], rtol=1e-5, atol=1e-5)


def test_megablox_tiles_divide_the_rows_fit_vmem_and_refuse_odd_row_counts():
  # The paper MoE's shapes per v5p device (262,144 rows): the tilings the AOT compile
  # measured best among those that fit (docs/PERFORMANCE.md)
  assert moe.megablox_tiles(262_144, 640, 1024) == (1024, 640, 1024)
  assert moe.megablox_tiles(262_144, 1536, 1280) == (1024, 512, 1280)
  for rows, k, n in [(262_144, 1280, 1536), (96, 32, 48), (24, 2048, 4096)]:
    tm, tk, tn = moe.megablox_tiles(rows, k, n)
    assert rows % tm == 0 and tk <= k and tn <= n
    assert 2 * (tm * tk + tk * tn) * 2 + tm * tn * 6 <= moe.VMEM_BUDGET
  with pytest.raises(ValueError, match=r'rows per device \(30\) to be a multiple of 8'):
    moe.megablox_tiles(30, 32, 48)


def test_moe_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r'model.moe_dispatch must be one of \(\'capacity\', \'grouped\'\)'):
    dataclasses.replace(CFG, moe_dispatch='dropless')
  cfg = tiny_config()
  cfg.model.update(mlp='moe', moe_experts=4, moe_dispatch='grouped')
  cfg.mesh.update(data=1, expert=2)
  with pytest.raises(ValueError, match='model.moe_dispatch=grouped runs every expert on every '
                                       'device and mesh.expert=2 shards the experts'):
    validate(cfg, n_devices=2)
  with pytest.raises(ValueError, match=r'model.moe_top_k=5 must lie in \[1, model.moe_experts=4\]'):
    dataclasses.replace(CFG, moe_top_k=5)
  layer = nnx.clone(_layer())
  layer.group_size = 5
  with pytest.raises(ValueError, match='model.moe_group_size=5 must divide the 16 tokens'):
    _call(layer, jnp.zeros((2, 8, CFG.d_model)))


@pytest.mark.parametrize('dispatch', ['capacity', 'grouped'])
def test_moe_model_trains_and_logs_router_statistics(tmp_path, dispatch):
  cfg = tiny_config()
  cfg.model.update(mlp='moe', moe_experts=4, moe_top_k=2, moe_expert_ff=32, variant='hg',
                   moe_dispatch=dispatch)
  cfg.train.update(steps=6, eval_every=0, log_every=3)
  cfg.data.eval_batches = 0  # saves a compile; the eval step only reads loss_fn's 'loss'
  trainer.train(cfg, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'moe_lb_loss' in r]
  assert [r['step'] for r in train] == [3, 6]
  for r in train:
    assert np.isfinite(r['loss']) and r['moe_lb_loss'] > 0
    assert r['moe_z_loss'] > 0 and 0.0 <= r['moe_drop_frac'] < 1.0
    assert dispatch == 'capacity' or r['moe_drop_frac'] == 0.0

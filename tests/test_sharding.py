"""Sharded training on 8 emulated CPU devices equals one device; params follow the rules.

The device count is fixed when JAX starts, so the sharded runs happen in one
subprocess (this file run as a script, XLA_FLAGS set first) that writes losses,
gradients, updated params and layouts to an .npz; the tests compare them here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from _util import child_xla_flags

ROOT = Path(__file__).parents[1]
# Halves XLA:CPU compile time (LLVM does less); both sides of a comparison use it.

# name -> (model, mesh, also run the optimizer step); d_ff, heads, vocab and experts
# divide every mesh axis. The unified variant has every kind of scale param.
DENSE = dict(d_model=32, n_heads=4, d_ff=64, variant='unified')
MOE = dict(DENSE, mlp='moe', moe_experts=4, moe_top_k=2, moe_expert_ff=32, moe_shared_ff=16)
# The splash kernel (Pallas interpreter on CPU) runs per device in a shard_map: batch
# over data, query and kv heads over tensor. Its tiles need 128 tokens.
SPLASH = dict(DENSE, n_kv_heads=2, attention_impl='splash', max_seq_len=128)
# Grouped (dropless) MoE dispatch per device in a shard_map, batch over data and fsdp.
GROUPED = dict(MOE, moe_dispatch='grouped')
CASES = {
    'data8': ('dense', dict(data=8, fsdp=1, tensor=1, expert=1), False),
    'fsdp4_tensor2': ('dense', dict(data=1, fsdp=4, tensor=2, expert=1), True),
    'moe_expert4': ('moe', dict(data=2, fsdp=1, tensor=1, expert=4), False),
    'splash_tensor2': ('splash', dict(data=4, fsdp=1, tensor=2, expert=1), False),
    'grouped_fsdp4': ('grouped', dict(data=2, fsdp=4, tensor=1, expert=1), True),
}
MODELS = {'dense': DENSE, 'moe': MOE, 'splash': SPLASH, 'grouped': GROUPED}
SEQ_LEN = {'splash': 128}  # others: configs/tiny.py's
# The single-device reference of the splash case runs XLA's attention: the kernel,
# sharded, must compute what XLA computes unsharded; that of the grouped case the
# capacity dispatch with room for every token (experts / top_k), which drops nothing.
REFERENCE = {'splash': dict(attention_impl='xla'),
             'grouped': dict(moe_dispatch='capacity', moe_capacity_factor=2.0)}
ONE = dict(data=1, fsdp=1, tensor=1, expert=1)
# params whose layout the tests check: path -> logical axes they carry
CHECKED = ('embed/table', 'head/kernel', 'blocks/attn/q/kernel', 'blocks/mlp/gate/kernel',
           'blocks/mlp/experts/up/kernel', 'blocks/mlp/router/kernel',
           'blocks/mlp_norm/gate/alpha')


def _worker(out_dir: str) -> None:
  import jax
  import jax.numpy as jnp
  from _util import tiny_config
  from scalejax.core import sharding
  from scalejax.train import trainer

  assert jax.device_count() == 8, jax.devices()
  arrays, layouts = {}, {}

  def flat(tree, prefix):
    for path, v in jax.tree_util.tree_leaves_with_path(tree):
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      yield f'{prefix}/{name}', name, v

  def one_step(name, model, mesh, devices, step, reference=False):
    cfg = tiny_config()
    cfg.model.update(**{**MODELS[model], **(REFERENCE.get(model, {}) if reference else {})})
    cfg.train.seq_len = SEQ_LEN.get(model, cfg.train.seq_len)
    cfg.mesh.update(**mesh)
    # SGD: Adam's first update is g / (|g| + eps), a sign that a rounding-level change
    # of a near-zero gradient can flip; SGD keeps the comparison linear in the grads.
    cfg.optimizer.update(name='sgd', warmup_steps=0)  # and the first step moves the params
    run, state = trainer.build_run(cfg, None, devices=devices)
    batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: trainer.loss_fn(run.graphdef, p, b), has_aux=True))
    with jax.set_mesh(run.mesh):
      (total, metrics), grads = grad_fn(state['params'], batch)
      for key, path, v in flat(state['params'], f'{name}/init'):
        arrays[key] = np.asarray(v)
        if path in CHECKED:
          layouts[f'{name}/{path}'] = dict(
              spec=[list(s) if isinstance(s, tuple) else s for s in v.sharding.spec],
              shard=list(v.addressable_shards[0].data.shape), shape=list(v.shape))
      if step:
        state, _ = trainer.make_train_step(run)(state, batch)
        for key, path, v in flat(state['params'], f'{name}/params'):
          arrays[key] = np.asarray(v)
    arrays[f'{name}/loss'] = np.asarray(total)
    arrays[f'{name}/ce'] = np.asarray(metrics['loss'])
    for key, path, v in flat(grads, f'{name}/grads'):
      arrays[key] = np.asarray(v)

  for model in MODELS:  # single-device references; the train step only where a case takes it
    stepped = any(step for m, _, step in CASES.values() if m == model)
    one_step(f'{model}/single', model, ONE, jax.devices()[:1], step=stepped, reference=True)
  for name, (model, mesh, step) in CASES.items():
    one_step(name, model, mesh, jax.devices(), step)
  np.savez(os.path.join(out_dir, 'results.npz'), **arrays)
  with open(os.path.join(out_dir, 'layouts.json'), 'w') as f:
    json.dump(layouts, f)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp('sharding')
  env = dict(os.environ, XLA_FLAGS=child_xla_flags(8),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = np.load(out / 'results.npz')
  return {k: data[k] for k in data.files}, json.loads((out / 'layouts.json').read_text())


def _tree(arrays, prefix):
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize('case', list(CASES))
def test_one_step_matches_a_single_device(results, case):
  arrays, _ = results
  ref = f'{CASES[case][0]}/single'
  init = _tree(arrays, f'{case}/init/')
  assert init  # the same seed gives the same params whatever the layout
  chex.assert_trees_all_equal(init, _tree(arrays, f'{ref}/init/'))
  # Float32 tolerances. A sharded run adds partial sums in another order, which moves
  # the last bits: relative error ~ a few ulps (eps 1.2e-7) of the terms summed. Terms
  # are bounded by the largest gradient, so an element that is a near-cancelling sum
  # (e.g. the gradient of a magnitude scalar beta at init, ~1e-7) gets an absolute
  # tolerance of 1e-6 x max|grad| (about 8 ulps of it); everything else rtol 1e-5.
  chex.assert_trees_all_close(arrays[f'{case}/loss'], arrays[f'{ref}/loss'], rtol=1e-6)
  chex.assert_trees_all_close(arrays[f'{case}/ce'], arrays[f'{ref}/ce'], rtol=1e-6)
  grads, want = _tree(arrays, f'{case}/grads/'), _tree(arrays, f'{ref}/grads/')
  assert set(grads) == set(want) and len(grads) > 20
  scale = max(float(np.abs(g).max()) for g in want.values())
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6 * scale)
  if CASES[case][2]:  # the jitted train step with sharded SGD state: the same params
    chex.assert_trees_all_close(_tree(arrays, f'{case}/params/'),
                                _tree(arrays, f'{ref}/params/'), rtol=1e-5, atol=1e-6 * scale)


# Expected PartitionSpecs from LOGICAL_RULES; None = replicated along that dim.
EXPECTED = {
    'data8': {name: None for name in CHECKED},
    'fsdp4_tensor2': {
        'embed/table': ['tensor', 'fsdp'],                 # (vocab, embed)
        'head/kernel': ['fsdp', 'tensor'],                 # (embed, vocab)
        'blocks/attn/q/kernel': [None, 'fsdp', 'tensor'],  # (layers, embed, heads)
        'blocks/mlp/gate/kernel': [None, 'fsdp', 'tensor'],
        'blocks/mlp_norm/gate/alpha': [],                  # scale vectors: replicated
    },
    'moe_expert4': {
        'embed/table': [None, 'expert'],                   # embed -> (fsdp, expert)
        'blocks/attn/q/kernel': [None, 'expert', None],
        # ('layers', 'expert', 'embed', 'mlp'): experts split, embed's expert axis taken
        'blocks/mlp/experts/up/kernel': [None, 'expert'],
        'blocks/mlp/router/kernel': [None, 'expert', None],
        'blocks/mlp_norm/gate/alpha': [],
    },
    'splash_tensor2': {
        'embed/table': ['tensor'],                         # (vocab, embed): no fsdp axis
        'head/kernel': [None, 'tensor'],
        'blocks/attn/q/kernel': [None, None, 'tensor'],    # query heads split in two
        'blocks/mlp/gate/kernel': [None, None, 'tensor'],
        'blocks/mlp_norm/gate/alpha': [],
    },
    'grouped_fsdp4': {
        'embed/table': [None, 'fsdp'],
        'head/kernel': ['fsdp'],
        'blocks/attn/q/kernel': [None, 'fsdp', None],
        'blocks/mlp/experts/up/kernel': [None, None, 'fsdp'],  # stored FSDP, run gathered
        'blocks/mlp/router/kernel': [None, 'fsdp', None],
        'blocks/mlp_norm/gate/alpha': [],
    },
}


@pytest.mark.parametrize('case', list(CASES))
def test_params_are_laid_out_as_the_rules_say(results, case):
  _, layouts = results
  mesh = CASES[case][1]
  seen = 0
  for path, want in EXPECTED[case].items():
    key = f'{case}/{path}'
    if key not in layouts:
      continue
    seen += 1
    got = layouts[key]
    spec = [s for s in got['spec']]
    want = [] if want is None else want
    assert spec[:len(want)] == want and not any(spec[len(want):]), (path, spec)
    # each device holds 1/size of every sharded dim
    for dim, axis in enumerate(want):
      size = mesh[axis] if axis else 1
      assert got['shard'][dim] * size == got['shape'][dim], (path, got)
  assert seen >= 4


if __name__ == '__main__':
  _worker(sys.argv[1])

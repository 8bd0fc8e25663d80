"""Every role label against the function it claims: an input scale folds into the
kernels it feeds with the logits unchanged, an output scale does not; a scale whose
magnitude the wiring calls function-neutral can be multiplied by a constant with the
logits unchanged, and no other can. Over every variant x placement x QK-norm x storage
x dense/MoE; the roles are read off the built model's param metadata."""

import dataclasses
import itertools
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.analysis import folding
from scalejax.cli import param_report
from scalejax.core import roles as R
from scalejax.model import wiring
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.scales import norms
from scalejax.scales.variants import VARIANTS
from scalejax.scales.weight_decay import decay_rates, decay_table
from scalejax.train.config import load_config

# A norm forgets a constant factor up to its eps: a tiny one makes that exact to rounding.
TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8,
            moe_experts=3, moe_top_k=2, moe_expert_ff=8, moe_capacity_factor=1.5,
            norm_eps=1e-12)
# Every variant x placement x QK-norm x storage x dense/MoE is 216 models, about 4
# minutes on two cores (--dist load): SCALEJAX_FULL_GRID=1 runs all of them. By default
# the valid (variant, placement) pairs take the rows of the orthogonal array over
# (QK-norm, storage, MoE) below in turn; with the extra cases after GRID every pair of
# values of any two factors appears (test_the_default_grid_covers_every_pair_...).
_BINARY = [(False, 'direct', 'dense'), (True, 'delta', 'dense'), (False, 'delta', 'moe'),
           (True, 'direct', 'moe')]
_PAIRS = [(v, p) for v in VARIANTS for p in ('pre', 'sandwich', 'post')
          if not (p == 'post' and VARIANTS[v].hg)]
if os.environ.get('SCALEJAX_FULL_GRID'):
  _ROWS = [(pair, b) for pair in _PAIRS for b in itertools.product(
      (False, True), ('direct', 'delta'), ('dense', 'moe'))]
else:
  _ROWS = [(pair, _BINARY[i % 4]) for i, pair in enumerate(_PAIRS)]
GRID = [dict(variant=v, placement=p, qk_norm=qk, scale_storage=st, mlp=mlp)
        for (v, p), (qk, st, mlp) in _ROWS]
# Post-Norm's norms under the strict rule, a shared expert, and DP/DNP on some maps only.
GRID += [dict(variant='dnp', placement='post', post_norm_role='output', qk_norm=True),
         dict(variant='unified', mlp='moe', moe_shared_ff=8, placement='sandwich'),
         dict(variant='dp', dual_targets=('v', 'gate'), norm='layer', norm_bias=True),
         dict(variant='unified', dual_targets=('q', 'k', 'up'), n_kv_heads=4),
         dict(variant='hg', placement='sandwich', qk_norm=True, scale_storage='delta'),
         dict(variant='unified_frozen', qk_norm=True)]
FACTORS = dict(variant=tuple(VARIANTS), placement=('pre', 'sandwich', 'post'),
               qk_norm=(False, True), scale_storage=('direct', 'delta'), mlp=('dense', 'moe'))


def test_the_default_grid_covers_every_pair_of_factor_values():
  cases = [{**{f: ModelConfig.__dataclass_fields__[f].default for f in FACTORS}, **kw}
           for kw in GRID]
  for a, b in itertools.combinations(FACTORS, 2):
    for x, y in itertools.product(FACTORS[a], FACTORS[b]):
      if (a, b) == ('variant', 'placement') and y == 'post' and VARIANTS[x].hg:
        continue  # HG needs a norm in front of each branch
      assert any(c[a] == x and c[b] == y for c in cases), (a, x, b, y)


def _random_model(config, seed=0):
  """Random params (every scale's gamma positive, in about [0.5, 1.5]), built abstractly."""
  abstract = nnx.eval_shape(lambda: build_model(config))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  value = lambda s, r: ((0.0 if config.scale_storage == 'delta' else 1.0)
                        + rng.uniform(-0.4, 0.4, s.shape) if r in R.SCALE_ROLES
                        else 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
  return nnx.merge(graphdef, jax.tree.map(value, nnx.to_pure_dict(state),
                                          R.role_tree(abstract)))


def _times(form, c, config):
  """The form's params with gamma multiplied by a positive constant (c, c^2 or c^3: every
  param's value times c, whatever the form; a delta-stored param holds value - init).
  Stacked over experts, only the first expert's copy: each expert's is a scale of its
  own, and all of them at once is a different direction."""
  fresh = R.params_of(norms.make_scale(dataclasses.replace(config.norm_spec, storage='direct'),
                                       form.dim, R.INPUT_SCALE))
  state = nnx.state(form, nnx.Param)
  axes = R.axes_tree(form)
  init = lambda f: f if config.scale_storage == 'delta' else 0.0

  def times(f, p, ax):
    factor = jnp.asarray(c, jnp.float32)
    if 'expert' in ax:
      i = ax.index('expert')
      factor = jnp.where(jnp.arange(p.shape[i]) == 0, c, 1.0).reshape(
          (-1,) + (1,) * (p.ndim - i - 1))
    return (p + init(f)) * factor - init(f)

  new = jax.tree.map(times, fresh, nnx.to_pure_dict(state), axes,
                     is_leaf=lambda x: isinstance(x, tuple))
  nnx.replace_by_pure_dict(state, new)
  nnx.update(form, state)


@pytest.mark.parametrize('kw', GRID, ids=lambda kw: '-'.join(map(str, kw.values())))
def test_roles_fold_and_neutral_magnitudes_match_the_logits(kw):
  config = ModelConfig(**{**TINY, **kw})
  model = _random_model(config, seed=len(str(kw)))
  roles = R.role_tree(model)
  learnable = [s for s in wiring.scales(config) if R.params_of(wiring.module_at(model, s.path))]
  for s in learnable:  # the model carries the role the wiring decides
    node = roles
    for p in s.path:
      node = node[p]
    assert set(jax.tree.leaves(node)) == {s.role}, s.name

  edits = [(s, what) for what in ('fold', 'x3') for s in learnable]
  graphdef = nnx.graphdef(model)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, config.vocab_size)

  @jax.jit
  def every_edit(params):  # one program: each edit and its forward, batched
    sets = [params]
    for s, what in edits:
      edited = nnx.merge(graphdef, params)
      if what == 'fold':  # gamma -> 1, the consumers' rows times gamma
        folding.fold_scale(edited, s, force=True)
      else:  # gamma -> 3 gamma (or 9 or 27)
        _times(wiring.module_at(edited, s.path), 3.0, config)
      sets.append(R.params_of(edited))
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *sets)
    return jax.vmap(lambda p: nnx.merge(graphdef, p)(tokens))(stacked)

  logits = every_edit(R.params_of(model))
  ref, size = logits[0], float(jnp.max(jnp.abs(logits[0])))
  assert size > 0.3, size  # logits large enough for a change to show
  for (s, what), out in zip(edits, logits[1:]):
    change = float(jnp.max(jnp.abs(out - ref)))
    same = s.folds if what == 'fold' else s.neutral
    if same:
      assert change < 2e-5 * size, (s.name, what, s.role, change)
    else:
      assert change > 1e-3 * size, (s.name, what, s.role, change)
    if what == 'fold':  # the role is the fold, but for Post-Norm's documented choice
      mixed = any(c.kernel is None for c in s.consumers) and not s.folds and any(
          c.direct for c in s.consumers)
      want = config.post_norm_role if mixed else ('input' if s.folds else 'output')
      assert s.role == {'input': R.INPUT_SCALE, 'output': R.OUTPUT_SCALE}[want], s.name


def test_dp_roles_on_shakespeare_char_and_the_labels_that_changed():
  """DP's output side on v and up folds (into W_o, W_down), on q, k and gate it does not:
  3,028 input-scale and 2,388 output-scale params on configs/shakespeare_char.py."""
  config = ModelConfig(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_seq_len=64,
                       tie_embeddings=True, variant='dp')
  model = nnx.eval_shape(lambda: build_model(config))
  summary = R.role_summary(R.params_of(model), R.role_tree(model))
  assert summary[R.INPUT_SCALE][1] == 3028 and summary[R.OUTPUT_SCALE][1] == 2388
  # ... and so reads the table train.py logs at start-up, and the param report
  table = decay_table(R.params_of(model), R.role_tree(model), decay_rates('iwd', 0.1))
  assert re.search(r'input_scale\s+5\s+3,028\s+0\.1\n', table), table
  assert re.search(r'output_scale\s+3\s+2,388\s+0\n', table), table
  cfg = load_config(Path(__file__).parents[1] / 'configs' / 'shakespeare_char.py')
  cfg.model.update(variant='dp', vocab_size=65)
  text, _ = param_report.report(cfg)
  assert re.search(r'blocks/attn/v/post\s+input\s+512\s+yes', text), text
  assert re.search(r'blocks/mlp/gate/post\s+output\s+1,364\s+no', text), text
  by_name = {s.name: s.role for s in wiring.scales(config)}
  assert by_name['blocks/attn/v/post'] == by_name['blocks/mlp/up/post'] == R.INPUT_SCALE
  assert {by_name[f'blocks/{m}/post'] for m in ('attn/q', 'attn/k', 'mlp/gate')} == {
      R.OUTPUT_SCALE}


def test_dnp_makes_the_input_norms_magnitude_neutral_and_the_frozen_variant_freezes_it():
  config = ModelConfig(**{**TINY, 'variant': 'unified'})
  neutral = {s.name for s in wiring.scales(config) if s.neutral}
  assert neutral == {f'blocks/attn_norm/{b}' for b in 'qkv'} | {
      'blocks/mlp_norm/gate', 'blocks/mlp_norm/up'}
  frozen = R.frozen_tree(nnx.eval_shape(lambda: build_model(
      dataclasses.replace(config, variant='unified_frozen'))))
  flat = {jax.tree_util.keystr(p, simple=True, separator='/'): f
          for p, f in jax.tree_util.tree_leaves_with_path(frozen)}
  assert {k for k, f in flat.items() if f} == {f'{n}/beta' for n in neutral}
  assert not any(jax.tree.leaves(R.frozen_tree(nnx.eval_shape(lambda: build_model(config)))))


def test_a_tied_head_unties_to_the_same_function():
  config = ModelConfig(**{**TINY, 'variant': 'dnp', 'tie_embeddings': True})
  model = _random_model(config)
  untied = folding.untie(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
  np.testing.assert_array_equal(untied(tokens), model(tokens))
  final = next(s for s in wiring.scales(config) if s.name == 'final_norm/scale')
  assert final.role == R.INPUT_SCALE and final.consumers[0].transposed
  with pytest.raises(ValueError, match='untie'):
    folding.fold_scale(folding.copy_model(model), final)


def test_scales_built_outside_a_decoder_must_be_given_a_role():
  from scalejax.model.layers import Attention
  attn = Attention(ModelConfig(**{**TINY, 'qk_norm': True}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='have no role'):
    R.role_tree(attn)
  norm = norms.Norm(norms.NormSpec(), 8, R.OUTPUT_SCALE)
  assert jax.tree.leaves(R.role_tree(norm)) == [R.OUTPUT_SCALE]


def test_stacked_scale_roles_survive_scan():
  """Stacked (rank-2) scale params keep their role; a rank rule would call them matrices."""
  model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2,
                                  variant='unified'))
  gamma = model.blocks.attn_norm.q.alpha
  assert gamma.shape == (4, 16)
  assert gamma.get_metadata()['role'] == R.INPUT_SCALE
  assert gamma.get_metadata()['axes'] == ('layers', 'norm')
  beta = model.blocks.attn_norm.q.beta
  assert beta.shape == (4,) and beta.get_metadata()['axes'] == ('layers',)
  assert beta.get_metadata()['part'] == 'magnitude'
  assert model.blocks.mlp.up.kernel.get_metadata()['axes'] == ('layers', 'embed', 'mlp')


def test_foreign_params_need_an_explicit_default():
  class Mixed(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match='carries no'):
    R.role_tree(Mixed())
  tree = R.role_tree(Mixed(), default=R.MATRIX)
  assert set(jax.tree.leaves(tree)) == {R.MATRIX}

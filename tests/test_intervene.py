"""Scale-vector interventions: forms set to a target gamma, edits, the loss/KL measure,
the fold comparison, the edit grammar and the command (tables, plot, edited workdir)."""

import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.analysis import interventions as I
from scalejax.cli import common
from scalejax.core import roles
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.scales.norms import SCALE_FORMS
from scalejax.studies import intervene
from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib
from scalejax.train.runs import load_run

from _util import tiny_config

STEP = 20


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens_BxL):
  return nnx.merge(graphdef, params)(tokens_BxL)


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _random_model(config: ModelConfig, seed: int = 0):
  """(graphdef, params) of a model with random weights, its scales drawn as
  _util.randomize_scales draws them (uniform in [0.5, 1.5], every scale param).

  Drawn in NumPy from the abstract model's shapes: building the model, or
  randomize_scales' jax.random draws, compile one program per initializer and
  shape, seconds for a small model on a 2-core machine.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config)))
  role = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()['role'], state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))
  rng = np.random.default_rng(seed)

  def draw(x, r):
    if r in roles.SCALE_ROLES:
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    # kernels [..., d_in, d_out] with unit-variance outputs; the table [vocab, d]: N(0, 1)
    std = 1.0 if r == roles.EMBEDDING else 1 / math.sqrt(x.shape[-2])
    return jnp.asarray(rng.normal(0.0, std, x.shape), jnp.float32)

  return graphdef, jax.tree.map(draw, nnx.to_pure_dict(state), role)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A tiny baseline run (untied head) with random scales, saved as train.py saves it."""
  cfg = tiny_config()
  cfg.model.update(tie_embeddings=False)
  _, params = _random_model(config_lib.model_config(cfg, cfg.data.synthetic_vocab))
  workdir = tmp_path_factory.mktemp('run')
  mngr = ckpt.manager(str(workdir), keep=1, async_save=False)
  ckpt.save(mngr, STEP, {'params': params, 'step': np.int32(STEP)}, {})
  mngr.wait_until_finished()
  mngr.close()
  (workdir / 'config.json').write_text(config_lib.to_json(cfg))
  return str(workdir)


@pytest.fixture(scope='module')
def baseline(run_dir):
  """(graphdef, params, eval batches) of the run: the shapes the command compiles for."""
  cfg, graphdef, params, _ = load_run(run_dir)
  return graphdef, params, intervene.eval_batches(cfg, run_dir)


@pytest.fixture(scope='module')
def unified():
  """HG + DNP + magdir, grouped-query attention (v's scale spreads over head groups)."""
  return _random_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                   n_kv_heads=2, max_seq_len=16, variant='unified'), seed=3)


def _find(graphdef, params, spec: str):
  return I.parse_edit(spec, nnx.merge(graphdef, params).config)


def _log_softmax(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), -1, keepdims=True))


def _tokens(batches):
  return jnp.asarray(batches[0]['inputs'])


# --- forms ---------------------------------------------------------------------------

@pytest.mark.parametrize('storage', ['direct', 'delta'])
@pytest.mark.parametrize('form_name', ['vector', 'magdir', 'magdir_unit'])
def test_params_for_gives_the_target_gamma(form_name, storage):
  d = 16
  form = SCALE_FORMS[form_name](d, roles.INPUT_SCALE, storage)
  init = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(form, nnx.Param)).items()}
  rand = np.asarray(jax.random.uniform(jax.random.key(0), (d,), minval=0.5, maxval=1.5))
  mixed = rand.copy()
  mixed[:3], mixed[3:5] = 1.0, 0.0
  for target in (np.ones(d, np.float32), np.zeros(d, np.float32), rand, mixed):
    values = form.params_for(target)
    assert set(values) == set(init)
    for name, v in values.items():
      getattr(form, name).set_value(v)
    gamma = np.asarray(form())
    if form_name == 'magdir_unit' and target.any() and not (target == 1).all():
      np.testing.assert_allclose(gamma, target, rtol=1e-6)  # through a norm: rounding
    else:
      np.testing.assert_array_equal(gamma, target)
    if (target == 1).all():  # gamma = 1 is the init's params, exactly
      chex.assert_trees_all_equal({k: np.asarray(v) for k, v in values.items()}, init)
  with pytest.raises(ValueError, match='no params'):
    SCALE_FORMS['none'](d, roles.INPUT_SCALE, storage).params_for(np.ones(d))


def test_targets_are_split_by_the_layers_axis():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, variant='unified')
  names = [t.name for t in I.targets(cfg)]
  assert names[:3] == ['blocks/attn_norm/q@layer0', 'blocks/attn_norm/q@layer1',
                       'blocks/attn_norm/q@layer2']
  assert 'final_norm/scale' in names and len(names) == 3 * 10 + 1
  assert I.targets(ModelConfig(vocab_size=64, d_model=32, variant='no_scale')) == []


# --- edits ---------------------------------------------------------------------------

def test_an_edit_changes_only_its_layer(unified):
  graphdef, params = unified
  target, edit = _find(graphdef, params, 'blocks/attn_norm/v@layer1=zero')
  edited, changed = I.apply_edit(graphdef, params, target, edit)
  assert changed == 32
  assert I.changed_params(params, edited) == ['blocks/attn_norm/v/alpha',
                                             'blocks/attn_norm/v/beta']
  v, v_new = params['blocks']['attn_norm']['v'], edited['blocks']['attn_norm']['v']
  np.testing.assert_array_equal(v_new['alpha'][0], v['alpha'][0])
  np.testing.assert_array_equal(v_new['beta'][0], v['beta'][0])
  np.testing.assert_array_equal(I.gamma_of(nnx.merge(graphdef, edited), target), 0.0)


def test_resetting_a_scale_at_one_changes_nothing(baseline):
  graphdef, params, batches = baseline
  ones = params
  for t in I.targets(nnx.merge(graphdef, params).config):
    ones = I.with_gamma(graphdef, ones, t, jnp.ones(t.scale.dim))
  target, edit = _find(graphdef, ones, 'blocks/attn_norm/scale@layer0=reset')
  edited, changed = I.apply_edit(graphdef, ones, target, edit)
  assert changed == 0 and I.changed_params(ones, edited) == []
  evaluate = I.make_evaluator(graphdef, ones, batches)
  (base, base_kl), (loss, kl) = evaluate(ones), evaluate(edited)
  assert loss - base == 0.0 and abs(kl) < 1e-7 and abs(base_kl) < 1e-7


def test_zeroing_the_final_norm_gives_uniform_predictions(baseline):
  graphdef, params, batches = baseline
  target, edit = _find(graphdef, params, 'final_norm/scale=zero')
  edited, _ = I.apply_edit(graphdef, params, target, edit)
  x = _tokens(batches)
  np.testing.assert_array_equal(_logits(graphdef, edited, x), 0.0)  # head(0) = 0
  loss, kl = I.make_evaluator(graphdef, params, batches)(edited)
  vocab = 64
  assert loss == pytest.approx(math.log(vocab), rel=1e-6)
  # KL(p || uniform) = log V - H(p), by hand from the unedited logits
  logp = np.concatenate([_log_softmax(_logits(graphdef, params, jnp.asarray(b['inputs'])))
                         for b in batches])
  by_hand = np.mean(math.log(vocab) + np.sum(np.exp(logp) * logp, -1))
  assert kl == pytest.approx(by_hand, rel=1e-4) and kl > 0


def test_kl_is_positive_and_a_hand_computation(baseline):
  graphdef, params, batches = baseline
  target, edit = _find(graphdef, params, 'blocks/attn_norm/scale@layer1=zero')
  edited, _ = I.apply_edit(graphdef, params, target, edit)
  loss, kl = I.make_evaluator(graphdef, params, batches)(edited)
  p, q = (np.concatenate([_log_softmax(_logits(graphdef, w, jnp.asarray(b['inputs'])))
                          for b in batches]) for w in (params, edited))
  assert kl > 1e-4
  assert kl == pytest.approx(np.mean(np.sum(np.exp(p) * (p - q), -1)), rel=1e-4)
  # Without room for the reference log-probs they are recomputed: the same numbers.
  again = I.make_evaluator(graphdef, params, batches, cache_bytes=0)(edited)
  np.testing.assert_allclose(again, (loss, kl), rtol=1e-5)


@pytest.mark.parametrize('kind,k', [('topk:3', 3), ('topk:25%', 8)])
def test_topk_resets_exactly_k_channels(baseline, kind, k):
  graphdef, params, _ = baseline
  target, edit = _find(graphdef, params, f'blocks/mlp_norm/scale@layer1={kind}')
  gamma = np.asarray(I.gamma_of(nnx.merge(graphdef, params), target))
  edited, changed = I.apply_edit(graphdef, params, target, edit)
  new = np.asarray(I.gamma_of(nnx.merge(graphdef, edited), target))
  top = np.argsort(-np.abs(gamma - 1))[:k]
  assert changed == k and (gamma != 1).all()
  np.testing.assert_array_equal(new[top], 1.0)
  rest = np.setdiff1d(np.arange(gamma.size), top)
  np.testing.assert_array_equal(new[rest], gamma[rest])


def test_direction_of_a_neutral_scale_is_inert_but_not_its_reset(unified):
  """unified's block input norms feed only DNP-renormalized maps: their magnitude is
  function-neutral, their direction is not."""
  graphdef, params = unified
  x = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
  base = _logits(graphdef, params, x)
  change, neutral = {}, {}
  for spec in ('blocks/attn_norm/q@layer0=direction', 'blocks/attn_norm/q@layer0=reset',
               'final_norm/scale=direction'):
    target, edit = _find(graphdef, params, spec)
    neutral[target.scale.name] = target.scale.neutral
    change[spec] = float(jnp.max(jnp.abs(
        _logits(graphdef, I.apply_edit(graphdef, params, target, edit)[0], x) - base)))
  assert neutral == {'blocks/attn_norm/q': True, 'final_norm/scale': False}
  assert change['blocks/attn_norm/q@layer0=direction'] < 1e-5
  assert change['blocks/attn_norm/q@layer0=reset'] > 1e-3
  assert change['final_norm/scale=direction'] > 1e-3


def test_fold_reset_equals_reset(baseline, unified):
  """W(gamma * n) = (diag(gamma) W) n: resetting gamma = resetting the folded rows."""
  for graphdef, params in (baseline[:2], unified):
    x = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    base = _logits(graphdef, params, x)
    # every foldable scale, in its last layer (the layer index is no special case)
    foldable = {t.scale.name: t for t in I.targets(nnx.merge(graphdef, params).config)
                if t.foldable}.values()
    assert len(foldable) == (3 if graphdef is baseline[0] else 8)  # HG: q, k, v, gate,
    # up; the final norm; DNP's output side on v (over GQA head groups) and on up
    for t in foldable:
      reset, _ = I.apply_edit(graphdef, params, t, I.Edit('reset'))
      folded = I.fold_reset(graphdef, params, t)
      assert any(p.endswith('/kernel') for p in I.changed_params(reset, folded)), t.name
      a, b = _logits(graphdef, reset, x), _logits(graphdef, folded, x)
      assert float(jnp.max(jnp.abs(a - base))) > 1e-4, t.name
      chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
  q_post = _find(*unified, 'blocks/attn/q/post/scale@layer0=reset')[0]
  with pytest.raises(ValueError, match='does not fold'):
    I.fold_reset(*unified, q_post)


# --- the grammar ---------------------------------------------------------------------

@pytest.mark.parametrize('spec,says', [
    ('blocks/attn_norm/scale@layer1', 'is not SCALE[@layerN]=EDIT'),
    ('blocks/attn_nrm/scale@layer0=reset', "unknown scale 'blocks/attn_nrm/scale'; valid: "
     'blocks/attn_norm/scale, blocks/mlp_norm/scale, final_norm/scale'),
    ('blocks/attn_norm/scale@layer0=shrink',
     "unknown edit 'shrink'; valid: reset, zero, direction, topk:K, topk:P%"),
    ('blocks/attn_norm/scale=zero', 'stacked over 2 layers: name one, e.g. '
     'blocks/attn_norm/scale@layer0=zero'),
    ('final_norm/scale@layer0=zero', 'final_norm/scale has no layers'),
    ('blocks/attn_norm/scale@layer2=zero', 'layer 2 out of range'),
    ('blocks/attn_norm/scale@2=zero', "bad layer '2'"),
    ('blocks/attn_norm/scale@layer0=topk:0', 'topk takes a count K >= 1'),
    ('blocks/attn_norm/scale@layer0=topk:x%', 'topk takes a count K >= 1'),
])
def test_bad_edit_specs_are_one_line_errors(spec, says):
  config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)
  with pytest.raises(ValueError) as e:
    I.parse_edit(spec, config)
  assert says in str(e.value) and len(common.message(e.value).splitlines()) == 1


def test_good_edit_specs():
  config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, variant='magdir')
  target, edit = I.parse_edit('blocks/mlp_norm/scale@layer1=topk:12.5%', config)
  assert (target.name, edit.label, edit.channels(32)) == (
      'blocks/mlp_norm/scale@layer1', 'topk:12.5%', 4)
  target, edit = I.parse_edit('final_norm/scale=direction', config)
  assert target.layer is None and edit == I.Edit('direction')
  with pytest.raises(ValueError, match='no learnable scales'):
    I.parse_edit('final_norm/scale=zero', ModelConfig(vocab_size=64, variant='no_scale'))


# --- the command -----------------------------------------------------------------------

def test_command_writes_the_table_and_plot(run_dir, tmp_path):
  out = tmp_path / 'out'
  fv = common.parse_flags(intervene.define_flags,
                          ['--workdir', run_dir, '--out', str(out), '--topk', '3,25%'])
  data = intervene.main([''], fv)
  edits = ['reset', 'zero', 'direction', 'topk:3', 'topk:25%', I.FOLD]
  assert data['run']['edits'] == edits and data['run']['eval_tokens'] == 2 * 8 * 32
  # 5 scale vectors (2 layers x 2 norms, the final norm), each foldable
  assert len(data['results']) == 5 * len(edits)
  by = {(r['target'], r['edit']): r for r in data['results']}
  for name in ('blocks/attn_norm/scale@layer0', 'final_norm/scale'):
    assert by[name, I.FOLD]['loss'] == pytest.approx(by[name, 'reset']['loss'], abs=1e-5)
    assert by[name, 'topk:25%']['changed'] == 8 and by[name, 'zero']['kl'] > 0
  saved = json.loads((out / 'interventions.json').read_text())
  assert saved['run']['base_loss'] == pytest.approx(data['run']['base_loss'])
  md = (out / 'interventions.md').read_text()
  assert '| `blocks/mlp_norm/scale` | 1 | input |' in md and '`fold_reset` vs `reset`' in md
  png = (out / 'interventions.png').read_bytes()
  assert png[:4] == b'\x89PNG' and len(png) > 10_000


def test_edit_saves_a_workdir_that_load_run_reads(run_dir, tmp_path):
  out = str(tmp_path / 'edited')
  spec = 'blocks/mlp_norm/scale@layer1=topk:4'
  fv = common.parse_flags(intervene.define_flags,
                          ['--workdir', run_dir, '--out', out, '--edit', spec])
  record = intervene.main([''], fv)
  _, graphdef, params, _ = load_run(run_dir)
  cfg, _, edited, tokenizer = load_run(out)
  assert cfg.model.variant == 'baseline' and tokenizer.vocab_size == 64
  assert ckpt.steps(out) == [STEP]
  assert I.changed_params(params, edited) == ['blocks/mlp_norm/scale/gamma']
  old = np.asarray(params['blocks']['mlp_norm']['scale']['gamma'])
  new = np.asarray(edited['blocks']['mlp_norm']['scale']['gamma'])
  np.testing.assert_array_equal(new[0], old[0])
  np.testing.assert_array_equal(new[1], I.edited_gamma(old[1], I.Edit('topk', k=4)))
  assert int(np.sum(new[1] != old[1])) == 4 == record['changed_channels']
  saved = json.loads((tmp_path / 'edited' / 'intervention.json').read_text())
  assert saved['spec'] == spec and saved['kl'] > 0 and saved['delta'] == record['delta']
  with pytest.raises(ValueError, match='already holds checkpoints'):
    intervene.main([''], fv)
  fv = common.parse_flags(intervene.define_flags, ['--workdir', run_dir, '--out',
                                                   str(tmp_path / 'x'), '--edit', 'head=zero'])
  with pytest.raises(ValueError, match="unknown scale 'head'"):
    intervene.main([''], fv)

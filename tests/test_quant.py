"""Fake-quantization numerics, role-selected modes, folding, and the study command."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.analysis import quant as Q
from scalejax.core import roles as R
from scalejax.train import trainer
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.studies.quant_study import contrasts, markdown, plot, study_run
from scalejax.analysis.scale_stats import effective_scales
from _util import tiny_config

ROOT = Path(__file__).parents[1]

INT_FORMATS = [f for f, spec in Q.FORMATS.items() if spec.qmax is not None]


def _x(shape=(2, 24, 6), seed=0):
  x = jax.random.normal(jax.random.key(seed), shape)
  return np.asarray(x * jnp.linspace(0.05, 4.0, shape[-1]))  # columns of unlike range


def _groups(a, axis, size):
  """[..., n_groups, size] view of `a` with `axis` split into groups (size divides it)."""
  a = np.moveaxis(a, axis, -1)
  return a.reshape(a.shape[:-1] + (a.shape[-1] // size, size))


@pytest.mark.parametrize('group', [0, 8])
@pytest.mark.parametrize('fmt', INT_FORMATS)
def test_int_grid_levels_absmax_and_error(fmt, group):
  x = _x()
  y = np.asarray(Q.fake_quant(x, fmt, axis=1, group_size=group))
  qmax = Q.FORMATS[fmt].qmax
  xg, yg = _groups(x, 1, group or x.shape[1]), _groups(y, 1, group or x.shape[1])
  absmax = np.abs(xg).max(-1, keepdims=True)
  scale = absmax / qmax
  levels = yg / scale
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)   # on the integer grid
  assert np.abs(np.round(levels)).max() <= qmax                      # symmetric, 2^b - 1 levels
  n_levels = max(len(np.unique(np.round(l))) for l in levels.reshape(-1, levels.shape[-1]))
  assert n_levels <= 2 ** Q.FORMATS[fmt].bits - 1
  np.testing.assert_allclose(np.abs(yg).max(-1, keepdims=True), absmax, rtol=1e-6)
  assert np.all(np.abs(yg - xg) <= scale / 2 * (1 + 1e-5))           # round to nearest


@pytest.mark.parametrize('fmt', list(Q.FORMATS))
def test_idempotent(fmt):
  x = _x()
  for group in (0, 8):
    y = Q.fake_quant(x, fmt, axis=1, group_size=group)
    chex.assert_trees_all_close(Q.fake_quant(y, fmt, axis=1, group_size=group), y,
                                rtol=1e-6, atol=1e-7)


def test_fp8_is_e4m3_times_a_per_channel_scale():
  x = _x()
  y = np.asarray(Q.fake_quant(x, 'fp8', axis=1))
  scale = np.abs(x).max(1, keepdims=True) / float(jnp.finfo(jnp.float8_e4m3fn).max)
  v = (y / scale).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jnp.asarray(v).astype(jnp.float8_e4m3fn), np.float32),
                             v, rtol=1e-5)
  np.testing.assert_allclose(y, x, rtol=2 ** -3)  # e4m3: 3 mantissa bits
  assert not np.allclose(y, x, rtol=1e-3)


@pytest.mark.parametrize('fmt', ['int4', 'fp8'])
def test_scales_are_per_channel_and_per_group(fmt):
  x = _x()
  big = x.copy()
  big[1, :, 2] *= 1000.0      # one channel of one layer
  y, yb = Q.fake_quant(x, fmt, axis=1), Q.fake_quant(big, fmt, axis=1)
  keep = np.ones(x.shape, bool)
  keep[1, :, 2] = False
  np.testing.assert_array_equal(np.asarray(yb)[keep], np.asarray(y)[keep])
  big = x.copy()
  big[0, 8:16, 3] *= 1000.0   # one group of one channel
  y, yb = Q.fake_quant(x, fmt, axis=1, group_size=8), Q.fake_quant(big, fmt, axis=1, group_size=8)
  keep = np.ones(x.shape, bool)
  keep[0, 8:16, 3] = False
  np.testing.assert_array_equal(np.asarray(yb)[keep], np.asarray(y)[keep])


def test_group_padding_keeps_shape_and_last_group_scale():
  x = _x((30, 4))
  y = np.asarray(Q.fake_quant(x, 'int4', axis=0, group_size=8))
  assert y.shape == x.shape
  tail = np.abs(x[24:]).max(0) / 7   # the last group holds 6 rows, padding adds zeros
  np.testing.assert_allclose(y[24:] / tail, np.round(y[24:] / tail), atol=1e-4)


def test_bad_format_and_mode_are_clear_errors():
  with pytest.raises(ValueError, match='unknown quantization format'):
    Q.fake_quant(np.ones(3), 'int5', axis=0)
  m = build_model(_cfg('baseline'))
  with pytest.raises(ValueError, match='unknown quantization mode'):
    Q.apply_mode(*nnx.split(m), R.role_tree(m), R.axes_tree(m), 'everything', 'int8')


def test_quant_axis_from_role_and_axes():
  assert Q.quant_axis(R.MATRIX, ('layers', 'embed', 'mlp')) == 1
  assert Q.quant_axis(R.MATRIX, ('embed', 'vocab')) == 0
  assert Q.quant_axis(R.EMBEDDING, ('vocab', 'embed')) == 1
  assert Q.quant_axis(R.INPUT_SCALE, ('layers', 'norm')) == 1
  assert Q.quant_axis(R.INPUT_SCALE, ('layers',)) is None   # magdir beta: exact


# --- models -----------------------------------------------------------------------

def _cfg(variant, **kw):
  kw = dict(dict(vocab_size=48, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                 variant=variant, qk_norm=True), **kw)
  return ModelConfig(**kw)


def _perturbed(cfg, seed=1):
  """A model whose every scale param is far from its init (so folding matters)."""
  model = build_model(cfg)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  roles = R.role_tree(model)
  leaves, treedef = jax.tree.flatten(params)
  key = jax.random.key(seed)
  leaves = [np.asarray(p + 0.4 * jax.random.normal(jax.random.fold_in(key, i), p.shape))
            if r in R.SCALE_ROLES else np.asarray(p)
            for i, (p, r) in enumerate(zip(leaves, jax.tree.leaves(roles)))]
  return graphdef, jax.tree.unflatten(treedef, leaves), roles, R.axes_tree(model)


def _tokens(cfg):
  return jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)


FOLD_CASES = [('baseline', {}), ('hg', {}), ('unified', {}), ('magdir_unit', {}),
              ('dp', {}), ('baseline', dict(placement='sandwich')),
              ('unified', dict(scale_storage='delta'))]


@pytest.mark.parametrize('variant,kw', FOLD_CASES)
def test_fold_leaves_float_model_unchanged(variant, kw):
  cfg = _cfg(variant, **kw)
  graphdef, params, roles, _ = _perturbed(cfg)
  before = jax.tree.map(np.copy, params)
  tokens = _tokens(cfg)
  ref = nnx.merge(graphdef, params)(tokens)
  folded, left = Q.fold_input_scales(nnx.merge(graphdef, params))
  assert left == []
  chex.assert_trees_all_close(nnx.merge(graphdef, folded)(tokens), ref, atol=2e-5, rtol=1e-4)
  chex.assert_trees_all_equal(params, before)   # the caller's (numpy) params are untouched
  scales = effective_scales(nnx.merge(graphdef, folded))
  for name, (role, gamma) in scales.items():
    if role == R.INPUT_SCALE:
      chex.assert_trees_all_close(gamma, jnp.ones_like(gamma), atol=1e-6)
  old = effective_scales(nnx.merge(graphdef, params))
  for name, (role, gamma) in scales.items():
    if role == R.OUTPUT_SCALE:
      chex.assert_trees_all_equal(gamma, old[name][1])
  q_old, q_new = params['blocks']['attn']['q']['kernel'], folded['blocks']['attn']['q']['kernel']
  attn_gamma = old['blocks/attn_norm/' + ('q' if cfg.hg else 'scale')][1]
  chex.assert_trees_all_close(q_new, q_old * attn_gamma[:, :, None], rtol=1e-6)


def test_fold_tied_head_no_scale_post_norm_and_bias():
  cfg = _cfg('baseline', tie_embeddings=True)
  graphdef, params, _, _ = _perturbed(cfg)
  folded, left = Q.fold_input_scales(nnx.merge(graphdef, params))
  assert left == ['final_norm/scale']
  chex.assert_trees_all_equal(folded['final_norm'], params['final_norm'])
  tokens = _tokens(cfg)
  chex.assert_trees_all_close(nnx.merge(graphdef, folded)(tokens),
                              nnx.merge(graphdef, params)(tokens), atol=2e-5, rtol=1e-4)
  no_scale = build_model(_cfg('no_scale'))   # nothing to fold
  chex.assert_trees_all_equal(Q.fold_input_scales(no_scale), (R.params_of(no_scale), []))
  # Post-Norm's norms also feed the residual stream: they stay; DP's u on v and up fold.
  post = _cfg('dp', placement='post')
  graphdef, params, _, _ = _perturbed(post)
  folded, left = Q.fold_input_scales(nnx.merge(graphdef, params))
  assert left == ['blocks/attn_norm/scale', 'blocks/mlp_norm/scale']
  assert not np.allclose(folded['blocks']['attn']['o']['kernel'],
                         params['blocks']['attn']['o']['kernel'])
  chex.assert_trees_all_close(nnx.merge(graphdef, folded)(tokens),
                              nnx.merge(graphdef, params)(tokens), atol=2e-5, rtol=1e-4)
  # A LayerNorm bias is divided by the gamma folded out of its norm.
  biased = _cfg('dnp', norm='layer', norm_bias=True)
  graphdef, params, roles, _ = _perturbed(biased)
  params = jax.tree.map(lambda p, r: p + 0.3 if r == R.OTHER else p, params, roles)
  folded, left = Q.fold_input_scales(nnx.merge(graphdef, params))
  assert left == [] and not np.allclose(folded['final_norm']['scale_bias'],
                                        params['final_norm']['scale_bias'])
  chex.assert_trees_all_close(nnx.merge(graphdef, folded)(tokens),
                              nnx.merge(graphdef, params)(tokens), atol=2e-5, rtol=1e-4)


def _changed(a, b):
  return {'/'.join(map(str, (getattr(k, 'key', k) for k in path)))
          for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
          if not np.array_equal(np.asarray(x), np.asarray(y))}


def _paths_with(roles, wanted):
  return {'/'.join(map(str, (getattr(k, 'key', k) for k in path)))
          for path, r in jax.tree_util.tree_leaves_with_path(roles) if r in wanted}


def test_modes_quantize_exactly_their_roles():
  graphdef, params, roles, axes = _perturbed(_cfg('unified'))
  for mode, spec in Q.MODES.items():
    if spec.fold:
      continue
    out, _ = Q.apply_mode(graphdef, params, roles, axes, mode, 'int4')
    changed = _changed(params, out)
    wanted = _paths_with(roles, spec.quantize)
    assert changed <= wanted, mode
    # only magdir's scalar beta, which has its own scale, may come back unchanged
    assert not {p for p in wanted - changed if not p.endswith('beta')}, mode
  out, _ = Q.apply_mode(graphdef, params, roles, axes, 'fold', 'int4')
  for name, (role, gamma) in effective_scales(nnx.merge(graphdef, out)).items():
    if role == R.OUTPUT_SCALE:   # fold keeps output-role scales float32
      chex.assert_trees_all_equal(gamma, effective_scales(nnx.merge(graphdef, params))[name][1])


def test_every_mode_error_shrinks_with_bits():
  """int8's grid is 18x finer than int4's: each mode's logit error must reflect that."""
  cfg = _cfg('unified')
  graphdef, params, roles, axes = _perturbed(cfg)
  tokens = _tokens(cfg)
  ref = nnx.merge(graphdef, params)(tokens)

  def err(mode, fmt):
    out, _ = Q.apply_mode(graphdef, params, roles, axes, mode, fmt)
    return float(jnp.abs(nnx.merge(graphdef, out)(tokens) - ref).max())

  for mode in Q.MODES:
    assert 0 < 4 * err(mode, 'int8') < err(mode, 'int4'), mode


def test_study_command_writes_table_and_plot(tmp_path):
  cfg = tiny_config()
  cfg.model.update(tie_embeddings=False)
  cfg.train.update(steps=4, eval_every=0, log_every=2)
  run_dir = tmp_path / 'run'
  trainer.train(cfg, str(run_dir))
  results = study_run('tiny', str(run_dir), ['int8', 'int2'], ['all', 'except_scales', 'fold'],
                      [0, 16], eval_batches=1, log=lambda *_: None)
  assert len(results) == 12
  base = results[0]['fp32_loss']
  for r in results:
    assert r['eval_loss'] == pytest.approx(base + r['delta'])
  by = {(r['format'], r['mode'], r['group_size']): r['delta'] for r in results}
  assert abs(by['int8', 'all', 0]) < 0.05 < by['int2', 'all', 0]
  table = markdown(results)
  assert '| all |' in table and 'groups of 16' in table
  diffs = contrasts(results)
  want = by['int2', 'all', 16] - by['int2', 'except_scales', 16]
  assert f'| tiny | groups of 16 | scales quantized too (`all` - `except_scales`) | ' \
         f'{by["int8", "all", 16] - by["int8", "except_scales", 16]:+.4f} | {want:+.4f} |' in diffs
  assert 'output-role' not in diffs   # the tiny baseline has no output-role scales
  plot(results, str(tmp_path / 'q.png'))
  assert (tmp_path / 'q.png').read_bytes()[:4] == b'\x89PNG'

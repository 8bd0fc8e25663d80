"""The decoder: expressivity of input scales, param counts, gradient flow, variants."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.core import roles
from scalejax.model.counting import param_counts
from scalejax.model import attention, layers
from scalejax.model.layers import MLP
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model, cross_entropy
from scalejax.scales.variants import VARIANTS

from _util import count_eqns, is_matrix_product, randomize_scales

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
# The library's attention under plain autodiff: the reference for the `xla` paths, which
# on CPU have backward passes of their own.
LIBRARY_XLA = attention._dot_product('xla')


def _tokens(b=2, l=12, vocab=64, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, vocab)




@pytest.mark.parametrize('variant', ['baseline', 'hg', 'dnp', 'unified'])
def test_maps_reading_one_input_as_one_matmul_match_separate_maps(variant, monkeypatch):
  """q/k/v and gate/up as one matmul over their kernels side by side (each with its
  folded input scale, HG's included; the CPU path) are the same function as one matmul
  per map (the other backends' path), values and gradients."""
  from scalejax.core import sharding
  model = build_model(ModelConfig(**SMALL, variant=variant), seed=3)
  randomize_scales(model)
  graphdef, params = nnx.split(model)
  tokens = _tokens()
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
  dots = lambda: count_eqns(jax.make_jaxpr(lambda p: loss(p))(params), is_matrix_product)
  fused, fused_dots = jax.value_and_grad(lambda p: loss(p))(params), dots()
  monkeypatch.setattr(sharding, 'platform', lambda: 'tpu')  # tokens unflattened, too
  separate, separate_dots = jax.value_and_grad(lambda p: loss(p))(params), dots()
  assert fused_dots == separate_dots - 3  # per layer (scanned once): q/k/v 3 -> 1, gate/up 2 -> 1
  chex.assert_trees_all_close(fused, separate, rtol=1e-5, atol=1e-6)


def test_folding_input_scales_into_next_linear_map_is_exact():
  """Pre-Norm: W(gamma * n) == (diag(gamma) W) n, for every input-role scale at once."""
  cfg = ModelConfig(**SMALL, variant='baseline')
  model = build_model(cfg, seed=3)
  randomize_scales(model)
  tokens = _tokens()
  want = model(tokens)

  b = model.blocks
  g_attn = b.attn_norm.scale.gamma[...]          # [L, D]
  g_mlp = b.mlp_norm.scale.gamma[...]
  for lin in (b.attn.q, b.attn.k, b.attn.v):
    lin.kernel[...] = lin.kernel[...] * g_attn[:, :, None]
  for lin in (b.mlp.gate, b.mlp.up):
    lin.kernel[...] = lin.kernel[...] * g_mlp[:, :, None]
  model.head.kernel[...] = model.head.kernel[...] * model.final_norm.scale.gamma[...][:, None]
  for g in (b.attn_norm.scale.gamma, b.mlp_norm.scale.gamma, model.final_norm.scale.gamma):
    g[...] = jnp.ones_like(g[...])

  chex.assert_trees_all_close(model(tokens), want, rtol=2e-5, atol=2e-5)


def test_folding_output_scale_changes_function():
  """Output-role scales (sandwich) cannot be folded into a following linear map."""
  cfg = ModelConfig(**SMALL, placement='sandwich')
  model = build_model(cfg, seed=3)
  tokens = _tokens()
  before = model(tokens)
  model.blocks.attn_out_norm.scale.gamma[...] *= 3.0
  assert not np.allclose(model(tokens), before, atol=1e-3)


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('placement', ['pre', 'sandwich', 'post'])
def test_param_count_matches_formula(variant, placement):
  if VARIANTS[variant].hg and placement == 'post':
    pytest.skip('HG needs a norm in front of each branch')
  cfg = ModelConfig(**SMALL, variant=variant, placement=placement, qk_norm=True, n_kv_heads=2)
  params = roles.params_of(build_model(cfg))
  got = sum(int(x.size) for x in jax.tree.leaves(params))
  counts = param_counts(cfg)
  assert got == counts['total']
  scale_params = sum(int(p.size) for p, r in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(roles.role_tree(build_model(cfg))))
                     if r in roles.SCALE_ROLES)
  assert scale_params == counts['norm']


def test_llama_1b_count_from_paper_notes():
  cfg = ModelConfig(vocab_size=50304, d_model=1792, n_layers=22, n_heads=14, d_ff=4778)
  counts = param_counts(cfg)
  assert counts['total'] == 1_028_065_024
  assert counts['norm'] == 80_640


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_gradients_reach_every_param(variant):
  cfg = ModelConfig(**SMALL, variant=variant, qk_norm=True, tie_embeddings=variant == 'hg')
  model = build_model(cfg, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = _tokens()

  def loss(p):
    return cross_entropy(nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:])

  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_variant_runs_and_stacks_layers(variant):
  cfg = ModelConfig(**SMALL, variant=variant)
  model = build_model(cfg)
  logits = jax.jit(lambda t: model(t))(_tokens())
  chex.assert_shape(logits, (2, 12, 64))
  chex.assert_tree_all_finite(logits)
  assert model.blocks.attn.q.kernel.shape == (2, 32, 32)  # [layers, d_in, d_out]


def test_gqa_tied_bfloat16_and_remat_agree_with_reference():
  base = dict(SMALL, n_kv_heads=2, tie_embeddings=True)
  ref = build_model(ModelConfig(**base), seed=5)
  tokens = _tokens()
  want = ref(tokens)
  for extra in (dict(remat='full'), dict(remat='dots'), dict(scan_unroll=2)):
    other = build_model(ModelConfig(**base, **extra), seed=5)
    chex.assert_trees_all_close(other(tokens), want, rtol=1e-5, atol=1e-5)
  bf16 = build_model(ModelConfig(**base, dtype='bfloat16'), seed=5)
  out = bf16(tokens)
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(out, want, atol=0.05)


@pytest.mark.parametrize('placement,variant,mlp', [('pre', 'unified', 'dense'),
                                                    ('sandwich', 'dnp', 'dense'),
                                                    ('post', 'baseline', 'dense'),
                                                    ('pre', 'unified', 'moe')])
def test_grad_fence_changes_no_value_or_gradient(placement, variant, mlp):
  # The fence only orders the backward pass (one optimization barrier): the same loss,
  # and the same gradients to float32 rounding, under full remat as the paper configs run.
  base = dict(SMALL, placement=placement, variant=variant, mlp=mlp, remat='full')
  tokens = _tokens()
  targets = jnp.roll(tokens, 1, axis=1)

  def loss_and_grads(fence):
    model = build_model(ModelConfig(**base, grad_fence=fence), seed=3)
    loss = lambda m: cross_entropy(m(tokens), targets)
    return nnx.jit(nnx.value_and_grad(loss))(model)
  (loss, grads), (want_loss, want_grads) = loss_and_grads(True), loss_and_grads(False)
  chex.assert_trees_all_close(loss, want_loss, rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-6 * scale)


def test_causal():
  model = build_model(ModelConfig(**SMALL))
  t = _tokens()
  t2 = t.at[:, 6:].set(0)
  chex.assert_trees_all_close(model(t)[:, :6], model(t2)[:, :6], atol=1e-6)


@pytest.mark.parametrize('bad, match', [
    (dict(n_heads=5), 'must divide model.d_model'),
    (dict(n_kv_heads=3), 'must divide model.n_heads'),
    (dict(variant='nope'), 'valid: baseline'),
    (dict(placement='middle'), 'placement'),
    (dict(variant='unified', placement='post'), 'HG'),
    (dict(dual_targets=('o',)), r"model.dual_targets=\('o',\) must be a subset"),
    (dict(dual_targets='v,o'), r"model.dual_targets=\('v', 'o'\) must be a subset"),
    (dict(rope_dtype='bfloat16'), "rope_dtype must be one of \\('float32', 'compute'\\)"),
])
def test_bad_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**SMALL, **bad})


@pytest.mark.parametrize('given, names', [('v,gate', ('v', 'gate')), ('gate', ('gate',)),
                                          (' q , k ', ('q', 'k')), (['up'], ('up',)), ('', ()),
                                          (('v,gate',), ('v', 'gate'))])
def test_dual_targets_from_a_string_of_names(given, names):
  """A command-line override gives a string: split by commas, not into characters."""
  assert ModelConfig(**{**SMALL, 'dual_targets': given}).dual_targets == names


@pytest.mark.parametrize('variant', ['baseline', 'dp', 'dnp', 'unified'])
def test_mlp_keeps_only_its_matmul_outputs_for_the_backward(variant):
  """The gating (and DP/DNP's output side) is recomputed in the backward pass: the
  residuals of width d_ff are gate(x), up(x) and the down map's input, for every
  variant; plain autodiff would keep 6 (8 with DP/DNP)."""
  cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, vocab_size=16, d_ff=48, variant=variant)
  graphdef, params = nnx.split(MLP(cfg, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  _, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x, x), params, x)
  # an activation of width d_ff over the 16 tokens, as [2, 8, 48] or flattened [16, 48]
  wide = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, 'shape', ())[-1:] == (48,)
          and leaf.ndim >= 2 and math.prod(leaf.shape[:-1]) == 16]
  assert len(wide) == 3, [leaf.shape for leaf in wide]


@pytest.mark.parametrize('variant,stats', [('baseline', 0), ('dp', 0), ('dnp', 2), ('unified', 2)])
def test_mlp_keeps_dnps_statistics_and_its_backward_reduces_no_row_of_them(variant, stats):
  """Under DNP the gating's recomputation takes the gate and up norms' 1/rms kept from
  the forward pass ([tokens, 1] each): the backward pass sums rows of width d_ff only for
  the norms' own gradients (one row sum each), not to recompute their statistics."""
  cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, vocab_size=16, d_ff=48, variant=variant)
  graphdef, params = nnx.split(MLP(cfg, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  run = lambda p, x: nnx.merge(graphdef, p)(x, x)
  _, vjp = jax.vjp(run, params, x)
  kept = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, 'shape', ())[-1:] == (1,)
          and math.prod(leaf.shape[:-1]) == 16]
  assert len(kept) == stats, [leaf.shape for leaf in kept]
  backward = jax.make_jaxpr(lambda p, x, g: jax.vjp(run, p, x)[1](g))(params, x, jnp.ones_like(x))
  groups = (48 // 8, 8)  # row_sum's groups of a width-48 row on CPU
  wide_sums = lambda eqn: (eqn.primitive.name == 'reduce_sum'
                           and eqn.invars[0].aval.shape[-2:] == groups)
  # forward: the statistics (2 under DNP); backward: none (row sums of the gradients are
  # matrix-vector products with gamma)
  assert count_eqns(backward, wide_sums) == stats


def test_mlp_recomputes_each_layers_gating_when_its_backward_runs(monkeypatch):
  """The gating is recomputed once its layer's cotangent exists: each MLP of a stack
  adds about the 3 arrays of width d_ff it keeps (gate(x), up(x), the down map's input)
  to the backward's scratch memory, and less than under `jax.checkpoint`, whose
  recomputation depends on forward values only and which XLA:CPU schedules at the start
  of the backward pass; what it saves grows with depth. The same gradients."""
  cfg = ModelConfig(d_model=64, n_layers=1, n_heads=4, vocab_size=16, d_ff=256, variant='unified')
  x = jax.random.normal(jax.random.key(0), (4, 128, 64))
  wide = x.shape[0] * x.shape[1] * cfg.d_ff * 4  # bytes of one float32 [tokens, d_ff] array

  def scratch_and_grads(depth):
    graphdef, params = nnx.split([MLP(cfg, rngs=nnx.Rngs(i)) for i in range(depth)])

    def loss(params, x):
      for mlp in nnx.merge(graphdef, params):
        x = x + mlp(x, x)
      return jnp.sum(x ** 2)
    return _backward_scratch(loss, params, x), jax.jit(jax.grad(loss))(params, x)

  (late4, _), (late8, grads) = scratch_and_grads(4), scratch_and_grads(8)
  monkeypatch.setattr(layers, 'remat_late',
                      lambda fn, modules, *arrays: nnx.remat(fn)(*modules, *arrays))
  (early4, _), (early8, want) = scratch_and_grads(4), scratch_and_grads(8)
  assert (late8 - late4) / 4 < 4 * wide, (late4, late8)
  assert (late8 - late4) < (early8 - early4), (late4, late8, early4, early8)
  assert 0 < early4 - late4 < early8 - late8, (late4, late8, early4, early8)
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('variant,extra', [('dnp', {}), ('unified', dict(n_kv_heads=2)),
                                           ('dp', {}), ('baseline', dict(qk_norm=True))])
def test_attention_recomputing_qkv_equals_autodiff(variant, extra):
  """With an output side (DP, DNP) or QK-norm the `xla` path keeps the projections
  and the probabilities and recomputes the rotated q, k, v in the backward pass: the
  output and every gradient (params, projections) as autodiff of `attention.attend`
  over `rotated` gives them."""
  cfg = ModelConfig(**SMALL, variant=variant, attention_impl='xla', **extra)
  att = layers.Attention(cfg, rngs=nnx.Rngs(0))
  assert att.recomputes_qkv
  graphdef, params = nnx.split(att)
  keys = iter(jax.random.split(jax.random.key(1), 100))
  params = jax.tree.map(lambda p: p * jax.random.uniform(next(keys), p.shape, minval=0.5,
                                                         maxval=1.5), params)
  n, kv, h = att.n_heads, att.n_kv, att.h
  q, k, v, w = (jax.random.normal(next(keys), (2, 12, width))
                for width in (n * h, kv * h, kv * h, n * h))
  positions = np.arange(12)

  def loss(params, q, k, v, recompute):
    a = nnx.merge(graphdef, params)
    out = (layers._attend_recomputing(a, q, k, v, positions) if recompute else
           LIBRARY_XLA(*a.rotated(q, k, v, positions)))
    return jnp.sum(out.reshape(w.shape) * w)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  value, grads = grad(params, q, k, v, True)
  want_value, want_grads = grad(params, q, k, v, False)
  chex.assert_trees_all_close(value, want_value, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize('variant,extra', [('dnp', {}), ('unified', dict(n_kv_heads=2)),
                                           ('dp', {}), ('baseline', dict(qk_norm=True)),
                                           ('dnp', dict(norm='layer', norm_bias=True)),
                                           ('baseline', {})])
def test_rotated_heads_first_equals_rotated_transposed(variant, extra):
  """`rotated(heads_first=True)` (the output side, the heads moved first, then QK-norm
  and RoPE along L) gives `rotated`'s values with the heads moved first: under DNP (RMS with
  its statistics given, LayerNorm with a bias), DP, grouped-query heads and QK-norm."""
  cfg = ModelConfig(**SMALL, variant=variant, attention_impl='xla', **extra)
  att = layers.Attention(cfg, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 100))
  _, params = nnx.split(att)
  nnx.update(att, jax.tree.map(lambda p: p * jax.random.uniform(next(keys), p.shape,
                                                                minval=0.5, maxval=1.5), params))
  q, k, v = (jax.random.normal(next(keys), (2, 12, width))
             for width in (att.n_heads * att.h, att.n_kv * att.h, att.n_kv * att.h))
  stats = tuple(m.inv_rms(y) for m, y in zip((att.q, att.k, att.v), (q, k, v)))
  positions = np.arange(12)
  want = tuple(attention.swap_heads(x) for x in att.rotated(q, k, v, positions, stats))
  chex.assert_trees_all_close(att.rotated(q, k, v, positions, stats, heads_first=True), want,
                              rtol=1e-6, atol=1e-6)


def test_dnp_attention_keeps_one_copy_of_qkv_for_the_backward(monkeypatch):
  """Four stacked DNP attention blocks need less scratch memory for their backward pass
  when q, k, v are recomputed from the projections than under plain autodiff, which
  keeps the projections (for the norms) and the rotated q, k, v (for attention), and
  less than with the `xla` implementation's own backward pass, which keeps the rotated
  q, k, v once, heads first."""
  cfg = ModelConfig(d_model=64, n_layers=1, n_heads=4, vocab_size=16, variant='dnp',
                    attention_impl='xla', max_seq_len=128)
  graphdef, params = nnx.split([layers.Attention(cfg, rngs=nnx.Rngs(i)) for i in range(4)])
  x = jax.random.normal(jax.random.key(0), (4, 128, 64))

  def loss(params, x):
    for att in nnx.merge(graphdef, params):
      x = x + att(x, x, x, np.arange(128))
    return jnp.sum(x ** 2)

  recomputed = _backward_scratch(loss, params, x)
  monkeypatch.setattr(layers.Attention, 'recomputes_qkv', property(lambda self: False))
  kept_once = _backward_scratch(loss, params, x)
  monkeypatch.setitem(attention.IMPLEMENTATIONS, 'xla', LIBRARY_XLA)
  assert recomputed < kept_once
  assert recomputed < 0.9 * _backward_scratch(loss, params, x)


def _backward_scratch(loss, params, x) -> int:
  """Scratch bytes of the compiled gradient of loss(params, x), by XLA's buffer assignment."""
  return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes


def test_cross_entropy_equals_optax_bit_for_bit_with_its_gradient():
  # The select-and-sum pick of the target logit must give optax's values exactly, so
  # runs before and after the change stay comparable seed by seed.
  import optax
  k1, k2 = jax.random.split(jax.random.key(3))
  logits = 4.0 * jax.random.normal(k1, (2, 33, 97), jnp.float32)
  targets = jax.random.randint(k2, (2, 33), 0, 97)
  ours = jax.jit(jax.value_and_grad(lambda l: cross_entropy(l, targets)))(logits)
  ref = jax.jit(jax.value_and_grad(
      lambda l: optax.softmax_cross_entropy_with_integer_labels(l, targets).mean()))(logits)
  chex.assert_trees_all_equal(ours, ref)
  assert float(ours[0]) > 1.0  # a real loss, not a degenerate zero


def test_token_matmul_flattened_and_batched_forms_agree_with_their_gradients():
  # CPU traces the flattened form, other backends the batched one: same function.
  from scalejax.model.layers import token_matmul
  k1, k2 = jax.random.split(jax.random.key(4))
  x = jax.random.normal(k1, (3, 5, 16), jnp.float32)
  w = jax.random.normal(k2, (16, 24), jnp.float32)
  def run(flatten):
    f = lambda x, w: jnp.sum(jnp.sin(token_matmul(x, w, flatten)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
  flat, batched = run(True), run(False)
  chex.assert_trees_all_close(flat, batched, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(token_matmul(x, w, True), jnp.einsum('bld,df->blf', x, w),
                              rtol=1e-5, atol=1e-5)
  assert token_matmul(x, w).shape == (3, 5, 24)


def test_rope_in_the_compute_dtype_changes_only_bfloat16_models():
  tokens = _tokens()
  f32 = dict(SMALL, n_kv_heads=2)
  # float32 compute: the two settings are the same arithmetic
  chex.assert_trees_all_equal(build_model(ModelConfig(**f32), seed=2)(tokens),
                              build_model(ModelConfig(**f32, rope_dtype='compute'), seed=2)(tokens))
  # bfloat16 compute: the rotation's rounding differs, within bfloat16's precision
  bf16 = dict(f32, dtype='bfloat16')
  ref = build_model(ModelConfig(**bf16), seed=2)(tokens)
  low = build_model(ModelConfig(**bf16, rope_dtype='compute'), seed=2)(tokens)
  assert not np.array_equal(np.asarray(ref), np.asarray(low))
  chex.assert_trees_all_close(low, ref, atol=0.05)
  # the rotation itself: float32 angles, bfloat16 arithmetic, within bfloat16 rounding
  from scalejax.model.layers import rope
  x = jax.random.normal(jax.random.key(1), (2, 9, 3, 8), jnp.float32)
  pos = jnp.arange(9)
  exact = rope(x, pos, 10000.0)
  chex.assert_trees_all_close(rope(x.astype(jnp.bfloat16), pos, 10000.0, jnp.bfloat16)
                              .astype(jnp.float32), exact, rtol=0.02, atol=0.02)
  # a rotation keeps each pair's norm
  chex.assert_trees_all_close(jnp.linalg.norm(exact, axis=-1), jnp.linalg.norm(x, axis=-1),
                              rtol=1e-5)
  # positions known at trace time (NumPy, as the decoder passes them): the same rotation
  chex.assert_trees_all_close(rope(x, np.arange(9), 10000.0), exact, rtol=1e-6, atol=1e-6)


def test_rope_table_is_a_constant_of_the_compiled_step():
  """The decoder's positions are static, so no sin/cos is left for XLA to recompute per
  element of q and k: the optimized forward and backward hold no sine or cosine op."""
  from scalejax.model.layers import rope
  model = build_model(ModelConfig(**SMALL))
  tokens = jnp.zeros((2, 16), jnp.int32)
  graphdef, params = nnx.split(model)
  loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens))
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert ' sine(' not in hlo and ' cosine(' not in hlo
  traced = jax.jit(lambda x, pos: rope(x, pos, 10000.0)).lower(
      jnp.zeros((2, 16, 4, 8)), jnp.arange(16)).compile().as_text()
  assert ' cosine(' in traced  # the check can fail: traced positions keep the op

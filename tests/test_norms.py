"""Scale forms, HG, DP/DNP at init, and float32 statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from scalejax.core import roles
from scalejax.model.layers import Linear
from scalejax.scales.norms import SCALE_FORMS, Norm, NormSpec, rms_scale, rms_stats

from _util import count_eqns

D = 16


def _x(shape=(2, 5, D), seed=0, dtype=jnp.float32):
  return (3.0 * jax.random.normal(jax.random.key(seed), shape) + 0.5).astype(dtype)


def _plain_rms(x, eps=1e-6):
  """The RMS normalization written out, autodiff's gradients: the reference."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class ScaleFormTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(form=list(SCALE_FORMS), storage=['direct', 'delta'],
                         kind=['rms', 'layer'])
  def test_every_form_equals_plain_vector_at_init(self, form, storage, kind):
    x = _x()
    plain = Norm(NormSpec(kind=kind, scale='vector'), D, roles.INPUT_SCALE)
    other = Norm(NormSpec(kind=kind, scale=form, storage=storage), D, roles.INPUT_SCALE)
    chex.assert_trees_all_close(self.variant(lambda x: other(x))(x), plain(x), rtol=1e-6)

  def test_vector_at_one_equals_none(self):
    x = _x()
    none = Norm(NormSpec(scale='none'), D, roles.INPUT_SCALE)
    vec = Norm(NormSpec(scale='vector'), D, roles.INPUT_SCALE)
    chex.assert_trees_all_equal(vec(x), none(x))
    assert not roles.params_of(none)  # `none` has no parameter at all

  def test_forms_compute_their_formula(self):
    spec = NormSpec(scale='magdir_unit')
    norm = Norm(spec, D, roles.INPUT_SCALE)
    alpha = jnp.arange(1.0, D + 1)
    norm.scale.alpha[...] = alpha
    norm.scale.beta[...] = jnp.asarray(0.7)
    want = 0.7 * np.sqrt(D) * alpha / jnp.linalg.norm(alpha)
    chex.assert_trees_all_close(norm.gammas()[0], want, rtol=1e-6)
    md = Norm(NormSpec(scale='magdir'), D, roles.INPUT_SCALE)
    md.scale.alpha[...] = alpha
    md.scale.beta[...] = jnp.asarray(-2.0)
    chex.assert_trees_all_close(md.gammas()[0], -2.0 * alpha)
    delta = Norm(NormSpec(scale='vector', storage='delta'), D, roles.INPUT_SCALE)
    chex.assert_trees_all_equal(delta.scale.gamma[...], jnp.zeros(D))  # stored as delta
    chex.assert_trees_all_equal(delta.gammas()[0], jnp.ones(D))        # gamma = 1 + delta

  def test_rms_and_layer_statistics(self):
    x = _x()
    n = Norm(NormSpec(kind='rms'), D, roles.INPUT_SCALE)(x)
    chex.assert_trees_all_close(jnp.mean(n**2, -1), jnp.ones(x.shape[:-1]), rtol=1e-4)
    ln = Norm(NormSpec(kind='layer'), D, roles.INPUT_SCALE)(x)
    chex.assert_trees_all_close(jnp.mean(ln, -1), jnp.zeros(x.shape[:-1]), atol=1e-5)
    chex.assert_trees_all_close(jnp.var(ln, -1), jnp.ones(x.shape[:-1]), rtol=1e-4)

  def test_unknown_form_lists_valid(self):
    with pytest.raises(ValueError, match='magdir_unit'):
      NormSpec(scale='magdirr')


class BranchTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hg_at_init_equals_shared_vector(self):
    x = _x()
    shared = Norm(NormSpec(), D, roles.INPUT_SCALE)
    hg = Norm(NormSpec(), D, roles.INPUT_SCALE, branches=('q', 'k', 'v'))
    outs = self.variant(lambda x: hg(x))(x)
    assert len(outs) == 3
    for out in outs:
      chex.assert_trees_all_close(out, shared(x))

  def test_hg_branches_are_independent(self):
    x = _x()
    hg = Norm(NormSpec(), D, roles.INPUT_SCALE, branches=('gate', 'up'))
    hg.up.gamma[...] = 2.0 * jnp.ones(D)
    g, u = hg(x)
    chex.assert_trees_all_close(u, 2.0 * g)

  def test_statistics_computed_once(self):
    """HG adds multiplies, not reductions: one mean-of-squares per call."""
    hg = Norm(NormSpec(), D, roles.INPUT_SCALE, branches=('q', 'k', 'v'))
    jaxpr = jax.make_jaxpr(lambda x: hg(x))(_x())
    assert count_eqns(jaxpr, lambda eqn: eqn.primitive.name == 'reduce_sum') == 1


class DualTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_dp_at_init_is_plain_linear(self):
    x = _x()
    plain = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1))
    dp = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1), dual='dp', norm=NormSpec())
    chex.assert_trees_all_close(self.variant(lambda x: dp(x))(x), plain(x))

  @chex.variants(with_jit=True, without_jit=True)
  def test_dnp_at_init_is_normalized_linear(self):
    x = _x()
    plain = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1))
    dnp = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1), dual='dnp', norm=NormSpec())
    want = _plain_rms(plain(x))
    chex.assert_trees_all_close(self.variant(lambda x: dnp(x))(x), want, rtol=1e-5)

  def test_dp_output_scale_multiplies(self):
    x = _x()
    plain = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1))
    dp = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1), dual='dp', norm=NormSpec())
    u = jnp.linspace(0.5, 2.0, 8)
    dp.post.gamma[...] = u
    chex.assert_trees_all_close(dp(x), plain(x) * u, rtol=1e-6)
    # Standalone, the output side's role is the caller's to give; in the decoder the
    # wiring gives it (u on q/k/gate: output, on v/up: input).
    assert dp.post.gamma.get_metadata()['role'] == roles.UNLABELLED
    with pytest.raises(ValueError, match='have no role'):
      roles.role_tree(dp)
    given = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(1), dual='dnp', norm=NormSpec(),
                   post_role=roles.OUTPUT_SCALE)
    assert set(jax.tree.leaves(roles.role_tree(given))) == {roles.MATRIX, roles.OUTPUT_SCALE}


class PrecisionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_float16_large_activations_do_not_overflow(self):
    # 1000^2 overflows float16 (max 65504); the float32 reduction must not.
    x32 = _x() * 400.0
    x16 = x32.astype(jnp.float16)
    norm = Norm(NormSpec(), D, roles.INPUT_SCALE)
    out = self.variant(lambda x: norm(x))(x16)
    assert out.dtype == jnp.float16
    assert bool(jnp.all(jnp.isfinite(out)))
    chex.assert_trees_all_close(out.astype(jnp.float32), norm(x16.astype(jnp.float32)),
                                rtol=2e-3, atol=2e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_matches_float32_reference(self):
    x = _x(shape=(4, 7, 256)) * 1e4
    norm = Norm(NormSpec(kind='layer'), 256, roles.INPUT_SCALE)
    out = self.variant(lambda x: norm(x))(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(jnp.float32),
                                norm(x.astype(jnp.bfloat16).astype(jnp.float32)),
                                rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_scale_custom_gradient_equals_autodiff(dtype, tol):
  """The memory-lean backward of `rms_scale` is the gradient of the plain composition."""
  x = _x((3, 7, D), dtype=dtype)
  gamma = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (D,))
  cot = jax.random.normal(jax.random.key(2), x.shape).astype(dtype)
  reference = lambda x, g: (_plain_rms(x.astype(jnp.float32)) * g).astype(x.dtype)
  lean = lambda x, g: rms_scale(x, g, 1e-6)
  out_ref, vjp_ref = jax.vjp(reference, x, gamma)
  out, vjp = jax.vjp(lean, x, gamma)
  chex.assert_trees_all_close(out, out_ref, rtol=tol, atol=tol)
  assert out.dtype == dtype
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), rtol=tol, atol=tol)
  # second order passes through (jvp of the custom backward is not needed by training,
  # but a norm used inside jax.hessian-based analyses should not silently break)
  assert jnp.isfinite(jax.grad(lambda g: jnp.sum(lean(x, g).astype(jnp.float32)**2))(gamma)).all()


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_rms_scale_gradient_of_gamma_on_each_backend_path(platform, monkeypatch):
  """The sums of the backward pass are matrix-vector products on CPU and fused sums
  elsewhere: both are the gradient of the plain composition, d(x) and d(gamma)."""
  from scalejax.core import sharding
  monkeypatch.setattr(sharding, 'platform', lambda: platform)
  x = _x((3, 7, D))
  gamma = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (D,))
  cot = jax.random.normal(jax.random.key(2), x.shape)
  reference = lambda x, g: _plain_rms(x) * g
  want = jax.vjp(reference, x, gamma)[1](cot)
  got = jax.vjp(lambda x, g: rms_scale(x, g, 1e-6), x, gamma)[1](cot)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # the statistics alone (the folding path: a norm whose scale goes into the next kernel)
  want, vjp_want = jax.vjp(_plain_rms, x)
  got, vjp_got = jax.vjp(lambda x: rms_stats(x, 1e-6), x)
  chex.assert_trees_all_close((got, vjp_got(cot)), (want, vjp_want(cot)), rtol=1e-5, atol=1e-5)


def test_norm_saves_no_normalized_copy_for_its_backward():
  """Residuals of a single-branch RMS norm: x and 1/rms, not also the normalized x."""
  x = _x((4, 64, D))
  norm = Norm(NormSpec(), D, roles.INPUT_SCALE)
  graphdef, params = nnx.split(norm)
  reference = lambda p, x: (_plain_rms(x) * nnx.merge(graphdef, p).gammas()[0])

  def full_size_residuals(f):
    _, vjp = jax.vjp(f, params, x)  # the vjp closure holds the residuals as its leaves
    return sum(leaf.shape == x.shape for leaf in jax.tree.leaves(vjp))
  assert full_size_residuals(lambda p, x: nnx.merge(graphdef, p)(x)) == 1   # x itself
  assert full_size_residuals(reference) >= 2  # autodiff also keeps x / rms(x)

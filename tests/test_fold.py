"""Folding input scales into linear kernels (norms.Scaled) computes the same function
and gradients as multiplying the activations first."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from scalejax.model import decoder as model_lib
from scalejax.core import roles
from scalejax.model.layers import Linear
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model, cross_entropy
from scalejax.scales.norms import Norm, NormSpec, Scaled

from _util import randomize_scales

D = 16




@pytest.mark.parametrize('form,dual', [('vector', 'none'), ('none', 'dp'), ('magdir', 'dp'),
                                       ('magdir_unit', 'dnp')])
def test_linear_of_scaled_equals_linear_of_product(form, dual):
  spec = NormSpec(scale=form)
  norm = Norm(spec, D, roles.INPUT_SCALE, branches=('q', 'k'))
  lin = Linear(D, 8, ('embed', 'mlp'), rngs=nnx.Rngs(2), dual=dual, norm=spec)
  randomize_scales(norm)
  randomize_scales(lin, seed=2)
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, D)) + 0.5
  for lazy, eager in zip(norm.scaled(x), norm(x)):
    assert isinstance(lazy, Scaled) and lazy.shape == eager.shape
    chex.assert_trees_all_close(lazy.value(), eager)
    chex.assert_trees_all_close(lin(lazy), lin(eager), rtol=1e-5, atol=1e-6)


def test_norm_with_bias_is_not_folded():
  norm = Norm(NormSpec(bias=True), D, roles.INPUT_SCALE)
  x = jax.random.normal(jax.random.key(0), (3, D))
  chex.assert_trees_all_equal(norm.scaled(x), norm(x))


def test_decoder_loss_and_grads_match_unfolded(monkeypatch):
  """unified: HG branches, DNP, magdir scales all go through the folded path."""
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                    variant='unified')
  model = build_model(cfg, seed=3)
  randomize_scales(model)
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)

  def loss(params):
    return cross_entropy(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])

  folded = jax.jit(jax.value_and_grad(loss))(params)
  # the same model with every norm output multiplied before the linear maps
  monkeypatch.setattr(model_lib, 'feed', lambda norm, x, module, k:
                      model_lib._branches(norm(x), k))
  eager = jax.jit(jax.value_and_grad(loss))(params)
  chex.assert_trees_all_close(folded, eager, rtol=1e-4, atol=1e-6)

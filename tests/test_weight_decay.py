"""Role-aware weight decay: exactly the roles with a non-zero rate shrink."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalejax.core import roles as R
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.scales.weight_decay import (NORM_DECAY_POLICIES, decay_rates, decay_table, role_weight_decay)

LR, WD = 0.5, 0.1
DIRECTIONS = {
    'adamw': lambda: optax.scale_by_adam(),
    'lion': lambda: optax.scale_by_lion(),
    'sgd': lambda: optax.trace(decay=0.9),
}


def _model():
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, variant='unified',
                    placement='sandwich', qk_norm=True, norm='layer', norm_bias=True)
  m = build_model(cfg)
  return R.params_of(m), R.role_tree(m)


class WeightDecayTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradient_step_decays_exactly_the_chosen_roles(self):
    params, roles = _model()
    params = jax.tree.map(lambda p: p + 0.25, params)  # avoid all-zero params (biases)
    for policy in NORM_DECAY_POLICIES:
      rates = decay_rates(policy, WD, other=0.0)
      for name, direction in DIRECTIONS.items():
        tx = optax.chain(direction(), role_weight_decay(rates, roles),
                         optax.scale_by_learning_rate(LR))
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = self.variant(tx.update)(zeros, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        for p, n, role in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                              jax.tree.leaves(roles)):
          rate = rates[role]
          if rate:
            want = np.asarray(p) - np.float32(LR) * (np.float32(rate) * np.asarray(p))
            np.testing.assert_allclose(n, want, rtol=1e-6, err_msg=f'{policy}/{name}/{role}')
          else:
            np.testing.assert_array_equal(n, p, err_msg=f'{policy}/{name}/{role}')

  def test_policies(self):
    assert decay_rates('iwd', WD)[R.INPUT_SCALE] == WD
    assert decay_rates('iwd', WD)[R.OUTPUT_SCALE] == 0.0
    assert decay_rates('all', WD)[R.OUTPUT_SCALE] == WD
    assert decay_rates('none', WD)[R.INPUT_SCALE] == 0.0
    assert decay_rates('none', WD, embedding=0.0)[R.EMBEDDING] == 0.0
    assert decay_rates('iwd', WD, scale=0.3)[R.INPUT_SCALE] == 0.3
    with pytest.raises(ValueError, match='iwd'):
      decay_rates('some', WD)

  def test_decay_table_counts(self):
    params, roles = _model()
    table = decay_table(params, roles, decay_rates('iwd', WD))
    lines = {l.split()[0]: l.split()[1:] for l in table.splitlines()[1:]}
    assert lines['matrix'][0] == '8'          # q k v o gate up down head
    assert lines['embedding'] == ['1', '512', '0.1']
    assert lines['output_scale'][-1] == '0'
    assert float(lines['input_scale'][-1]) == WD


def _unified(variant='unified'):
  m = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, variant=variant))
  params = jax.tree.map(lambda p: p + 0.25, R.params_of(m))
  return m, params, R.role_tree(m), R.part_tree(m)


@pytest.mark.parametrize('mode,decays', [('both', {'magnitude', 'direction'}),
                                         ('direction', {'direction'}),
                                         ('magnitude', {'magnitude'})])
def test_magdir_decay_chooses_which_part_of_gamma_decays(mode, decays):
  """gamma = beta * alpha: decaying both parts shrinks gamma twice as fast as one."""
  _, params, roles, parts = _unified()
  tx = role_weight_decay(decay_rates('all', WD), roles, parts, mode)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for u, p, r, part in zip(*map(jax.tree.leaves, (updates, params, roles, parts))):
    decayed = r in (R.MATRIX, R.EMBEDDING) or (r in R.SCALE_ROLES and part in decays)
    want = WD * p if decayed else 0 * p
    np.testing.assert_allclose(u, want, rtol=1e-6)
  assert {part for part in jax.tree.leaves(parts)} == {'magnitude', 'direction', ''}
  with pytest.raises(ValueError, match='magdir_decay'):
    role_weight_decay(decay_rates('all', WD), roles, parts, 'alpha')


def test_frozen_magnitudes_stay_at_their_init_under_the_whole_optimizer():
  from scalejax.train import optim
  model, params, roles, parts = _unified('unified_frozen')
  frozen = R.frozen_tree(model)
  assert sum(jax.tree.leaves(frozen)) == 5  # beta of attn_norm/{q,k,v}, mlp_norm/{gate,up}
  tx, _, _ = optim.build_optimizer(optim.default_config(), roles, R.axes_tree(model), 10,
                                   'iwd', parts=parts, frozen=frozen)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for u, f in zip(jax.tree.leaves(updates), jax.tree.leaves(frozen)):
    assert bool(jnp.all(u == 0)) == f

"""Optimizers and learning-rate schedules, chosen by name from small registries.

Every optimizer is built as Optax's canonical decomposition

    clip -> direction (adam / lion / sgd / adafactor / muon) -> role weight decay
         -> scale-vector LR multiplier -> -lr(step)

so swapping optimizers never changes how weight decay treats each role.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scalejax.core import reductions
from scalejax.core import roles as R
from scalejax.scales.weight_decay import decay_rates, role_weight_decay


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw',           # key of OPTIMIZERS
      lr=1e-3,
      schedule='cosine',      # key of SCHEDULES
      warmup_steps=100,
      min_lr_ratio=0.1,       # final lr = lr * min_lr_ratio (cosine, linear, wsd)
      decay_fraction=0.2,     # wsd: fraction of all train steps spent decaying
      weight_decay=0.1,       # matrices (and embeddings unless embedding_decay >= 0)
      embedding_decay=-1.0,   # < 0: same as weight_decay
      norm_decay='variant',   # 'all' | 'none' | 'iwd' | 'variant' (the variant's default)
      scale_decay=-1.0,       # rate for decayed scale roles; < 0: same as weight_decay
      magdir_decay='both',    # parts of magdir scales decayed: 'both' | 'direction' | 'magnitude'
      scale_lr_mult=1.0,      # LR multiplier for every scale-vector param (study knob)
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.9,           # sgd
      muon_beta=0.95,
      grad_clip=1.0,          # global-norm clip; 0 disables
  ))


# --- schedules --------------------------------------------------------------------

# Each entry maps (config, n steps after warmup, total steps) to the post-warmup
# schedule, which starts at opt_cfg.lr; `make_schedule` puts the linear warmup 0 -> lr in front.

def _wsd(opt_cfg, n, total):
  # The decay length is a fraction of the whole run (as in Hagele et al. 2024), taken
  # out of the post-warmup steps; the stable phase holds the peak LR until then.
  decay = min(max(int(round(total * opt_cfg.decay_fraction)), 1), n)
  stable = n - decay
  return optax.join_schedules(
      [optax.constant_schedule(opt_cfg.lr),
       optax.linear_schedule(opt_cfg.lr, opt_cfg.lr * opt_cfg.min_lr_ratio, decay)], [stable])


SCHEDULES: dict[str, Callable] = {
    'cosine': lambda opt_cfg, n, total: optax.cosine_decay_schedule(
        opt_cfg.lr, n, alpha=opt_cfg.min_lr_ratio),
    'linear': lambda opt_cfg, n, total: optax.linear_schedule(
        opt_cfg.lr, opt_cfg.lr * opt_cfg.min_lr_ratio, n),
    'constant': lambda opt_cfg, n, total: optax.constant_schedule(opt_cfg.lr),
    'wsd': _wsd,
    # lr / sqrt(1 + s / warmup): continuous at the end of warmup, no end point needed.
    'rsqrt': lambda opt_cfg, n, total: (
        lambda s: opt_cfg.lr * jax.lax.rsqrt(1.0 + s / max(opt_cfg.warmup_steps, 1))),
}


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  if opt_cfg.schedule not in SCHEDULES:
    raise ValueError(f'unknown optimizer.schedule {opt_cfg.schedule!r}; '
                     f'valid: {", ".join(SCHEDULES)}')
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  after = SCHEDULES[opt_cfg.schedule](opt_cfg, max(total_steps - warmup, 1), total_steps)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, warmup), after], [warmup])


def decay_budget(opt_cfg, total_steps: int, rate: float) -> float:
  """prod_t (1 - lr_t * rate): the factor decay alone shrinks a param by over a run.

  The decay is decoupled and scaled by the schedule (`build_optimizer` chains it before
  the -lr(step) scaling), so this is what a decay rate means for a run of this length;
  `rate` includes any LR multiplier the param gets (`scale_lr_mult` for scales).
  """
  lrs = np.asarray(jax.vmap(make_schedule(opt_cfg, total_steps))(jnp.arange(total_steps)),
                   np.float64)
  return float(np.prod(1.0 - lrs * rate))


# --- optimizer directions ---------------------------------------------------------

def muon_labels(roles, axes):
  """'muon' for hidden matrices (role `matrix`, no `vocab` axis), else 'adam'."""
  return jax.tree.map(lambda r, ax: 'muon' if r == R.MATRIX and 'vocab' not in ax else 'adam',
                      roles, axes, is_leaf=lambda x: isinstance(x, tuple))


def _muon(opt_cfg, roles, axes):
  """Muon on hidden matrices; scales, embeddings, the LM head and biases go to Adam.

  The split comes from param metadata (role `matrix`, no `vocab` axis). Our linear
  kernels keep (input, output) as their last two axes; leading ones (`layers`) are
  batch axes for the orthogonalization. Muon's update is rescaled to Adam's RMS
  (0.2 * sqrt(max(fan_in, fan_out)), as in Liu et al. 2025) so one LR serves both.
  """
  labels = muon_labels(roles, axes)

  def dims(updates):
    return jax.tree.map(
        lambda u: optax.contrib.MuonDimensionNumbers(u.ndim - 2, u.ndim - 1), updates)

  match_adam_rms = optax.stateless(lambda u, p: jax.tree.map(
      lambda x: x * (0.2 * max(x.shape[-2:]) ** 0.5), u))
  muon = optax.chain(
      optax.contrib.scale_by_muon(beta=opt_cfg.muon_beta, weight_dimension_numbers=dims),
      match_adam_rms)
  adam = optax.scale_by_adam(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps)
  return optax.multi_transform({'muon': muon, 'adam': adam},
                               labels)


OPTIMIZERS: dict[str, Callable] = {
    'adamw': lambda opt_cfg, roles, axes: optax.scale_by_adam(opt_cfg.b1, opt_cfg.b2, opt_cfg.eps),
    'lion': lambda opt_cfg, roles, axes: optax.scale_by_lion(opt_cfg.b1, opt_cfg.b2),
    'sgd': lambda opt_cfg, roles, axes: optax.trace(decay=opt_cfg.momentum),
    'adafactor': lambda opt_cfg, roles, axes: optax.scale_by_factored_rms(),
    'muon': _muon,
}


def resolve_norm_decay(opt_cfg, variant_default: str) -> str:
  return variant_default if opt_cfg.norm_decay == 'variant' else opt_cfg.norm_decay


def role_rates(opt_cfg, variant_default: str) -> dict[str, float]:
  return decay_rates(
      resolve_norm_decay(opt_cfg, variant_default), opt_cfg.weight_decay,
      embedding=None if opt_cfg.embedding_decay < 0 else opt_cfg.embedding_decay,
      scale=None if opt_cfg.scale_decay < 0 else opt_cfg.scale_decay)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm, with the norm summed by `reductions.global_norm`: the
  form XLA:CPU runs fast, and the same computation as the step's `grad_norm` metric and
  its non-finite test (nonfinite.py), which XLA then computes once."""
  def update(updates, state, params=None):
    del params
    norm = reductions.global_norm(updates)
    # One scalar factor (1 when the norm is within max_norm): the gradients are only
    # multiplied, which XLA fuses into the optimizer's own passes over them. A select
    # between t and t / norm * max_norm (optax's form) wrote the clipped copy out, and
    # the passes after it read both.
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(opt_cfg, roles, axes, total_steps: int, variant_default: str = 'none', *,
                    parts=None, frozen=None):
  """Returns (optax transformation, schedule, per-role decay rates).

  `parts` and `frozen` are the trees `roles.part_tree` / `roles.frozen_tree` read off
  the model: which part of a scale form each param is (for `magdir_decay`), and which
  params stay at their init (a variant's frozen function-neutral magnitudes).
  """
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer.name {opt_cfg.name!r}; valid: {", ".join(OPTIMIZERS)}')
  schedule = make_schedule(opt_cfg, total_steps)
  rates = role_rates(opt_cfg, variant_default)
  chain = []
  if opt_cfg.grad_clip > 0:
    chain.append(clip_by_global_norm(opt_cfg.grad_clip))
  chain.append(OPTIMIZERS[opt_cfg.name](opt_cfg, roles, axes))
  if any(rates.values()):  # an all-zero policy has nothing to chain
    chain.append(role_weight_decay(rates, roles, parts, opt_cfg.magdir_decay))
  if opt_cfg.scale_lr_mult != 1.0:
    is_scale = jax.tree.map(lambda r: r in R.SCALE_ROLES, roles)
    chain.append(optax.masked(optax.scale(opt_cfg.scale_lr_mult), is_scale))
  chain.append(optax.scale_by_learning_rate(schedule))
  if frozen is not None and any(jax.tree.leaves(frozen)):
    chain.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*chain), schedule, rates

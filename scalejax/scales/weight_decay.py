"""Role-aware decoupled weight decay as an Optax transformation.

`role_weight_decay(rates, roles)` adds `rate[role] * param` to the updates, where
`roles` is the tree of role labels read from the model's params (see roles.py). Chain
it exactly where `optax.add_decayed_weights` would go, before the learning-rate scale:

    optax.chain(optax.scale_by_adam(), role_weight_decay(rates, roles),
                optax.scale_by_learning_rate(lr))
"""

from __future__ import annotations

from typing import Mapping

import jax
import optax

from scalejax.core import roles as R

# Which scale roles each policy decays (the matrix/embedding/other rates are separate).
NORM_DECAY_POLICIES: dict[str, tuple[str, ...]] = {
    'all': (R.INPUT_SCALE, R.OUTPUT_SCALE),
    'none': (),
    'iwd': (R.INPUT_SCALE,),  # the paper's rule: decay Input-Norm scales only
}


# optimizer.magdir_decay -> the parts of a two-part scale form (magdir's beta, alpha; see
# norms.py) that decayed scale roles leave undecayed. gamma = beta * alpha, so decaying
# both shrinks gamma by (1 - lr wd)^2 a step, twice the vector form's rate; either part
# alone gives the vector form's rate.
MAGDIR_DECAY: dict[str, tuple[str, ...]] = {
    'both': (),
    'direction': ('magnitude',),  # alpha only
    'magnitude': ('direction',),  # beta only
}


def undecayed_parts(magdir_decay: str) -> tuple[str, ...]:
  """The parts `optimizer.magdir_decay` leaves undecayed; an unknown value is an error."""
  if magdir_decay not in MAGDIR_DECAY:
    raise ValueError(f'unknown optimizer.magdir_decay {magdir_decay!r}; valid: '
                     f'{", ".join(MAGDIR_DECAY)}')
  return MAGDIR_DECAY[magdir_decay]


def decay_rates(policy: str, weight_decay: float, *, embedding: float | None = None,
                other: float = 0.0, scale: float | None = None) -> dict[str, float]:
  """Per-role decay rates for a named scale policy.

  `scale` is the rate applied to the scale roles the policy decays (default: the
  matrix rate); `embedding` defaults to the matrix rate.
  """
  if policy not in NORM_DECAY_POLICIES:
    raise ValueError(f'unknown optimizer.norm_decay {policy!r}; valid: '
                     f'{", ".join(NORM_DECAY_POLICIES)}')
  scale = weight_decay if scale is None else scale
  rates = {R.MATRIX: weight_decay,
           R.EMBEDDING: weight_decay if embedding is None else embedding,
           R.OTHER: other, R.INPUT_SCALE: 0.0, R.OUTPUT_SCALE: 0.0}
  for role in NORM_DECAY_POLICIES[policy]:
    rates[role] = scale
  return rates


def role_weight_decay(rates: Mapping[str, float], roles, parts=None,
                      magdir_decay: str = 'both') -> optax.GradientTransformation:
  """Decoupled weight decay with one rate per role; roles with rate 0 are untouched.

  `parts` (the tree `roles.part_tree` reads) and `magdir_decay` (a key of
  `MAGDIR_DECAY`) leave one part of a two-part scale form undecayed.
  """
  unknown = set(rates) - set(R.ROLES)
  if unknown:
    raise ValueError(f'unknown roles in decay rates: {sorted(unknown)}; valid: {R.ROLES}')
  skip = undecayed_parts(magdir_decay)
  if skip and parts is None:
    raise ValueError(f'optimizer.magdir_decay={magdir_decay!r} needs the params\' parts')
  parts = jax.tree.map(lambda r: '', roles) if parts is None else parts
  parts = [optax.masked(optax.add_decayed_weights(rate),
                        jax.tree.map(lambda r, p, role=role: r == role and p not in skip,
                                     roles, parts))
           for role, rate in rates.items() if rate]
  return optax.chain(*parts) if parts else optax.identity()


def decay_table(params, roles, rates: Mapping[str, float]) -> str:
  """A text table: role, tensors, params, decay rate (logged at the start of training)."""
  summary = R.role_summary(params, roles)
  lines = [f'{"role":<14}{"tensors":>9}{"params":>14}{"decay":>10}']
  for role in R.ROLES:
    n, size = summary[role]
    lines.append(f'{role:<14}{n:>9}{size:>14,}{rates.get(role, 0.0):>10.4g}')
  return '\n'.join(lines)

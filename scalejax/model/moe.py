"""Mixture-of-experts MLP: a router, top-k of N SwiGLU experts, an optional shared expert.

Token dispatch drops by capacity (GShard / Switch style), it is not dropless. Why:
every shape is static, so the layer is a few einsums that GSPMD shards over the
`expert` mesh axis (an all-to-all appears where the dispatch buffer changes from
batch- to expert-sharded) with no custom collectives, the same code compiles for
CPU, GPU and TPU topologies ahead of time, and which tokens are dropped does not
depend on how the batch is split over devices (routing groups are fixed runs of
`moe_group_size` tokens, a sequence by default). Dropless routing needs ragged matmuls
plus a shard_map'd all-to-all, which is more code to get right on every backend
(`jax.lax.ragged_dot` does not vmap over routing groups with shared expert weights).
Filling the buffers by index (gathers, then a gather back) instead of the one-hot
einsums was measured in the v5p AOT estimate of `paper_moe_500m`: 12 % fewer FLOPs but
16 % more HBM bytes, on a step that is HBM-bound (docs/PERFORMANCE.md), so the einsums
stay. Capacity per expert and routing
group is ceil(capacity_factor * group * k / N), capped at the group size; with
`moe_capacity_factor >= moe_experts / moe_top_k` nothing can be dropped (dropless at
the cost of padded compute), and the dropped fraction is logged as `moe_drop_frac`.

Routing: softmax over the N router logits (float32), top-k, the k weights renormalized
to sum to 1 (equal to Mixtral's softmax over the top-k logits). Slots in an expert's
buffer go first to every token's first choice, then to second choices, and so on,
in token order within a group.

Each expert is `layers.MLP`, created N times with `nnx.vmap`, so kernels are role
`matrix` with logical axes ('expert', 'embed', 'mlp') (then 'layers' in front) and the
last two axes stay (in, out) for Muon; DP/DNP wrap each expert's gate/up maps exactly
as in the dense MLP. Under HG the router reads its own scale vector of the pre-MLP norm
(it is a third linear map fed by that norm), hence `BRANCHES`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scalejax.core import sharding
from scalejax.model.config import ModelConfig
from scalejax.model.layers import MLP, Linear

AUX_KEYS = ('moe_lb_loss', 'moe_z_loss', 'moe_drop_frac')


class MoE(nnx.Module):
  BRANCHES = ('gate', 'up', 'router')  # the maps the input norm feeds, in call order

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, n = config.d_model, config.moe_experts
    self.n_experts, self.top_k = n, config.moe_top_k
    self.capacity_factor, self.group_size = config.moe_capacity_factor, config.moe_group_size
    # The router's output axis is not sharded: N is small and top-k needs all of it.
    self.router = Linear(d, n, ('embed', None), rngs=rngs, std=config.init_std)
    expert_cfg = dataclasses.replace(config, d_ff=config.resolved_moe_expert_ff)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'expert'})
    def make_experts(rngs):
      return MLP(expert_cfg, rngs=rngs)

    self.experts = make_experts(rngs)
    self.shared = (MLP(dataclasses.replace(config, d_ff=config.moe_shared_ff), rngs=rngs)
                   if config.moe_shared_ff else None)

  def capacity(self, group: int) -> int:
    return min(group, math.ceil(self.capacity_factor * group * self.top_k / self.n_experts))

  def route(self, xr_GxSxD: jax.Array):
    """Returns (dispatch, combine) [G, S, N, C] and the auxiliary statistics."""
    g, s, _ = xr_GxSxD.shape
    n, k, c = self.n_experts, self.top_k, self.capacity(s)
    logits_GxSxN = self.router(xr_GxSxD.astype(jnp.float32))
    probs_GxSxN = jax.nn.softmax(logits_GxSxN, axis=-1)
    w_GxSxK, idx_GxSxK = jax.lax.top_k(probs_GxSxN, k)
    w_GxSxK = w_GxSxK / jnp.sum(w_GxSxK, axis=-1, keepdims=True)
    choice_GxSxKxN = jax.nn.one_hot(idx_GxSxK, n, dtype=jnp.int32)
    # Buffer position of each (token, choice) in its expert: choice-major, then token order.
    order_GxKSxN = choice_GxSxKxN.transpose(0, 2, 1, 3).reshape(g, k * s, n)
    pos_GxSxKxN = (jnp.cumsum(order_GxKSxN, axis=1) - 1).reshape(g, k, s, n).transpose(0, 2, 1, 3)
    chosen_GxSxN = jnp.sum(choice_GxSxKxN, axis=2)  # 0/1: a token picks an expert once
    pos_GxSxN = jnp.sum(pos_GxSxKxN * choice_GxSxKxN, axis=2)
    kept_GxSxN = chosen_GxSxN * (pos_GxSxN < c)
    weight_GxSxN = jnp.sum(w_GxSxK[..., None] * choice_GxSxKxN, axis=2) * kept_GxSxN
    slot_GxSxNxC = jax.nn.one_hot(pos_GxSxN, c, dtype=jnp.float32) * kept_GxSxN[..., None]
    combine_GxSxNxC = slot_GxSxNxC * weight_GxSxN[..., None]

    # Switch load balance, generalised to top-k: N * sum_e (share of assignments to e)
    # * (mean router prob of e); 1 when both are uniform.
    assigned_N = jnp.mean(chosen_GxSxN.astype(jnp.float32), axis=(0, 1)) / k
    lb = n * jnp.sum(assigned_N * jnp.mean(probs_GxSxN, axis=(0, 1)))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxSxN, axis=-1)))
    drop = (g * s * k - jnp.sum(kept_GxSxN)) / (g * s * k)  # integer count: exact 0 when none
    aux = dict(zip(AUX_KEYS, (lb, z, drop)))
    return slot_GxSxNxC, combine_GxSxNxC, aux

  def __call__(self, xg_BxLxD, xu_BxLxD, xr_BxLxD):
    """Returns (y [B, L, D], aux statistics); x_g, x_u, x_r differ only under HG."""
    b, l, d = xg_BxLxD.shape
    s = self.group_size or l
    if (b * l) % s:
      raise ValueError(f'model.moe_group_size={s} must divide the {b * l} tokens of a batch '
                       f'({b} x {l}); pick a divisor of the sequence length')
    g, dtype = b * l // s, xg_BxLxD.dtype
    groups = lambda x: x.reshape(g, s, d)
    dispatch_GxSxNxC, combine_GxSxNxC, aux = self.route(groups(xr_BxLxD))
    dispatch_GxSxNxC = dispatch_GxSxNxC.astype(dtype)

    def to_experts(x_BxLxD):
      x_NxGxCxD = jnp.einsum('gsnc,gsd->ngcd', dispatch_GxSxNxC, groups(x_BxLxD))
      return sharding.constrain(x_NxGxCxD, ('act_expert', 'act_batch', None, 'act_embed'))

    graphdef, state = nnx.split(self.experts)
    run = jax.vmap(lambda st, xg, xu: nnx.merge(graphdef, st)(xg, xu))
    out_NxGxCxD = run(state, to_experts(xg_BxLxD), to_experts(xu_BxLxD))
    out_NxGxCxD = sharding.constrain(out_NxGxCxD, ('act_expert', 'act_batch', None, 'act_embed'))
    y_GxSxD = jnp.einsum('gsnc,ngcd->gsd', combine_GxSxNxC.astype(dtype), out_NxGxCxD)
    y_BxLxD = y_GxSxD.reshape(b, l, d)
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(xg_BxLxD, xu_BxLxD)
    return y_BxLxD, aux


def aux_loss(config: ModelConfig, aux: dict) -> jax.Array | float:
  """The weighted auxiliary losses added to the training loss (0 for a dense model)."""
  if not aux:
    return 0.0
  return config.moe_lb_weight * aux['moe_lb_loss'] + config.moe_z_weight * aux['moe_z_loss']


# model.mlp -> the module a block holds; its BRANCHES name the linear maps its pre-norm
# feeds (one HG branch each). What feeds what is described in model/wiring.py.
MLP_MODULES = {'dense': MLP, 'moe': MoE}

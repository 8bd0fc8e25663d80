"""Mixture-of-experts MLP: a router, top-k of N SwiGLU experts, an optional shared expert.

Two dispatches (`model.moe_dispatch`), the same routing and the same experts:

`capacity` (default): drops by capacity (GShard / Switch style). Every shape is static,
so the layer is a few einsums that GSPMD shards over the `expert` mesh axis (an
all-to-all appears where the dispatch buffer changes from batch- to expert-sharded)
with no custom collectives, and which tokens are dropped does not depend on how the
batch is split over devices (routing groups are fixed runs of `moe_group_size` tokens,
a sequence by default). Capacity per expert and routing group is
ceil(capacity_factor * group * k / N), capped at the group size; with
`moe_capacity_factor >= moe_experts / moe_top_k` nothing can be dropped (at the cost
of padded compute), and the dropped fraction is logged as `moe_drop_frac`. Filling
the buffers by index (gathers, then a gather back) instead of the one-hot einsums was
measured in the v5p AOT estimate of `paper_moe_500m`: 12 % fewer FLOPs but 16 % more
HBM bytes, on a step that is HBM-bound (docs/PERFORMANCE.md).

`grouped`: dropless. Each device sorts its own (token, choice) rows by expert and runs
the experts as three grouped matmuls over them (`grouped_matmul`: Megablox on TPU,
`jax.lax.ragged_dot` elsewhere), inside a `shard_map` over the batch with every
expert's weights on every device (gathered as FSDP gathers any layer's), so no
collective runs inside the layer; hence it needs `mesh.expert=1`. No padding, nothing
dropped, no [tokens, N, capacity] one-hots.

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
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from scalejax.core import sharding
from scalejax.model.config import ModelConfig
from scalejax.model.layers import MLP, Linear, remat_late

AUX_KEYS = ('moe_lb_loss', 'moe_z_loss', 'moe_drop_frac')
GROUPED_KERNELS = {'tpu': 'megablox'}  # platform -> grouped_matmul's kernel; others: ragged_dot


class MoE(nnx.Module):
  BRANCHES = ('gate', 'up', 'router')  # the maps the input norm feeds, in call order

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, n = config.d_model, config.moe_experts
    self.n_experts, self.top_k = n, config.moe_top_k
    self.capacity_factor, self.group_size = config.moe_capacity_factor, config.moe_group_size
    self.dispatch = config.moe_dispatch
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

  def choose(self, xr_GxSxD: jax.Array):
    """Router logits and probabilities [G, S, N], and each token's top-k experts with
    their weights (renormalized to sum to 1) [G, S, K]."""
    logits_GxSxN = self.router(xr_GxSxD.astype(jnp.float32))
    probs_GxSxN = jax.nn.softmax(logits_GxSxN, axis=-1)
    w_GxSxK, idx_GxSxK = jax.lax.top_k(probs_GxSxN, self.top_k)
    w_GxSxK = w_GxSxK / jnp.sum(w_GxSxK, axis=-1, keepdims=True)
    return logits_GxSxN, probs_GxSxN, w_GxSxK, idx_GxSxK

  def aux(self, logits_GxSxN, probs_GxSxN, chosen_GxSxN, kept: jax.Array | int):
    """The auxiliary statistics from the routing and the number of kept assignments."""
    g, s, n = probs_GxSxN.shape
    k = self.top_k
    # Switch load balance, generalised to top-k: N * sum_e (share of assignments to e)
    # * (mean router prob of e); 1 when both are uniform.
    assigned_N = jnp.mean(chosen_GxSxN.astype(jnp.float32), axis=(0, 1)) / k
    lb = n * jnp.sum(assigned_N * jnp.mean(probs_GxSxN, axis=(0, 1)))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxSxN, axis=-1)))
    drop = (g * s * k - kept) / (g * s * k)  # integer count: exact 0 when none
    return dict(zip(AUX_KEYS, (lb, z, jnp.asarray(drop, jnp.float32))))

  def route(self, xr_GxSxD: jax.Array):
    """Returns (dispatch, combine) [G, S, N, C] and the auxiliary statistics."""
    g, s, _ = xr_GxSxD.shape
    n, k, c = self.n_experts, self.top_k, self.capacity(s)
    logits_GxSxN, probs_GxSxN, w_GxSxK, idx_GxSxK = self.choose(xr_GxSxD)
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

    aux = self.aux(logits_GxSxN, probs_GxSxN, chosen_GxSxN, jnp.sum(kept_GxSxN))
    return slot_GxSxNxC, combine_GxSxNxC, aux

  def __call__(self, xg_BxLxD, xu_BxLxD, xr_BxLxD):
    """Returns (y [B, L, D], aux statistics); x_g, x_u, x_r differ only under HG."""
    if self.dispatch == 'grouped':
      return self.grouped(xg_BxLxD, xu_BxLxD, xr_BxLxD)
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

  def grouped(self, xg_BxLxD, xu_BxLxD, xr_BxLxD):
    """Dropless dispatch: each device puts its tokens' (token, choice) rows in expert
    order and runs the experts as three grouped matmuls (`grouped_matmul`) over them."""
    b, l, d = xg_BxLxD.shape
    logits_BxLxN, probs_BxLxN, w_BxLxK, idx_BxLxK = self.choose(xr_BxLxD)
    chosen_BxLxN = jnp.sum(jax.nn.one_hot(idx_BxLxK, self.n_experts, dtype=jnp.int32), axis=2)
    aux = self.aux(logits_BxLxN, probs_BxLxN, chosen_BxLxN, b * l * self.top_k)
    graphdef, state = nnx.split(self.experts)
    run = functools.partial(_grouped_experts, graphdef, platform=sharding.platform())
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      y_BxLxD = run(state, xg_BxLxD, xu_BxLxD, w_BxLxK, idx_BxLxK)
    else:
      if mesh.shape['expert'] > 1:
        raise ValueError(grouped_mesh_error(mesh.shape['expert']))
      # Per device: its own tokens, every expert's weights (gathered as FSDP gathers them
      # for any layer), no collective inside.
      rows = sharding.logical_spec(('act_batch', None, None), (b, l, d), mesh)
      replicated = jax.tree.map(lambda _: P(), state)
      y_BxLxD = jax.shard_map(run, in_specs=(replicated, rows, rows, rows, rows),
                              out_specs=rows, check_vma=False)(
                                  state, xg_BxLxD, xu_BxLxD, w_BxLxK, idx_BxLxK)
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(xg_BxLxD, xu_BxLxD)
    return y_BxLxD, aux


def grouped_mesh_error(expert: int) -> str:
  """Why the grouped dispatch cannot run on a mesh with `expert` > 1 shards of experts."""
  return (f'model.moe_dispatch=grouped runs every expert on every device and '
          f'mesh.expert={expert} shards the experts: set mesh.expert=1 (batch and FSDP '
          'over the other axes) or model.moe_dispatch=capacity')


def grouped_matmul(x_RxD: jax.Array, w_NxDxF: jax.Array, sizes_N: jax.Array,
                   kernel: str = 'ragged_dot', interpret: bool = False) -> jax.Array:
  """Rows sorted by group, row block i times w[i]: [R, F] in x's dtype.

  `kernel` 'megablox': the Megablox grouped matmul that ships with JAX (Pallas; its
  backward is a grouped and a transposed-grouped matmul; `interpret` runs it off TPU);
  'ragged_dot': `jax.lax.ragged_dot`. TPU takes Megablox (GROUPED_KERNELS): there
  `ragged_dot`'s weight gradient compiles to a masked dense product over every group,
  18x the kernel's FLOPs in the AOT estimate (docs/PERFORMANCE.md).
  """
  w_NxDxF = w_NxDxF.astype(x_RxD.dtype)
  if kernel == 'ragged_dot':
    return jax.lax.ragged_dot(x_RxD, w_NxDxF, sizes_N)
  from jax.experimental.pallas.ops.tpu.megablox import gmm
  return gmm(x_RxD, w_NxDxF, sizes_N, preferred_element_type=x_RxD.dtype,
             tiling=megablox_tiles(x_RxD.shape[0], *w_NxDxF.shape[1:]), interpret=interpret)


# The kernel's tiles live in TPU VMEM under its scoped limit: tm x tk and tk x tn input
# tiles double-buffered in bf16, a float32 tm x tn accumulator and a double-buffered
# output tile. Compiled for v5p with the grouped matmul and both gradients at 262,144
# rows: (1024, 512, 1280) fits (15.20 MB by this count), (1024, 1280, 768) does not (15.47).
VMEM_BUDGET = 15.3e6


def megablox_tiles(rows: int, k: int, n: int) -> tuple[int, int, int]:
  """(tm, tk, tn) for Megablox: the tiling with the least HBM traffic by the kernel's
  structure (the weights are read once per row tile, the rows once per column tile)
  within VMEM_BUDGET. At 262,144 x 640 x 1024 (paper_moe_500m's gate) this halves the
  bytes of (512, 512, 512): 3.45 against 5.88 GB forward and backward, v5p AOT
  (docs/PERFORMANCE.md)."""
  tm = next((t for t in (1024, 512, 256, 128, 64, 32, 16, 8) if rows % t == 0), None)
  if tm is None:
    raise ValueError(f'model.moe_dispatch=grouped on TPU needs the (token, choice) rows per '
                     f'device ({rows}) to be a multiple of 8: change the batch or seq_len')
  # tk below 512 made the weight gradient's pass dearer (1536 x 1280: 9.33 GB at tk 384,
  # 8.66 at 512; 1280 x 1536: 13.89 GB at tk 128, 10.40 at 512)
  tks = [k] + [t for t in (1024, 768, 640, 512) if t < k]
  tns = [n] + [t for t in (1024, 768, 640, 512, 384, 256, 128) if t < n]
  vmem = lambda tk, tn: 2 * (tm * tk + tk * tn) * 2 + tm * tn * 4 + 2 * tm * tn * 2
  traffic = lambda tk, tn: rows // tm * k * n + -(-n // tn) * rows * k + rows * n
  fits = [(traffic(tk, tn), -tk * tn, tk, tn) for tk in tks for tn in tns
          if vmem(tk, tn) <= VMEM_BUDGET]
  _, _, tk, tn = min(fits) if fits else (0, 0, min(k, 512), min(n, 128))
  return tm, tk, tn


def _grouped_experts(graphdef, state, xg_BxLxD, xu_BxLxD, w_BxLxK, idx_BxLxK, *, platform):
  """The experts on this device's tokens: (token, choice) rows put in expert order,
  three grouped matmuls, back to token order weighted by the router."""
  experts = nnx.merge(graphdef, state)  # one MLP whose params have a leading expert axis
  b, l, d = xg_BxLxD.shape
  k, n = idx_BxLxK.shape[-1], experts.down.kernel.shape[0]
  expert_R = idx_BxLxK.reshape(-1)  # R = T * K rows, row t * K + j: token t's j-th choice
  dest_R, source_R, sizes_N = _expert_order(expert_R, n)
  rows = lambda x_BxLxD: _token_rows(x_BxLxD.reshape(b * l, d), source_R, dest_R, k)
  kernel = GROUPED_KERNELS.get(platform, 'ragged_dot')
  mm = lambda x, linear: grouped_matmul(x, linear.kernel[...], sizes_N, kernel)
  g_RxF, u_RxF = mm(rows(xg_BxLxD), experts.gate), mm(rows(xu_BxLxD), experts.up)
  h_RxF = remat_late(_gated_rows, (experts.gate, experts.up), g_RxF, u_RxF, expert_R[source_R])
  out_RxD = _permute_rows(mm(h_RxF, experts.down), dest_R, source_R)  # token order again
  y_TxD = jnp.einsum('tkd,tk->td', out_RxD.reshape(b * l, k, d),
                     w_BxLxK.reshape(b * l, k).astype(out_RxD.dtype))
  return y_TxD.reshape(b, l, d)


def _expert_order(expert_R: jax.Array, n: int):
  """(dest_R, source_R, sizes_N): row r goes to position dest_R[r] of the expert-ordered
  rows, position i holds row source_R[i] (the inverse permutation), expert e owns
  sizes_N[e] of them. Stable: an expert's rows keep token order. Counted with a cumsum
  over one-hots rather than sorted (a sort over every row costs passes over HBM)."""
  onehot_RxN = jax.nn.one_hot(expert_R, n, dtype=jnp.int32)
  sizes_N = jnp.sum(onehot_RxN, axis=0)
  rank_R = jnp.sum((jnp.cumsum(onehot_RxN, axis=0) - 1) * onehot_RxN, axis=1)
  dest_R = (jnp.cumsum(sizes_N) - sizes_N)[expert_R] + rank_R
  source_R = jnp.zeros_like(dest_R).at[dest_R].set(jnp.arange(dest_R.shape[0], dtype=dest_R.dtype))
  return dest_R, source_R, sizes_N


# Row gathers whose gradients are gathers too. Autodiff would transpose a gather into a
# scatter-add over [rows, d]; these index maps are permutations (and, for the tokens, K
# copies of each), so the transpose is a gather by the inverse map.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_rows(x_TxD, source_R, dest_R, k):
  """Position i of the expert-ordered rows: token source_R[i] // k of x."""
  return x_TxD[source_R // k]


def _token_rows_fwd(x_TxD, source_R, dest_R, k):
  return x_TxD[source_R // k], dest_R


def _token_rows_bwd(k, dest_R, g_RxD):
  # token t's k copies sit at dest_R[t * k : (t + 1) * k]
  g_TxD = jnp.sum(g_RxD[dest_R].reshape(-1, k, g_RxD.shape[-1]), axis=1)
  return g_TxD, None, None


_token_rows.defvjp(_token_rows_fwd, _token_rows_bwd)


@jax.custom_vjp
def _permute_rows(x_RxD, index_R, inverse_R):
  """x[index_R], where index_R is a permutation and inverse_R its inverse."""
  return x_RxD[index_R]


def _permute_rows_fwd(x_RxD, index_R, inverse_R):
  return x_RxD[index_R], inverse_R


def _permute_rows_bwd(inverse_R, g_RxD):
  return g_RxD[inverse_R], None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _gated_rows(gate: Linear, up: Linear, g_RxF, u_RxF, expert_R):
  """The SwiGLU gating of `layers.MLP`, each row with its expert's DP/DNP output side."""
  return jax.nn.silu(gate.finish_rows(g_RxF, expert_R)) * up.finish_rows(u_RxF, expert_R)


def aux_loss(config: ModelConfig, aux: dict) -> jax.Array | float:
  """The weighted auxiliary losses added to the training loss (0 for a dense model)."""
  if not aux:
    return 0.0
  return config.moe_lb_weight * aux['moe_lb_loss'] + config.moe_z_weight * aux['moe_z_loss']


# model.mlp -> the module a block holds; its BRANCHES name the linear maps its pre-norm
# feeds (one HG branch each). What feeds what is described in model/wiring.py.
MLP_MODULES = {'dense': MLP, 'moe': MoE}

"""A Llama-style decoder whose every norm is a scalejax `Norm`.

Read top to bottom: config, block, decoder, loss. Layers are created stacked (one
param per layer along a leading `layers` axis) and run with `jax.lax.scan`, so compile
time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from scalejax import moe, roles, sharding
from scalejax.layers import Attention, Embed, Linear, MLP
from scalejax.norms import Norm, NormSpec
from scalejax.variants import get_variant

PLACEMENTS = ('pre', 'post', 'sandwich')
DUAL_TARGETS = ('q', 'k', 'v', 'gate', 'up')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# model.mlp -> (module, names of the linear maps its pre-norm feeds: one HG branch each)
MLP_KINDS = {'dense': (MLP, ('gate', 'up')), 'moe': (moe.MoE, moe.MoE.BRANCHES)}
RESIDUAL = ('act_batch', 'act_seq', 'act_embed')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0           # 0: same as n_heads (full multi-head attention)
  head_dim: int = 0             # 0: d_model // n_heads
  d_ff: int = 0                 # 0: int(8 * d_model / 3) (SwiGLU's usual width)
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  variant: str = 'baseline'     # key of variants.VARIANTS
  placement: str = 'pre'        # 'pre' | 'post' | 'sandwich'
  qk_norm: bool = False
  norm: str = 'rms'             # 'rms' | 'layer'
  norm_eps: float = 1e-6
  norm_bias: bool = False
  scale_storage: str = 'direct'  # 'direct' | 'delta' (gamma = 1 + delta)
  dual_targets: tuple = DUAL_TARGETS  # linear maps that DP/DNP wrap
  dtype: str = 'float32'        # compute dtype; params are always float32
  remat: str = 'none'           # key of REMAT_POLICIES
  scan_unroll: int = 1          # >1 unrolls the layer scan (faster on CPU for few layers)
  attention_impl: str = ''      # '' lets XLA choose; 'cudnn' / 'xla' force one
  init_std: float = 0.02
  mlp: str = 'dense'            # key of MLP_KINDS; 'moe': every layer's MLP is a moe.MoE
  moe_experts: int = 8
  moe_top_k: int = 2
  moe_expert_ff: int = 0        # hidden width of each expert (0: the dense ff_dim)
  moe_shared_ff: int = 0        # hidden width of an always-on shared expert (0: none)
  moe_capacity_factor: float = 1.25  # >= moe_experts / moe_top_k: no token is dropped
  moe_group_size: int = 0       # tokens per routing group (0: one sequence)
  moe_lb_weight: float = 0.01   # load-balancing loss weight
  moe_z_weight: float = 1e-3    # router z-loss weight

  def __post_init__(self):
    object.__setattr__(self, 'dual_targets', tuple(self.dual_targets))
    v = self.variant_
    checks = [
        (self.placement in PLACEMENTS, f'model.placement must be one of {PLACEMENTS}'),
        (self.dtype in DTYPES, f'model.dtype must be one of {tuple(DTYPES)}'),
        (self.remat in REMAT_POLICIES, f'model.remat must be one of {tuple(REMAT_POLICIES)}'),
        (set(self.dual_targets) <= set(DUAL_TARGETS),
         f'model.dual_targets must be a subset of {DUAL_TARGETS}'),
        (self.head_dim or self.d_model % self.n_heads == 0,
         f'model.n_heads={self.n_heads} must divide model.d_model={self.d_model} '
         '(or set model.head_dim)'),
        (self.n_heads % self.kv_heads == 0,
         f'model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}'),
        (self.head_dim_ % 2 == 0, f'head dim {self.head_dim_} must be even for RoPE'),
        (not (v.hg and self.placement == 'post'),
         f'variant {self.variant!r} uses HG, which needs a norm in front of each branch: '
         'use model.placement=pre or sandwich'),
        (self.mlp in MLP_KINDS, f'model.mlp must be one of {tuple(MLP_KINDS)}'),
        (self.mlp != 'moe' or self.moe_experts >= 1,
         f'model.moe_experts={self.moe_experts} must be >= 1 with model.mlp=moe '
         '(use model.mlp=dense for no experts)'),
        (self.mlp != 'moe' or 1 <= self.moe_top_k <= self.moe_experts,
         f'model.moe_top_k={self.moe_top_k} must lie in [1, model.moe_experts='
         f'{self.moe_experts}]: each token is routed to top_k of the experts'),
        (self.mlp != 'moe' or self.moe_capacity_factor > 0,
         'model.moe_capacity_factor must be positive'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    self.norm_spec  # validates norm kind, scale form and storage

  @property
  def variant_(self):
    return get_variant(self.variant)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    return self.d_ff or int(8 * self.d_model / 3)

  @property
  def moe_ff_dim(self) -> int:
    return self.moe_expert_ff or self.ff_dim

  @property
  def hg(self) -> bool:
    return self.variant_.hg

  @property
  def dual(self) -> str:
    return self.variant_.dual

  @property
  def out_std(self) -> float:
    return self.init_std / math.sqrt(2 * self.n_layers)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def norm_spec(self) -> NormSpec:
    return NormSpec(kind=self.norm, eps=self.norm_eps, bias=self.norm_bias,
                    scale=self.variant_.scale, storage=self.scale_storage)


class Block(nnx.Module):
  """One transformer layer. Which norms exist depends on the placement:

  pre:      x + Attn(N_in(x)),             then the same for the MLP
  sandwich: x + N_out(Attn(N_in(x))),      then the same for the MLP
  post:     N(x + Attn(x)),                then the same for the MLP
  A post norm's output feeds the next sub-layer's linear maps: it is an input role.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    spec, d = cfg.norm_spec, cfg.d_model
    self.placement = cfg.placement
    self.attn_norm = Norm(spec, d, roles.INPUT_SCALE, branches=('q', 'k', 'v') if cfg.hg else ('scale',))
    self.attn = Attention(cfg, rngs=rngs)
    mlp_cls, self.mlp_branches = MLP_KINDS[cfg.mlp]
    self.mlp_norm = Norm(spec, d, roles.INPUT_SCALE, branches=self.mlp_branches if cfg.hg else ('scale',))
    self.mlp = mlp_cls(cfg, rngs=rngs)
    sandwich = cfg.placement == 'sandwich'
    self.attn_out_norm = Norm(spec, d, roles.OUTPUT_SCALE) if sandwich else None
    self.mlp_out_norm = Norm(spec, d, roles.OUTPUT_SCALE) if sandwich else None

  def __call__(self, x_BxLxD, positions_L):
    """Returns (x, aux): aux holds the MoE router statistics ({} for a dense MLP)."""
    k = len(self.mlp_branches)
    if self.placement == 'post':
      x = self.attn_norm(x_BxLxD + self.attn(x_BxLxD, x_BxLxD, x_BxLxD, positions_L))
      m, aux = _with_aux(self.mlp(*_branches(x, k)))
      return self.mlp_norm(x + m), aux
    h = _feed(self.attn_norm, x_BxLxD, self.attn, 3)
    a = self.attn(*h, positions_L)
    x = x_BxLxD + (a if self.attn_out_norm is None else self.attn_out_norm(a))
    m, aux = _with_aux(self.mlp(*_feed(self.mlp_norm, x, self.mlp, k)))
    return x + (m if self.mlp_out_norm is None else self.mlp_out_norm(m)), aux


def _branches(out, k):
  return out if isinstance(out, tuple) else (out,) * k


def _with_aux(out):
  return out if isinstance(out, tuple) else (out, {})


def _feed(norm, x, module, k):
  """The norm's k branch inputs for `module`, as `norms.Scaled` when the module folds
  scales into its kernels (`folds_scales`), else as arrays."""
  return _branches(norm.scaled(x) if getattr(module, 'folds_scales', False) else norm(x), k)


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=cfg.init_std)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    # Post-Norm's last block already ends in a (input-role) norm that feeds the head.
    self.final_norm = (None if cfg.placement == 'post'
                       else Norm(cfg.norm_spec, cfg.d_model, roles.INPUT_SCALE))
    self.head = (None if cfg.tie_embeddings
                 else Linear(cfg.d_model, cfg.vocab_size, ('embed', 'vocab'), rngs=rngs,
                             std=cfg.init_std))

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Returns float32 logits [B, L, V]."""
    return self.forward(tokens_BxL)[0]

  def forward(self, tokens_BxL: jax.Array) -> tuple[jax.Array, dict]:
    """Returns (float32 logits [B, L, V], MoE router statistics averaged over layers)."""
    cfg = self.cfg
    x = sharding.constrain(self.embed(tokens_BxL, cfg.compute_dtype), RESIDUAL)
    positions_L = jnp.arange(tokens_BxL.shape[1])
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer_params):
      x, aux = nnx.merge(graphdef, layer_params)(x, positions_L)
      return sharding.constrain(x, RESIDUAL), aux

    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x, aux_L = jax.lax.scan(body, x, stacked, unroll=cfg.scan_unroll)
    if self.final_norm is not None:
      x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    logits = sharding.constrain(logits.astype(jnp.float32), ('act_batch', 'act_seq', 'act_vocab'))
    return logits, {k: jnp.mean(v) for k, v in aux_L.items()}

  def aux_loss(self, aux: dict):
    """Weighted MoE auxiliary losses to add to the cross-entropy (0 for dense models)."""
    return moe.aux_loss(self.cfg, aux)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()


def build_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
  return Decoder(cfg, rngs=nnx.Rngs(params=seed))

"""The model's typed config: every field of the decoder, checked on construction.

Fields a user may leave at 0 ("derive it") keep the user's value; the derived value is
the property of the same name with `resolved_` in front (`resolved_head_dim`, ...), so
a config written back to disk holds what was asked for, and `dataclasses.replace` on
one field re-derives the rest.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from scalejax.model.attention import IMPLS as ATTENTION_IMPLS
from scalejax.scales.norms import NormSpec
from scalejax.scales.variants import get_variant

MLP_KINDS = ('dense', 'moe')  # model.mlp; 'moe': every layer's MLP is a moe.MoE
MOE_DISPATCHES = ('capacity', 'grouped')  # model.moe_dispatch (model/moe.py)
PLACEMENTS = ('pre', 'post', 'sandwich')
POST_NORM_ROLES = ('input', 'output')  # model.post_norm_role
DUAL_TARGETS = ('q', 'k', 'v', 'gate', 'up')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ROPE_DTYPES = ('float32', 'compute')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _names(value) -> tuple[str, ...]:
  """A tuple of names from a sequence of names or of strings of names split by commas:
  a command-line override (--config.model.dual_targets=v,gate) arrives as the one
  string 'v,gate' (or a tuple holding it)."""
  items = [value] if isinstance(value, str) else value
  return tuple(name.strip() for item in items for name in str(item).split(',') if name.strip())


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
  # RoPE's rotation arithmetic: 'float32' (whatever the compute dtype), or 'compute' (in
  # the compute dtype, as MaxText's Llama RoPE: no float32 copies of q and k; used by
  # the 120m preset on TPU, PERFORMANCE.md). The angles are float32 either way.
  rope_dtype: str = 'float32'
  tie_embeddings: bool = False
  variant: str = 'baseline'     # key of variants.VARIANTS
  placement: str = 'pre'        # 'pre' | 'post' | 'sandwich'
  # Role of a norm that feeds linear maps and the residual stream (Post-Norm), which
  # cannot fold into either: 'input' (our reading: it feeds linear maps) or 'output'.
  post_norm_role: str = 'input'
  qk_norm: bool = False
  norm: str = 'rms'             # 'rms' | 'layer'
  norm_eps: float = 1e-6
  norm_bias: bool = False
  scale_storage: str = 'direct'  # 'direct' | 'delta' (gamma = 1 + delta)
  dual_targets: tuple = DUAL_TARGETS  # linear maps that DP/DNP wrap
  dtype: str = 'float32'        # compute dtype; params are always float32
  remat: str = 'none'           # key of REMAT_POLICIES
  scan_unroll: int = 1          # >1 unrolls the layer scan (faster on CPU for few layers)
  grad_fence: bool = False      # the MLP's param grads before its input grad (decoder.fence)
  attention_impl: str = 'auto'  # key of attention.IMPLS; 'auto': the backend's fused kernel
  attention_block_q: int = 512  # splash tiles (rounded to a multiple of 128 dividing the
  attention_block_kv: int = 512  # sequence); they change speed, not the result
  init_std: float = 0.02
  mlp: str = 'dense'            # key of MLP_KINDS; 'moe': every layer's MLP is a moe.MoE
  moe_experts: int = 8
  moe_top_k: int = 2
  moe_expert_ff: int = 0        # hidden width of each expert (0: the dense ff_dim)
  moe_shared_ff: int = 0        # hidden width of an always-on shared expert (0: none)
  moe_dispatch: str = 'capacity'  # key of MOE_DISPATCHES: 'capacity' (einsums, may drop)
                                  # or 'grouped' (sorted tokens, grouped matmuls, dropless)
  moe_capacity_factor: float = 1.25  # >= moe_experts / moe_top_k: no token is dropped
  moe_group_size: int = 0       # tokens per routing group (0: one sequence)
  moe_lb_weight: float = 0.01   # load-balancing loss weight
  moe_z_weight: float = 1e-3    # router z-loss weight

  def __post_init__(self):
    object.__setattr__(self, 'dual_targets', _names(self.dual_targets))
    v = self.variant_spec
    checks = [
        (self.placement in PLACEMENTS, f'model.placement must be one of {PLACEMENTS}'),
        (self.post_norm_role in POST_NORM_ROLES,
         f'model.post_norm_role must be one of {POST_NORM_ROLES}'),
        (self.dtype in DTYPES, f'model.dtype must be one of {tuple(DTYPES)}'),
        (self.rope_dtype in ROPE_DTYPES, f'model.rope_dtype must be one of {ROPE_DTYPES}'),
        (self.attention_impl in ATTENTION_IMPLS,
         f'model.attention_impl must be one of {ATTENTION_IMPLS}'),
        (min(self.attention_block_q, self.attention_block_kv) >= 128,
         'model.attention_block_q and model.attention_block_kv must be >= 128'),
        (self.remat in REMAT_POLICIES, f'model.remat must be one of {tuple(REMAT_POLICIES)}'),
        (set(self.dual_targets) <= set(DUAL_TARGETS),
         f'model.dual_targets={self.dual_targets} must be a subset of {DUAL_TARGETS}, '
         "written as a tuple ('v','gate') or by commas (v,gate)"),
        (self.head_dim or self.d_model % self.n_heads == 0,
         f'model.n_heads={self.n_heads} must divide model.d_model={self.d_model} '
         '(or set model.head_dim)'),
        (self.n_heads % self.resolved_n_kv_heads == 0,
         f'model.n_kv_heads={self.resolved_n_kv_heads} must divide model.n_heads={self.n_heads}'),
        (self.resolved_head_dim % 2 == 0, f'head dim {self.resolved_head_dim} must be even for RoPE'),
        (not (v.hg and self.placement == 'post'),
         f'variant {self.variant!r} uses HG, which needs a norm in front of each branch: '
         'use model.placement=pre or sandwich'),
        (self.mlp in MLP_KINDS, f'model.mlp must be one of {MLP_KINDS}'),
        (self.mlp != 'moe' or self.moe_experts >= 1,
         f'model.moe_experts={self.moe_experts} must be >= 1 with model.mlp=moe '
         '(use model.mlp=dense for no experts)'),
        (self.mlp != 'moe' or 1 <= self.moe_top_k <= self.moe_experts,
         f'model.moe_top_k={self.moe_top_k} must lie in [1, model.moe_experts='
         f'{self.moe_experts}]: each token is routed to top_k of the experts'),
        (self.mlp != 'moe' or self.moe_capacity_factor > 0,
         'model.moe_capacity_factor must be positive'),
        (self.moe_dispatch in MOE_DISPATCHES,
         f'model.moe_dispatch must be one of {MOE_DISPATCHES}'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    self.norm_spec  # validates norm kind, scale form and storage

  @property
  def variant_spec(self):
    return get_variant(self.variant)

  @property
  def resolved_n_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_d_ff(self) -> int:
    return self.d_ff or int(8 * self.d_model / 3)

  @property
  def resolved_moe_expert_ff(self) -> int:
    return self.moe_expert_ff or self.resolved_d_ff

  @property
  def hg(self) -> bool:
    return self.variant_spec.hg

  @property
  def dual(self) -> str:
    return self.variant_spec.dual

  @property
  def out_std(self) -> float:
    return self.init_std / math.sqrt(2 * self.n_layers)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def resolved_rope_dtype(self):
    """The dtype RoPE's rotation runs in (`rope_dtype`: float32, or the compute dtype)."""
    return jnp.float32 if self.rope_dtype == 'float32' else self.compute_dtype

  @property
  def norm_spec(self) -> NormSpec:
    return NormSpec(kind=self.norm, eps=self.norm_eps, bias=self.norm_bias,
                    scale=self.variant_spec.scale, storage=self.scale_storage)

"""Analytic parameter and FLOP counts (for param reports, tests and MFU).

FLOP convention (PaLM, appendix B): a training step costs 6 FLOPs per matmul
parameter per token (forward 2, backward 4) plus 12 * layers * heads * head_dim *
seq_len per token for the attention score and value matmuls; the causal mask's
skipped half is NOT subtracted, embedding lookups count 0 and the LM head counts.
An MoE layer counts its router, the top-k experts a token uses and the shared expert
(the matmuls a token needs); the dispatch/combine einsums and the capacity padding are
implementation overhead, not model FLOPs, and are left out.
"""

from __future__ import annotations

from scalejax.model.config import ModelConfig


def _scale_size(cfg: ModelConfig, dim: int) -> int:
  form = cfg.norm_spec.scale
  return {'none': 0, 'vector': dim}.get(form, dim + 1)  # magdir forms add a scalar


def _norm_size(cfg: ModelConfig, dim: int, branches: int = 1, bias: bool = True) -> int:
  return branches * (_scale_size(cfg, dim) + (dim if cfg.norm_bias and bias else 0))


def _dual_size(cfg: ModelConfig, name: str, dim: int, bias: bool = True) -> int:
  if cfg.dual == 'none' or name not in cfg.dual_targets:
    return 0
  return _scale_size(cfg, dim) if cfg.dual == 'dp' else _norm_size(cfg, dim, bias=bias)


def _swiglu(cfg: ModelConfig, f: int, bias: bool = True) -> tuple[int, int]:
  """(matrix params, norm params) of one SwiGLU MLP of hidden width f."""
  dual = sum(_dual_size(cfg, name, f, bias) for name in ('gate', 'up'))
  return 3 * cfg.d_model * f, dual


def _mlp(cfg: ModelConfig, experts: int, bias: bool = True) -> tuple[int, int]:
  """(matrix, norm) params of one layer's MLP when a token uses `experts` routed experts."""
  if cfg.mlp != 'moe':
    return _swiglu(cfg, cfg.resolved_d_ff, bias)
  m, n = _swiglu(cfg, cfg.resolved_moe_expert_ff, bias)
  m_s, n_s = _swiglu(cfg, cfg.moe_shared_ff, bias) if cfg.moe_shared_ff else (0, 0)
  return cfg.d_model * cfg.moe_experts + experts * m + m_s, experts * n + n_s


def _mlp_branches(cfg: ModelConfig) -> int:
  return (3 if cfg.mlp == 'moe' else 2) if cfg.hg else 1  # MoE: the router has its own


def layer_matrix_params(cfg: ModelConfig, active: bool = False) -> int:
  """Matrix params of one layer (`active`: only the experts one token uses)."""
  d, h = cfg.d_model, cfg.resolved_head_dim
  attn = d * cfg.n_heads * h * 2 + d * cfg.resolved_n_kv_heads * h * 2
  return attn + _mlp(cfg, cfg.moe_top_k if active else cfg.moe_experts)[0]


def layer_norm_params(cfg: ModelConfig, active: bool = False, bias: bool = True) -> int:
  d, h = cfg.d_model, cfg.resolved_head_dim
  n = _norm_size(cfg, d, 3 if cfg.hg else 1, bias) + _norm_size(cfg, d, _mlp_branches(cfg), bias)
  if cfg.placement == 'sandwich':
    n += 2 * _norm_size(cfg, d, bias=bias)
  if cfg.qk_norm:
    n += 2 * _norm_size(cfg, h, bias=bias)
  outs = {'q': cfg.n_heads * h, 'k': cfg.resolved_n_kv_heads * h, 'v': cfg.resolved_n_kv_heads * h}
  n += sum(_dual_size(cfg, name, dim, bias) for name, dim in outs.items())
  return n + _mlp(cfg, cfg.moe_top_k if active else cfg.moe_experts, bias)[1]


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts of a model built from `cfg`.

  total; embedding (the token table); head (0 when tied); matrix (all linear maps,
  head and MoE router included); norm (scale vectors plus norm biases); scale (scale
  vector params only); non_embedding (total - embedding table); active (params one
  token uses: all of a dense model, the top-k routed experts of an MoE layer).
  """
  embedding = cfg.vocab_size * cfg.d_model
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  final = lambda bias: 0 if cfg.placement == 'post' else _norm_size(cfg, cfg.d_model, bias=bias)
  norms = cfg.n_layers * layer_norm_params(cfg) + final(True)
  scale = cfg.n_layers * layer_norm_params(cfg, bias=False) + final(False)
  matrix = cfg.n_layers * layer_matrix_params(cfg) + head
  total = embedding + matrix + norms
  active = (embedding + head + final(True) + cfg.n_layers * (
      layer_matrix_params(cfg, active=True) + layer_norm_params(cfg, active=True)))
  return dict(total=total, embedding=embedding, head=head, matrix=matrix, norm=norms,
              scale=scale, non_embedding=total - embedding, active=active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token under the convention in the module docstring."""
  matmul = cfg.n_layers * layer_matrix_params(cfg, active=True) + cfg.vocab_size * cfg.d_model
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
  return 6.0 * matmul + attention

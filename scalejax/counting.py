"""Analytic parameter and FLOP counts (for param reports, tests and MFU).

FLOP convention (PaLM, appendix B): a training step costs 6 FLOPs per matmul
parameter per token (forward 2, backward 4) plus 12 * layers * heads * head_dim *
seq_len per token for the attention score and value matmuls; the causal mask's
skipped half is NOT subtracted, embedding lookups count 0 and the LM head counts.
"""

from __future__ import annotations

from scalejax.model import ModelConfig


def _scale_size(cfg: ModelConfig, dim: int) -> int:
  form = cfg.norm_spec.scale
  return {'none': 0, 'vector': dim}.get(form, dim + 1)  # magdir forms add a scalar


def _norm_size(cfg: ModelConfig, dim: int, branches: int = 1) -> int:
  return branches * (_scale_size(cfg, dim) + (dim if cfg.norm_bias else 0))


def _dual_size(cfg: ModelConfig, name: str, dim: int) -> int:
  if cfg.dual == 'none' or name not in cfg.dual_targets:
    return 0
  return _scale_size(cfg, dim) if cfg.dual == 'dp' else _norm_size(cfg, dim)


def layer_matrix_params(cfg: ModelConfig) -> int:
  d, h = cfg.d_model, cfg.head_dim_
  attn = d * cfg.n_heads * h * 2 + d * cfg.kv_heads * h * 2
  return attn + 3 * d * cfg.ff_dim


def layer_norm_params(cfg: ModelConfig) -> int:
  d, h, f = cfg.d_model, cfg.head_dim_, cfg.ff_dim
  n = _norm_size(cfg, d, 3 if cfg.hg else 1) + _norm_size(cfg, d, 2 if cfg.hg else 1)
  if cfg.placement == 'sandwich':
    n += 2 * _norm_size(cfg, d)
  if cfg.qk_norm:
    n += 2 * _norm_size(cfg, h)
  outs = {'q': cfg.n_heads * h, 'k': cfg.kv_heads * h, 'v': cfg.kv_heads * h, 'gate': f, 'up': f}
  return n + sum(_dual_size(cfg, name, dim) for name, dim in outs.items())


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """total, embedding (table), head, matrix (all linear maps incl. head), norm params."""
  embedding = cfg.vocab_size * cfg.d_model
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  final = 0 if cfg.placement == 'post' else _norm_size(cfg, cfg.d_model)
  norms = cfg.n_layers * layer_norm_params(cfg) + final
  matrix = cfg.n_layers * layer_matrix_params(cfg) + head
  total = embedding + matrix + norms
  return dict(total=total, embedding=embedding, head=head, matrix=matrix, norm=norms,
              non_embedding=total - embedding)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token under the convention in the module docstring."""
  matmul = cfg.n_layers * layer_matrix_params(cfg) + cfg.vocab_size * cfg.d_model
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim_ * seq_len
  return 6.0 * matmul + attention

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

import math

from scalejax.core import roles
from scalejax.model import wiring
from scalejax.model.config import ModelConfig
from scalejax.scales.norms import SCALE_FORMS


def _active(config: ModelConfig, copies: int, stack: tuple[str, ...]) -> int:
  """Copies one token uses: top-k of the copies stacked over experts, all others."""
  return copies // config.moe_experts * config.moe_top_k if 'expert' in stack else copies


def param_counts(config: ModelConfig) -> dict[str, int]:
  """Parameter counts of a model built from `config`, from its wiring.

  total; embedding (the token table); head (0 when tied); matrix (all linear maps,
  head and MoE router included); norm (scale vectors plus norm biases); scale (scale
  vector params only, each form counting its own); non_embedding (total - embedding
  table); active (params one token uses: all of a dense model, the top-k routed
  experts of an MoE layer).
  """
  form = SCALE_FORMS[config.norm_spec.scale]
  ks, ss = wiring.kernels(config), wiring.scales(config)
  # (kind, params of one copy, copies, stack) of every param tensor
  tensors = ([(k.role, math.prod(k.shape), k.copies, k.stack) for k in ks]
             + [('scale', form.param_count(s.dim), s.copies, s.stack) for s in ss]
             + [('bias', s.dim, s.copies, s.stack) for s in ss if s.bias])
  size = lambda kind: sum(n * c for k, n, c, _ in tensors if k == kind)
  embedding, matrix, scale = size(roles.EMBEDDING), size(roles.MATRIX), size('scale')
  norms = scale + size('bias')
  total = embedding + matrix + norms
  return dict(total=total, embedding=embedding,
              head=sum(k.size for k in ks if k.path == wiring.HEAD), matrix=matrix,
              norm=norms, scale=scale, non_embedding=total - embedding,
              active=sum(n * _active(config, c, st) for _, n, c, st in tensors))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token under the convention in the module docstring."""
  layers = sum(math.prod(k.shape) * _active(config, k.copies, k.stack)
               for k in wiring.kernels(config) if 'layers' in k.stack)
  matmul = layers + config.vocab_size * config.d_model  # the head, tied or not
  attention = 12 * config.n_layers * config.n_heads * config.resolved_head_dim * seq_len
  return 6.0 * matmul + attention

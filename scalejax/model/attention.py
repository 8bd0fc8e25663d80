"""Causal attention by backend: one registry, one choice, the same math.

`model.attention_impl` names the implementation; `auto` (the default) takes the fused
kernel of the backend the step is compiled for, when that kernel takes the shape:

  tpu -> `splash`: the Pallas splash-attention kernel that ships with JAX (causal,
         grouped-query heads natively, tiles of `model.attention_block_q/_kv`); it never
         writes the [heads, L, L] scores to HBM, forward or backward.
  gpu -> `cudnn`: cuDNN's flash attention through `jax.nn.dot_product_attention`
         (bf16/fp16 only).
  else   `xla`: the scores materialized. On CPU the math below (`forward_heads_first`,
         `backward_heads_first`) with the probabilities kept for the backward pass;
         elsewhere `jax.nn.dot_product_attention` as XLA writes it.

The backend is the one of the mesh the step is traced under (`jax.set_mesh`), so an
ahead-of-time compile for a TPU topology on a CPU host picks `splash`; without a mesh
it is `jax.default_backend()`. `splash` on a CPU runs the Pallas interpreter: slow, but
the same kernel, which is how the tests compare it with `xla`.

Under a mesh the splash kernel runs per device in `jax.shard_map` (a Pallas call has
no partitioning rule of its own): batch sharded as the activations are, heads over
`tensor` when both the query and the kv heads divide by it, else replicated heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from scalejax.core import reductions, sharding

IMPLS = ('auto', 'xla', 'cudnn', 'splash')
AUTO = {'tpu': 'splash', 'gpu': 'cudnn'}  # platform -> fused kernel; others: xla
LANES = 128  # splash tiles the kv sequence in multiples of the TPU's lane width
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
Q_SPEC = ('act_batch', 'act_seq', 'act_heads', None)
KV_SPEC = ('act_batch', 'act_seq', 'act_kv_heads', None)


def splash_unsupported(seq_len: int) -> str | None:
  """Why the splash kernel cannot tile `seq_len` (None: it can)."""
  if seq_len % LANES:
    return (f'splash attention tiles the sequence in multiples of {LANES}; '
            f'seq_len {seq_len} is not one (use model.attention_impl=xla or a multiple of {LANES})')
  return None


def unsupported(impl: str, seq_len: int, head_dim: int, dtype, on: str) -> str | None:
  """Why `impl` cannot run this shape on platform `on` (None: it can)."""
  if impl == 'splash':
    return splash_unsupported(seq_len)
  if impl == 'cudnn':
    if on != 'gpu':
      return (f'cudnn attention needs a GPU, this step compiles for {on} '
              '(use model.attention_impl=auto)')
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
      return (f'cudnn attention needs bfloat16 or float16 activations, not {jnp.dtype(dtype).name} '
              '(set model.dtype=bfloat16 or model.attention_impl=xla)')
    if head_dim > 128 or head_dim % 8:
      return f'cudnn attention needs a head dim <= 128 and a multiple of 8, not {head_dim}'
  return None


def choose(impl: str, seq_len: int, head_dim: int, dtype, on: str | None = None) -> str:
  """The implementation that runs: `impl` itself, or for `auto` the platform's fused
  kernel when it takes the shape, else `xla`. An explicit impl that cannot run raises."""
  if impl not in IMPLS:
    raise ValueError(f'unknown model.attention_impl {impl!r}; valid: {IMPLS}')
  on = on or sharding.platform()
  if impl == 'auto':
    fused = AUTO.get(on, 'xla')
    return 'xla' if unsupported(fused, seq_len, head_dim, dtype, on) else fused
  why = unsupported(impl, seq_len, head_dim, dtype, on)
  if why:
    raise ValueError(why)
  return impl


def for_model(config, seq_len: int, on: str | None = None) -> str:
  """What `choose` picks for a ModelConfig's attention at `seq_len` on platform `on`."""
  return choose(config.attention_impl, seq_len, config.resolved_head_dim,
                config.compute_dtype, on)


def attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, *, impl: str = 'auto', block_q: int = 512,
           block_kv: int = 512):
  """Causal softmax(q k^T / sqrt(H)) v with K kv heads shared by groups of N / K query heads."""
  _, l, _, h = q_BxLxNxH.shape
  impl = choose(impl, l, h, q_BxLxNxH.dtype)
  return IMPLEMENTATIONS[impl](q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block_q=block_q,
                               block_kv=block_kv)


def _dot_product(implementation: str):
  def run(q, k, v, **_):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  return run


def tile(block: int, seq_len: int) -> int:
  """The largest multiple of LANES that divides seq_len and is at most `block`."""
  best = LANES
  for b in range(LANES, min(block, seq_len) + 1, LANES):
    if seq_len % b == 0:
      best = b
  return best


def _splash_kernel(seq_len: int, n_heads: int, block_q: int, block_kv: int, interpret: bool):
  """A causal splash kernel for this shape. Built inside the trace that uses it: its block
  masks become that program's constants (a kernel kept across traces would hold arrays
  of another trace, or of a device that a compile-only topology cannot hold)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bkv = tile(block_q, seq_len), tile(block_kv, seq_len)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                            interpret=interpret)


def _splash_local(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, *, block_q, block_kv, interpret):
  _, l, n, h = q_BxLxNxH.shape
  kernel = _splash_kernel(l, n, block_q, block_kv, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel takes [heads, L, H] per sequence
  # The kernel does not scale the logits: 1/sqrt(H) goes on q, as XLA's path applies it.
  q_BxNxLxH = heads_first(q_BxLxNxH * jnp.asarray(1 / math.sqrt(h), q_BxLxNxH.dtype))
  out_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, heads_first(k_BxLxKxH), heads_first(v_BxLxKxH))
  return heads_first(out_BxNxLxH)


def _splash(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, *, block_q, block_kv):
  run = functools.partial(_splash_local, block_q=block_q, block_kv=block_kv,
                          interpret=sharding.platform() != 'tpu')
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
  q_spec = sharding.logical_spec(Q_SPEC, q_BxLxNxH.shape, mesh)
  kv_spec = sharding.logical_spec(KV_SPEC, k_BxLxKxH.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # a shard must hold whole groups of query heads with their kv head
    q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    kv_spec = jax.sharding.PartitionSpec(kv_spec[0], None, None, None)
  return jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                       check_vma=False)(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)


def causal_tiles(seq_len: int, block_q: int, block_kv: int) -> int:
  """(q tile, kv tile) pairs the causal kernel computes: those not wholly above the diagonal."""
  bq, bkv = tile(block_q, seq_len), tile(block_kv, seq_len)
  return sum(min(seq_len // bkv, ((i + 1) * bq - 1) // bkv + 1) for i in range(seq_len // bq))


def splash_cost(config, batch: int, seq_len: int) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of the splash calls of one train step over `batch` sequences.

  XLA's cost analysis counts a Pallas custom call as 0 FLOPs, so this adds what the
  kernel's grid does: per (query head, q tile, kv tile) it computes, the forward runs
  2 matmuls of a tile and reads a K and a V tile; the fused backward runs 5 (the scores
  again, dP, dV, dQ, dK) and reads a q, dO, K and V tile. Under remat the forward runs
  twice (the recompute for the backward). An estimate from the kernel's structure.
  """
  h, n = config.resolved_head_dim, config.n_heads
  bq = tile(config.attention_block_q, seq_len)
  bkv = tile(config.attention_block_kv, seq_len)
  pairs = causal_tiles(seq_len, bq, bkv) * n * batch * config.n_layers
  forwards = 1 if config.remat == 'none' else 2
  matmul = 2.0 * bq * bkv * h  # FLOPs of one tile's matmul
  itemsize = jnp.dtype(config.compute_dtype).itemsize
  flops = pairs * matmul * (2 * forwards + 5)
  tile_bytes = h * itemsize
  bytes_ = pairs * tile_bytes * (forwards * 2 * bkv + 2 * bq + 2 * bkv)
  return flops, bytes_


# --- the XLA path with its probabilities kept ----------------------------------------
# The `xla` implementation's math split at the softmax, on [B, heads, L, H] (the batched
# products' layout): `forward_heads_first` returns the probabilities with the output and
# `backward_heads_first` takes them back with the q, k, v they came from, so a caller
# that can recompute q, k, v (layers.Attention under DNP: a norm and RoPE away from its
# projections) need not save them.

def _per_query_head(kv_BxKxSxH, n_heads: int):
  """kv heads repeated to one per query head (GQA: query head n reads kv head n // G)."""
  return jnp.repeat(kv_BxKxSxH, n_heads // kv_BxKxSxH.shape[1], axis=1)


def forward_heads_first(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH):
  """(out [B, N, L, H], probs [B, N, L, S] float32) of causal attention."""
  n, h = q_BxNxLxH.shape[1], q_BxNxLxH.shape[-1]
  k_BxNxSxH, v_BxNxSxH = (_per_query_head(x, n) for x in (k_BxKxSxH, v_BxKxSxH))
  logits = jnp.einsum('bnlh,bnsh->bnls', q_BxNxLxH, k_BxNxSxH,
                      preferred_element_type=jnp.float32) * jnp.float32(h ** -0.5)
  causal_LxS = jnp.tril(jnp.ones(logits.shape[-2:], bool))
  logits = jnp.where(causal_LxS, logits, jnp.finfo(jnp.float32).min)
  probs_BxNxLxS = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnls,bnsh->bnlh', probs_BxNxLxS.astype(v_BxNxSxH.dtype), v_BxNxSxH)
  return out, probs_BxNxLxS


def backward_heads_first(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, probs_BxNxLxS, d_out_BxNxLxH):
  """(dq, dk, dv) of `forward_heads_first`'s output, from its probabilities."""
  b, n_kv, s, h = k_BxKxSxH.shape
  n = q_BxNxLxH.shape[1]
  k_BxNxSxH, v_BxNxSxH = (_per_query_head(x, n) for x in (k_BxKxSxH, v_BxKxSxH))
  dv = jnp.einsum('bnls,bnlh->bnsh', probs_BxNxLxS.astype(d_out_BxNxLxH.dtype), d_out_BxNxLxH)
  d_probs = jnp.einsum('bnlh,bnsh->bnls', d_out_BxNxLxH, v_BxNxSxH,
                       preferred_element_type=jnp.float32)
  # softmax's backward; masked entries have probability 0 and so get no gradient
  d_logits = probs_BxNxLxS * (d_probs - reductions.row_sum(d_probs * probs_BxNxLxS))
  d_logits = (d_logits * jnp.float32(h ** -0.5)).astype(q_BxNxLxH.dtype)
  dq = jnp.einsum('bnls,bnsh->bnlh', d_logits, k_BxNxSxH)
  dk = jnp.einsum('bnls,bnlh->bnsh', d_logits, q_BxNxLxH)
  per_kv = lambda d: d.reshape(b, n_kv, n // n_kv, s, h).sum(2).astype(k_BxKxSxH.dtype)
  return dq, per_kv(dk), per_kv(dv)


def swap_heads(x):
  """[B, L, heads, H] <-> [B, heads, L, H]."""
  return jnp.swapaxes(x, 1, 2)


def _xla(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, **_):
  """`xla`: on CPU the heads-first pair above under a custom vjp that keeps q, k, v
  heads first with the probabilities. Autodiff of `jax.nn.dot_product_attention`
  transposes them again for the backward pass (3 more transposes per layer at
  `configs/bench_mid.py`), and sums softmax's backward row as a reduce-window where
  `backward_heads_first` uses `reductions.row_sum` (PERFORMANCE.md). Elsewhere that
  library call (this backward pass is measured on CPU only)."""
  if sharding.platform() != 'cpu':
    return _dot_product('xla')(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
  out_BxNxLxH = _kept_probs(*(swap_heads(x) for x in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)))
  return swap_heads(out_BxNxLxH)


@jax.custom_vjp
def _kept_probs(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH):
  return forward_heads_first(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH)[0]


def _kept_probs_fwd(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH):
  out, probs = forward_heads_first(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH)
  return out, (q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, probs)


_kept_probs.defvjp(_kept_probs_fwd, lambda res, d_out: backward_heads_first(*res, d_out))


IMPLEMENTATIONS = {'xla': _xla, 'cudnn': _dot_product('cudnn'), 'splash': _splash}

"""Attention by backend: the splash kernel (Pallas interpreter on CPU) equals XLA's path;
`auto` picks each backend's fused kernel; an AOT compile for TPU runs splash."""

import dataclasses
import functools
import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.model import attention
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model, cross_entropy
from scalejax.train import xla_flags

# Grouped-query heads (4 query heads share 2 kv heads), two 128-token tiles per side so
# the kernel's block skipping (above the diagonal) and its running softmax both matter.
L = 256
CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=L, attention_impl='xla', attention_block_q=128,
                  attention_block_kv=128, variant='unified')


@functools.cache
def _loss_and_grads(impl: str, dtype: str):
  model = build_model(dataclasses.replace(CFG, attention_impl=impl, dtype=dtype))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, L + 1)))

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:]), logits
  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, logits, grads


@pytest.mark.parametrize('dtype,tol', [('float32', 2e-5), ('bfloat16', 3e-2)])
def test_splash_equals_xla_in_logits_and_gradients(dtype, tol):
  # float32: the two differ only in summation order. bfloat16: splash scales q before
  # the product (one more rounding) and keeps its running softmax in float32, XLA's path
  # rounds the probabilities to bfloat16: differences of a few bf16 ulps of O(1) logits.
  want_loss, want_logits, want_grads = _loss_and_grads('xla', dtype)
  loss, logits, grads = _loss_and_grads('splash', dtype)
  chex.assert_trees_all_close(loss, want_loss, rtol=tol)
  chex.assert_trees_all_close(logits, want_logits, atol=tol * 4, rtol=tol)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  chex.assert_trees_all_close(grads, want_grads, atol=tol * scale, rtol=tol * 10)
  assert float(jnp.abs(logits - want_logits).max()) > 0  # two computations, not one


@pytest.mark.parametrize('on,dtype,seq,head_dim,want', [
    ('tpu', jnp.bfloat16, 2048, 64, 'splash'),
    ('tpu', jnp.float32, 2048, 128, 'splash'),
    ('tpu', jnp.bfloat16, 100, 64, 'xla'),       # not a multiple of 128: no splash tiles
    ('gpu', jnp.bfloat16, 2048, 64, 'cudnn'),
    ('gpu', jnp.float32, 2048, 64, 'xla'),       # cuDNN's flash attention is fp16/bf16
    ('gpu', jnp.bfloat16, 2048, 256, 'xla'),
    ('cpu', jnp.bfloat16, 2048, 64, 'xla'),
])
def test_auto_takes_the_backends_fused_kernel_when_it_fits(on, dtype, seq, head_dim, want):
  assert attention.choose('auto', seq, head_dim, dtype, on=on) == want


@pytest.mark.parametrize('impl,on,dtype,seq,message', [
    ('splash', 'tpu', jnp.bfloat16, 100, 'seq_len 100 is not one'),
    ('cudnn', 'cpu', jnp.bfloat16, 256, 'cudnn attention needs a GPU'),
    ('cudnn', 'gpu', jnp.float32, 256, 'needs bfloat16 or float16 activations, not float32'),
    ('flash', 'tpu', jnp.bfloat16, 256, "unknown model.attention_impl 'flash'"),
])
def test_an_explicit_impl_that_cannot_run_is_one_clear_error(impl, on, dtype, seq, message):
  with pytest.raises(ValueError, match=message) as err:
    attention.choose(impl, seq, 64, dtype, on=on)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('block,seq,want', [(512, 2048, 512), (512, 256, 256), (512, 384, 384),
                                            (256, 384, 128), (128, 128, 128)])
def test_tiles_divide_the_sequence(block, seq, want):
  assert attention.tile(block, seq) == want


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed: pip install "jax[tpu]==0.10.2"')
def test_aot_for_tpu_runs_splash_and_never_writes_the_scores():
  from scalejax.cli import aot
  from _util import tiny_config
  reports = {}
  for impl in ('auto', 'xla'):
    cfg = tiny_config()
    cfg.model.update(attention_impl=impl, max_seq_len=512, n_heads=4, d_model=128,
                     dtype='bfloat16')
    cfg.train.update(seq_len=512, batch_size=8)
    cfg.mesh.update(data=1, fsdp=-1)
    report, compiled = aot.compile_train_step(cfg, 'v5p-8')
    reports[impl] = report
    has_kernel = 'tpu_custom_call' in compiled.as_text()
    assert has_kernel == (impl == 'auto'), impl
  # The XLA path writes the [B, N, L, L] probabilities per layer and reads them back in
  # the backward: splash saves at least that one round trip (per device: 2 sequences).
  scores = 2 * 4 * 512 * 512 * 2  # bfloat16
  saved = reports['xla'].bytes_accessed - reports['auto'].bytes_accessed
  assert saved > 2 * cfg.model.n_layers * scores, saved


@pytest.mark.parametrize('n_kv', [4, 2])
def test_xla_path_split_at_the_softmax_equals_autodiff_of_the_library_call(n_kv):
  """`forward_heads_first` (output and probabilities), `backward_heads_first` (gradients
  from the probabilities) and the `xla` implementation with its own backward pass on
  CPU equal `jax.nn.dot_product_attention` and the gradients `jax.vjp` gives for it,
  with grouped-query heads too."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k = normal(2, 16, 4, 8), normal(2, 16, n_kv, 8)
  v, d_out = normal(2, 16, n_kv, 8), normal(2, 16, 4, 8)
  library = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation='xla')
  want_out, vjp = jax.vjp(library, q, k, v)
  swap = attention.swap_heads
  out, probs = attention.forward_heads_first(swap(q), swap(k), swap(v))
  chex.assert_trees_all_close(swap(out), want_out, rtol=1e-5, atol=1e-6)
  grads = attention.backward_heads_first(swap(q), swap(k), swap(v), probs, swap(d_out))
  chex.assert_trees_all_close(tuple(map(swap, grads)), vjp(d_out), rtol=1e-5, atol=1e-6)
  ours_out, ours_vjp = jax.vjp(lambda q, k, v: attention.attend(q, k, v, impl='xla'), q, k, v)
  chex.assert_trees_all_close(ours_out, want_out, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(ours_vjp(d_out), vjp(d_out), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0  # causal
  chex.assert_trees_all_close(probs.sum(-1), jnp.ones(probs.shape[:-1]), rtol=1e-6)


def test_xla_path_on_cpu_compiles_fewer_transposes_and_reduce_windows_than_autodiff():
  """The `xla` implementation's own backward pass keeps q, k, v heads first and sums
  softmax's rows by `reductions.row_sum`: compiled as a train step is (the project's
  options, XLA's default optimization level), its gradient has fewer transposes and
  reduce-windows than autodiff of `jax.nn.dot_product_attention`."""
  q = jax.random.normal(jax.random.key(0), (2, 128, 4, 16))
  options = {**xla_flags.CPU_COMPILE_OPTIONS, 'xla_backend_optimization_level': 2}

  def counts(attend):
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2))
    hlo = jax.jit(grad).lower(q, q, q).compile(options).as_text()
    return hlo.count(' transpose('), hlo.count(' reduce-window(')

  library = counts(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation='xla'))
  ours = counts(lambda q, k, v: attention.attend(q, k, v, impl='xla'))
  assert ours[0] < library[0] and ours[1] < library[1], (ours, library)

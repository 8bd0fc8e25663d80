"""A Llama-style decoder whose every norm is a scalejax `Norm`.

Read top to bottom: config, block, decoder, loss. Layers are created stacked (one
param per layer along a leading `layers` axis) and run with `jax.lax.scan`, so compile
time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalejax.core import roles, sharding
from scalejax.model import moe, wiring
from scalejax.model.config import REMAT_POLICIES, ModelConfig
from scalejax.model.layers import Attention, Embed, Linear, input_branches
from scalejax.model.moe import MLP_MODULES
from scalejax.scales.norms import Norm

RESIDUAL = ('act_batch', 'act_seq', 'act_embed')


class Block(nnx.Module):
  """One transformer layer. Which norms exist depends on the placement:

  pre:      x + Attn(N_in(x)),             then the same for the MLP
  sandwich: x + N_out(Attn(N_in(x))),      then the same for the MLP
  post:     N(x + Attn(x)),                then the same for the MLP
  Every scale is built `unlabelled`; the decoder gives it the role its wiring decides.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    spec, d = config.norm_spec, config.d_model
    self.placement = config.placement
    self.attn_norm = Norm(spec, d, roles.UNLABELLED, branches=input_branches(Attention, config.hg))
    self.attn = Attention(config, rngs=rngs)
    mlp_cls = MLP_MODULES[config.mlp]
    self.mlp_norm = Norm(spec, d, roles.UNLABELLED, branches=input_branches(mlp_cls, config.hg))
    self.mlp = mlp_cls(config, rngs=rngs)
    self.n_attn_inputs, self.n_mlp_inputs = len(Attention.BRANCHES), len(mlp_cls.BRANCHES)
    sandwich = config.placement == 'sandwich'
    self.attn_out_norm = Norm(spec, d, roles.UNLABELLED) if sandwich else None
    self.mlp_out_norm = Norm(spec, d, roles.UNLABELLED) if sandwich else None
    self.grad_fence = config.grad_fence

  def __call__(self, x_BxLxD, positions_L):
    """Returns (x, aux): aux holds the MoE router statistics ({} for a dense MLP)."""
    k = self.n_mlp_inputs
    if self.placement == 'post':
      a = self.attn(*_branches(x_BxLxD, self.n_attn_inputs), positions_L)
      x = self.attn_norm(x_BxLxD + a)
      mlp, x_in = fence(self.mlp, x) if self.grad_fence else (self.mlp, x)
      m, aux = _with_aux(mlp(*_branches(x_in, k)))
      return self.mlp_norm(x + m), aux
    h = feed(self.attn_norm, x_BxLxD, self.attn, self.n_attn_inputs)
    a = self.attn(*h, positions_L)
    x = x_BxLxD + (a if self.attn_out_norm is None else self.attn_out_norm(a))
    mlp, mlp_norm, mlp_out_norm, x_in = self.mlp, self.mlp_norm, self.mlp_out_norm, x
    if self.grad_fence:
      (mlp, mlp_norm, mlp_out_norm), x_in = fence((mlp, mlp_norm, mlp_out_norm), x)
    m, aux = _with_aux(mlp(*feed(mlp_norm, x_in, mlp, k)))
    return x + (m if mlp_out_norm is None else mlp_out_norm(m)), aux


def fence(modules, x):
  """`modules` and `x` unchanged; in the backward pass their cotangents leave together.

  The cotangents pass through one `optimization_barrier`: the gradient of x (what the
  layer below waits for) is released only once every param gradient of `modules` is
  computed, so the arrays those need (activations, recomputed projections) are freed
  before the next sub-layer's backward starts. Without it, XLA:TPU's scheduler may
  defer param-gradient reductions (DNP's d(gamma) over tokens) past the attention's
  backward and keep their inputs alive: +2.6 GiB per chip for `unified` at
  paper_dense_1b on v5p-8 (docs/PERFORMANCE.md). Same values, to rounding.
  """
  graphdef, state = nnx.split(modules)
  state, x = _together(state, x)
  return nnx.merge(graphdef, state), x


@jax.custom_vjp
def _together(params, x):
  return params, x


def _together_fwd(params, x):
  return (params, x), None


def _together_bwd(_, cotangents):
  return jax.lax.optimization_barrier(cotangents)


_together.defvjp(_together_fwd, _together_bwd)


def _branches(out, k):
  return out if isinstance(out, tuple) else (out,) * k


def _with_aux(out):
  return out if isinstance(out, tuple) else (out, {})


def feed(norm, x, module, k):
  """The norm's k branch inputs for `module`, as `norms.Scaled` when the module folds
  scales into its kernels (`folds_scales`), else as arrays."""
  return _branches(norm.scaled(x) if getattr(module, 'folds_scales', False) else norm(x), k)


class Decoder(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config.vocab_size, config.d_model, rngs=rngs, std=config.init_std)

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    # Post-Norm's last block already ends in a norm that feeds the head.
    self.final_norm = (None if config.placement == 'post'
                       else Norm(config.norm_spec, config.d_model, roles.UNLABELLED))
    self.head = (None if config.tie_embeddings
                 else Linear(config.d_model, config.vocab_size, ('embed', 'vocab'), rngs=rngs,
                             std=config.init_std))
    wiring.label_roles(self)  # every scale's role, from what consumes it

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Returns float32 logits [B, L, V]."""
    return self.forward(tokens_BxL)[0]

  def forward(self, tokens_BxL: jax.Array) -> tuple[jax.Array, dict]:
    """Returns (float32 logits [B, L, V], MoE router statistics averaged over layers)."""
    config = self.config
    x = sharding.constrain(self.embed(tokens_BxL, config.compute_dtype), RESIDUAL)
    positions_L = np.arange(tokens_BxL.shape[1])  # static: RoPE's table is a constant
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, layer_params):
      x, aux = nnx.merge(graphdef, layer_params)(x, positions_L)
      return sharding.constrain(x, RESIDUAL), aux

    if config.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    x, aux_L = jax.lax.scan(body, x, stacked, unroll=config.scan_unroll)
    if self.final_norm is not None:
      x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    logits = sharding.constrain(logits.astype(jnp.float32), ('act_batch', 'act_seq', 'act_vocab'))
    return logits, {k: jnp.mean(v) for k, v in aux_L.items()}

  def aux_loss(self, aux: dict):
    """Weighted MoE auxiliary losses to add to the cross-entropy (0 for dense models)."""
    return moe.aux_loss(self.config, aux)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Mean of logsumexp(logits) - logits[target], the sum optax's integer-label loss
  computes. The target's logit is picked by a select-and-sum over the vocabulary, not a
  gather: the select fuses into the same passes over the [B, L, V] logits as the
  logsumexp (forward) and the softmax (backward), where TPU runs a gather as a pass of
  its own over the float32 logits (-27 GB of HBM traffic per device and step at
  paper_dense_120m on v5p, PERFORMANCE.md). Same values: the sum adds zeros to one
  logit, and its gradient is the gather's scatter."""
  hit_BxLxV = (jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, 2)
               == targets_BxL[..., None])
  target_BxL = jnp.sum(jnp.where(hit_BxLxV, logits_BxLxV, 0), axis=-1)
  return jnp.mean(jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL)


def build_model(config: ModelConfig, seed: int = 0) -> Decoder:
  return Decoder(config, rngs=nnx.Rngs(params=seed))

"""Linear maps (with DP/DNP output scales), embedding, RoPE, attention, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalejax.core import reductions, roles, sharding
from scalejax.core.roles import Param
from scalejax.model import attention
from scalejax.model.config import ModelConfig
from scalejax.scales.norms import Norm, NormSpec, Scaled, make_scale, normalize

DUAL_MODES = ('none', 'dp', 'dnp')


def dual_mode(config: ModelConfig, name: str) -> str:
  """The DP/DNP placement around the linear map `name` ('none' unless a dual target)."""
  return config.dual if name in config.dual_targets else 'none'


def input_branches(module_cls, hg: bool) -> tuple[str, ...]:
  """Branches of the norm in front of `module_cls`: under HG one per linear map it
  feeds (`module_cls.BRANCHES`, in the order its call takes them), else one shared."""
  return tuple(module_cls.BRANCHES) if hg else ('scale',)


def token_matmul(x_BxLxD: jax.Array, w_DxF: jax.Array, flatten: bool | None = None) -> jax.Array:
  """x @ W in x's dtype; `flatten` None: as the platform the trace compiles for wants it.

  On CPU over the tokens flattened to one axis: the weight gradient is then a dot over
  a single contracting axis, which XLA:CPU hands to its GEMM as is; over [B, L] it
  first writes the output gradient transposed, a copy per map. Elsewhere over [B, L]
  as they are: TPU's layout assignment takes two contracting axes in its stride, and
  the flattened form made it write transposed float32 copies of activations instead
  (+18 % HBM bytes per step at paper_dense_120m on v5p; both in PERFORMANCE.md).
  """
  w_DxF = w_DxF.astype(x_BxLxD.dtype)
  if not (sharding.platform() == 'cpu' if flatten is None else flatten):
    return jnp.einsum('...d,df->...f', x_BxLxD, w_DxF)
  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  y_TxF = jnp.dot(x_TxD, w_DxF)
  return y_TxF.reshape(*x_BxLxD.shape[:-1], w_DxF.shape[-1])


class Linear(nnx.Module):
  """y = x @ W, optionally followed by an output-side scale (DP) or norm (DNP).

  DP:  y = u * W(v * n)        (v is the preceding norm's scale, u an output scale)
  DNP: y = u * Norm(W(v * n))  (an extra normalization, u its output-role scale)

  `x` may be a `norms.Scaled` (n with v not yet applied): v is then folded into the
  kernel, diag(v) W, which replaces an elementwise pass over [tokens, d_in]
  activations (and, under HG, a saved copy per branch) by a multiply over the
  [d_in, d_out] weights. u multiplies the output, which XLA fuses into the matmul's
  consumer.
  """

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
               std: float = 0.02, dual: str = 'none', norm: NormSpec | None = None,
               post_role: str = roles.UNLABELLED):
    if dual not in DUAL_MODES:
      raise ValueError(f'unknown dual placement {dual!r}; valid: {DUAL_MODES}')
    w = std * jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32)
    self.kernel = Param(w, role=roles.MATRIX, axes=axes)
    self.dual = dual
    # The output side's role depends on what reads it: inside the decoder the wiring
    # labels it; a Linear used on its own takes `post_role`.
    post = {'dp': lambda: make_scale(norm, d_out, post_role),
            'dnp': lambda: Norm(norm, d_out, post_role)}.get(dual)
    self.post = post() if post else None

  def __call__(self, x: jax.Array | Scaled) -> jax.Array:
    return self.finish(self.project(x))

  def project(self, x: jax.Array | Scaled) -> jax.Array:
    """x @ W, with a `Scaled` input's scale folded into W."""
    return token_matmul(*self.operands(x))

  def operands(self, x: jax.Array | Scaled) -> tuple[jax.Array, jax.Array]:
    """(activations, kernel) of the matmul: a `Scaled` input's scale goes into W."""
    w = self.kernel[...]
    if isinstance(x, Scaled):
      x, v = x.n, x.gamma
      w = w if v is None else fold_rows(v, w)
    return x, w

  def finish(self, y: jax.Array, inv_rms: jax.Array | None = None) -> jax.Array:
    """The output side: DP's scale or DNP's norm (identity without one). `inv_rms`:
    `self.inv_rms(y)`, computed earlier."""
    if self.dual == 'dp':
      u = self.post()
      return y if u is None else (y * u).astype(y.dtype)
    if self.dual == 'dnp':
      return self.post(y, inv_rms)
    return y

  def inv_rms(self, y: jax.Array) -> jax.Array | None:
    """The statistics of DNP's norm of y (`Norm.inv_rms`), None without one: what a
    backward pass that recomputes `finish(y)` keeps besides y."""
    return self.post.inv_rms(y) if self.dual == 'dnp' else None

  def finish_rows(self, y_RxF: jax.Array, copy_R: jax.Array) -> jax.Array:
    """`finish` of a stacked Linear (params with a leading axis of copies, e.g. the
    experts of an MoE) on rows of several copies at once: row r takes copy copy_R[r]'s
    output scale or norm params."""
    if self.dual == 'none':
      return y_RxF
    graphdef, state = nnx.split(self.post)
    each = lambda fn: jax.vmap(lambda st: fn(nnx.merge(graphdef, st)))(state)
    if self.dual == 'dp':
      u_CxF = each(lambda form: form())
      return y_RxF if u_CxF is None else (y_RxF * u_CxF[copy_R]).astype(y_RxF.dtype)
    gamma_CxF, bias_CxF = each(lambda norm: norm.affine())
    row = lambda a: None if a is None else a[copy_R]
    return normalize(y_RxF, self.post.spec, row(gamma_CxF), row(bias_CxF))


def fold_rows(v_D: jax.Array, w_DxF: jax.Array) -> jax.Array:
  """diag(v) W: row i of W times v[i]. On CPU the gradient of v, each row of
  d(diag(v) W) * W summed over the kernel's d_out, goes through `reductions.row_sum`
  (autodiff's would be a plain reduction, the slow form there); elsewhere autodiff's."""
  if sharding.platform() == 'cpu':
    return _fold_rows(v_D, w_DxF)
  return v_D[:, None] * w_DxF


@jax.custom_vjp
def _fold_rows(v_D, w_DxF):
  return v_D[:, None] * w_DxF


def _fold_rows_bwd(res, g_DxF):
  v_D, w_DxF = res
  return reductions.row_sum(g_DxF * w_DxF)[:, 0], v_D[:, None] * g_DxF


_fold_rows.defvjp(lambda v, w: (_fold_rows(v, w), (v, w)), _fold_rows_bwd)


def project_all(maps: tuple[Linear, ...], xs: tuple) -> tuple[jax.Array, ...]:
  """`m.project(x)` for each map. On CPU, maps that read the same activations (one
  input, or HG's branches of one normalized input, each with its own folded scale) run
  as one matmul over their kernels side by side, split after: XLA:CPU's matmul library
  splits one [tokens, 3d] product over both cores where it runs three [tokens, d] ones
  on one each (PERFORMANCE.md). Elsewhere one matmul per map: side by side, kernels
  sharded over different mesh axes (heads, kv heads) would be gathered first."""
  inputs, kernels = zip(*(m.operands(x) for m, x in zip(maps, xs)))
  if sharding.platform() != 'cpu' or any(x is not inputs[0] for x in inputs):
    return tuple(token_matmul(x, w) for x, w in zip(inputs, kernels))
  y = token_matmul(inputs[0], jnp.concatenate(kernels, axis=1))
  cuts = np.cumsum([w.shape[1] for w in kernels])[:-1]
  return tuple(jnp.split(y, cuts, axis=-1))


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02):
    table = std * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)
    self.table = Param(table, role=roles.EMBEDDING, axes=('vocab', 'embed'))

  def __call__(self, tokens_BxL: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], tokens_BxL, axis=0).astype(dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Tied LM head: logits against the embedding table."""
    return token_matmul(x_BxLxD, self.table[...].T)


def rope(x_BxLxNxH: jax.Array, positions_L, theta: float,
         math_dtype=jnp.float32, heads_first: bool = False) -> jax.Array:
  """Rotary embedding: angles in float32, the rotation in `math_dtype` (float32, or the
  compute dtype: ModelConfig.resolved_rope_dtype), the result in x's dtype. x is
  [B, L, heads, H], or [B, heads, L, H] with `heads_first`.

  Positions known at trace time (a NumPy array, as the decoder passes them) make the
  sin/cos table a constant: from a traced iota XLA:CPU recomputes sin and cos for every
  element of q and k inside the fusions that rotate them, batch x heads times over."""
  h = x_BxLxNxH.shape[-1]
  xp = np if isinstance(positions_L, np.ndarray) else jnp
  freq_H2 = xp.float32(theta) ** (-xp.arange(0, h, 2, dtype=xp.float32) / xp.float32(h))
  angle_LxH2 = positions_L[:, None].astype(xp.float32) * freq_H2[None, :]
  along_l = (lambda a: a[None, None]) if heads_first else (lambda a: a[None, :, None, :])
  sin = along_l(jnp.asarray(xp.sin(angle_LxH2), math_dtype))
  cos = along_l(jnp.asarray(xp.cos(angle_LxH2), math_dtype))
  x1, x2 = jnp.split(x_BxLxNxH.astype(math_dtype), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
  """Causal multi-head / grouped-query attention with RoPE and optional QK-norm."""
  folds_scales = True  # xq, xk, xv may be `norms.Scaled`: only Linear maps read them
  BRANCHES = ('q', 'k', 'v')  # the maps the input norm feeds, in call order

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = config.d_model, config.n_heads, config.resolved_n_kv_heads, config.resolved_head_dim
    self.n_heads, self.n_kv, self.h, self.theta = n, k, h, config.rope_theta
    self.rope_math = config.resolved_rope_dtype
    self.impl = config.attention_impl
    self.tiles = (config.attention_block_q, config.attention_block_kv)  # splash's q, kv tiles
    dual = lambda name: dual_mode(config, name)
    spec = config.norm_spec
    self.q = Linear(d, n * h, ('embed', 'heads'), rngs=rngs, dual=dual('q'), norm=spec)
    self.k = Linear(d, k * h, ('embed', 'kv_heads'), rngs=rngs, dual=dual('k'), norm=spec)
    self.v = Linear(d, k * h, ('embed', 'kv_heads'), rngs=rngs, dual=dual('v'), norm=spec)
    self.o = Linear(n * h, d, ('heads', 'embed'), rngs=rngs, std=config.out_std)
    self.q_norm = Norm(spec, h, roles.UNLABELLED) if config.qk_norm else None
    self.k_norm = Norm(spec, h, roles.UNLABELLED) if config.qk_norm else None

  def __call__(self, xq_BxLxD, xk_BxLxD, xv_BxLxD, positions_L):
    """x_BxLxD -> [B, L, D]; N query heads, K kv heads (GQA when K < N), head dim H."""
    b, l, _ = xq_BxLxD.shape
    q, k, v = project_all((self.q, self.k, self.v), (xq_BxLxD, xk_BxLxD, xv_BxLxD))
    if self.recomputes_qkv and attention.choose(self.impl, l, self.h, q.dtype) == 'xla':
      out_BxLxNxH = _attend_recomputing(self, q, k, v, positions_L)
    else:
      out_BxLxNxH = attention.attend(*self.rotated(q, k, v, positions_L), impl=self.impl,
                                     block_q=self.tiles[0], block_kv=self.tiles[1])
    return self.o(out_BxLxNxH.reshape(b, l, self.n_heads * self.h))

  @property
  def recomputes_qkv(self) -> bool:
    """Whether the `xla` path keeps the projections and recomputes q, k, v from them in
    the backward pass: when something with a backward of its own sits in between (DP's
    scale, DNP's norm, QK-norm), for which autodiff keeps the projections as well."""
    return self.q_norm is not None or any(m.dual != 'none' for m in (self.q, self.k, self.v))

  def rotated(self, q_BxLxNH, k_BxLxKH, v_BxLxKH, positions_L, inv_rms=(None,) * 3,
              heads_first: bool = False):
    """The projections as attention reads them: the maps' output side (DP/DNP), heads
    split, QK-norm, RoPE. `inv_rms`: DNP's statistics of q, k, v computed earlier.

    `heads_first`: the same values in [B, heads, L, H] (the layout of attention's batched
    products), the heads moved first after the output side, so that QK-norm and RoPE run
    along L. XLA:CPU runs RoPE on [B, L, heads, H] behind a norm or scale, fused with a
    transpose after it, slower than in this order (PERFORMANCE.md).
    """
    b, l, _ = q_BxLxNH.shape
    r_q, r_k, r_v = inv_rms
    layout = attention.swap_heads if heads_first else (lambda x: x)
    q_heads = layout(self.q.finish(q_BxLxNH, r_q).reshape(b, l, self.n_heads, self.h))
    k_heads = layout(self.k.finish(k_BxLxKH, r_k).reshape(b, l, self.n_kv, self.h))
    v_heads = layout(self.v.finish(v_BxLxKH, r_v).reshape(b, l, self.n_kv, self.h))
    if self.q_norm is not None:
      q_heads, k_heads = self.q_norm(q_heads), self.k_norm(k_heads)
    q_heads = rope(q_heads, positions_L, self.theta, self.rope_math, heads_first)
    k_heads = rope(k_heads, positions_L, self.theta, self.rope_math, heads_first)
    return q_heads, k_heads, v_heads


def _attend_recomputing(att: Attention, q, k, v, positions_L):
  """`attention.attend(*att.rotated(q, k, v))` for the `xla` path, keeping only the
  projections (with DNP's statistics of them) and the attention probabilities for the
  backward pass, which recomputes the rotated q, k, v from them. With an output side
  (DP, DNP) or QK-norm autodiff would keep both: the projections for that side's
  backward and the rotated q, k, v for attention's (PERFORMANCE.md). The rotated values
  come from `rotated` heads first, their gradients from autodiff of `rotated`."""
  graphdef, state = nnx.split(att)
  stats = tuple(m.inv_rms(y) for m, y in zip((att.q, att.k, att.v), (q, k, v)))

  def rotate(state, qkv, stats, heads_first=False):
    return nnx.merge(graphdef, state).rotated(*qkv, positions_L, stats, heads_first)

  @jax.custom_vjp
  def run(state, qkv, stats):
    return fwd(state, qkv, stats)[0]

  def fwd(state, qkv, stats):
    out_BxNxLxH, probs = attention.forward_heads_first(*rotate(state, qkv, stats, True))
    return attention.swap_heads(out_BxNxLxH), (state, qkv, stats, probs)

  def bwd(res, d_out_BxLxNxH):
    state, qkv, stats, probs = res
    qkv = after_cotangent(qkv, d_out_BxLxNxH)
    # the values of `rotate` go unused, and XLA drops them: only its vjp is needed
    _, rotate_vjp = jax.vjp(lambda s, x: rotate(s, x, stats), state, qkv)
    grads = attention.backward_heads_first(*rotate(state, qkv, stats, True), probs,
                                           attention.swap_heads(d_out_BxLxNxH))
    d_state, d_qkv = rotate_vjp(tuple(attention.swap_heads(d) for d in grads))
    return d_state, d_qkv, jax.tree.map(jnp.zeros_like, stats)

  run.defvjp(fwd, bwd)
  return run(state, (q, k, v), stats)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x_g)) * up(x_u)); x_g and x_u differ only under HG."""
  folds_scales = True  # xg, xu may be `norms.Scaled`: only Linear maps read them
  BRANCHES = ('gate', 'up')  # the maps the input norm feeds, in call order

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, f, spec = config.d_model, config.resolved_d_ff, config.norm_spec
    dual = lambda name: dual_mode(config, name)
    self.gate = Linear(d, f, ('embed', 'mlp'), rngs=rngs, dual=dual('gate'), norm=spec)
    self.up = Linear(d, f, ('embed', 'mlp'), rngs=rngs, dual=dual('up'), norm=spec)
    self.down = Linear(f, d, ('mlp', 'embed'), rngs=rngs, std=config.out_std)

  def __call__(self, xg, xu):
    g, u = project_all((self.gate, self.up), (xg, xu))
    # Recomputing the gating (with DP/DNP's output side) in the backward pass, when
    # this layer's turn comes, keeps 3 [tokens, d_ff] arrays for it instead of 6 (8
    # with DP/DNP): the elementwise recompute fuses into the backward's own pass. DNP's
    # statistics are kept ([tokens, 1] each), so recomputing its norms reduces nothing.
    stats = (self.gate.inv_rms(g), self.up.inv_rms(u))
    return self.down(remat_late(_gated, (self.gate, self.up), g, u, *stats))


def _gated(gate: Linear, up: Linear, g, u, r_g=None, r_u=None):
  return jax.nn.silu(gate.finish(g, r_g)) * up.finish(u, r_u)


def after_cotangent(arrays: tuple, g: jax.Array) -> tuple:
  """`arrays`, made to depend on the cotangent `g`: a backward pass's recomputation from
  them cannot start before `g` exists. On CPU by adding 0 times one element of `g`.

  `jax.checkpoint`'s recomputation depends on forward values only, and XLA:CPU drops
  optimization barriers before it schedules: its scheduler, which starts independent
  work early, recomputed every layer's activations at the start of the backward pass and
  kept them all (a checkpointed SwiGLU then saved no memory; PERFORMANCE.md).
  """
  if sharding.platform() == 'cpu':
    tie = g.reshape(-1)[0] * 0
    return tuple(None if a is None else a + tie.astype(a.dtype) for a in arrays)
  # elsewhere the barrier holds until scheduling (and a sharded g's first element
  # would be a cross-device read)
  return jax.lax.optimization_barrier((arrays, g))[0]


def remat_late(fn, modules: tuple, *arrays):
  """`fn(*modules, *arrays)` that keeps only its inputs for the backward pass and
  recomputes the rest there, once the output's cotangent has arrived (`after_cotangent`)."""
  graphdef, state = nnx.split(modules)
  pure = lambda state, arrays: fn(*nnx.merge(graphdef, state), *arrays)

  @jax.custom_vjp
  def run(state, arrays):
    return pure(state, arrays)

  def bwd(res, g):
    state, arrays = res
    return jax.vjp(pure, state, after_cotangent(arrays, g))[1](g)

  run.defvjp(lambda state, arrays: (pure(state, arrays), (state, arrays)), bwd)
  return run(state, arrays)

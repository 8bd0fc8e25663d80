"""Moving a scale vector into the kernels it feeds, along the model's wiring.

A scale that folds (`wiring.Scale.folds`) reaches each consumer's kernel through ops
that are linear per channel, so `W(gamma * n) = (diag(gamma) W) n`: multiplying the
kernel's rows by gamma (spread over every query head of a kv group for v's output
side, `Consumer.to_rows`) and resetting the scale to 1 leaves the function unchanged.
A norm bias beside it is divided by gamma (gamma * n + b = gamma * (n + b / gamma)).
The tests use this to check every role label; quantization's `fold` modes and export
use it to leave scale vectors out of the quantized or exported weights. DP's output
scale u folds the other way, into its own kernel's columns (`fold_output_scales`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scalejax.core import roles as R
from scalejax.model import wiring
from scalejax.model.decoder import build_model
from scalejax.model.layers import Linear
from scalejax.scales.norms import make_scale


def copy_model(model):
  """A copy holding jax arrays: restored params may be numpy arrays, which a Variable
  update would otherwise write into in place, changing the caller's params."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def untie(model):
  """The same function with an untied head: head kernel = table^T (a new model)."""
  config = model.config
  if not config.tie_embeddings:
    return copy_model(model)
  untied = nnx.eval_shape(lambda: build_model(dataclasses.replace(config, tie_embeddings=False)))
  graphdef, _ = nnx.split(untied)
  params = R.params_of(model)
  params['head'] = {'kernel': jnp.asarray(params['embed']['table']).T}
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def fold_scale(model, scale: wiring.Scale, *, force: bool = False) -> None:
  """In place: the scale's gamma moved into its consumers' kernel rows, and the form
  reset to the identity (gamma = 1 for every form and storage: a fresh form's params).

  Refused when the scale does not fold, or feeds a tied table. `force` does it anyway
  for a scale that does not fold (its kernels are still reached, through ops that are
  not channelwise): the tests check that this changes the function.
  """
  if not scale.folds and not force:
    raise ValueError(f'{scale.name} does not fold into the kernels it feeds (role '
                     f'{scale.role}): its consumers are {[c.ops for c in scale.consumers]}')
  if any(c.transposed for c in scale.consumers):
    raise ValueError(f'{scale.name} feeds the tied embedding table, which is also the input '
                     'embedding: fold into folding.untie(model) instead')
  form = wiring.module_at(model, scale.path)
  gamma = wiring.form_gamma(form)
  if gamma is None:
    return  # the `none` form: nothing to move
  for c in scale.consumers:
    if c.kernel is None:
      continue  # the residual stream (only when forced)
    kernel = wiring.module_at(model, c.kernel.path)
    w = kernel.get_value()
    # gamma [*stack, dim] onto the rows of [*stack, (experts,) d_in, d_out]
    rows = jnp.expand_dims(c.to_rows(gamma)[..., :, None], wiring.extra_stack_axes(scale, c))
    if c.layer == 'next':  # layer i's norm feeds layer i + 1 (Post-Norm, only when forced)
      w = w.at[1:].multiply(rows[:-1])
    elif c.layer == 'last':  # the last layer's norm feeds the head
      w = w * rows[-1]
    else:
      w = w * rows
    kernel.set_value(w)
  if scale.bias is not None:
    bias = wiring.module_at(model, scale.bias)
    bias.set_value(bias.get_value() / gamma)
  reset_to_identity(form, make_scale(model.config.norm_spec, scale.dim, scale.role))


def fold_output_scales(model) -> None:
  """In place: every DP output scale u moved into its own kernel's columns.

  `y = u * (x @ W)` is `x @ (W diag(u))` whatever follows y, so folding u into the
  columns of the map it scales is exact for every wrapped map. The wiring folds u only
  where channelwise ops lead on to the *next* kernel (v's u into W_o's rows through the
  attention sum, up's u into W_down's rows through the GLU product: role input_scale)
  and calls the others output scales (q, k: RoPE and softmax follow; gate: SiLU); this
  column fold needs no such path, so it takes all of them the same way.
  """
  config = model.config
  for s in wiring.scales(config):
    linear = wiring.module_at(model, s.path[:-1])  # DP's u is `<map>/post`
    if not (s.path[-1] == 'post' and isinstance(linear, Linear) and linear.dual == 'dp'):
      continue
    form = wiring.module_at(model, s.path)
    u = wiring.form_gamma(form)  # [*stack, d_out]
    if u is None:
      continue  # the `none` form: u = 1
    linear.kernel.set_value(linear.kernel.get_value() * u[..., None, :])  # [*stack, d_in, d_out]
    reset_to_identity(form, make_scale(config.norm_spec, s.dim, s.role))


def reset_to_identity(form, fresh) -> None:
  """Sets a (possibly stacked) form's params to those of the unstacked `fresh` one."""
  state = nnx.state(form, nnx.Param)
  new = jax.tree.map(lambda f, c: jnp.broadcast_to(f, c.shape),
                     R.params_of(fresh), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, new)
  nnx.update(form, state)


def fold_input_scales(model) -> tuple[object, list[str]]:
  """A copy of `model` with every input-role gamma that folds moved into its kernels.

  Returns (model, names of input scales left in place): the final norm of a
  tied-embedding model (its table is also the input embedding; fold into
  `untie(model)` to move it too) and Post-Norm's norms (`model.post_norm_role=input`),
  which also feed the residual stream.
  """
  model = copy_model(model)
  left = []
  for s in wiring.scales(model.config):
    if s.role != R.INPUT_SCALE:
      continue
    if not s.folds or any(c.transposed for c in s.consumers):
      left.append(s.name)
      continue
    fold_scale(model, s)
  return model, left

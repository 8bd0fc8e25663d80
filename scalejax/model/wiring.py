"""Which scale feeds which linear map, and through which ops: the decoder's wiring.

`scales(config)` lists one `Scale` per scale form the decoder builds (a norm's branch,
or DP's bare output scale) with the `Consumer`s its output reaches: the next kernel and
the ops in between (`OPS`), or the residual stream. `kernels(config)` lists every
weight of a linear map and the embedding table. Parameter counts (counting.py), the
preconditioner bounds (analysis/scale_stats.py) and folding (analysis/quant.py) read
these records instead of keeping their own map of the model.

The records are derived from the same facts the modules are built from: the maps a norm
feeds are the module's `BRANCHES` (`Attention`, `MLP`, `MoE`, the router included), DP/DNP
wrap the maps `layers.dual_mode` names, a Post-Norm block has no final norm, a tied head
is the embedding table used transposed. tests/test_wiring.py checks them against built
models. The last section reads records off a built model (`module_at`, `form_gamma`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from scalejax.core import roles as R
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import MLP_MODULES
from scalejax.model.layers import MLP, Attention, dual_mode, input_branches

# What lies between a scale's output and the kernel of a consumer.
OPS = {
    'linear': 'the kernel reads it as it is: W(gamma * n) = (diag(gamma) W) n',
    'rope+dot': "RoPE, then attention's q.k dot product and softmax (q and k)",
    'attention-sum': "attention's weighted sum over positions (v's output, before W_o)",
    'silu': "SiLU (the gate's output)",
    'glu': 'the product silu(gate) * up',
    'norm': 'the statistics of a following norm (QK-norm after DP/DNP on q, k)',
    'residual': 'added to the residual stream (no kernel)',
}
LAYER_RELATIONS = ('same', 'next', 'last')  # values of Consumer.layer
# Logical axes that stack copies of a module: the decoder's layers, the MoE's experts.
STACK_AXES = ('layers', 'expert')

HEAD = ('head', 'kernel')  # the untied LM head's kernel
ATTN, MLP_PATH = ('blocks', 'attn'), ('blocks', 'mlp')
# The ops from the output of each DP/DNP-wrapped map to the next kernel (W_o, W_down).
_AFTER = {'q': ('rope+dot',), 'k': ('rope+dot',), 'v': ('attention-sum',),
          'gate': ('silu', 'glu'), 'up': ('glu',)}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A weight: param `path`, `shape` of one copy ([d_in, d_out]; the table [vocab, d]),
  stacked over the logical axes `stack`, `copies` of it in all."""
  path: tuple[str, ...]
  shape: tuple[int, int]
  role: str = R.MATRIX
  stack: tuple[str, ...] = ()
  copies: int = 1

  @property
  def size(self) -> int:
    return self.copies * math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Consumer:
  """Where a scale's output goes: into `kernel` through `ops`, or (kernel None) into
  the residual stream. `transposed`: the kernel is used transposed (the tied embedding
  table as the head). `layer`: the kernel is in the scale's own layer ('same'), in the
  next one ('next': a Post-Norm block's last norm feeds the next block), or only the
  last layer's output reaches it ('last': Post-Norm's head). Routing tokens to MoE
  experts moves whole vectors, so it is no op."""
  kernel: Kernel | None
  ops: tuple[str, ...]
  transposed: bool = False
  layer: str = 'same'

  def __post_init__(self):
    unknown = set(self.ops) - set(OPS)
    if unknown or self.layer not in LAYER_RELATIONS:
      raise ValueError(f'unknown ops {sorted(unknown)} or layer {self.layer!r}')

  @property
  def direct(self) -> bool:
    return self.ops == ('linear',)


@dataclasses.dataclass(frozen=True)
class Scale:
  """One scale form: module `path`, width `dim`, stacked over `stack` (`copies` in all),
  its `consumers`, and the path of the norm bias beside it (None without one)."""
  path: tuple[str, ...]
  dim: int
  consumers: tuple[Consumer, ...]
  stack: tuple[str, ...] = ()
  copies: int = 1
  bias: tuple[str, ...] | None = None

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  @property
  def role(self) -> str:
    """The role the model gives it (docs/ROLES.md): input when its output feeds a linear
    map directly, even where it also feeds the residual stream (Post-Norm)."""
    return R.INPUT_SCALE if any(c.direct for c in self.consumers) else R.OUTPUT_SCALE

  @property
  def folds_into(self) -> tuple[Consumer, ...]:
    """The consumers gamma moves into with the function unchanged: all of them when each
    is a kernel reading the output directly, else none (a Post-Norm output also feeds
    the residual stream). A tied table is listed; that it is also the input embedding
    is for the folding code to handle."""
    return self.consumers if all(c.direct for c in self.consumers) else ()

  @property
  def kernels(self) -> tuple[tuple[str, ...], ...]:
    """Param paths of the kernels it folds into."""
    return tuple(c.kernel.path for c in self.folds_into)


def _copies(config: ModelConfig, stack: tuple[str, ...]) -> int:
  return math.prod({'layers': config.n_layers, 'expert': config.moe_experts}[a] for a in stack)


def _swiglus(config: ModelConfig) -> list[tuple[tuple[str, ...], int, tuple[str, ...]]]:
  """(module path, hidden width, stack) of each SwiGLU MLP of a block."""
  if config.mlp == 'dense':
    return [(MLP_PATH, config.resolved_d_ff, ('layers',))]
  out = [(MLP_PATH + ('experts',), config.resolved_moe_expert_ff, ('layers', 'expert'))]
  if config.moe_shared_ff:
    out.append((MLP_PATH + ('shared',), config.moe_shared_ff, ('layers',)))
  return out


def _kernels(config: ModelConfig) -> dict[tuple[str, ...], Kernel]:
  """Module path of each linear map (and the table) -> its Kernel."""
  d, h = config.d_model, config.resolved_head_dim
  q, kv = config.n_heads * h, config.resolved_n_kv_heads * h
  out = {}

  def add(path, shape, stack=('layers',), role=R.MATRIX):
    param = 'table' if role == R.EMBEDDING else 'kernel'
    out[path] = Kernel(path + (param,), shape, role, stack, _copies(config, stack))

  add(('embed',), (config.vocab_size, d), (), R.EMBEDDING)
  for name, shape in (('q', (d, q)), ('k', (d, kv)), ('v', (d, kv)), ('o', (q, d))):
    add(ATTN + (name,), shape)
  if config.mlp == 'moe':
    add(MLP_PATH + ('router',), (d, config.moe_experts))
  for path, f, stack in _swiglus(config):
    for name, shape in (('gate', (d, f)), ('up', (d, f)), ('down', (f, d))):
      add(path + (name,), shape, stack)
  if not config.tie_embeddings:
    add(('head',), (d, config.vocab_size), ())
  return out


def kernels(config: ModelConfig) -> tuple[Kernel, ...]:
  """Every weight of a model built from `config`: linear maps (head, router, experts
  included) and the embedding table."""
  return tuple(_kernels(config).values())


def scales(config: ModelConfig) -> tuple[Scale, ...]:
  """Every scale form of a model built from `config` (also those of the `none` form,
  which have no params), with what its output feeds."""
  ks = _kernels(config)
  d = config.d_model
  out = []

  def norm(path, branches, dim, consumers_of, stack=('layers',)):
    for b in branches:
      bias = path + (f'{b}_bias',) if config.norm_bias else None
      out.append(Scale(path + (b,), dim, tuple(consumers_of(b)), stack,
                       _copies(config, stack), bias))

  def fed(maps, branch, layer='same'):
    # A shared norm feeds all the maps; an HG branch feeds the maps of its own name.
    return [Consumer(k, ('linear',), layer=layer) for k in maps
            if branch == 'scale' or k.path[-2] == branch]

  mlp_cls = MLP_MODULES[config.mlp]
  attn_maps = [ks[ATTN + (b,)] for b in Attention.BRANCHES]
  mlp_maps = [k for p, k in ks.items() if p[:2] == MLP_PATH and p[-1] in mlp_cls.BRANCHES]
  head = (Consumer(ks[('embed',)], ('linear',), transposed=True) if config.tie_embeddings
          else Consumer(ks[('head',)], ('linear',)))
  residual = Consumer(None, ('residual',))
  attn_branches = input_branches(Attention, config.hg)
  mlp_branches = input_branches(mlp_cls, config.hg)
  if config.placement == 'post':
    # The norm after each residual add feeds the next sub-layer and the residual stream;
    # the last block's MLP norm feeds the head.
    norm(('blocks', 'attn_norm'), attn_branches, d, lambda b: fed(mlp_maps, b) + [residual])
    norm(('blocks', 'mlp_norm'), mlp_branches, d,
         lambda b: fed(attn_maps, b, 'next') + [dataclasses.replace(head, layer='last'),
                                               dataclasses.replace(residual, layer='next')])
  else:
    norm(('blocks', 'attn_norm'), attn_branches, d, lambda b: fed(attn_maps, b))
    norm(('blocks', 'mlp_norm'), mlp_branches, d, lambda b: fed(mlp_maps, b))
    if config.placement == 'sandwich':
      for name in ('attn_out_norm', 'mlp_out_norm'):
        norm(('blocks', name), ('scale',), d, lambda b: [residual])
    norm(('final_norm',), ('scale',), d, lambda b: [head], stack=())
  if config.qk_norm:
    for name in ('q_norm', 'k_norm'):
      norm(ATTN + (name,), ('scale',), config.resolved_head_dim,
           lambda b: [Consumer(ks[ATTN + ('o',)], ('rope+dot',))])

  # DP: a bare scale at `<map>/post`; DNP: a norm there, its scale at `<map>/post/scale`.
  wrapped = [(ATTN, Attention.BRANCHES, 'o', ('layers',))]
  wrapped += [(path, MLP.BRANCHES, 'down', stack) for path, _, stack in _swiglus(config)]
  qk = ('norm',) if config.qk_norm else ()
  for path, names, next_map, stack in wrapped:
    for name in names:
      mode = dual_mode(config, name)
      if mode == 'none':
        continue
      dim = ks[path + (name,)].shape[1]
      ops = (qk if name in ('q', 'k') else ()) + _AFTER[name]
      uses = [Consumer(ks[path + (next_map,)], ops)]
      if mode == 'dp':
        out.append(Scale(path + (name, 'post'), dim, tuple(uses), stack, _copies(config, stack)))
      else:
        norm(path + (name, 'post'), ('scale',), dim, lambda b: uses, stack)
  return tuple(out)


# --- reading records off a built model ----------------------------------------------

def module_at(model, path):
  for p in path:
    model = getattr(model, p)
  return model


def stack_depth(module) -> int:
  """How many leading axes of the module's params stack copies of it (`STACK_AXES`)."""
  axes = jax.tree.leaves(R.axes_tree(module), is_leaf=lambda x: isinstance(x, tuple))
  depths = {next((i for i, a in enumerate(ax) if a not in STACK_AXES), len(ax)) for ax in axes}
  if len(depths) > 1:
    raise ValueError(f'params of one scale form are stacked unequally: axes {axes}')
  return depths.pop() if depths else 0


def form_gamma(form) -> jax.Array | None:
  """Effective gamma of one scale form: [*stack, dim] ([layers, dim], [layers, experts,
  dim]) when stacked, else [dim]; None for the `none` form."""
  graphdef, state = nnx.split(form)
  gamma = lambda s: nnx.merge(graphdef, s)()
  for _ in range(stack_depth(form)):
    gamma = jax.vmap(gamma)
  return gamma(nnx.to_pure_dict(state))


def extra_stack_axes(scale: Scale, consumer: Consumer) -> tuple[int, ...]:
  """Axes of the consumer's kernel stacked beyond the scale (the experts an MLP norm
  feeds), counted in the kernel's shape [*stack, d_in, d_out]."""
  return tuple(range(len(scale.stack), len(consumer.kernel.stack)))


def _flat(tree) -> dict[tuple[str, ...], object]:
  return {tuple(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def input_scale_consumers(model) -> list[Scale]:
  """Every input-role scale of a built `model`, each with the kernels it folds into.

  Roles are the data: the model's input-role params must be exactly those of the input
  scales listed here, so a norm the wiring does not know is an error, not a skip.
  """
  listed = [s for s in scales(model.config) if s.role == R.INPUT_SCALE]
  residual = [s.name for s in listed if not s.folds_into]
  if residual:
    raise ValueError(f'input-role scales {residual} also feed the residual stream: '
                     'input-scale consumers are defined for model.placement=pre or sandwich')
  have = {path[:-1] for path, role in _flat(R.role_tree(model)).items()
          if role == R.INPUT_SCALE}
  unknown = have - {s.path for s in listed}
  missing = [s.name for s in listed
             if s.path not in have and R.params_of(module_at(model, s.path))]
  if unknown or missing:
    raise ValueError(f'the wiring (scalejax/model/wiring.py) disagrees with the model\'s '
                     f'roles: input-role params under {sorted(map("/".join, unknown))} are '
                     f'not listed, listed input scales {missing} do not have role input_scale')
  return listed

"""Which scale feeds which linear map, and through which ops: the decoder's wiring.

`scales(config)` lists one `Scale` per scale form the decoder builds (a norm's branch,
or DP's bare output scale) with the `Consumer`s its output reaches: the next kernel and
the ops in between (`OPS`), or the residual stream. `kernels(config)` lists every
weight of a linear map and the embedding table. Each scale's role follows from its
consumers (`scale_role`: input when it folds into them) and the decoder labels its
params with it (`label_roles`); whether its magnitude is function-neutral follows too
(`Scale.neutral`). Parameter counts (counting.py), the preconditioner bounds
(analysis/scale_stats.py), folding (analysis/folding.py) and docs/ROLES.md
(cli/roles_doc.py) read these records instead of keeping their own map of the model.

The records are derived from the same facts the modules are built from: the maps a norm
feeds are the module's `BRANCHES` (`Attention`, `MLP`, `MoE`, the router included), DP/DNP
wrap the maps `layers.dual_mode` names, a Post-Norm block has no final norm, a tied head
is the embedding table used transposed. tests/test_wiring.py checks them against built
models, tests/test_roles.py against the logits. The last section reads records off a
built model (`module_at`, `form_gamma`) and labels it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scalejax.core import roles as R
from scalejax.model.config import ModelConfig
from scalejax.model.layers import MLP, Attention, dual_mode, input_branches
from scalejax.model.moe import MLP_MODULES
from scalejax.scales.norms import SCALE_FORMS

@dataclasses.dataclass(frozen=True)
class Op:
  """What lies between a scale's output and a consumer's kernel. `channelwise`: a
  per-channel factor on the op's input comes out as the same factor on its output
  channels (the op is linear per channel), so it can move on into the kernel's rows."""
  doc: str
  channelwise: bool


OPS = {
    'linear': Op('the kernel reads it as it is: W(gamma * n) = (diag(gamma) W) n', True),
    'rope+dot': Op("RoPE, then attention's q.k dot product and softmax (q and k)", False),
    'attention-sum': Op("attention's weighted sum over positions (v's output, before W_o): "
                        'channel c of the result is a sum of channel c of v', True),
    'silu': Op("SiLU (the gate's output)", False),
    'glu': Op('the product silu(gate) * up, channelwise in up', True),
    'norm': Op('the statistics of a following norm (QK-norm after DP/DNP on q, k); they '
               'forget a constant factor, nothing else', False),
    'residual': Op('added to the residual stream (no kernel)', False),
}
LAYER_RELATIONS = ('same', 'next', 'last')  # values of Consumer.layer
# Logical axes that stack copies of a module: the decoder's layers, the MoE's experts.
STACK_AXES = ('layers', 'expert')

HEAD = ('head', 'kernel')  # the untied LM head's kernel
ATTN, MLP_PATH = ('blocks', 'attn'), ('blocks', 'mlp')
# The ops from the output of each DP/DNP-wrapped map to the next kernel (W_o, W_down).
_AFTER = {'q': ('rope+dot',), 'k': ('rope+dot',), 'v': ('attention-sum',),
          'gate': ('silu', 'glu'), 'up': ('glu',)}
_NEXT = {'q': 'o', 'k': 'o', 'v': 'o', 'gate': 'down', 'up': 'down'}


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
  the residual stream.

  `transposed`: the kernel is used transposed (the tied embedding table as the head).
  `layer`: the kernel is in the scale's own layer ('same'), in the next one ('next': a
  Post-Norm block's last norm feeds the next block), or only the last layer's output
  reaches it ('last': Post-Norm's head). `heads` = (kv heads K, query heads per kv
  head G) when a scale channel reaches G kernel rows: v's channel (kv head j, dim h)
  reaches the W_o rows of each query head of group j. `renormalized`: the kernel's
  output reaches a norm's statistics through ops that keep a constant factor a
  constant factor (DNP's norm, QK-norm, a sandwich output norm), and nothing else
  reads it, so the norm forgets the kernel's output magnitude. Routing tokens to MoE
  experts moves whole vectors, so it is no op.
  """
  kernel: Kernel | None
  ops: tuple[str, ...]
  transposed: bool = False
  layer: str = 'same'
  heads: tuple[int, int] | None = None
  renormalized: bool = False

  def __post_init__(self):
    unknown = set(self.ops) - set(OPS)
    if unknown or self.layer not in LAYER_RELATIONS:
      raise ValueError(f'unknown ops {sorted(unknown)} or layer {self.layer!r}')

  @property
  def direct(self) -> bool:
    return self.ops == ('linear',)

  @property
  def folds(self) -> bool:
    """A per-channel gamma moves into the kernel's rows with the function unchanged."""
    return self.kernel is not None and all(OPS[op].channelwise for op in self.ops)

  @property
  def forgets_magnitude(self) -> bool:
    """A constant factor on the scale's output changes nothing downstream: a norm reads
    it before any op that is not channelwise, or the kernel's output is renormalized."""
    for op in self.ops:
      if op == 'norm':
        return True
      if not OPS[op].channelwise:
        return False
    return self.renormalized

  def to_rows(self, gamma):
    """A scale's [..., dim] vector spread onto the kernel's [..., d_in] rows."""
    if self.heads is None:
      return gamma
    k, g = self.heads
    per_head = gamma.reshape(gamma.shape[:-1] + (k, 1, -1))
    return jnp.broadcast_to(per_head, per_head.shape[:-2] + (g, per_head.shape[-1])) \
        .reshape(gamma.shape[:-1] + (-1,))

  def from_rows(self, rows):
    """The transpose of `to_rows`: per-row values [..., d_in] summed per scale channel."""
    if self.heads is None:
      return rows
    k, g = self.heads
    return rows.reshape(rows.shape[:-1] + (k, g, -1)).sum(-2).reshape(rows.shape[:-1] + (-1,))


@dataclasses.dataclass(frozen=True)
class Scale:
  """One scale form: module `path`, width `dim`, stacked over `stack` (`copies` in all),
  its `consumers`, its `role`, and the path of the norm bias beside it (None without)."""
  path: tuple[str, ...]
  dim: int
  consumers: tuple[Consumer, ...]
  role: str
  stack: tuple[str, ...] = ()
  copies: int = 1
  bias: tuple[str, ...] | None = None

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  @property
  def folds(self) -> bool:
    """gamma moves into its consumers' kernels with the function unchanged (a tied head
    once untied): every consumer is a kernel reached through channelwise ops."""
    return bool(self.consumers) and all(c.folds for c in self.consumers)

  @property
  def folds_into(self) -> tuple[Consumer, ...]:
    """The consumers gamma moves into: all of them if it folds, else none."""
    return self.consumers if self.folds else ()

  @property
  def kernels(self) -> tuple[tuple[str, ...], ...]:
    """Param paths of the kernels it folds into."""
    return tuple(c.kernel.path for c in self.folds_into)

  @property
  def neutral(self) -> bool:
    """Its magnitude is function-neutral: every consumer forgets a constant factor, so
    scaling gamma by a constant changes nothing and its gradient along gamma is 0."""
    return bool(self.consumers) and all(c.forgets_magnitude for c in self.consumers)


def scale_role(consumers, post_norm_role: str) -> str:
  """The rule: an input scale folds into the linear maps it feeds (W(gamma * n) =
  (W diag(gamma)) n, so it adds no expressivity), an output scale does not. A
  Post-Norm norm feeds linear maps *and* the residual stream: it cannot fold, and
  whether it counts as an input scale is `model.post_norm_role` (our reading)."""
  if consumers and all(c.folds for c in consumers):
    return R.INPUT_SCALE
  if any(c.direct for c in consumers) and any(c.kernel is None for c in consumers):
    return R.INPUT_SCALE if post_norm_role == 'input' else R.OUTPUT_SCALE
  return R.OUTPUT_SCALE


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


def _renormalized(config: ModelConfig, path: tuple[str, ...], every_expert: bool) -> bool:
  """Whether a norm forgets a constant factor on the output of the map at module `path`:
  the output reaches the norm through ops that carry the factor through (a DP scale,
  the attention sum, the product with silu(gate), the next kernel) and nothing else is
  added on the way. An MoE's outputs are summed before a sandwich norm: the factor is
  forgotten only when it reaches every expert and the shared one (`every_expert`: the
  scale is a norm in front of all of them, not one expert's or the shared one's own)."""
  name = path[-1]
  if dual_mode(config, name) == 'dnp':
    return True
  if name in ('q', 'k'):
    return config.qk_norm  # DP's u, then QK-norm per head
  if name in ('v', 'up'):
    return _renormalized(config, path[:-1] + (_NEXT[name],), every_expert)
  if name == 'o':
    return config.placement == 'sandwich'
  if name == 'down':
    return config.placement == 'sandwich' and (config.mlp == 'dense' or every_expert)
  return False  # gate (SiLU), router (softmax), the head


def scales(config: ModelConfig) -> tuple[Scale, ...]:
  """Every scale form of a model built from `config` (also those of the `none` form,
  which have no params), with what its output feeds and the role that follows."""
  ks = _kernels(config)
  d = config.d_model
  out = []

  def add(path, dim, consumers, stack, bias=None):
    out.append(Scale(path, dim, tuple(consumers), scale_role(consumers, config.post_norm_role),
                     stack, _copies(config, stack), bias))

  def norm(path, branches, dim, consumers_of, stack=('layers',)):
    for b in branches:
      bias = path + (f'{b}_bias',) if config.norm_bias else None
      add(path + (b,), dim, consumers_of(b), stack, bias)

  def reads(k, layer='same'):
    return Consumer(k, ('linear',), layer=layer,
                    renormalized=_renormalized(config, k.path[:-1], every_expert=True))

  def fed(maps, branch, layer='same'):
    # A shared norm feeds all the maps; an HG branch feeds the maps of its own name.
    return [reads(k, layer) for k in maps if branch == 'scale' or k.path[-2] == branch]

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
  # Channels of k and v (K kv heads) meet the W_o rows of every query head of their
  # group; QK-norm's (one head's width) those of every head.
  group = (config.resolved_n_kv_heads, config.n_heads // config.resolved_n_kv_heads)
  if config.qk_norm:
    for name in ('q_norm', 'k_norm'):
      norm(ATTN + (name,), ('scale',), config.resolved_head_dim,
           lambda b: [Consumer(ks[ATTN + ('o',)], ('rope+dot',), heads=(1, config.n_heads))])

  # DP: a bare scale at `<map>/post`; DNP: a norm there, its scale at `<map>/post/scale`.
  wrapped = [(ATTN, Attention.BRANCHES, ('layers',))]
  wrapped += [(path, MLP.BRANCHES, stack) for path, _, stack in _swiglus(config)]
  qk = ('norm',) if config.qk_norm else ()
  for path, names, stack in wrapped:
    for name in names:
      mode = dual_mode(config, name)
      if mode == 'none':
        continue
      dim = ks[path + (name,)].shape[1]
      nxt = path + (_NEXT[name],)
      uses = [Consumer(ks[nxt], (qk if name in ('q', 'k') else ()) + _AFTER[name],
                       heads=group if name in ('k', 'v') else None,
                       renormalized=_renormalized(config, nxt, every_expert=False))]
      if mode == 'dp':
        add(path + (name, 'post'), dim, uses, stack)
      else:
        norm(path + (name, 'post'), ('scale',), dim, lambda b: uses, stack)
  return tuple(out)


def feeds(scale: Scale) -> str:
  """What a scale's output feeds: 'W_q, W_k (linear); residual' and the like."""
  def one(c):
    if c.kernel is None:
      return 'residual'
    name = c.kernel.path[-2]
    name = {'embed': 'head (tied table)', 'head': 'head'}.get(name, f'W_{name}')
    where = {'same': '', 'next': ' of the next layer', 'last': ' (last layer)'}[c.layer]
    return f'{name}{where} ({"+".join(c.ops)})'
  uses = []
  for text in map(one, scale.consumers):
    if text not in uses:  # every expert's W_up reads the same way
      uses.append(text)
  return ', '.join(uses)


def scale_params(config: ModelConfig, scale: Scale) -> int:
  """Params of one scale record, every copy (layer, expert) counted; the form counts its
  own."""
  return SCALE_FORMS[config.norm_spec.scale].param_count(scale.dim) * scale.copies


def scale_table(config: ModelConfig, *, markdown: bool = False) -> str:
  """One row per scale: role, params, what it feeds, whether it folds, and whether its
  magnitude is function-neutral."""
  head = ('scale', 'role', 'params', 'folds', 'neutral magnitude', 'feeds')
  rows = [(s.name, s.role.split('_')[0], f'{scale_params(config, s):,}',
           'yes' if s.folds else 'no', 'yes' if s.neutral else 'no', feeds(s))
          for s in scales(config)]
  if markdown:
    lines = ['| ' + ' | '.join(head) + ' |', '|---|---|---:|---|---|---|']
    return '\n'.join(lines + ['| `' + r[0] + '` | ' + ' | '.join(r[1:]) + ' |' for r in rows])
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
  fmt = lambda r: '  '.join(c.ljust(w) if i != 2 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths))) + '  ' + r[5]
  return '\n'.join(map(fmt, [head] + rows))


def scale_report(config: ModelConfig) -> str:
  """`scale_table`, then a line naming the scales whose magnitude is function-neutral
  and, for Post-Norm, the role its norms were given: what the training log and the
  param report print."""
  lines = [scale_table(config)]
  names = [s.name for s in scales(config) if s.neutral]
  if names:
    frozen = ' (their magnitude params are frozen)' if config.variant_spec.freeze_neutral else ''
    lines.append(f'{len(names)} scale(s) with a function-neutral magnitude (every consumer '
                 f'renormalizes; decay only changes their effective LR){frozen}: '
                 f'{", ".join(names)}')
  if config.placement == 'post':
    lines.append(f'Post-Norm norms have role {config.post_norm_role}_scale '
                 '(model.post_norm_role: they feed linear maps and the residual stream)')
  return '\n'.join(lines)


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


def _params_of_form(form) -> list[nnx.Variable]:
  return [v for _, v in nnx.iter_graph(form) if isinstance(v, nnx.Param)]


def label_roles(model) -> None:
  """Gives every scale param of a built decoder the role its wiring decides.

  The modules build their scale forms with role `unlabelled`; this is the one place
  a scale's role is set. Under a variant with `freeze_neutral`, the magnitude params
  (metadata part 'magnitude': magdir's beta) of scales whose magnitude is
  function-neutral (`Scale.neutral`) are also marked `frozen`; the optimizer leaves them
  at their init. A scale param the wiring does not list is an error, not a skip.
  """
  freeze = model.config.variant_spec.freeze_neutral
  for s in scales(model.config):
    form = module_at(model, s.path)
    form.role = s.role
    for v in _params_of_form(form):
      v.set_metadata(role=s.role)
      if freeze and s.neutral and v.get_metadata().get('part') == 'magnitude':
        v.set_metadata(frozen=True)
  left = [path for path, role in _flat(R.role_tree(model, unlabelled_ok=True)).items()
          if role == R.UNLABELLED]
  if left:
    raise ValueError(f'scale params {sorted(map("/".join, left))} are not in the wiring '
                     '(scalejax/model/wiring.py): a norm the decoder builds needs a record '
                     'in wiring.scales')

"""The wiring (model/wiring.py) against built models: the counts and statistics of a
scale form registered here only, the kernels and scales it names, folding along it."""

import itertools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalejax.analysis.scale_stats import (effective_scales, preconditioner_statistics,
                                           scale_statistics)
from scalejax.core import roles as R
from scalejax.model import wiring
from scalejax.model.config import ModelConfig
from scalejax.model.counting import param_counts
from scalejax.model.decoder import build_model
from scalejax.scales import norms, variants

SMALL = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
             moe_experts=4, moe_top_k=2, moe_expert_ff=24)


def _config(**kw):
  return ModelConfig(**{**SMALL, **kw})


def _params(model) -> dict[tuple[str, ...], tuple[tuple[int, ...], str, tuple]]:
  """param path -> (shape, role, logical axes)."""
  flat = jax.tree_util.tree_leaves_with_path(R.params_of(model))
  roles = jax.tree.leaves(R.role_tree(model))
  axes = jax.tree.leaves(R.axes_tree(model), is_leaf=lambda x: isinstance(x, tuple))
  return {tuple(str(k.key) for k in path): (tuple(p.shape), r, a)
          for (path, p), r, a in zip(flat, roles, axes)}


def _random_model(config, seed=0):
  """A model built abstractly, then given random params (scales in [0.5, 1.5]): no init
  to run op by op, which is slow on CPU."""
  abstract = nnx.eval_shape(lambda: build_model(config))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  value = lambda s, r: (rng.uniform(0.5, 1.5, s.shape) if r in R.SCALE_ROLES
                        else 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
  params = jax.tree.map(value, nnx.to_pure_dict(state), R.role_tree(abstract))
  return nnx.merge(graphdef, params)


def _stack_shape(config, stack):
  return tuple({'layers': config.n_layers, 'expert': config.moe_experts}[a] for a in stack)


# --- a scale form the library does not know ----------------------------------------

class TwoScalarVector(norms._Form):
  """gamma = a * b * v: a vector and two scalars, gamma = 1 at init (a = 2, b = 1/2)."""

  def __init__(self, dim, role, storage):
    super().__init__(dim, role, storage)
    self.v = self._param(1.0, (dim,), ('norm',))
    self.a = self._param(2.0, (), ())
    self.b = self._param(0.5, (), ())

  def __call__(self):
    return self._read(self.a, 2.0) * self._read(self.b, 0.5) * self._read(self.v, 1.0)


@pytest.fixture
def two_scalar_forms(monkeypatch):
  monkeypatch.setitem(norms.SCALE_FORMS, 'two_scalar', TwoScalarVector)
  for name, kw in (('two_scalar_hg_dnp', dict(hg=True, dual='dnp')),
                   ('two_scalar_dp', dict(dual='dp'))):
    monkeypatch.setitem(variants.VARIANTS, name, variants.Variant(scale='two_scalar', **kw))


NEW_FORM_CASES = [
    dict(variant='two_scalar_hg_dnp', mlp='moe', moe_shared_ff=16, qk_norm=True),
    dict(variant='two_scalar_dp', placement='sandwich', tie_embeddings=True,
         scale_storage='delta', norm='layer', norm_bias=True),
    dict(variant='two_scalar_dp', placement='post', qk_norm=True),
]


@pytest.mark.parametrize('kw', NEW_FORM_CASES)
def test_a_new_scale_form_is_counted_and_inspected_with_no_library_edit(two_scalar_forms, kw):
  config = _config(**kw)
  model = _random_model(config, seed=1)
  params = _params(model)
  size = lambda *roles: sum(int(np.prod(s)) for s, r, _ in params.values() if r in roles)
  counts = param_counts(config)
  assert counts['total'] == size(*R.ROLES)
  assert counts['scale'] == size(*R.SCALE_ROLES)
  assert counts['norm'] == size(*R.SCALE_ROLES, R.OTHER)
  assert counts['matrix'] == size(R.MATRIX) and counts['embedding'] == size(R.EMBEDDING)
  new = list(wiring.scales(config))
  assert all(isinstance(wiring.module_at(model, s.path), TwoScalarVector) for s in new)

  # Raw statistics: one entry per param (and layer) of every form, a, b and v included.
  stats = scale_statistics(R.params_of(model), R.role_tree(model), R.axes_tree(model))
  want = set()
  for path, (shape, role, axes) in params.items():
    if role in R.SCALE_ROLES:
      name = '/'.join(path)
      want |= ({f'{name}/layer{i}' for i in range(config.n_layers)} if 'layers' in axes
               else {name})
  assert set(stats) == want and {p[-1] for p in params if p[:-1] == new[0].path} == {'v', 'a', 'b'}

  # Effective gammas: the form's own a * b * v, for every scale of the wiring.
  gammas = effective_scales(model)
  assert set(gammas) == {s.name for s in new}
  form = wiring.module_at(model, new[0].path)
  read = lambda p, init: p[...] + (init if config.scale_storage == 'delta' else 0.0)
  want = read(form.a, 2.0)[:, None] * read(form.b, 0.5)[:, None] * read(form.v, 1.0)
  chex.assert_trees_all_close(gammas[new[0].name][1], want, rtol=1e-6)

  # Preconditioner: every scale that folds (Post-Norm's norms do not), on that gamma.
  pstats = preconditioner_statistics(model)
  inputs = [s for s in new if s.folds]
  assert all(s.role == R.INPUT_SCALE for s in inputs)
  keys = {f'{s.name}/layer{i}' if s.stack else s.name: (s, i)
          for s in inputs for i in range(config.n_layers if s.stack else 1)}
  assert set(pstats) == set(keys)
  for key, (s, i) in keys.items():
    g = gammas[s.name][1]
    g = g[i] if s.stack else g
    assert pstats[key]['gamma2_mean'] == pytest.approx(float(jnp.mean(g ** 2)), rel=1e-5)


# --- the wiring names what the model builds -----------------------------------------

GRID = [dict(placement=p, qk_norm=qk, variant=v, mlp=mlp, tie_embeddings=tied)
        for p, qk, v, mlp, tied in itertools.product(
            ('pre', 'sandwich', 'post'), (False, True), ('hg', 'dp', 'dnp', 'magdir'),
            ('dense', 'moe'), (False, True))
        if not (p == 'post' and v == 'hg')]


def _grid_config(kw):
  # MoE configs get a shared expert; tied ones a LayerNorm with biases.
  extra = dict(moe_shared_ff=16 if kw['mlp'] == 'moe' else 0)
  if kw['tie_embeddings']:
    extra.update(norm='layer', norm_bias=True)
  return _config(**kw, **extra)


@pytest.mark.parametrize('kw', GRID, ids=lambda kw: '-'.join(str(v) for v in kw.values()))
def test_wiring_names_exactly_the_kernels_and_scales_of_the_built_model(kw):
  config = _grid_config(kw)
  model = nnx.eval_shape(lambda: build_model(config))
  params = _params(model)

  kernels = wiring.kernels(config)
  assert {k.path: (_stack_shape(config, k.stack) + k.shape, k.role, k.stack) for k in kernels} \
      == {p: (s, r, a[:len(a) - 2]) for p, (s, r, a) in params.items()
          if r in (R.MATRIX, R.EMBEDDING)}

  scales = wiring.scales(config)
  owner = {}
  for s in scales:
    form = wiring.module_at(model, s.path)
    assert isinstance(form, tuple(norms.SCALE_FORMS.values())) and form.dim == s.dim, s.name
    assert s.copies == int(np.prod(_stack_shape(config, s.stack)))
    for c in s.consumers:
      assert c.kernel is None or c.kernel in kernels, (s.name, c)
      if c.direct:  # the kernel's input side is the scale's width
        assert c.kernel.shape[1 if c.transposed else 0] == s.dim, (s.name, c)
  for path, (shape, role, axes) in params.items():
    if role in R.SCALE_ROLES:
      listed = [s for s in scales if s.path == path[:-1]]
      assert len(listed) == 1, path
      s = listed[0]
      assert (role, axes[:len(s.stack)]) == (s.role, s.stack), path
      assert shape[:len(s.stack)] == _stack_shape(config, s.stack), path
      assert shape[len(s.stack):] in ((), (s.dim,)), path
      owner[path] = s
  assert {s.path for s in owner.values()} == {s.path for s in scales}
  assert {p for p, (_, r, _) in params.items() if r == R.OTHER} == {s.bias for s in scales
                                                                    if s.bias}
  # A scale that folds is an input scale; one that does not is an output scale, except
  # the norms Post-Norm feeds into linear maps and the residual stream (post_norm_role).
  for s in scales:
    mixed = any(c.kernel is None for c in s.consumers) and any(c.direct for c in s.consumers)
    assert s.role == (R.INPUT_SCALE if s.folds or (mixed and config.post_norm_role == 'input')
                      else R.OUTPUT_SCALE), s.name
    assert not mixed or config.placement == 'post', s.name


# --- docs/ROLES.md is the wiring's ------------------------------------------------

def test_roles_doc_is_what_the_wiring_generates():
  from scalejax.cli import roles_doc
  doc = Path(__file__).parents[1] / 'docs' / 'ROLES.md'
  assert doc.read_text() == roles_doc.render(), (
      'docs/ROLES.md is out of date: run python -m scalejax.cli.roles_doc')

"""The role table in docs/ROLES.md is what the models actually carry."""

import fnmatch
import itertools
import re
from pathlib import Path

import jax
import pytest

from scalejax.core import roles
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.scales.variants import VARIANTS

DOC = Path(__file__).parents[1] / 'docs' / 'ROLES.md'
PLACEMENTS = ('pre', 'sandwich', 'post')
ROLE_WORDS = {'input': roles.INPUT_SCALE, 'output': roles.OUTPUT_SCALE, '-': None}


def _expand(pattern):
  m = re.search(r'\{([^}]*)\}', pattern)
  if not m:
    return [pattern]
  return [p for alt in m.group(1).split(',')
          for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def _doc_table():
  """[(path glob, {placement: role or None})] from the markdown table."""
  rows = []
  for line in DOC.read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) != 6 or '`' not in cells[1]:
      continue
    expected = dict(zip(PLACEMENTS, (ROLE_WORDS[c] for c in cells[2:5])))
    for pat in re.findall(r'`([^`]+)`', cells[1]):
      rows.extend((p, expected) for p in _expand(pat))
  return rows


TABLE = _doc_table()


def _scale_paths(model):
  tree = roles.role_tree(model)
  return {'/'.join(str(k.key) for k in path): r
          for path, r in jax.tree_util.tree_leaves_with_path(tree)}


def test_table_parses():
  assert len(TABLE) >= 12


@pytest.mark.parametrize('placement,variant', [
    (p, v) for p, v in itertools.product(PLACEMENTS, VARIANTS)
    if not (p == 'post' and VARIANTS[v].hg)])
def test_roles_match_doc_table(placement, variant):
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, placement=placement,
                    variant=variant, qk_norm=True, norm='layer', norm_bias=True)
  paths = _scale_paths(build_model(cfg))
  covered = set()
  for path, role in paths.items():
    if role not in roles.SCALE_ROLES:
      continue
    rows = [exp for pat, exp in TABLE if fnmatch.fnmatch(path, pat)]
    assert rows, f'{path} ({role}) is missing from docs/ROLES.md'
    assert all(exp[placement] == role for exp in rows), (
        f'{path}: model says {role}, docs/ROLES.md says {rows[0][placement]} for {placement}')
    covered.add(path)
  for pat, exp in TABLE:
    present = any(fnmatch.fnmatch(p, pat) for p in covered)
    wraps = '/post/' in pat
    if exp[placement] is None:
      assert not present, f'{pat} should not exist under placement {placement}'
    elif not wraps and VARIANTS[variant].scale != 'none':
      assert present, f'{pat} missing from a {placement}/{variant} model'
    elif wraps and VARIANTS[variant].dual != 'none':
      assert present, f'{pat} missing from a {placement}/{variant} model'


def test_stacked_scale_roles_survive_scan():
  """Stacked (rank-2) scale params keep their role; a rank rule would call them matrices."""
  model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=4, n_heads=2,
                                  variant='unified'))
  gamma = model.blocks.attn_norm.q.alpha
  assert gamma.shape == (4, 16)
  assert gamma.get_metadata()['role'] == roles.INPUT_SCALE
  assert gamma.get_metadata()['axes'] == ('layers', 'norm')
  beta = model.blocks.attn_norm.q.beta
  assert beta.shape == (4,) and beta.get_metadata()['axes'] == ('layers',)
  assert model.blocks.mlp.up.kernel.get_metadata()['axes'] == ('layers', 'embed', 'mlp')


def test_foreign_params_need_an_explicit_default():
  from flax import nnx

  class Mixed(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match='carries no'):
    roles.role_tree(Mixed())
  tree = roles.role_tree(Mixed(), default=roles.MATRIX)
  assert set(jax.tree.leaves(tree)) == {roles.MATRIX}

"""The package's layout rules, read from the source: folders are layers, every import
points down (or stays in its folder), there is no import cycle, and no command imports
another command."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).parents[1] / 'scalejax'
# Lowest first: a module may import its own folder and the folders before it.
LAYERS = ('core', 'scales', 'data', 'model', 'analysis', 'export', 'eval', 'train', 'cli',
          'studies')
COMMAND_FOLDERS = ('cli', 'studies')
HELPERS = ('common',)  # modules of the command folders that are not commands


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
  """scalejax modules imported anywhere in a module (function-level imports too)."""
  tree = ast.parse(MODULES[name].read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      subs = {f'{node.module}.{a.name}' for a in node.names} & set(MODULES)
      found.update(subs)  # `from pkg import mod` imports mod
      if len(subs) < len(node.names):
        found.add(node.module)  # `from mod import name`
  # A package's __init__ runs before any of its modules: not an edge of the graph.
  return {m for m in found if m in MODULES and not name.startswith(m + '.') and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _folder(name: str) -> str | None:
  parts = name.split('.')
  return parts[1] if len(parts) > 1 else None


def _is_command(name: str) -> bool:
  parts = name.split('.')
  return len(parts) == 3 and parts[1] in COMMAND_FOLDERS and parts[2] not in HELPERS


def test_every_module_sits_in_a_layer_folder():
  loose = [n for n in MODULES if n != 'scalejax' and _folder(n) not in LAYERS]
  assert not loose, f'modules outside the layer folders {LAYERS}: {loose}'
  assert set(LAYERS) == {_folder(n) for n in MODULES if n != 'scalejax'}


def test_imports_point_down_the_layers():
  up = []
  for name in MODULES:
    for dep in GRAPH[name]:
      if _folder(name) is None or _folder(dep) is None:
        continue  # the bare package
      same_level = {_folder(name), _folder(dep)} <= set(COMMAND_FOLDERS)
      if LAYERS.index(_folder(dep)) > LAYERS.index(_folder(name)) and not same_level:
        up.append(f'{name} imports {dep}')
  assert not up, up


def test_no_command_imports_another_command():
  bad = [(n, d) for n in MODULES if _is_command(n) for d in GRAPH[n] if _is_command(d)]
  assert not bad, bad
  commands = {n for n in MODULES if _is_command(n)}
  assert {'scalejax.cli.train', 'scalejax.cli.bench', 'scalejax.studies.ablation'} <= commands


def test_no_import_cycle():
  # Package __init__ files re-export their own submodules; a cycle through one is an
  # import-time cycle too, so they stay in the graph.
  state: dict[str, int] = {}

  def visit(n, stack):
    state[n] = 1
    for d in sorted(GRAPH[n]):
      if state.get(d) == 1:
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d, stack + [d])
    state[n] = 2

  for n in sorted(MODULES):
    if n not in state:
      visit(n, [n])


def test_the_checker_sees_a_cycle_and_an_upward_import():
  # The rules above would pass vacuously if imports were not found at all.
  assert 'scalejax.model.layers' in GRAPH['scalejax.model.decoder']
  assert 'scalejax.data.tokenizers' in GRAPH['scalejax.data.sources']
  assert 'scalejax.data.sources' not in GRAPH['scalejax.data.tokenizers']

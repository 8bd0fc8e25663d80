"""Every command: one CLI style (absl flags defined at run time), `--help`, one-line errors."""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path

import pytest
from absl import flags

from scalejax.cli import common

from _util import run_command_lines

ROOT = Path(__file__).parents[1]

# module -> the flags its --help must name
COMMANDS = {
    'scalejax.cli.train': ('config', 'workdir'),
    'scalejax.cli.sample': ('workdir', 'prompt', 'tokens', 'temperature', 'top_k', 'seed'),
    'scalejax.cli.param_report': ('config',),
    'scalejax.cli.roles_doc': ('out',),
    'scalejax.cli.aot': ('config', 'topology', 'json', 'fusion'),
    'scalejax.cli.bench': ('config', 'variants', 'rounds', 'steps', 'warmup', 'call', 'json',
                           'profile_steps', 'matmuls', 'against', 'nanogpt_torch'),
    'scalejax.cli.gpu_bench': ('out', 'smoke', 'batches', 'headroom', 'rounds', 'steps',
                               'budget_s', 'curve_steps', 'curve_batch', 'corpus', 'corpus_mb'),
    'scalejax.cli.train_spm': ('input', 'vocab_size', 'model_prefix', 'model_type',
                               'byte_fallback', 'input_sentence_size'),
    'scalejax.cli.eval': ('workdir', 'tasks', 'out', 'include_path', 'limit', 'step', 'batch_size'),
    'scalejax.cli.lm_eval': (),  # lm-eval's own command line, passed through
    'scalejax.cli.export': ('workdir', 'out', 'step', 'overwrite'),
    'scalejax.studies.ablation': ('config', 'out', 'suite', 'variants', 'seeds', 'optimizers',
                                  'schedules', 'lrs', 'parallel', 'set', 'reuse', 'restore',
                                  'aggregate_only'),
    'scalejax.studies.claims': ('out', 'markdown', 'results'),
    'scalejax.studies.quant_study': ('runs', 'out', 'formats', 'modes', 'group_sizes', 'step',
                                     'eval_batches', 'replot'),
    'scalejax.studies.inspect_scales': ('runs', 'out', 'steps', 'print_report'),
    'scalejax.studies.intervene': ('workdir', 'out', 'step', 'eval_batches', 'topk', 'fold',
                                   'edit'),
}

# argv -> (the program named in the error, what the one line must say); train.py's own
# errors are tests/test_validation.py's.
BAD_INPUT = {
    ('-m', 'scalejax.cli.bench', '--rounds=many'):
        ('scalejax.cli.bench', 'flag --rounds=many: invalid literal for int()'),
    ('-m', 'scalejax.studies.ablation', '--config', 'configs/tiny.py', '--out', 'x',
     '--seeds', '0,x'): ('scalejax.studies.ablation', 'flag --seeds=0,x: invalid literal'),
    ('-m', 'scalejax.studies.ablation', '--out', 'x'):
        ('scalejax.studies.ablation', 'flag --config=None: Flag --config must have a value'),
    ('-m', 'scalejax.cli.aot'): ('scalejax.cli.aot', '--config is required (or --fusion)'),
    ('-m', 'scalejax.studies.claims', '--out', 'no/such/study'):
        ('scalejax.studies.claims', '--out no/such/study: no such folder'),
    ('-m', 'scalejax.studies.claims', '--out', 'docs/results/full', '--results', 'no/such.md'):
        ('scalejax.studies.claims', '--results no/such.md: no such file'),
}


@pytest.fixture(scope='module')
def finished():
  """Every --help and bad-input command line, run one after another in one process
  (tests/_cli_driver.py: each as `python ARGV` would run it, JAX imported once)."""
  runs = [('-m', m, '--help') for m in COMMANDS] + list(BAD_INPUT)
  # JAX_PLATFORMS: no probing for accelerators, whose warnings would add stderr lines.
  results = run_command_lines([list(r) for r in runs], env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return {argv: (r['rc'], r['stdout'], r['stderr']) for argv, r in zip(runs, results)}


@pytest.mark.subprocess
@pytest.mark.parametrize('module', COMMANDS)
def test_help_exits_0_and_names_the_flags(finished, module):
  rc, out, err = finished['-m', module, '--help']
  assert rc == 0, err[-2000:]
  doc = importlib.import_module(module).__doc__
  assert out.startswith(doc.splitlines()[0]) and '\nflags:\n' in out
  for name in COMMANDS[module]:
    assert f'--{name}:' in out or f'--[no]{name}:' in out, (module, name)
  assert '--verbosity' not in out  # the command's own flags, not absl's


@pytest.mark.subprocess
@pytest.mark.parametrize('argv', BAD_INPUT, ids=' '.join)
def test_bad_input_is_one_line_and_exit_1(finished, argv):
  rc, _, err = finished[argv]
  prog, says = BAD_INPUT[argv]
  lines = err.strip().splitlines()
  assert rc == 1, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), err[-2000:]
  assert says in lines[0], lines[0]


def test_importing_every_command_defines_no_flag():
  modules = [importlib.import_module(m) for m in COMMANDS]  # no DuplicateFlagError
  ours = {name for names in COMMANDS.values() for name in names}
  assert not ours & set(flags.FLAGS)
  for module in modules:  # each command's flags, on a FlagValues of its own
    fv = flags.FlagValues()
    module.define_flags(fv)
    assert set(COMMANDS[module.__name__]) == set(fv), module.__name__
    assert callable(module.main) and callable(module.run)


def test_console_scripts_name_the_commands():
  scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
  targets = {}
  for target in scripts.values():
    module, _, fn = target.partition(':')
    assert fn == 'run', target
    targets[module] = importlib.import_module(module)
  assert set(targets) == set(COMMANDS)


def test_list_flags_convert_their_items():
  def define(fv):
    common.define_list('seeds', [0, 1, 2], 'seeds', flag_values=fv)
    common.define_list('lrs', None, 'lrs', item=float, flag_values=fv)

  fv = common.parse_flags(define, [])
  assert fv.seeds == [0, 1, 2] and fv.lrs is None
  fv = common.parse_flags(define, ['--seeds', '3,4', '--lrs=1e-3,2e-3'])
  assert fv.seeds == [3, 4] and fv.lrs == [1e-3, 2e-3]
  with pytest.raises(flags.IllegalFlagValueError, match="--seeds=1,b"):
    common.parse_flags(define, ['--seeds=1,b'])

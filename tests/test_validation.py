"""Bad input: every bad config value or data source is one line naming it, before
anything is compiled; through train.py it is that line on stderr and exit status 1."""

import os
from pathlib import Path

import pytest

from scalejax.train import config as config_lib
from _util import child_xla_flags, run_command_lines, tiny_config

ROOT = Path(__file__).parents[1]


def _set(**sections):
  def change(cfg):
    for section, values in sections.items():
      cfg[section].update(values)
  return change


BAD_CONFIGS = [
    (_set(model=dict(n_heads=3)), 'model.n_heads=3 must divide model.d_model=32'),
    (_set(model=dict(n_kv_heads=3)), 'model.n_kv_heads=3 must divide model.n_heads=2'),
    (_set(train=dict(seq_len=65)), 'train.seq_len=65 exceeds model.max_seq_len=64'),
    (_set(mesh=dict(fsdp=2)), 'fix 2 devices, which does not divide the 1 devices'),
    (_set(mesh=dict(data=2)), 'has 2 devices but 1 are available'),
    (_set(model=dict(variant='fancy')), "unknown model.variant 'fancy'; valid: baseline, no_scale"),
    (_set(optimizer=dict(name='adamx')), "unknown optimizer.name 'adamx'; valid: adamw, lion"),
    (_set(optimizer=dict(schedule='cosin')), "unknown optimizer.schedule 'cosin'; valid: cosine"),
    (_set(optimizer=dict(norm_decay='some')), "unknown optimizer.norm_decay 'some'"),
    (_set(train=dict(nan_policy='ignore')), "unknown train.nan_policy 'ignore'; valid: skip, stop"),
    (_set(train=dict(max_bad_steps=0)), 'train.max_bad_steps=0 must be at least 1'),
    (_set(train=dict(steps=0)), 'train.steps=0 must be positive'),
    (_set(train=dict(log_every=0)), 'train.log_every=0 must be positive'),
    (_set(optimizer=dict(lr=-1.0)), 'optimizer.lr=-1.0 must be positive'),
    (_set(optimizer=dict(b2=1.0)), 'optimizer.b2=1.0 must lie in [0, 1)'),
    (_set(optimizer=dict(min_lr_ratio=2.0)), 'optimizer.min_lr_ratio=2.0 must lie in [0, 1]'),
    (_set(checkpoint=dict(keep=0)), 'checkpoint.keep=0 must be positive'),
    (_set(model=dict(placement='middle')), "model.placement must be one of ('pre', 'post'"),
    (_set(model=dict(attention_impl='flash')), "model.attention_impl must be one of ('auto', 'xla'"),
    (_set(model=dict(attention_impl='splash')),
     'model.attention_impl=splash: splash attention tiles the sequence in multiples of 128; '
     'seq_len 32 is not one'),
    (_set(lm_eval=dict(every=-1)), 'lm_eval.every=-1 must be >= 0 (0: only after the last'),
    (_set(lm_eval=dict(batch_size=0)), 'lm_eval.batch_size=0 must be positive'),
    (_set(lm_eval=dict(include_path='no/such/dir')),
     'lm_eval.include_path=no/such/dir is not a directory'),
    (_set(lm_eval=dict(tasks='piqa')),
     'lm_eval.tasks needs a text tokenizer and data.source=synthetic has token ids only'),
    (_set(model=dict(vocab_size=10)), None),  # fine: the tokenizer's size is checked later
]


@pytest.mark.parametrize('change,message', BAD_CONFIGS)
def test_each_bad_config_value_is_one_line(change, message):
  cfg = tiny_config()
  change(cfg)
  if message is None:
    config_lib.validate(cfg)
    return
  with pytest.raises(ValueError) as err:
    config_lib.validate(cfg)
  assert message in str(err.value) and '\n' not in str(err.value)


@pytest.mark.parametrize('mlp,experts,top_k,expert_axis,message', [
    ('moe', 4, 8, 1, 'model.moe_top_k=8 must lie in [1, model.moe_experts=4]'),
    ('moe', 4, 0, 1, 'model.moe_top_k=0 must lie in [1, model.moe_experts=4]'),
    ('moe', 0, 1, 1, 'model.moe_experts=0 must be >= 1'),
    ('moe', 6, 2, 4, 'mesh.expert=4 must divide model.moe_experts=6'),
    ('dense', 4, 8, 1, None),  # the moe_* keys are unused by a dense MLP
])
def test_moe_keys_are_checked_for_a_moe_mlp(mlp, experts, top_k, expert_axis, message):
  cfg = tiny_config()
  cfg.model.mlp = mlp
  cfg.model.moe_experts = experts
  cfg.model.moe_top_k = top_k
  cfg.mesh.expert = expert_axis
  if message is None:
    config_lib._validate_moe(cfg)
    return
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    config_lib.validate(cfg)


def test_unknown_keys_and_wrong_types_fail_when_set():
  cfg = tiny_config()
  with pytest.raises(AttributeError, match='stepz'):
    cfg.train.stepz = 3
  with pytest.raises(TypeError, match='steps'):
    cfg.train.steps = 'many'


# --- through train.py -------------------------------------------------------------

def _write(path: Path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def test_train_py_prints_one_error_line_and_exits_1(tmp_path):
  """Bad configs and bad data sources, all run at once (they fail in seconds)."""
  text = (b'All the world is a stage, and all the men and women merely players. ' * 30)
  files = {
      'empty': _write(tmp_path / 'empty.txt', b''),
      'short': _write(tmp_path / 'short.txt', b'too short to fill one window'),
      'small': _write(tmp_path / 'small.txt', text[:2000]),
      'binary': _write(tmp_path / 'binary.txt', text[:500] + b'\xff\xfe\x00' + text[:500]),
      'a file': _write(tmp_path / 'a_file', b'not a directory'),
  }
  text_data = ['--config.data.source=text_files', '--config.data.tokenizer=byte']
  cases = {
      'unknown key': (["--config.train.stepz=3"], "unknown config key 'stepz'; did you mean"),
      'wrong type': (['--config.train.steps=many'], "--config.train.steps=many: invalid literal"),
      'heads': (['--config.model.n_heads=3'], 'model.n_heads=3 must divide model.d_model=32'),
      'schedule': (['--config.optimizer.schedule=cosin'], 'valid: cosine, linear'),
      'no config file': (['--config=configs/nope.py'], 'configs/nope.py: no such config file'),
      'batch vs mesh': (['--config.train.batch_size=6'],
                        'train.batch_size=6 is not divisible by the 8 batch shards'),
      'missing path': (text_data + [f'--config.data.path={tmp_path}/nope.txt'],
                       f"data.path '{tmp_path}/nope.txt' does not exist"),
      'empty corpus': (text_data + [f'--config.data.path={files["empty"]}'],
                       'the corpus is empty'),
      'shorter than a window': (text_data + [f'--config.data.path={files["short"]}'],
                                'fewer than one window of seq_len+1=33'),
      'eval shorter than a batch': (text_data + [f'--config.data.path={files["small"]}'],
                                    'The eval split has 200 tokens, fewer than one batch'),
      'undecodable': (['--config.data.source=text_files', '--config.data.tokenizer=char',
                       f'--config.data.path={files["binary"]}'],
                      'not valid UTF-8 at byte offset 500'),
      'tfds not prepared': (['--config.data.source=tfds', '--config.data.tfds_name=lm1b',
                             f'--config.data.tfds_data_dir={tmp_path}/tfds'],
                            "TFDS dataset 'lm1b' is not prepared"),
      # The last --workdir on the command line wins (absl), so these replace the default.
      'workdir is a file': ([f'--workdir={files["a file"]}'],
                            f'--workdir {files["a file"]} is an existing file, not a directory'),
      'workdir under a file': ([f'--workdir={files["a file"]}/run'],
                               f'--workdir {files["a file"]}/run lies under {files["a file"]}, '
                               'which is a file'),
  }
  # All in one process (tests/_cli_driver.py), but the mesh case, which needs 8 devices.
  argvs = {}
  for name, (args, _) in cases.items():
    argv = ['train.py', '--workdir', str(tmp_path / name.replace(' ', '_'))]
    if not any(a.startswith('--config=') for a in args):
      argv += ['--config', 'configs/tiny.py']
    argvs[name] = argv + args
  eight = ['batch vs mesh']
  ones = [n for n in cases if n not in eight]
  results = dict(zip(ones, run_command_lines([argvs[n] for n in ones])))
  results.update(zip(eight, run_command_lines(
      [argvs[n] for n in eight], env=dict(os.environ, XLA_FLAGS=child_xla_flags(8)))))
  for name, r in results.items():
    err = r['stderr']
    errors = [l for l in err.splitlines() if l.startswith('train.py: error: ')]
    assert r['rc'] == 1, (name, err[-2000:])
    assert 'Traceback' not in err, (name, err[-2000:])
    assert len(errors) == 1 and cases[name][1] in errors[0], (name, err[-2000:])
    assert not (tmp_path / name.replace(' ', '_') / 'checkpoints').exists() or \
        not os.listdir(tmp_path / name.replace(' ', '_') / 'checkpoints'), name
  assert Path(files['a file']).read_bytes() == b'not a directory'  # nothing written over it

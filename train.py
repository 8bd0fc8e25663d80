"""Train a scalejax model.

    python train.py --config configs/quickstart.py --workdir runs/quick \
        [--config.model.variant=unified --config.train.steps=500 ...]

Rerunning the same command with the same --workdir resumes from the newest checkpoint.
SIGTERM / Ctrl-C stop after the current step with a checkpoint saved (exit 0). A bad
config, bad data or a run stopped by non-finite losses is one line on stderr (exit 1).
"""

from scalejax.train import xla_flags

xla_flags.apply()  # first, before JAX starts: allocator and XLA settings (xla_flags.py)

import ast
import logging
import re
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from scalejax.train import nonfinite
from scalejax.train import trainer
from scalejax.model.sampling import generate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'config file (configs/*.py)',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'output directory: metrics, checkpoints, config.json')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
  log = logging.getLogger('scalejax')
  log.setLevel(logging.INFO)
  log.addHandler(logging.StreamHandler())
  log.propagate = False
  cfg = FLAGS.config
  try:
    cfg.train  # a config file that failed to load raises here, not at flag parsing
  except OSError as e:
    _fail(e)
  try:
    final = trainer.train(cfg, FLAGS.workdir)
  except (ValueError, FileNotFoundError, nonfinite.NonFiniteError) as e:
    _fail(e)
  if final['stopped']:
    saved = '; the checkpoint is saved' if final['step'] else ''
    print(f'stopped by {final["stopped"]} after step {final["step"]}{saved}. To resume, rerun '
          f'the same command:\n  {shlex.join([sys.executable] + sys.argv)}')
    return
  run = final['run']
  summary = {k: final[k] for k in ('step', 'loss', 'eval_loss', 'tokens_per_sec') if k in final}
  print('final:', ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                            for k, v in summary.items()))
  if cfg.train.sample_tokens:
    text = generate(run.graphdef, final['state']['params'], run.data.tokenizer,
                    cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.seq_len)
    print('--- sample ---\n' + cfg.train.sample_prompt + text + '\n--------------')


def _fail(e: BaseException):
  """Exits 1 with `train.py: error: MESSAGE` on one line, no traceback."""
  msg = str(e)
  lines = [l.strip() for l in msg.splitlines() if l.strip()]
  if len(lines) > 1 and 'Traceback' in msg:  # an error inside a config file: keep its last line
    msg = f'{lines[0].split("Traceback")[0]} {lines[-1]}'
  if isinstance(e, KeyError) or msg[:1] in '"\'':  # ml_collections quotes KeyError text
    try:
      msg = str(ast.literal_eval(msg))
    except (ValueError, SyntaxError):
      pass
  msg = ' '.join(msg.split()).replace(' Did you mean', '; did you mean')
  msg = re.sub(r' Other fields present: ".*?"', '', msg)  # the whole section, on one line
  missing = re.search(r"Failed loading config file .*No such file or directory: '(.*?)'", msg)
  if missing:
    msg = f'--config {missing.group(1)}: no such config file'
  if isinstance(e, (AttributeError, KeyError)) and msg.startswith("'"):
    msg = f'unknown config key {msg}'
  print(f'train.py: error: {msg}', file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv):
  """absl's parser, but a bad --config file or override is one line, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError,
          SyntaxError) as e:
    _fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

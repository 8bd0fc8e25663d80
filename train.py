"""Train a scalejax model.

    python train.py --config configs/quickstart.py --workdir runs/quick \
        [--config.model.variant=unified --config.train.steps=500 ...]

Rerunning the same command with the same --workdir resumes from the newest checkpoint.
"""

from scalejax import xla_flags

xla_flags.apply()  # first, before JAX starts: allocator and XLA settings (xla_flags.py)

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from scalejax import trainer
from scalejax.sample import generate

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
  final = trainer.train(cfg, FLAGS.workdir)
  run = final['run']
  summary = {k: final[k] for k in ('step', 'loss', 'eval_loss', 'tokens_per_sec') if k in final}
  print('final:', ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                            for k, v in summary.items()))
  if cfg.train.sample_tokens:
    text = generate(run.graphdef, final['state']['params'], run.data.tokenizer,
                    cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.seq_len)
    print('--- sample ---\n' + cfg.train.sample_prompt + text + '\n--------------')


if __name__ == '__main__':
  app.run(main)

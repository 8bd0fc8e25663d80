r"""Train a scalejax model.

    python train.py --config configs/quickstart.py --workdir runs/quick \
        [--config.model.variant=unified --config.train.steps=500 ...]

(`python -m scalejax.cli.train` and `scalejax-train` take the same flags.) Rerunning the
same command with the same --workdir resumes from the newest checkpoint. SIGTERM /
Ctrl-C stop after the current step with a checkpoint saved (exit 0). A bad config, bad
data or a run stopped by non-finite losses is one line on stderr (exit 1).
"""

from __future__ import annotations

from scalejax.train import xla_flags

xla_flags.apply()  # first, before JAX starts: allocator and XLA settings (xla_flags.py)

import logging  # noqa: E402
import shlex  # noqa: E402

from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from scalejax.cli import common  # noqa: E402
from scalejax.model.sampling import generate  # noqa: E402
from scalejax.train import nonfinite, trainer  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'config file (configs/*.py)',
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'output directory: metrics, checkpoints, config.json',
                      flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain are chatty at INFO
  log = logging.getLogger('scalejax')
  log.setLevel(logging.INFO)
  log.addHandler(logging.StreamHandler())
  log.propagate = False
  cfg = common.loaded_config(fv)
  final = trainer.train(cfg, fv.workdir)
  if final['stopped']:
    saved = '; the checkpoint is saved' if final['step'] else ''
    print(f'stopped by {final["stopped"]} after step {final["step"]}{saved}. To resume, rerun '
          f'the same command:\n  {shlex.join(common.command_line())}')
    return
  train_run = final['run']
  summary = {k: final[k] for k in ('step', 'loss', 'eval_loss', 'tokens_per_sec') if k in final}
  print('final:', ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                            for k, v in summary.items()))
  if cfg.train.sample_tokens:
    text = generate(train_run.graphdef, final['state']['params'], train_run.data.tokenizer,
                    cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.seq_len)
    print('--- sample ---\n' + cfg.train.sample_prompt + text + '\n--------------')


def run() -> None:
  # A run stopped by non-finite losses is the user's to fix (lr, data), not a crash.
  common.run(main, define_flags, __doc__,
             errors=common.USER_ERRORS + (nonfinite.NonFiniteError,))


if __name__ == '__main__':
  run()

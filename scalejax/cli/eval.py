r"""Evaluate a checkpoint on lm-eval-harness tasks; write the results as JSON.

    python -m scalejax.cli.eval --workdir DIR --tasks hellaswag,piqa --out results.json \
        [--include_path DIR] [--limit N] [--step N] [--batch_size B]

Any task lm-eval knows, or one of your own from an --include_path folder of task YAML
files (tests/data/lm_eval_tasks: small offline ones). The JSON holds lm-eval's results
and `metrics`, the same numbers flat (`lm_eval/TASK/METRIC`, as train.py's hook logs
them). docs/EVALUATION.md has the details; `scalejax-lm-eval` is lm-eval's own CLI.
"""

from __future__ import annotations

import json
import os

from absl import flags
from lm_eval.utils import handle_non_serializable, make_table

from scalejax.cli import common
from scalejax.eval import harness, runner
from scalejax.train.runs import load_run


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'run directory holding config.json and checkpoints/',
                      flag_values=fv)
  flags.DEFINE_list('tasks', None, 'comma-separated lm-eval task names (or glob patterns)',
                    flag_values=fv)
  flags.DEFINE_string('out', None, 'JSON file for the results', flag_values=fv)
  flags.DEFINE_string('include_path', '', 'folder of lm-eval task YAML files of your own',
                      flag_values=fv)
  flags.DEFINE_integer('limit', 0, 'examples per task (0: all)', flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest)', flag_values=fv)
  flags.DEFINE_integer('batch_size', harness.DEFAULT_BATCH_SIZE, 'rows per model call',
                       flag_values=fv)
  for name in ('workdir', 'tasks', 'out'):
    flags.mark_flag_as_required(name, flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  if not os.path.isfile(os.path.join(fv.workdir, 'config.json')):
    raise FileNotFoundError(f'--workdir {fv.workdir} is not a scalejax run (no config.json); '
                            'pass the --workdir of a train.py run')
  tasks = runner.parse_tasks(fv.tasks)
  # Task names first: a typo fails before the checkpoint is read.
  manager = runner.task_manager(tasks, fv.include_path)
  harness.register(load_run)
  model_args = {'workdir': fv.workdir, 'step': fv.step, 'batch_size': fv.batch_size}
  results = runner.evaluate(harness.MODEL_TYPE, tasks, manager, fv.limit,
                            model_args={k: v for k, v in model_args.items() if v is not None})
  out = {'metrics': runner.flat_metrics(results), **results}
  os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
  with open(fv.out, 'w') as f:  # lm-eval's fallback for what JSON lacks (task configs)
    json.dump(out, f, indent=2, default=handle_non_serializable)
  print(make_table(results))
  print(f'results: {fv.out}')
  return out


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

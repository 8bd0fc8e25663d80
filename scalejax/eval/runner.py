"""Task runs through lm-eval's Python API: the tasks resolved once, the results as flat
metrics (`lm_eval/TASK/METRIC`) for metrics.jsonl and TensorBoard.

`evaluate` is lm-eval's `simple_evaluate` (the results JSON of the commands). The
trainer's `TaskRun` calls lm-eval's `evaluate` underneath it instead: `simple_evaluate`
also reseeds Python's and NumPy's global generators and writes an environment report
(which imports torch, when installed, and starts subprocesses), at every call.

lm-eval is imported when a run is asked for, not with this module: the trainer imports
it, and a run without lm-eval tasks pays nothing for it.
"""

from __future__ import annotations

import os
from typing import Any

PREFIX = 'lm_eval/'
FEWSHOT_SEED = 1234  # simple_evaluate's default: the same few-shot examples every time


def parse_tasks(tasks: str | list[str]) -> list[str]:
  """Task names from a comma-separated string (or a list), blanks dropped."""
  items = tasks.split(',') if isinstance(tasks, str) else tasks
  return [t.strip() for t in items if t.strip()]


def task_manager(tasks: list[str], include_path: str = '', include_flag: str = '--include_path'):
  """A lm-eval TaskManager that knows every name of `tasks` (names or glob patterns).

  The tasks of `include_path` alone when they cover the list: indexing lm-eval's own
  task files (some 15,000 YAML files) takes tens of seconds of CPU, so it happens only
  for a name the include path lacks. An unknown name or a missing folder is a
  ValueError / FileNotFoundError naming it and the fix (`include_flag` is how the
  caller spells the include path).
  """
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  if not tasks:
    raise ValueError('no lm-eval task named; give task names such as hellaswag,piqa')
  if include_path and not os.path.isdir(include_path):
    raise FileNotFoundError(f'{include_flag} {include_path}: no such directory; name a folder '
                            'of lm-eval task YAML files')
  if include_path:
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not _unknown(manager, tasks):
      return manager
  manager = TaskManager(include_path=include_path or None)
  unknown = _unknown(manager, tasks)
  if unknown:
    raise ValueError(
        f'unknown lm-eval task {", ".join(unknown)}; `scalejax-lm-eval ls tasks` lists the '
        f'{len(manager.all_tasks)} known tasks, and {include_flag} adds a folder of task YAML '
        'files')
  return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
  return [t for t in tasks if not manager.match_tasks([t])]


def evaluate(model, tasks: list[str], manager, limit: int | None = None,
             model_args: dict | None = None, bootstrap_iters: int = 100_000,
             log_samples: bool = False) -> dict[str, Any]:
  """lm-eval's results of `tasks` for `model` (an lm-eval LM, or a registered model
  type with `model_args`), tasks zero-shot unless their config says otherwise."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  return lm_eval.simple_evaluate(
      model=model, model_args=model_args, tasks=tasks, task_manager=manager,
      limit=limit or None, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
      # lm-eval seeds torch when it is installed, which imports it: nothing here uses it.
      torch_random_seed=None)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'lm_eval/TASK/METRIC': value} of every task and group of lm-eval's results; a
  metric after a filter other than lm-eval's `none` is METRIC/FILTER. Standard errors
  and sample counts are left out."""
  out = {}
  for task, metrics in results['results'].items():
    for key, value in metrics.items():
      name, _, filt = key.partition(',')
      if (name.endswith('_stderr') or name == 'sample_len' or isinstance(value, bool)
          or not isinstance(value, (int, float))):
        continue
      out[f'{PREFIX}{task}/{name}' + ('' if filt in ('', 'none') else f'/{filt}')] = float(value)
  return out


class TaskRun:
  """The same tasks run on changing params (the trainer's hook): the tasks are resolved
  and the model's programs compiled once, each call swaps in the new params."""

  def __init__(self, tasks: list[str], include_path: str = '', limit: int = 0,
               batch_size: int = 16, include_flag: str = '--include_path') -> None:
    self.tasks, self.limit, self.batch_size = tasks, limit, batch_size
    self.manager = task_manager(tasks, include_path, include_flag)
    self._lm = None

  def __call__(self, graphdef, params, tokenizer, seq_len: int) -> dict[str, float]:
    """Flat metrics (`flat_metrics`) of the tasks for these params."""
    from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
    from scalejax.eval.harness import ScalejaxLM  # pylint: disable=g-import-not-at-top
    if self._lm is None:
      self._lm = ScalejaxLM(graphdef, params, tokenizer, seq_len, self.batch_size,
                            progress=False)
    self._lm.params = params
    loaded = self.manager.load(self.tasks)
    for task in loaded['tasks'].values():
      task.set_fewshot_seed(seed=FEWSHOT_SEED)
    # No bootstrap: standard errors are not logged.
    results = evaluator.evaluate(lm=self._lm, task_dict=loaded, limit=self.limit or None,
                                 bootstrap_iters=0, log_samples=False)
    return flat_metrics(results)

"""Export a run to a Hugging Face transformers directory (docs/EXPORT.md).

    python -m scalejax.cli.export --workdir DIR --out OUT [--step N] [--overwrite]

Writes OUT/config.json, model.safetensors, generation_config.json and the tokenizer's
files: `AutoModelForCausalLM.from_pretrained(OUT)` loads a LlamaForCausalLM (a
Qwen3ForCausalLM for a model with QK-norm) computing the run's function, its scale
vectors folded into the kernels they feed. A variant no such model can hold is refused,
naming the scales in the way.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import flags
from flax import nnx

from scalejax.cli import common
from scalejax.export import hf
from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib
from scalejax.train.runs import load_run


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'run directory holding config.json and checkpoints/',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'directory to write (absent or empty, or see --overwrite)',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step to export (default: the newest)',
                       flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'replace the export files in a non-empty --out',
                    flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Returns the names of the files written (for callers in one process)."""
  common.no_arguments(argv)
  workdir = fv.workdir
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir}: no such directory; point it at a train.py '
                            'run directory')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--workdir {workdir}: no config.json there; point it at a '
                            'train.py run directory')
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  # Before the restore, which takes a while: exportability depends on no vocabulary size.
  why = hf.unsupported(config_lib.model_config(saved, vocab_size=1))
  if why:
    raise ValueError(why)
  steps = ckpt.steps(workdir) if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
  if not steps:
    raise FileNotFoundError(f'--workdir {workdir} has no checkpoint yet; export a run that '
                            'has saved one (checkpoint.every)')
  if fv.step is not None and fv.step not in steps:
    raise ValueError(f'--step {fv.step}: {workdir} has no checkpoint at that step; kept steps: '
                     f'{steps}')
  hf.check_out(fv.out, fv.overwrite)  # before the restore, which takes a while
  _, graphdef, params, tokenizer = load_run(workdir, fv.step)
  written = hf.export(nnx.merge(graphdef, params), fv.out, tokenizer, overwrite=fv.overwrite)
  step = steps[-1] if fv.step is None else fv.step
  print(f'exported step {step} of {workdir} to {fv.out}: {", ".join(written)}')
  return written


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

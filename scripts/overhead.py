"""Wall-clock cost of variants relative to baseline, timed interleaved in one process.

    python scripts/overhead.py --config configs/shakespeare_char.py \
        --variants baseline,unified,no_scale [--rounds 7 --steps 20]

Each variant's jitted train step is compiled first; then rounds alternate between the
variants (`steps` steps each), so load from other processes on a shared machine hits
all of them alike. Prints the median seconds per step and its ratio to baseline.
"""

import argparse
import importlib.util
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scalejax.core import sharding
from scalejax.train import trainer  # noqa: E402  (run from anywhere)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--config', required=True)
  p.add_argument('--variants', default='baseline,unified')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--steps', type=int, default=20)
  args = p.parse_args()
  spec = importlib.util.spec_from_file_location('c', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  runs = {}
  for v in args.variants.split(','):
    cfg = module.get_config()
    cfg.model.variant = v
    cfg.data.eval_batches = 0
    run, state = trainer.build_run(cfg, None)
    step = trainer.make_train_step(run)
    batch = sharding.global_batch(next(run.data.train_iter), run.mesh)
    with jax.set_mesh(run.mesh):
      state, m = step(state, batch)  # compile
      jax.block_until_ready(m)
    runs[v] = [run, step, state, batch, []]
  for _ in range(args.rounds):
    for v, r in runs.items():
      run, step, state, batch, times = r
      with jax.set_mesh(run.mesh):
        t = time.perf_counter()
        for _ in range(args.steps):
          state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / args.steps)
      r[2] = state
  base = np.median(runs['baseline'][4]) if 'baseline' in runs else None
  for v, r in runs.items():
    med = np.median(r[4])
    ratio = f'{med / base:.3f}x' if base else ''
    print(f'{v:12s} {med * 1e3:7.1f} ms/step  {ratio}')


if __name__ == '__main__':
  main()

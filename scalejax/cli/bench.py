r"""Benchmark train steps: compile time, step time, tokens/s, memory, MFU, overhead.

    python -m scalejax.cli.bench --config configs/shakespeare_char.py \
        --variants baseline,unified --json bench.json [--config.KEY=VALUE ...]

Every variant is built from the same config and measured in one process. Steps are
timed in rounds: each round runs `--steps` steps of every variant in turn (and, on
CPU, the matmul probe), so load from other processes falls on all of them alike and
the ratios stay meaningful on a shared machine. Reported per variant:

- compile_s: lowering plus XLA compilation of the train step;
- step_ms: median over rounds of the mean step time (after `--warmup` steps), with
  the min and the process CPU time per step (robust to other processes' load);
- tokens_per_s, flops_per_step (analytic, `counting.flops_per_token`), mfu: achieved
  FLOP/s over the device peak (bf16 dense peak on TPU/GPU; on CPU the float32 matmul
  probe measured in the same rounds);
- peak_bytes: XLA's own account of the compiled step (arguments + outputs - aliased +
  temporaries) and, where the device reports it, the allocator's peak;
- step_ratio and memory_ratio to `baseline` (when measured).

Data come from the config's pipeline, fetched before timing. `--nanogpt_torch` adds
nanoGPT's model and optimizer step in PyTorch (if installed) to the same rounds: an
external reference measured under the same load, stepped in a process of its own so
that PyTorch runs with its defaults, as nanoGPT's `train.py` does
(`scalejax/train/torch_reference.py`).

`--call=jit` times each step as a call of the jitted function inside the mesh context
(its cache lookup and dispatch included) instead of a call of the compiled executable;
`--call=loop` times the train loop's own step (`trainer.advance`: the next batch from
the data pipeline put on the mesh, the jitted step, earlier steps' verdicts read in turn).
`--call=untuned` times the compiled executable built with XLA's default options
instead of the project's (`xla_flags.compiler_options`). Several calls time every
variant once per call in the same rounds, so the ratio of `baseline@loop` to
`baseline` is the loop's cost over the step, and of `baseline@untuned` to `baseline`
what the project's compile options gain, each under one load:

    python -m scalejax.cli.bench --config configs/shakespeare_char.py \
        --variants baseline --call=compiled,loop,untuned --rounds 7 --steps 20

`--profile_steps=N` then traces N steps of each compiled variant with XLA's per-thunk
events (`scalejax/train/step_profile.py`) and prints, per step, the thread time of each
kind of work (dots, reductions, elementwise, transposes, copies) and of each phase
(forward, backward, update) with its thunk count, and how long 0, 1, 2, ... threads ran
a thunk at once: on a CPU, where a step's time goes and how much of it ran on several
cores. Then the same time by the line of code each thunk was traced from: the first
variant's busiest lines, and each other variant's largest differences from it, line by
line (where `unified`'s extra time goes). The figures go into the JSON's `profiles`.

`--against=REV` also builds every variant from another revision of the code, a git
revision of this repository (`git archive`) or a directory holding a `scalejax/`
package, in the same process (`scalejax/train/revisions.py`), and times it in the same
rounds as `NAME@REV`. The ratio of this tree's step and memory to the other's, per
variant, resolves a change to the code that separate processes cannot (their spread on
a shared CPU is a few percent). The other revision reads its own copy of the config
file, with this command line's overrides:

    python -m scalejax.cli.bench --config configs/bench_mid.py --variants baseline,unified \
        --against HEAD~1 --rounds 8 --steps 2 --warmup 1

`--matmuls=R` then times each distinct matrix product of the first compiled variant's
step alone (`scalejax/train/matmuls.py`), R rounds, as a jitted `jnp.matmul` and, with
`--nanogpt_torch`, as `torch.matmul` in the reference's process, and sums them over the
step: how much of a gap to PyTorch its matrix library alone explains on this CPU. The
figures go into the JSON's `matmuls`.
"""

from __future__ import annotations

from scalejax.train import xla_flags

xla_flags.apply()  # before JAX creates its CPU client


from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from scalejax.cli import common  # noqa: E402
from scalejax.scales.variants import VARIANTS  # noqa: E402
from scalejax.train import matmuls, metrics, step_profile  # noqa: E402
from scalejax.train.benchmark import CALLS, against_table, run_benchmark, table  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', 'configs/shakespeare_char.py',
                                  'config file (configs/*.py)', flag_values=fv, lock_config=True)
  flags.DEFINE_list('variants', ['baseline', 'unified'], 'comma-separated model.variant names',
                    flag_values=fv)
  flags.DEFINE_integer('rounds', 7, 'timed rounds (the median is reported)', flag_values=fv)
  flags.DEFINE_integer('steps', 10, 'steps per variant per round', flag_values=fv)
  flags.DEFINE_integer('warmup', 3, 'untimed steps per variant after compilation',
                       flag_values=fv)
  flags.DEFINE_list('call', ['compiled'], 'what a timed step calls, one or more of '
                    f'{", ".join(CALLS)}: the compiled executable, the jitted function '
                    'inside the mesh, the train loop\'s step (next batch, step, verdict), '
                    'or the executable compiled with XLA\'s default options',
                    flag_values=fv)
  flags.DEFINE_string('json', '', 'write the results here as JSON', flag_values=fv)
  flags.DEFINE_integer('profile_steps', 0, 'after timing, trace this many steps of each '
                       'compiled variant with XLA\'s per-thunk events and print where their '
                       'time goes: by kind of work, by phase, by threads busy and by '
                       'line of code (0: no profile)',
                       flag_values=fv)
  flags.DEFINE_integer('matmuls', 0, 'after timing, time each distinct matrix product of '
                       'the first compiled variant\'s step alone, in this many rounds, in XLA '
                       'and (with --nanogpt_torch) in PyTorch, and print both per shape '
                       '(0: not)', flag_values=fv)
  flags.DEFINE_string('against', '', 'also build every variant at this git revision of the '
                      'repository (or from a directory holding a scalejax/ package) in this '
                      'process, time it in the same rounds as NAME@REV and print this tree\'s '
                      'step and memory over it (\'\': not)', flag_values=fv)
  flags.DEFINE_bool('nanogpt_torch', False, 'also time nanoGPT\'s model in PyTorch (needs '
                    'torch) in the same rounds, as an external reference', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> dict:
  common.no_arguments(argv)
  variants = fv.variants
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f'unknown model.variant {bad[0]!r} in --variants; valid: '
                     f'{", ".join(VARIANTS)}')
  if not variants:
    raise ValueError('--variants is empty')
  out = run_benchmark(common.loaded_config(fv), variants, fv.rounds, fv.steps, fv.warmup,
                      fv.nanogpt_torch, fv.call, fv.profile_steps, fv.matmuls, fv.against,
                      config_flags.get_config_filename(fv['config']))
  print(f'{out["machine"]["device_kind"]} x{out["machine"]["device_count"]}, '
        f'load {out["load_avg_start"]:.1f}->{out["load_avg_end"]:.1f}, '
        f'peak {out["peak_flops"] / 1e9:.1f} GFLOP/s ({out["peak_source"]}), '
        f'{out["call"]} steps')
  print(table(out['results']))
  if fv.against:
    print(against_table(out['results']))
  if out['profiles']:
    print(step_profile.table(out['profiles']))
  if out['matmuls']:
    print(f'{out["matmuls"]["variant"]}\'s matrix products, each timed alone '
          f'({fv.matmuls} rounds of 50 calls):')
    print(matmuls.table(out['matmuls']['rows']))
  if fv.json:
    metrics.write_json(fv.json, out)
    print(f'wrote {fv.json}')
  return out


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

"""scalejax.cli.bench in CI's short mode (tiny config: it runs and emits every field) and
the process tuning it applies (scalejax/train/xla_flags.py)."""

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest

from scalejax.core import sharding
from scalejax.scales.variants import VARIANTS
from scalejax.train import benchmark, trainer
from scalejax.train import matmuls, metrics, revisions, step_profile, xla_flags
from scalejax.train.config import load_config

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'scalejax.cli.bench', '--config', 'configs/bench_tiny.py',
       '--variants', 'baseline,unified', '--rounds', '2', '--steps', '2', '--warmup', '1',
       '--profile_steps', '2', '--matmuls', '1', '--json', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_every_field_for_every_variant(short_run):
  _, out = short_run
  rows = {r['variant']: r for r in out['results']}
  assert list(rows) == ['baseline', 'unified']
  for name, row in rows.items():
    assert set(benchmark.FIELDS) <= set(row), set(benchmark.FIELDS) - set(row)
    for key in ('compile_s', 'step_ms', 'step_ms_min', 'cpu_ms', 'tokens_per_s',
                'flops_per_step', 'mfu', 'peak_bytes', 'step_ratio', 'memory_ratio', 'loss'):
      assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (name, key)
      assert row[key] > 0, (name, key)
    assert row['page_faults'] >= 0  # 0 is the goal of the allocator tuning
    assert len(row['step_ms_rounds']) == 2
    assert row['step_ms_min'] <= row['step_ms']
    # tokens/s is the batch's tokens over the median step time
    assert row['tokens_per_s'] == pytest.approx(4 * 16 / (row['step_ms'] / 1e3))
  assert rows['baseline']['step_ratio'] == 1.0 and rows['baseline']['memory_ratio'] == 1.0
  # the analytic count is of matmuls only; unified's extra norms add bytes, not FLOPs
  assert rows['unified']['flops_per_step'] == rows['baseline']['flops_per_step']
  # the ratios are unified's own figures over the baseline's
  assert rows['unified']['memory_ratio'] == pytest.approx(
      rows['unified']['peak_bytes'] / rows['baseline']['peak_bytes'])
  assert rows['unified']['memory_ratio'] != 1.0  # the two steps differ


def test_run_metadata_and_table(short_run):
  stdout, out = short_run
  assert out['peak_flops'] > 0 and len(out['probe_flops_rounds']) == 2
  assert out['call'] == 'compiled'  # the default: the compiled executable alone
  assert out['machine']['platform'] == 'cpu' and out['machine']['cpu_count'] >= 1
  assert out['machine']['tuning']['malloc'] is sys.platform.startswith('linux')
  # the XLA options the steps were compiled with, as this environment gives them
  assert out['machine']['compile_options'] == xla_flags.compiler_options('cpu')
  assert {'date', 'load_avg_start', 'load_avg_end', 'model', 'batch_size', 'seq_len'} <= set(out)
  assert 'baseline' in stdout and 'unified' in stdout and 'MFU' in stdout


def test_profile_of_each_variant(short_run):
  # --profile_steps: each compiled variant traced after the timing, its thunks summed
  stdout, out = short_run
  assert list(out['profiles']) == ['baseline', 'unified']
  for name, p in out['profiles'].items():
    assert p['steps'] == 2 and p['wall_ms'] > 0
    assert set(p['by_kind_ms']) == set(step_profile.KINDS)
    assert p['by_kind_ms']['dot'] > 0 and p['by_kind_ms']['elementwise'] > 0, name
    assert p['thunk_ms'] == pytest.approx(sum(p['by_kind_ms'].values()))
    assert sum(v for n, v in p['busy_ms'].items() if n != '0') > 0
    assert set(p['by_phase_ms']) == set(step_profile.PHASES)
    assert p['by_phase_ms']['forward'] > 0 and p['by_phase_ms']['backward'] > 0, name
    assert sum(p['by_phase_ms'].values()) == pytest.approx(p['thunk_ms'])
    assert len(p['top']) == 8 and p['top'][0]['ms'] >= p['top'][-1]['ms']
    # by source line: every thunk's time once, the model's lines among them
    assert sum(e['ms'] for e in p['by_source']) == pytest.approx(p['thunk_ms'])
    assert any(e['where'].startswith('model/') and e['kind'] == 'dot' for e in p['by_source'])
  assert 'ms with n threads busy' in stdout and 'unified, busiest thunks' in stdout
  assert 'unified - baseline, by source line' in stdout


def test_matmuls_of_the_step_match_the_analytic_count_and_are_timed(short_run):
  # --matmuls: the first compiled variant's dots read off its HLO, each timed alone
  stdout, out = short_run
  mm = out['matmuls']
  assert mm['variant'] == 'baseline'
  rows = mm['rows']
  assert rows and all(r['xla_s'] > 0 and r['xla_gflops'] > 0 for r in rows)
  assert all(r['torch_s'] is None for r in rows)  # no --nanogpt_torch: XLA alone (JSON null)
  # The products' FLOPs, read off the compiled step, against counting.py's analytic
  # count (6 per matmul weight per token plus attention): the matrix-matrix products
  # match it exactly; the rest are matrix-vector products, the form the step's sums
  # take on CPU (core/reductions.py): among them the final norm's scale gradient,
  # [1, tokens] x [tokens, d].
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  tokens, d = 4 * 16, cfg.model.d_model
  analytic = out['results'][0]['flops_per_step']
  matrix = [r for r in rows if min(r['m'], r['n']) > 1]
  assert sum(r['flops'] * r['count'] for r in matrix) == analytic
  assert mm['totals']['flops'] > analytic
  assert matmuls.Product(1, 1, tokens, d).flops == 2 * tokens * d
  assert any(r['batch'] == 1 and (r['m'], r['k'], r['n']) == (1, tokens, d) for r in rows)
  # attention's two batched products per layer, forward and backward: batch x heads
  assert any(r['batch'] == 4 * 2 for r in rows)
  assert mm['totals']['xla_ms'] == pytest.approx(
      1e3 * sum(r['xla_s'] * r['count'] for r in rows))
  assert "baseline's matrix products" in stdout and "the step's dots" in stdout


def test_matmul_products_read_off_hlo_by_hand_known_shapes():
  a, b = jnp.ones((16, 8)), jnp.ones((8, 12))
  x, y = jnp.ones((3, 16, 8)), jnp.ones((3, 8, 12))
  w = jnp.ones((16, 12))

  def f(a, b, x, y, w):
    return (jnp.sum(a @ b) + jnp.sum(jnp.einsum('bmk,bkn->bmn', x, y))
            + jnp.sum(a.T @ w))  # contracts the leading axis, as a weight gradient does
  text = jax.jit(f).lower(a, b, x, y, w).compile().as_text()
  assert matmuls.products(text) == {matmuls.Product(1, 16, 8, 12): 1,
                                    matmuls.Product(3, 16, 8, 12): 1,
                                    matmuls.Product(1, 8, 16, 12): 1}

  def scanned(w_Nx8x8, x_4x8):  # a loop of 5 layers: each layer's products, 5 times
    layer = lambda x, w: (jnp.tanh(x @ w), None)
    return jnp.sum(jax.lax.scan(layer, x_4x8, w_Nx8x8)[0])
  text = jax.jit(jax.grad(scanned)).lower(jnp.ones((5, 8, 8)),
                                          jnp.ones((4, 8))).compile().as_text()
  # forward x @ w; backward dx = g @ w.T and dw = x.T @ g, each once per layer
  assert matmuls.products(text) == {matmuls.Product(1, 4, 8, 8): 10,
                                    matmuls.Product(1, 8, 4, 8): 5}
  assert str(matmuls.Product(3, 16, 8, 12)) == '3x[16,8]x[8,12] f32'
  assert matmuls.Product(3, 16, 8, 12).flops == 2 * 3 * 16 * 8 * 12


def test_matmuls_need_a_compiled_call():
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  with pytest.raises(ValueError, match='--matmuls reads the products off a compiled step; '
                                       'add compiled to --call'):
    benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=1, warmup=0, call='jit',
                            matmul_rounds=1)


def test_profile_needs_the_cpu_backend(monkeypatch):
  monkeypatch.setattr(benchmark.jax, 'default_backend', lambda: 'tpu')
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  with pytest.raises(ValueError, match="--profile_steps reads XLA:CPU's per-thunk trace; "
                                       'this run is on tpu'):
    benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=1, warmup=0, profile_steps=2)


def test_unknown_variant_is_one_clear_error():
  proc = subprocess.run(
      [sys.executable, '-m', 'scalejax.cli.bench', '--config', 'configs/bench_tiny.py',
       '--variants', 'baselin'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "unknown model.variant 'baselin'" in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f'scalejax.cli.bench: error: unknown model.variant \'baselin\' in --variants; valid: '
      f'{", ".join(VARIANTS)}']


def test_jit_call_times_the_step_as_the_train_loop_calls_it():
  # What the former scripts/overhead.py timed: the jitted step inside the mesh context.
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  out = benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=2, warmup=0, call='jit')
  row, = out['results']
  assert out['call'] == 'jit' and row['variant'] == 'baseline'
  assert len(row['step_ms_rounds']) == 1 and row['step_ms'] > 0 and math.isfinite(row['loss'])
  # Even without warmup no timed step compiles (build_case's untimed first call did):
  # a compilation in one of the 2 steps would make their mean half a compile time.
  assert row['step_ms'] < 1e3 * row['compile_s'] / 10


def test_xla_flags_append_and_never_override(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_a=1')
  added = xla_flags._append_xla_flags(['--xla_a=2', '--xla_b=3'])
  assert added == ['--xla_b=3']
  assert xla_flags.os.environ['XLA_FLAGS'] == '--xla_a=1 --xla_b=3'  # the user's value wins
  monkeypatch.delenv('XLA_FLAGS')
  assert xla_flags._append_xla_flags([]) == []
  assert 'XLA_FLAGS' not in xla_flags.os.environ


def test_cpu_compile_options_by_platform_user_flag_and_switch(monkeypatch):
  monkeypatch.delenv('SCALEJAX_NO_TUNING', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  assert xla_flags.compiler_options('cpu') == xla_flags.CPU_COMPILE_OPTIONS
  assert xla_flags.compiler_options('tpu') is None and xla_flags.compiler_options('gpu') is None
  # an option the user set in XLA_FLAGS is theirs: the step is compiled without ours
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot,reduce')
  assert xla_flags.compiler_options('cpu') is None
  monkeypatch.delenv('XLA_FLAGS')
  monkeypatch.setenv('SCALEJAX_NO_TUNING', '1')
  assert xla_flags.compiler_options('cpu') is None


def _ynn_fusions_with_a_dot(hlo_text: str) -> list[bool]:
  """For each YNNPACK fusion of a compiled module: whether its computation has a dot."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r'^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}', hlo_text, re.M | re.S)}
  called = re.findall(r'calls=%?([\w.\-]+),.*?"kind":"__ynn_fusion"', hlo_text)
  return [' dot(' in bodies[name] for name in called]


def test_cpu_compile_options_leave_ynnpack_the_dots_and_the_math_unchanged():
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  with cfg.unlocked():
    cfg.model.variant = 'unified'  # DNP's norms: reductions XLA would hand to YNNPACK
  run, state = trainer.build_run(cfg, None)
  batches = [sharding.global_batch(next(run.data.train_iter), run.mesh) for _ in range(3)]
  states, texts = {}, {}
  for tuned in (True, False):
    step = trainer.make_train_step(run, tuned)
    texts[tuned] = step.lower(state, batches[0]).compile().as_text()
    s = jax.tree.map(jnp.copy, state)
    for batch in batches:
      s, _ = step(s, batch)
    states[tuned] = s
  tuned, untuned = _ynn_fusions_with_a_dot(texts[True]), _ynn_fusions_with_a_dot(texts[False])
  assert tuned and all(tuned)  # YNNPACK runs the dots (fused with what XLA puts around them)
  assert not all(untuned)  # XLA's default also gives it reductions, which we take back
  chex.assert_trees_all_close(states[True]['params'], states[False]['params'],
                              rtol=1e-5, atol=1e-6)


def test_untuned_call_times_xla_defaults_beside_the_tuned_step():
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  out = benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=2, warmup=0,
                                call=['compiled', 'untuned'])
  rows = {r['variant']: r for r in out['results']}
  assert list(rows) == ['baseline', 'baseline@untuned'] and out['call'] == 'compiled,untuned'
  assert rows['baseline@untuned']['step_ratio'] > 0
  # the same two steps from the same state: the same loss up to float32 rounding
  assert rows['baseline@untuned']['loss'] == pytest.approx(rows['baseline']['loss'], rel=1e-5)


def test_tuning_can_be_turned_off(monkeypatch):
  monkeypatch.setattr(xla_flags, '_applied', {})
  monkeypatch.setenv('SCALEJAX_NO_TUNING', '1')
  assert xla_flags.apply() == {'malloc': False, 'xla_flags': False}


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='Linux CPU affinity')
def test_scalejax_cpus_pins_the_process_before_jax_starts():
  assert xla_flags.parse_cpus('0-3,6') == {0, 1, 2, 3, 6} and xla_flags.parse_cpus('2') == {2}
  for bad in ('x', '', '3-a'):
    with pytest.raises(ValueError, match='is not a CPU list'):
      xla_flags.parse_cpus(bad)
  cpu = max(os.sched_getaffinity(0))
  code = ('from scalejax.train import xla_flags; import os; '
          'print(xla_flags.apply().get("cpus"), sorted(os.sched_getaffinity(0)))')
  run = lambda spec: subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                    env=dict(os.environ, SCALEJAX_CPUS=spec), timeout=120)
  pinned = run(str(cpu))
  assert pinned.stdout.split() == ['True', f'[{cpu}]'], pinned.stderr
  # A bad list is one line that names the fix; the process goes on unpinned.
  bad = run('zero')
  assert bad.returncode == 0 and bad.stdout.startswith('None')
  assert bad.stderr.strip().splitlines() == [
      "scalejax: not pinned: SCALEJAX_CPUS='zero' is not a CPU list; write it as taskset -c "
      f"does, e.g. 0 or 0-3,6 (this process may use CPUs "
      f"{','.join(map(str, sorted(os.sched_getaffinity(0))))})"]


def test_the_cpu_peak_is_the_median_of_its_probes(monkeypatch, tmp_path):
  """One busy second moves one probe, not the MFU: train.py and the bench divide by the
  median of the probes they took (on CPU the probe measures the whole machine)."""
  readings = iter([100e9, 20e9, 110e9, 105e9, 90e9, 5e9])
  monkeypatch.setattr(metrics, 'matmul_probe', lambda: lambda: next(readings))
  record = metrics.ProbeRecord(str(tmp_path / 'probe.json'))
  peak = metrics.Peak(first=3, record=record)
  assert peak.samples == [100e9, 20e9, 110e9] and peak.flops == 100e9
  peak.sample(), peak.sample(), peak.sample()
  assert peak.flops == 95e9 and peak.total(8) == 95e9
  empty = metrics.ProbeRecord(str(tmp_path / 'other.json'))
  assert metrics.Peak(first=0, record=empty).flops != metrics.Peak(first=0, record=empty).flops


def test_runs_on_one_machine_share_their_probes(monkeypatch, tmp_path):
  """A run that probed in a busy second divides by the machine's usual figure: the next
  run (the bench after train.py, or the reverse) reads the earlier probes too."""
  readings = iter([100e9, 102e9, 98e9, 30e9, 35e9])
  monkeypatch.setattr(metrics, 'matmul_probe', lambda: lambda: next(readings))
  path = str(tmp_path / 'cache' / 'probe.json')
  first = metrics.Peak(first=3, record=metrics.ProbeRecord(path))
  busy = metrics.Peak(first=2, record=metrics.ProbeRecord(path))  # two busy probes
  assert busy.earlier == [100e9, 102e9, 98e9] and busy.samples == [30e9, 35e9]
  assert busy.flops == 98e9 and first.flops == 100e9  # alone it would read 32.5e9
  assert 'median of 2 probes of this run and 3 earlier ones' in busy.source
  # The record keeps the newest `keep`, per machine key; other machines' stay apart.
  small = metrics.ProbeRecord(path, keep=4)
  assert small.read() == [102e9, 98e9, 30e9, 35e9]
  small.key = 'another CPU'
  small.add(1e9)
  assert small.read() == [1e9] and len(metrics.ProbeRecord(path).read()) == 5
  # A run pinned to fewer CPUs probes a slower machine: its key is its own.
  if hasattr(os, 'sched_getaffinity'):
    allowed = os.sched_getaffinity(0)
    assert f'| {len(allowed)} cores |' in metrics.ProbeRecord(path).key
    monkeypatch.setattr(metrics.os, 'sched_getaffinity', lambda pid: {min(allowed)})
    assert '| 1 cores |' in metrics.ProbeRecord(path).key
    monkeypatch.setattr(metrics.os, 'sched_getaffinity', lambda pid: allowed)
  # A cache that cannot be written (or a corrupt file) leaves a run its own probes.
  (tmp_path / 'bad.json').write_text('{not json')
  assert metrics.ProbeRecord(str(tmp_path / 'bad.json')).read() == []
  blocked = tmp_path / 'file'
  blocked.write_text('')
  readings = iter([50e9])
  alone = metrics.Peak(first=1, record=metrics.ProbeRecord(str(blocked / 'probe.json')))
  assert alone.flops == 50e9


def test_loop_call_times_the_train_loops_own_step_next_to_the_compiled_one():
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  out = benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=3, warmup=1,
                            call=['compiled', 'loop'])
  compiled, loop = out['results']
  assert out['call'] == 'compiled,loop'
  assert (compiled['variant'], loop['variant']) == ('baseline', 'baseline@loop')
  assert loop['step_ratio'] > 0 and math.isfinite(loop['loss']) and math.isfinite(compiled['loss'])
  with pytest.raises(ValueError, match='unknown --call'):
    benchmark.run_benchmark(cfg, ['baseline'], rounds=1, steps=1, warmup=0, call=['eager'])


def test_loop_case_numbers_its_steps_across_rounds_so_the_watch_reads_them():
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  case = benchmark.build_case(cfg, 'baseline', 2, call='loop')
  for _ in range(3):  # rounds of 5 steps: step numbers 1-15, not 1-5 three times
    case.run(5)
  assert case.steps_done == 15
  # read at steps 4, 8, 12 (those at least 2 steps old): 11-15 still pending
  assert [step for step, _ in case.watch._pending] == [11, 12, 13, 14, 15]


def test_the_pytorch_reference_steps_in_its_own_process_and_counts_its_own_cpu(monkeypatch):
  if importlib.util.find_spec('torch') is None:  # not imported here: only the child needs it
    pytest.skip('needs torch (the [hf] extra)')
  # One OpenMP thread: next to the other test worker, two spinning threads per step
  # made its 41 tiny steps take ~15 s.
  monkeypatch.setenv('OMP_NUM_THREADS', '1')
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  case = benchmark.nanogpt_torch_case(cfg, vocab=32)
  try:
    assert case.proc.pid != os.getpid() and case.proc.poll() is None
    cpu0, _ = case.clocks()
    first = case.run(1)
    for _ in range(3):  # the same 8 random batches over and over: it must learn them
      last = case.run(8)
    cpu1, _ = case.clocks()
    assert math.isfinite(first) and last < first - 0.05, (first, last)
    assert cpu1 > cpu0  # the reference process's own CPU time, not this process's
    # a matmul request: seconds of torch.matmul calls, the step's clocks untouched
    product = matmuls.Product(2, 32, 16, 24)
    few, many = case.matmul(product, 2), case.matmul(product, 400)
    assert 0 < few < many, (few, many)
    assert case.clocks()[0] == cpu1
  finally:
    case.close()
  assert case.proc.returncode == 0


def test_gpu_bench_smoke_mode_measures_the_batch_and_the_speed(tmp_path):
  # The one-accelerator script at toy sizes: the largest batch that compiles and the
  # bench's rounds for baseline and unified. A --budget_s too short for part 2 skips
  # its two training runs and says why (the runs themselves are trainer.train on a
  # text corpus, which test_train.py covers; their reading and plot: the test below).
  proc = subprocess.run([sys.executable, '-m', 'scalejax.cli.gpu_bench', '--smoke',
                         '--budget_s', '1', '--out', str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / 'gpu_bench.json').read_text())
  assert out['smoke'] and out['batch_size'] == 8 and out['batches_tried'][0][0] == 8
  rows = {r['variant']: r for r in out['speed']['results']}
  assert list(rows) == ['baseline', 'unified']
  assert rows['unified']['step_ratio'] > 0
  # memory: each variant's own compiled peak (two different programs), and their ratio
  peaks = {v: rows[v]['peak_bytes'] for v in rows}
  assert min(peaks.values()) > 0 and peaks['unified'] != peaks['baseline']
  assert rows['unified']['memory_ratio'] == pytest.approx(peaks['unified'] / peaks['baseline'])
  step_s = rows['baseline']['step_ms'] / 1e3
  assert rows['baseline']['tokens_per_s'] == pytest.approx(8 * 128 / step_s)
  assert 'of --budget_s left' in out['curves_skipped'] and 'curves' not in out
  assert not (tmp_path / 'curves.png').exists()


def test_gpu_bench_reads_and_plots_the_curves_of_its_runs(tmp_path):
  from scalejax.cli import gpu_bench
  curves = {}
  for variant, losses in [('baseline', (5.0, 4.0)), ('unified', (5.0, 3.5))]:
    workdir = tmp_path / variant
    workdir.mkdir()
    records = [{'step': 1, 'loss': 5.5}, {'step': 1, 'eval_loss': losses[0]},
               {'step': 2, 'loss': 4.5, 'tokens_per_sec': 10.0}, {'step': 2, 'eval_loss': losses[1]}]
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    curves[variant] = gpu_bench.read_curve(str(workdir))
  assert curves['unified'] == {'train': [(1, 5.5), (2, 4.5)], 'eval': [(1, 5.0), (2, 3.5)]}
  gpu_bench.plot_curves(curves, str(tmp_path / 'curves.png'))
  assert (tmp_path / 'curves.png').stat().st_size > 1000


# --- another revision of the code in the same process (--against) ---------------------

@pytest.fixture(scope='module')
def other_tree(tmp_path_factory):
  """A copy of this tree's package and configs, its bench_tiny config one layer deeper:
  a revision whose cases must come from its own files."""
  tree = tmp_path_factory.mktemp('other')
  skip = shutil.ignore_patterns('__pycache__')
  shutil.copytree(ROOT / 'scalejax', tree / 'scalejax', ignore=skip)
  shutil.copytree(ROOT / 'configs', tree / 'configs', ignore=skip)
  tiny = tree / 'configs' / 'bench_tiny.py'
  tiny.write_text(tiny.read_text().replace('n_layers=2', 'n_layers=3'))
  return tree


def test_against_builds_the_other_trees_cases_from_its_files_then_restores_ours(other_tree):
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  with cfg.unlocked():
    cfg.train.batch_size = 2  # as a command-line override would set it
  ours = {name: module for name, module in sys.modules.items() if name.startswith('scalejax')}
  rev = str(other_tree)
  other = revisions.cases_at(rev, cfg, str(ROOT / 'configs' / 'bench_tiny.py'),
                             [('baseline', 'compiled', 'baseline')], n_batches=2)
  assert {n: m for n, m in sys.modules.items() if n.startswith('scalejax')} == ours
  assert [c.name for c in other] == [f'baseline@{rev}']
  # its code and its config file (3 layers), with this run's override (batch 2 x 16)
  assert type(other[0]).run.__code__.co_filename.startswith(str(other_tree))
  assert other[0].tokens_per_step == 2 * 16
  with cfg.unlocked():
    cfg.model.n_layers = 3
  mine = benchmark.build_case(cfg, 'baseline', n_batches=2)
  assert other[0].flops_per_step == mine.flops_per_step
  benchmark.measure([mine] + other, rounds=2, steps=2, warmup=0)
  # the same program from the same state and batches: the same loss
  assert other[0].loss == pytest.approx(mine.loss, rel=1e-6)
  row = benchmark.report([mine] + other, peak=1e12, peak_source='test', rev=rev)[0]
  assert row['against'] == rev and len(row['against_step_ratio_rounds']) == 2
  assert row['against_step_ratio'] == pytest.approx(
      statistics.median(mine.wall) / statistics.median(other[0].wall))
  assert row['against_memory_ratio'] == pytest.approx(1.0)


def test_against_on_the_command_line_prints_this_tree_over_the_other(other_tree, tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'scalejax.cli.bench', '--config', 'configs/bench_tiny.py',
       '--variants', 'baseline', '--rounds', '1', '--steps', '1', '--warmup', '0',
       '--against', str(other_tree), '--config.model.n_layers=3', '--json', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())['results']
  assert [r['variant'] for r in rows] == ['baseline', f'baseline@{other_tree}']
  assert rows[0]['flops_per_step'] == rows[1]['flops_per_step']  # both 3 layers
  assert f'baseline     this tree / {other_tree}: step ' in proc.stdout


def test_against_a_git_revision_or_one_clear_error(tmp_path):
  if subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True).returncode:
    pytest.skip('not a git checkout')
  tree = revisions.source_tree('HEAD', str(tmp_path))
  committed = subprocess.run(['git', '-C', str(ROOT), 'show', 'HEAD:scalejax/train/trainer.py'],
                             capture_output=True, text=True, check=True).stdout
  assert (Path(tree) / 'scalejax' / 'train' / 'trainer.py').read_text() == committed
  with pytest.raises(ValueError, match=r'^--against no-such-revision: neither a directory '):
    revisions.source_tree('no-such-revision', str(tmp_path))


def test_against_names_an_override_the_other_config_lacks(other_tree):
  cfg = load_config(ROOT / 'configs' / 'bench_tiny.py')
  with pytest.raises(ValueError, match=r'its config has no train\.no_such_key'):
    revisions.build_cases('x', str(other_tree), str(ROOT / 'configs' / 'bench_tiny.py'),
                          {'train.no_such_key': 1}, [('baseline', 'compiled', 'baseline')],
                          n_batches=1)


def test_against_an_older_bench_is_one_clear_error_and_leaves_our_modules(tmp_path):
  """A revision whose build_case predates the bench's arguments: named, nothing built."""
  train = tmp_path / 'scalejax' / 'train'
  train.mkdir(parents=True)
  (tmp_path / 'scalejax' / '__init__.py').write_text('')
  (train / '__init__.py').write_text('')
  (train / 'config.py').write_text(
      'import ml_collections\n'
      'def load_config(path):\n'
      '  return ml_collections.ConfigDict({"train": {"steps": 1}})\n')
  (train / 'benchmark.py').write_text('def build_case(cfg, variant, n_batches):\n  raise AssertionError\n')
  ours = {name: module for name, module in sys.modules.items() if name.startswith('scalejax')}
  with pytest.raises(ValueError, match=r'its benchmark\.build_case takes \(cfg, variant, '
                                       r'n_batches\), not this bench.s n_batches, call and name'):
    revisions.build_cases('old', str(tmp_path), str(ROOT / 'configs' / 'bench_tiny.py'), {},
                          [('baseline', 'compiled', 'baseline')], n_batches=1)
  assert {n: m for n, m in sys.modules.items() if n.startswith('scalejax')} == ours

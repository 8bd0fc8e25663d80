"""Paper configs and param report; ahead-of-time compiles; fused normalization in the HLO.

TPU tests need `libtpu` (pip install "jax[tpu]==0.10.2"; no TPU needed) and are
skipped without it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from scalejax.cli import aot, param_report
from _util import tiny_config, child_xla_flags

ROOT = Path(__file__).parents[1]
from scalejax.train import presets

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu not installed: pip install "jax[tpu]==0.10.2" to compile '
                           'for TPU topologies on this machine')


def _run(*args, devices=1, extra_env=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             XLA_FLAGS=child_xla_flags(devices),
             **(extra_env or {}))
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


# --- paper sizes ------------------------------------------------------------------

def test_param_report_reproduces_the_llama_1b_counts():
  out = _run('-m', 'scalejax.cli.param_report', '--config', 'configs/paper_dense_1b.py')
  rows = dict((line[:18].strip(), line[18:].strip()) for line in out.splitlines())
  assert rows['total params'] == '1,028,065,024'
  assert rows['scale vectors'].startswith('80,640  (0.0078% of total)')
  assert rows['non-embedding'].startswith(f'{1_028_065_024 - 50_304 * 1792:,}')
  assert rows['active / token'].startswith('1,028,065,024')


@pytest.mark.parametrize('name,total,active', [
    ('dense_120m', (0.11e9, 0.14e9), None), ('dense_500m', (0.45e9, 0.55e9), None),
    ('dense_2b', (1.9e9, 2.1e9), None),
    ('moe_500m', (0.4e9, 0.55e9), (0.1e9, 0.2e9)), ('moe_2b', (1.9e9, 2.1e9), (0.4e9, 0.7e9))])
def test_paper_configs_have_the_paper_sizes(name, total, active):
  cfg = presets.paper_config(name)
  _, counts = param_report.report(cfg)   # also checks counting.py against the built model
  assert total[0] < counts['total'] < total[1]
  lo, hi = active or total
  assert lo < counts['active'] < hi
  assert cfg.model.vocab_size == 50_304 and not cfg.model.tie_embeddings


# --- ahead-of-time compilation ----------------------------------------------------

def test_aot_on_8_cpu_devices_reports_sharded_memory(tmp_path):
  report = tmp_path / 'r.json'
  out = _run('-m', 'scalejax.cli.aot', '--config', 'configs/tiny.py', '--topology', 'cpu',
             '--config.model.d_ff=64', '--config.mesh.data=1', '--config.mesh.fsdp=4',
             '--config.mesh.tensor=2', '--json', str(report), devices=8)
  assert 'mesh          data=1 fsdp=4 tensor=1' not in out and 'fsdp=4 tensor=2' in out
  r = json.loads(report.read_text())
  cfg = tiny_config()
  cfg.model.update(vocab_size=cfg.data.synthetic_vocab, d_ff=64)
  _, counts = param_report.report(cfg)
  state = 3 * 4 * counts['total']  # float32 params, Adam mu and nu
  # Every kernel and the tables are split 4 or 8 ways; only norms and scalars replicate.
  assert state / 8 < r['argument_bytes'] < state / 4
  # The state is donated: all but the batch (at most 2 x 8 x 32 int32) is aliased.
  assert 0 <= r['argument_bytes'] - r['alias_bytes'] <= 2 * 8 * 32 * 4
  assert r['devices'] == 8 and r['total_bytes'] > r['argument_bytes']


def test_compiler_cost_covers_every_scanned_layer():
  # XLA counts a loop body once; the extrapolated figure must match the analytic count.
  cfg = tiny_config()
  cfg.model.update(n_layers=6, d_model=64, n_heads=4)
  report, _ = aot.compile_train_step(cfg, 'cpu')
  assert 0.97 < report.flops / report.model_flops < 1.1, (report.flops, report.model_flops)
  one = tiny_config()
  one.model.update(n_layers=1, d_model=64, n_heads=4)
  single, _ = aot.compile_train_step(one, 'cpu')
  assert 4 < report.bytes_accessed / single.bytes_accessed < 6.5


def test_roofline_estimate_takes_the_bound_that_binds():
  kw = dict(topology='v5p:2x2x1', devices=4, device_kind='TPU v5', mesh={}, batch_size=8,
            seq_len=16, params=1, compile_s=0.0, argument_bytes=0, output_bytes=0,
            alias_bytes=0, temp_bytes=0, code_bytes=0, hbm_bytes=None,
            model_flops=300e12, peak_flops=400e12, hbm_bw=2e12)
  compute = aot.Report(flops=400e12, bytes_accessed=1e12, **kw)   # 1 s of FLOPs, 0.5 s of bytes
  assert compute.roofline_s == pytest.approx(1.0) and compute.roofline_mfu == pytest.approx(0.75)
  memory = aot.Report(flops=400e12, bytes_accessed=4e12, **kw)    # 1 s of FLOPs, 2 s of bytes
  assert memory.roofline_s == pytest.approx(2.0) and memory.roofline_mfu == pytest.approx(0.375)
  cpu = aot.Report(flops=1.0, bytes_accessed=1.0, **{**kw, 'peak_flops': None})
  assert cpu.roofline_s is None and 'roofline' not in aot.format_report(cpu)


@needs_libtpu
def test_aot_compiles_dense_and_moe_train_steps_for_a_v5p_slice():
  cfg = tiny_config()
  cfg.mesh.update(data=1, fsdp=-1)
  dense, _ = aot.compile_train_step(cfg, 'v5p-8')
  assert (dense.devices, dense.device_kind, dense.mesh['fsdp']) == (4, 'TPU v5', 4)
  assert dense.fits and dense.hbm_bytes == 95 * 2**30 and dense.flops > 0
  text = aot.format_report(dense)
  assert 'fits' in text and 'v5p:2x2x1: 4 x TPU v5' in text
  assert 'roofline' in text and 0 < dense.roofline_mfu < 1

  cfg.model.update(mlp='moe', moe_experts=4, moe_expert_ff=32, variant='unified')
  cfg.mesh.update(fsdp=1, expert=4)
  moe, _ = aot.compile_train_step(cfg, 'v5p-8')
  assert moe.mesh['expert'] == 4 and moe.fits and moe.argument_bytes > 0


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown --topology 'v9-8'; use an accelerator type"):
    aot.topology_devices('v9-8')


# --- fused normalization ----------------------------------------------------------
# A norm's scale vector(s) should ride in the fusions that compute the normalization
# (and, on TPU, those feeding the following matmuls): compared with the same layer
# without scales, the compiler's bytes-accessed estimate may grow only by the O(D)
# scale params. One activation written and read back again would add 2 activations
# of traffic, so a margin of 0.5 activation separates the two cleanly.

ROUND_TRIP_MARGIN = 0.5
DIM = 256


def _device(platform):
  if platform == 'cpu':
    return jax.devices('cpu')[0]
  return aot.topology_devices('v5p-8')[0][0]


def _traffic(device, dtype, grad=False, variant=None, **kw):
  unit = (aot.NormUnit.of_variant(DIM, variant, **kw) if variant else aot.NormUnit(DIM, **kw))
  return aot.norm_traffic(unit, device, dtype, grad)


@pytest.mark.parametrize('platform', ['cpu', pytest.param('tpu', marks=needs_libtpu)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_scale_vectors_and_hg_branches_fuse_into_the_normalization(platform, dtype):
  device = _device(platform)
  plain = _traffic(device, dtype, variant='no_scale')
  for name in ('baseline', 'magdir', 'magdir_unit', 'hg'):
    extra = _traffic(device, dtype, variant=name) - plain
    assert extra < ROUND_TRIP_MARGIN, (name, extra)
  # DNP's intermediate normalization: its output-role scale u fuses into it as well.
  no_u = _traffic(device, dtype, dual='dnp', dual_scale='none')
  for form in ('vector', 'magdir'):
    extra = _traffic(device, dtype, dual='dnp', dual_scale=form) - no_u
    assert extra < ROUND_TRIP_MARGIN, (form, extra)


@needs_libtpu
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_on_tpu_the_scale_gradient_adds_no_traffic_that_grows_with_tokens(dtype):
  # The norm hands its scale to the linear maps, which fold it into their kernels
  # (decoder.feed): d(gamma) comes from the kernel's gradient, a pass over [d, d]
  # weights, not over the activations. So the backward's extra bytes over a scale-free
  # norm stay put when the tokens grow 4x (they are weight-sized: ~5-9 MB here).
  # (XLA:CPU does not fuse the token reduction of an unfolded d(gamma): docs/TPU.md.)
  device = _device('tpu')
  small, large = (8, 128, DIM), (32, 128, DIM)
  act = 8 * 128 * DIM * jnp.dtype(dtype).itemsize  # bytes of one activation of `small`

  def extra(name, shape):
    acts = lambda v: aot.norm_traffic(aot.NormUnit.of_variant(DIM, v), device, dtype, True,
                                      shape) * (shape[0] // 8)
    return (acts(name) - acts('no_scale')) * act
  for name in ('baseline', 'magdir'):
    grown = extra(name, large) - extra(name, small)
    assert grown < ROUND_TRIP_MARGIN * act, (name, grown / act)
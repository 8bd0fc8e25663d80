"""Compile a config's real sharded train step for a TPU topology, on any machine.

  python -m scalejax.cli.aot --config configs/paper_dense_1b.py --topology v5p-8 \
    [--config.train.batch_size=64 --config.mesh.fsdp=4 ...]

No TPU is needed: with `libtpu` installed (`pip install "jax[tpu]==0.10.2"`) JAX
describes a TPU slice (`jax.experimental.topologies.get_topology_desc`) whose devices
can compile but not run. The step compiled is `trainer.make_train_step` on the
abstract train state of `trainer.build_run`: the same mesh, shardings, donation and
optimizer as a real run. Printed per device: memory from `compiled.memory_analysis()`
(arguments, outputs, donated aliases, temporaries) against the chip's HBM, and the
compiler's FLOP and byte estimates. `--topology cpu` compiles for this machine's
devices instead (e.g. 8 emulated with XLA_FLAGS=--xla_force_host_platform_device_count=8).

    python -m scalejax.cli.aot --fusion --topology v5p-8

prints instead how much memory traffic each variant's normalization adds (see
`norm_traffic`): the check that scale vectors and HG branches fuse.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from scalejax.train import metrics, trainer
from scalejax.core import roles, sharding
from scalejax.model import attention
from scalejax.model.counting import flops_per_token, param_counts
from scalejax.model.decoder import feed
from scalejax.model.layers import Attention, Linear, input_branches
from scalejax.scales.norms import Norm, NormSpec
from scalejax.scales.variants import get_variant

# accelerator type -> topology name (chips); v4 and v5p types count TensorCores, two per
# chip, and run one device per chip ("megacore").
ACCELERATORS = {
  'v4-8': 'v4:2x2x1', 'v4-16': 'v4:2x2x2', 'v4-32': 'v4:2x2x4', 'v4-64': 'v4:2x4x4',
  'v4-128': 'v4:4x4x4',
  'v5p-8': 'v5p:2x2x1', 'v5p-16': 'v5p:2x2x2', 'v5p-32': 'v5p:2x2x4', 'v5p-64': 'v5p:2x4x4',
  'v5p-128': 'v5p:4x4x4', 'v5p-256': 'v5p:4x4x8',
  'v5e-4': 'v5e:2x2', 'v5e-8': 'v5e:2x4', 'v5e-16': 'v5e:4x4', 'v5e-32': 'v5e:4x8',
  'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16',
  'v6e-4': 'v6e:2x2', 'v6e-8': 'v6e:2x4', 'v6e-16': 'v6e:4x4', 'v6e-32': 'v6e:4x8',
  'v6e-64': 'v6e:8x8', 'v6e-256': 'v6e:16x16',
}
HBM_GIB = {'v4': 32, 'v5p': 95, 'v5e': 16, 'v6e': 32}  # per chip, Cloud TPU docs
# HBM bandwidth per chip (bytes/s, Cloud TPU docs) for the roofline; peak FLOP/s come
# from metrics.PEAK_FLOPS by device kind, as for MFU in training.
HBM_BW = {'v4': 1.2e12, 'v5p': 2.765e12, 'v5e': 0.819e12, 'v6e': 1.64e12}
GIB = 1024**3


def generation(topology_name: str) -> str | None:
  return topology_name.split(':')[0] if ':' in topology_name else None


def topology_devices(topology: str):
  """(compile-only devices, HBM bytes per device or None, topology name)."""
  if topology == 'cpu':
    return jax.devices(), None, 'cpu'
  name = ACCELERATORS.get(topology, topology)
  match = re.fullmatch(r'(v4|v5p|v5e|v6e):\d+(x\d+)+', name)
  if not match:
    raise ValueError(f'unknown --topology {topology!r}; use an accelerator type '
                     f'({", ".join(ACCELERATORS)}), a topology like v5p:2x2x2, or cpu')
  try:
    import libtpu  # noqa: F401  (only to give a clear error below)
  except ImportError:
    raise RuntimeError('compiling for a TPU topology needs libtpu: '
                       'pip install "jax[tpu]==0.10.2" (no TPU needed)') from None
  from jax.experimental import topologies
  # Compiling touches no chip, so several processes may load libtpu at once (without
  # this, a second one fails on libtpu's lockfile).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  kw = {'chip_config_name': 'megacore'} if match.group(1) == 'v4' else {}
  devices = topologies.get_topology_desc(platform='tpu', topology_name=name, **kw).devices
  return devices, HBM_GIB[match.group(1)] * GIB, name


@dataclasses.dataclass
class Report:
  topology: str
  devices: int
  device_kind: str
  mesh: dict
  batch_size: int
  seq_len: int
  params: int
  compile_s: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int | None
  flops: float | None            # compiler's estimate, per device (layer_extrapolated_cost)
  bytes_accessed: float | None   # compiler's estimate, per device (layer_extrapolated_cost)
  model_flops: float             # analytic (counting.flops_per_token), per device
  attention: str = 'xla'         # the attention implementation compiled (attention.choose)
  kernel_flops: float = 0.0      # of those FLOPs and bytes: the splash kernel's (analytic)
  kernel_bytes: float = 0.0
  peak_flops: float | None = None  # chip's dense bf16 peak (TPU only)
  hbm_bw: float | None = None      # chip's HBM bandwidth, bytes/s (TPU only)

  @property
  def roofline_s(self) -> float | None:
    """Step time if the chip ran the compiler's FLOPs at peak and its bytes at full
    bandwidth, whichever bounds: an estimate, blind to collectives and overlap."""
    if not (self.peak_flops and self.hbm_bw and self.flops and self.bytes_accessed):
      return None
    return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bw)

  @property
  def roofline_mfu(self) -> float | None:
    """Analytic model FLOPs over the roofline time, against the peak."""
    t = self.roofline_s
    return None if t is None else self.model_flops / (t * self.peak_flops)

  @property
  def total_bytes(self) -> int:
    # Donated inputs are reused for outputs, so they count once.
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
        + self.code_bytes)

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes


def _prepare(cfg):
  """AOT needs shapes, not text: with a fixed vocabulary, use synthetic data."""
  cfg = cfg.copy_and_resolve_references()
  if cfg.model.vocab_size > 0 and cfg.data.source != 'synthetic':
    cfg.data.source = 'synthetic'
  if cfg.data.source == 'synthetic':
    if cfg.model.vocab_size > 0:
      cfg.data.synthetic_vocab = cfg.model.vocab_size
    # no eval step is compiled; the train iterator needs one window
    cfg.data.update(eval_batches=0, eval_fraction=0.0, max_bytes=2 * (cfg.train.seq_len + 1))
  return cfg


def _compile(cfg, devices):
  run, state = trainer.build_run(cfg, None, devices=devices, abstract=True)
  t = cfg.train
  batch_sh = sharding.batch_sharding(run.mesh)
  tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sh)
  with jax.set_mesh(run.mesh):
    compiled = trainer.make_train_step(run).lower(
      state, {'inputs': tokens, 'targets': tokens}).compile()
  return run, compiled


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis() or {}
  return (cost[0] if cost else {}) if isinstance(cost, list) else cost  # older JAX: a list


def layer_extrapolated_cost(cfg, devices) -> tuple[float | None, float | None]:
  """(FLOPs, bytes accessed) per device of the whole step.

  XLA's cost analysis counts a while loop's body once, so the scanned step's own figures
  miss all layers but one. Copies with 2 and 3 layers, fully unrolled, give the cost of
  one more layer; the total is extrapolated linearly to model.n_layers. (Not 1 and 2:
  on TPU the second layer adds more than each later one, e.g. 5.3e13 against 4.6e13
  FLOPs per device for paper_dense_1b on v5p-8: the first increment is not typical.)
  """
  costs = []
  for n in (2, 3):
    c = cfg.copy_and_resolve_references()
    c.model.update(n_layers=n, scan_unroll=n)
    costs.append(_cost(_compile(c, devices)[1]))
  out = []
  for key in ('flops', 'bytes accessed'):
    two, three = (c.get(key) for c in costs)
    out.append(None if two is None or three is None
               else two + (three - two) * (cfg.model.n_layers - 2))
  return tuple(out)


def compile_train_step(cfg, topology: str = 'cpu'):
  """Compiles the train step; returns (Report, compiled executable)."""
  cfg = _prepare(cfg)
  devices, hbm, name = topology_devices(topology)
  start = time.perf_counter()
  run, compiled = _compile(cfg, devices)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  flops, bytes_accessed = layer_extrapolated_cost(cfg, devices)
  t = cfg.train
  n_dev = len(devices)
  m = run.model_cfg
  impl = attention.for_model(m, t.seq_len, devices[0].platform)
  # A Pallas kernel is a custom call that XLA's cost analysis counts as 0 FLOPs.
  kernel_flops, kernel_bytes = (attention.splash_cost(m, t.batch_size / n_dev, t.seq_len)
                                if impl == 'splash' else (0.0, 0.0))
  if flops is not None:
    flops, bytes_accessed = flops + kernel_flops, bytes_accessed + kernel_bytes
  model_flops = flops_per_token(run.model_cfg, t.seq_len) * t.batch_size * t.seq_len / n_dev
  report = Report(
    topology=name, devices=n_dev, device_kind=devices[0].device_kind,
    mesh=dict(run.mesh.shape), batch_size=t.batch_size, seq_len=t.seq_len,
    params=param_counts(run.model_cfg)['total'], compile_s=seconds,
    argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
    code_bytes=mem.generated_code_size_in_bytes, hbm_bytes=hbm,
    flops=flops, bytes_accessed=bytes_accessed, model_flops=model_flops, attention=impl,
    kernel_flops=kernel_flops, kernel_bytes=kernel_bytes,
    peak_flops=metrics.device_peak_flops(devices[0])[0] if hbm else None,
    hbm_bw=HBM_BW.get(generation(name)))
  return report, compiled


def _size(b: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 1024**2), ('KiB', 1024)):
    if b >= scale:
      return f'{b / scale:8.2f} {unit}'
  return f'{b:8.0f} B  '


def format_report(r: Report) -> str:
  g = _size
  mesh = ' '.join(f'{k}={v}' for k, v in r.mesh.items())
  if r.hbm_bytes is None:
    verdict = ''
  else:
    verdict = (f', {100 * r.total_bytes / r.hbm_bytes:.0f}% of {r.hbm_bytes / GIB:.0f} GiB '
               f'HBM: {"fits" if r.fits else "DOES NOT FIT"}')
  est = lambda v, unit: 'n/a' if v is None else f'{v:.4g} {unit}'
  return '\n'.join([
    f'topology      {r.topology}: {r.devices} x {r.device_kind}',
    f'mesh          {mesh}',
    f'batch         {r.batch_size} x {r.seq_len} tokens '
    f'({r.batch_size / r.devices:g} per device)',
    f'params        {r.params:,}',
    f'compile       {r.compile_s:.1f} s',
    'memory per device (compiled.memory_analysis):',
    f'  arguments   {g(r.argument_bytes)}   train state shard + batch',
    f'  outputs     {g(r.output_bytes)}',
    f'  aliased     {g(r.alias_bytes)}   donated state reused by the outputs',
    f'  temporaries {g(r.temp_bytes)}',
    f'  code        {g(r.code_bytes)}',
    f'  total       {g(r.total_bytes)}   args + outputs - aliased + temps + code{verdict}',
    'per device per step:',
    f'  compiler    {est(r.flops, "FLOP")}, {est(r.bytes_accessed, "bytes accessed")} '
    '(cost_analysis, extrapolated over layers'
    + (', plus the kernel below)' if r.kernel_flops else ')'),
    *([f'  kernel      {r.kernel_flops:.4g} FLOP, {r.kernel_bytes:.4g} bytes   ({r.attention} '
       'attention, attention.splash_cost: invisible to cost_analysis)'] if r.kernel_flops else
      [f'  attention   {r.attention}']),
    f'  analytic    {r.model_flops:.4g} FLOP   (counting.flops_per_token: 6N + attention)',
    *([] if r.roofline_s is None else [
      f'  roofline    {1e3 * r.roofline_s:.1f} ms/step, MFU <= {100 * r.roofline_mfu:.1f}% '
      f'(ESTIMATE: max(FLOP/{r.peak_flops:.3g}, bytes/{r.hbm_bw:.3g} B/s); '
      'no collectives, no overlap)']),
  ])


# --- fused normalization -----------------------------------------------------------

class NormUnit(nnx.Module):
  """An attention input norm feeding q, k and v, wired as `decoder.Block` wires it: HG
  branches from `Attention.BRANCHES`, the norm's output handed over by `decoder.feed`
  (its scales folded into the kernels), DP/DNP on each map.

  `dual_scale` sets the scale form inside DP/DNP alone (default: the norm's).
  """
  folds_scales = Attention.folds_scales

  def __init__(self, dim: int, scale='vector', hg=False, dual='none', dual_scale=None):
    rngs = nnx.Rngs(0)
    self.norm = Norm(NormSpec(scale=scale), dim, roles.INPUT_SCALE,
                     branches=input_branches(Attention, hg))
    inner = NormSpec(scale=dual_scale or scale)
    for name in Attention.BRANCHES:
      setattr(self, name, Linear(dim, dim, ('embed', 'mlp'), rngs=rngs, dual=dual, norm=inner))

  @classmethod
  def of_variant(cls, dim: int, name: str, **kw):
    v = get_variant(name)
    return cls(dim, scale=v.scale, hg=v.hg, dual=kw.pop('dual', v.dual), **kw)

  def __call__(self, x):
    h = feed(self.norm, x, self, len(Attention.BRANCHES))
    return sum(getattr(self, name)(hi) for name, hi in zip(Attention.BRANCHES, h))


def norm_traffic(unit: NormUnit, device, dtype, grad: bool = False,
                 shape=(8, 128, 256)) -> float:
  """The compiler's bytes accessed for unit(x) (grad: its forward + backward), counted
  in activations (bytes of one x). Compiled for one `device`, which may be a
  compile-only TPU device, so nothing runs."""
  graphdef, state = nnx.split(unit)
  params = nnx.to_pure_dict(state)
  loss = lambda p, x: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x).astype(jnp.float32)))
  fn = jax.grad(loss, argnums=(0, 1)) if grad else loss
  sh = jax.sharding.SingleDeviceSharding(device)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  x = jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  cost = _cost(jax.jit(fn).lower(jax.tree.map(spec, params), x).compile())
  return cost['bytes accessed'] / (x.size * jnp.dtype(dtype).itemsize)


FUSION_ROWS = ('no_scale', 'baseline', 'magdir', 'magdir_unit', 'hg', 'dp', 'dnp', 'unified')


def fusion_table(topology: str, dim: int = 256) -> str:
  """Traffic of every variant's norm + 3 linear maps, minus that of the no-scale norm."""
  device = topology_devices(topology)[0][0]
  lines = [f'{device.device_kind}: bytes accessed over the no_scale unit, in activations '
           f'of [8, 128, {dim}] (a pre-norm feeding 3 linear maps)',
           f'{"variant":<12}{"fwd f32":>9}{"fwd bf16":>10}{"f+b f32":>9}{"f+b bf16":>10}']
  base = {(dt, g): norm_traffic(NormUnit.of_variant(dim, 'no_scale'), device, dt, g)
          for dt in (jnp.float32, jnp.bfloat16) for g in (False, True)}
  for name in FUSION_ROWS[1:]:
    cells = [norm_traffic(NormUnit.of_variant(dim, name), device, dt, g) - base[dt, g]
             for g in (False, True) for dt in (jnp.float32, jnp.bfloat16)]
    lines.append(f'{name:<12}' + ''.join(f'{c:>+9.2f} ' for c in cells))
  return '\n'.join(lines)


# --- command line -----------------------------------------------------------------

# The command line's own imports: nothing above needs absl or ml_collections.
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from scalejax.cli import common  # noqa: E402


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string('topology', 'v5p-8', 'accelerator type (v5p-8, v4-32, v5e-16, ...), '
                      'topology (v5p:2x2x2) or cpu', flag_values=fv)
  flags.DEFINE_string('json', '', 'also write the report to this JSON file', flag_values=fv)
  flags.DEFINE_bool('fusion', False, 'print the normalization traffic table instead',
                    flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  common.no_arguments(argv)
  if fv.fusion:
    print(fusion_table(fv.topology))
    return
  cfg = common.loaded_config(fv)
  if cfg is None:
    raise ValueError('--config is required (or --fusion)')
  report, _ = compile_train_step(cfg, fv.topology)
  print(f'config        {config_flags.get_config_filename(fv["config"])}')
  print(format_report(report))
  if fv.json:
    with open(fv.json, 'w') as f:
      json.dump({**dataclasses.asdict(report), 'total_bytes': report.total_bytes,
                 'fits': report.fits, 'roofline_s': report.roofline_s,
                 'roofline_mfu': report.roofline_mfu}, f, indent=2)


def run() -> None:
  common.run(main, define_flags, __doc__)


if __name__ == '__main__':
  run()

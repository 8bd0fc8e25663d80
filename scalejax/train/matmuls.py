"""The step's matrix products timed one at a time: XLA's dot against PyTorch's, per shape.

A CPU step that trails PyTorch's may do so in its matrix products (the library each
framework hands them to, and how it splits one product over the cores) or elsewhere.
`products` reads every dot of a compiled step off its HLO text and reduces it to
(batch, m, k, n); `time_products` times each distinct one alone, as a jitted
`jnp.matmul` compiled with the project's XLA options and, when given the PyTorch
reference process (`torch_reference.py`, which answers `{"matmul": ...}` requests), as
`torch.matmul` there, in the same rounds so both meet the same load. Summed over the
step's dots (a dot inside a loop as many times as the loop runs), the two totals say
how much of a gap between the steps the products alone explain. The bench prints them
(`python -m scalejax.cli.bench --matmuls`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from scalejax.train import step_profile, xla_flags

# '%name = f32[768,128]{1,0} op(' : an instruction with an array shape
_ARRAY = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+) = (\w+)\[([\d,]*)\]')
_DOT = re.compile(r'\bdot\((%[^\s,)]+),\s*(%[^\s,)]+)\)')
_DIMS = r'{}={{([\d,]*)}}'
# computations an instruction runs: fusions, reductions' and sorts' bodies, a loop's body
# and condition, a conditional's branches
_CALLED = re.compile(r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)'
                     r'=%([^\s,}]+)|branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
DTYPES = {'f32': 'float32', 'bf16': 'bfloat16', 'f16': 'float16'}


@dataclasses.dataclass(frozen=True)
class Product:
  """`batch` independent [m, k] x [k, n] products in `dtype` (an HLO element type)."""
  batch: int
  m: int
  k: int
  n: int
  dtype: str = 'f32'

  @property
  def flops(self) -> int:
    return 2 * self.batch * self.m * self.k * self.n

  def __str__(self) -> str:
    lead = f'{self.batch}x' if self.batch > 1 else ''
    return f'{lead}[{self.m},{self.k}]x[{self.k},{self.n}] {self.dtype}'


def _dims(text: str, key: str) -> tuple[int, ...]:
  m = re.search(_DIMS.format(key), text)
  return tuple(int(d) for d in m.group(1).split(',') if d) if m else ()


def products(hlo_text: str) -> collections.Counter:
  """{Product: how many times one run of the compiled module computes it} from the
  module's text: each dot's operand shapes give its batch, contracted and free sizes
  (m: the lhs's free dims, n: the rhs's), and a dot in a loop's body counts once per
  iteration (XLA's known trip count; 1 where it knows none). Dots of an element type
  PyTorch cannot time here (integers) are left out."""
  shapes, dtypes = {}, {}
  dots = []  # (computation, Product)
  callers = collections.defaultdict(list)  # computation: [(caller, runs per call)]
  entry = current = None
  for line in hlo_text.splitlines():
    head = step_profile.COMPUTATION.match(line)
    if head:
      current = head.group(1)
      entry = current if line.startswith('ENTRY') else entry
      continue
    array = _ARRAY.match(line)
    if array:  # operands come before their users in the text
      shapes[array.group(1)] = tuple(int(d) for d in array.group(3).split(',') if d)
      dtypes[array.group(1)] = array.group(2)
    trips = _TRIP_COUNT.search(line) if ' while(' in line else None
    for single, branches in _CALLED.findall(line):
      for callee in [single] if single else re.findall(r'%([^\s,]+)', branches):
        callers[callee].append((current, int(trips.group(1)) if trips else 1))
    dot = _DOT.search(line)
    if dot and array:
      lhs, rhs = (name.lstrip('%') for name in dot.groups())
      if lhs in shapes and rhs in shapes and dtypes[lhs] in DTYPES:
        dots.append((current, _product(shapes[lhs], shapes[rhs], dtypes[lhs],
                                       line[dot.end():])))
  runs: dict[str, int] = {}

  def count(name: str) -> int:  # HLO's call graph has no cycles
    if name not in runs:
      runs[name] = 1 if name == entry else sum(count(c) * k for c, k in callers[name])
    return runs[name]
  found: collections.Counter = collections.Counter()
  for computation, product in dots:
    if count(computation):
      found[product] += count(computation)
  return found


def _product(ls: tuple, rs: tuple, dtype: str, attrs: str) -> Product:
  """The Product of a dot with operand shapes `ls`, `rs` and attributes `attrs`."""
  lb, lc = _dims(attrs, 'lhs_batch_dims'), _dims(attrs, 'lhs_contracting_dims')
  rb, rc = _dims(attrs, 'rhs_batch_dims'), _dims(attrs, 'rhs_contracting_dims')
  size = lambda s, dims: math.prod(s[d] for d in dims)
  free = lambda s, used: math.prod(d for i, d in enumerate(s) if i not in used)
  return Product(size(ls, lb), free(ls, lb + lc), size(ls, lc), free(rs, rb + rc), dtype)


def xla_timer(p: Product, seed: int = 0):
  """A function of `calls` that runs the product that many times, jitted and compiled
  with the project's XLA options, and returns the seconds it took. A product with no
  batch is a plain [m, k] x [k, n] dot, as the step's projections are."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(DTYPES[p.dtype])
  lead = (p.batch,) if p.batch > 1 else ()
  a = jnp.asarray(rng.standard_normal((*lead, p.m, p.k)), dtype)
  b = jnp.asarray(rng.standard_normal((*lead, p.k, p.n)), dtype)
  fn = jax.jit(jnp.matmul).lower(a, b).compile(
      compiler_options=xla_flags.compiler_options(jax.default_backend()))
  jax.block_until_ready(fn(a, b))

  def run(calls: int) -> float:
    t = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(a, b)
    jax.block_until_ready(out)
    return time.perf_counter() - t
  return run


# Between XLA's products and PyTorch's: the reference's OpenMP threads spin-wait a while
# after its last call, and would take a core from the first XLA product timed next.
_SETTLE_S = 0.2


def time_products(found: collections.Counter, rounds: int, calls: int,
                  reference=None) -> list[dict]:
  """Per Product of `found`: median seconds per call over `rounds` rounds of `calls`
  calls in XLA and, with `reference` (a `benchmark.TorchReference`), in PyTorch: in
  each round every product in XLA, then every product in PyTorch."""
  timers = {p: xla_timer(p) for p in found}
  xla_s = collections.defaultdict(list)
  torch_s = collections.defaultdict(list)
  for _ in range(rounds):
    if reference is not None:
      time.sleep(_SETTLE_S)
    for p, run in timers.items():
      xla_s[p].append(run(calls) / calls)
    if reference is not None:
      for p in timers:
        torch_s[p].append(reference.matmul(p, calls) / calls)
  rows = []
  for p in sorted(found, key=lambda p: -p.flops * found[p]):
    x = statistics.median(xla_s[p])
    t = statistics.median(torch_s[p]) if torch_s[p] else float('nan')
    rows.append(dict(product=str(p), batch=p.batch, m=p.m, k=p.k, n=p.n, dtype=p.dtype,
                     count=found[p], flops=p.flops, xla_s=x, torch_s=t,
                     xla_gflops=p.flops / x / 1e9, torch_gflops=p.flops / t / 1e9,
                     speed_vs_torch=t / x))
  return rows


def totals(rows: list[dict]) -> dict:
  """Seconds of all the step's dots, each shape's time times its count, in each framework."""
  xla = sum(r['xla_s'] * r['count'] for r in rows)
  torch = sum(r['torch_s'] * r['count'] for r in rows)
  return dict(xla_ms=1e3 * xla, torch_ms=1e3 * torch, speed_vs_torch=torch / xla if xla else
              float('nan'), flops=sum(r['flops'] * r['count'] for r in rows))


def table(rows: list[dict]) -> str:
  head = (f'{"product":<30} {"count":>5} {"XLA us":>8} {"GFLOP/s":>8} {"torch us":>9} '
          f'{"GFLOP/s":>8} {"XLA speed":>9}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f'{r["product"]:<30} {r["count"]:5d} {1e6 * r["xla_s"]:8.1f} '
                 f'{r["xla_gflops"]:8.1f} {1e6 * r["torch_s"]:9.1f} {r["torch_gflops"]:8.1f} '
                 f'{r["speed_vs_torch"]:8.3f}x')
  t = totals(rows)
  label = "the step's dots"
  lines.append(f'{label:<30} {sum(r["count"] for r in rows):5d} '
               f'{1e3 * t["xla_ms"]:8.1f} {t["flops"] / t["xla_ms"] / 1e6:8.1f} '
               f'{1e3 * t["torch_ms"]:9.1f} {t["flops"] / t["torch_ms"] / 1e6:8.1f} '
               f'{t["speed_vs_torch"]:8.3f}x')
  return '\n'.join(lines)

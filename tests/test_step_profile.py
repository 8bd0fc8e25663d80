"""scalejax.train.step_profile: reading a compiled module's thunks and a trace of them."""

import inspect

import jax
import jax.numpy as jnp
import pytest

from scalejax.core import reductions
from scalejax.train import step_profile

# A compiled CPU module as `compiled.as_text()` prints it, cut down to one of each kind.
HLO = """\
HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%region (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_rw (p0.1: f32[4,64], p1.1: f32[]) -> f32[4,2] {
  %p0.1 = f32[4,64]{1,0} parameter(0)
  %sq = f32[4,64]{1,0} multiply(%p0.1, %p0.1), metadata={op_name="jit(step)/transpose(jvp())/mul"}
  %p1.1 = f32[] parameter(1)
  ROOT %rw = f32[4,2]{1,0} reduce-window(%sq, %p1.1), window={size=1x32 stride=1x32}, to_apply=%region
}

%fused_t (p0.2: f32[4,2]) -> f32[2,4] {
  %p0.2 = f32[4,2]{1,0} parameter(0)
  %t = f32[2,4]{0,1} transpose(%p0.2), dimensions={1,0}
  ROOT %c = f32[2,4]{1,0} copy(%t)
}

%fused_tm (p0.3: f32[4,2]) -> f32[2,4] {
  %p0.3 = f32[4,2]{1,0} parameter(0)
  %t.1 = f32[2,4]{1,0} transpose(%p0.3), dimensions={1,0}
  ROOT %e = f32[2,4]{1,0} exponential(%t.1)
}

%fused_mv (p0.4: f32[4,2]) -> f32[8] {
  %p0.4 = f32[4,2]{1,0} parameter(0)
  ROOT %b.1 = f32[8]{0} bitcast(%p0.4)
}

%fused_rw2 (p0.5: f32[], p1.5: f32[4,2]) -> f32[4,1] {
  %p0.5 = f32[] parameter(0)
  %p1.5 = f32[4,2]{1,0} parameter(1)
  ROOT %rw.1 = f32[4,1]{1,0} reduce-window(%p1.5, %p0.5), window={size=1x2 stride=1x2}, to_apply=%region
}

%body (tp: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  %tp = (s32[], f32[4,2]{1,0}) parameter(0)
  ROOT %t.2 = (s32[], f32[4,2]{1,0}) tuple(%tp)
}

%cond (t.3: (s32[], f32[4,2])) -> pred[] {
  %t.3 = (s32[], f32[4,2]{1,0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (x: f32[4,8], w: f32[8,2], y: f32[4,64]) -> f32[2,4] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %y = f32[4,64]{1,0} parameter(2)
  %zero = f32[] constant(0)
  %ynn_fusion = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=3}
  %wrapped_reduce-window.3 = f32[4,2]{1,0} fusion(%y, %zero), kind=kLoop, calls=%fused_rw
  %transpose_copy_fusion = f32[2,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_t
  %transpose_exponential_fusion = f32[2,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_tm
  %bitcast_fusion = f32[8]{0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_mv
  %dot.7 = f32[4,2]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %init = (s32[], f32[4,2]{1,0}) tuple(%zero, %dot.7)
  %while.2 = (s32[], /*index=1*/f32[4,2]{1,0}) while(%init), condition=%cond, body=%body
  %custom-call.1 = f32[4,2]{1,0} custom-call(%dot.7), custom_call_target="foo"
  %copy.3 = f32[4,8]{1,0} copy(%x)
  %wrapped_reduce-window.4 = f32[4,1]{1,0} fusion(%zero, %dot.7), kind=kLoop, calls=%fused_rw2
  ROOT %add.9 = f32[2,4]{1,0} add(%transpose_copy_fusion, %transpose_exponential_fusion)
}
"""


def test_classify_reads_each_fusion_kind_by_the_ops_it_runs():
  kinds = step_profile.classify(HLO)[0]
  assert kinds['ynn_fusion'] == 'dot'
  assert kinds['dot.7'] == 'dot'
  assert kinds['wrapped_reduce-window.3'] == 'reduce'  # its fused square does not matter
  assert kinds['transpose_copy_fusion'] == 'transpose'  # moves data, computes nothing
  assert kinds['transpose_exponential_fusion'] == 'elementwise'  # a transpose and math
  assert kinds['bitcast_fusion'] == 'movement'
  assert kinds['add.9'] == 'elementwise'
  assert kinds['while.2'] == 'control'  # tuple shape with a comment inside: still parsed
  assert kinds['custom-call.1'] == 'other'
  assert kinds['x'] == 'movement'  # parameters: never a thunk, harmless


def test_classify_reads_phases_off_the_op_names_autodiff_leaves():
  phases = step_profile.classify(HLO)[1]
  assert phases['ynn_fusion'] == 'forward'  # jvp() alone
  assert phases['dot.7'] == 'backward'  # under transpose(jvp())
  assert phases['wrapped_reduce-window.3'] == 'backward'  # no op_name: the first inside
  # None at all, inside or out (a reduction XLA split in two, a copy): its operands'.
  # The split reduction of a backward dot's output is backward work, not the update.
  assert phases['wrapped_reduce-window.4'] == 'backward'  # from dot.7, not the constant
  assert phases['add.9'] == 'forward'  # through two unnamed fusions, from ynn_fusion
  assert phases['copy.3'] == 'update'  # only a parameter before it: outside autodiff


# A module's source tables as XLA prints them ahead of its computations, and instructions
# whose frames lie in the package, in an installed library, in a user's own file, nowhere.
SOURCE_HLO = """\
HloModule jit_step, is_scheduled=true

FileNames
1 "/home/someone/src/scalejax/model/layers.py"
2 "/opt/venv/lib/python3.11/site-packages/optax/_src/transform.py"
3 "/home/someone/src/scalejax/core/reductions.py"
4 "/home/someone/notebook.py"

FunctionNames
1 "token_matmul"
2 "update_moment"
3 "row_sum"
4 "<module>"

FileLocations
1 {file_name_id=1 function_name_id=1 line=44 end_line=44 column=2 end_column=30}
2 {file_name_id=2 function_name_id=2 line=300 end_line=300 column=4 end_column=40}
3 {file_name_id=3 function_name_id=3 line=47 end_line=48 column=2 end_column=30}
4 {file_name_id=4 function_name_id=4 line=7 end_line=7 column=0 end_column=10}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=1}
4 {file_location_id=4 parent_frame_id=4}

%fused_sum (p0: f32[4,64]) -> f32[4,2] {
  %p0 = f32[4,64]{1,0} parameter(0)
  %sq = f32[4,64]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/jvp()/square" stack_frame_id=3}
  ROOT %r = f32[4,2]{1,0} bitcast(%sq)
}

ENTRY %main (x: f32[4,8], w: f32[8,2], y: f32[4,64]) -> f32[4,2] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %y = f32[4,64]{1,0} parameter(2)
  %dot.1 = f32[4,2]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=1}
  %sum_fusion = f32[4,2]{1,0} fusion(%y), kind=kLoop, calls=%fused_sum
  %copy.1 = f32[4,2]{1,0} copy(%sum_fusion)
  %moment = f32[4,2]{1,0} multiply(%dot.1, %copy.1), metadata={op_name="jit(step)/mul" stack_frame_id=2}
  %mine = f32[4,2]{1,0} add(%moment, %moment), metadata={op_name="jit(step)/add" stack_frame_id=4}
  %lost = f32[4,8]{1,0} negate(%x)
  ROOT %out = f32[4,2]{1,0} add(%mine, %copy.1)
}
"""


def test_sources_name_each_instructions_line_of_code():
  where = step_profile.sources(SOURCE_HLO)
  assert where['dot.1'] == 'model/layers.py:44'  # the package's files from its root
  assert where['sum_fusion'] == 'core/reductions.py:47'  # no frame of its own: the one inside
  assert where['copy.1'] == 'core/reductions.py:47'  # none in it either: its operand's
  assert where['moment'] == 'optax/_src/transform.py:300'  # a library: inside site-packages
  assert where['mine'] == 'notebook.py:7'  # anywhere else: the file's name
  assert where['lost'] == ''  # nothing to read it from (a parameter has no frame)
  assert where['out'] == 'notebook.py:7'  # no frame: its first operand's
  assert step_profile.sources(HLO)['ynn_fusion'] == ''  # a module printed without the tables


def test_sources_of_a_compiled_step_are_the_lines_that_traced_it():
  def step(x):
    return reductions.row_sum(jnp.tanh(x))

  where = step_profile.sources(jax.jit(step).lower(jnp.ones((16, 256))).compile().as_text())
  lines, first = inspect.getsourcelines(reductions.row_sum)
  row_sum = {f'core/reductions.py:{first + i}' for i in range(len(lines))}
  found = set(where.values())
  assert found & row_sum  # the grouped sum, the product with ones
  tanh = inspect.getsourcelines(step)[1] + 1
  assert f'test_step_profile.py:{tanh}' in found  # a test's own line: by file name
  assert not found - row_sum - {f'test_step_profile.py:{tanh}', ''}


def _event(name, tid, start, dur):
  return dict(ph='X', name=name, tid=tid, ts=start, dur=dur)


def test_summarize_sums_thread_time_by_kind_and_threads_busy():
  kinds = {'mm': 'dot', 'ew': 'elementwise', 'rw': 'reduce', 'loop': 'control'}
  events = [
      _event('mm', 1, 0.0, 10.0), _event('ew', 1, 20.0, 10.0),  # thread 1: [0,10], [20,30]
      _event('rw', 2, 5.0, 10.0),                                # thread 2: [5,15]
      _event('rw', 2, 8.0, 2.0),    # nested in thread 2's span: counted once as busy
      _event('loop', 3, 0.0, 40.0),  # encloses the others: neither a kind nor busy
      _event('ThunkExecutor::Execute', 1, 0.0, 40.0),  # the runtime's own: left out
      dict(ph='i', name='mm', tid=1, ts=0.0),           # not a complete event
  ]
  p = step_profile.summarize(events, kinds, steps=2, wall_s=40e-6)
  us = 1e-3  # one microsecond in ms
  assert p.wall == pytest.approx(20 * us)  # per step
  assert p.by_kind == pytest.approx({'dot': 5 * us, 'elementwise': 5 * us, 'reduce': 6 * us,
                                     'transpose': 0, 'movement': 0, 'other': 0})
  assert p.thunk_ms == pytest.approx(16 * us)
  # one thread busy: [0,5] [10,15] [20,30] = 20 us; two: [5,10] = 5 us; per step halves
  assert p.busy == pytest.approx({0: 7.5 * us, 1: 10 * us, 2: 2.5 * us})
  assert [(n, k) for n, k, _ in p.top] == [('rw', 'reduce'), ('mm', 'dot'), ('ew', 'elementwise')]
  assert p.by_phase == {} and p.phase_busy == {}  # no phases given
  p = step_profile.summarize(events, kinds, steps=2, wall_s=40e-6,
                             phases={'mm': 'forward', 'ew': 'backward', 'rw': 'backward'})
  assert p.by_phase == pytest.approx({'forward': 5 * us, 'backward': 11 * us, 'update': 0})
  assert p.phase_thunks == {'forward': 0.5, 'backward': 1.5, 'update': 0}  # 1 and 3 in 2 steps
  # backward: ew on thread 1 [20,30] and rw on thread 2 [5,15] never overlap
  assert p.phase_busy == {'forward': pytest.approx({1: 5 * us}),
                          'backward': pytest.approx({1: 10 * us}), 'update': {}}
  assert p.by_source == []  # no sources given
  p = step_profile.summarize(events, kinds, steps=2, wall_s=40e-6,
                             phases={'mm': 'forward', 'ew': 'backward', 'rw': 'backward'},
                             where={'mm': 'model/layers.py:44', 'rw': 'model/layers.py:44'})
  # rw's 12 us then mm's 10 us, each its own (line, phase, kind); ew has no line: '?'
  assert p.by_source == [('model/layers.py:44', 'backward', 'reduce', pytest.approx(6 * us)),
                         ('model/layers.py:44', 'forward', 'dot', pytest.approx(5 * us)),
                         ('?', 'backward', 'elementwise', pytest.approx(5 * us))]
  d = p.to_dict()
  assert d['by_source'][0] == {'where': 'model/layers.py:44', 'phase': 'backward',
                               'kind': 'reduce', 'ms': pytest.approx(6 * us)}
  assert d['phase_busy_ms']['backward'] == {'1': pytest.approx(10 * us)}
  assert d['busy_ms'] == {'0': p.busy[0], '1': p.busy[1], '2': p.busy[2]}
  assert d['top'][0] == {'name': 'rw', 'kind': 'reduce', 'ms': pytest.approx(6 * us)}


def test_profile_traces_a_compiled_cpu_step():
  def step(state, batch):
    loss, grad = jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(batch @ w) ** 2))(state['w'])
    return {'w': state['w'] - 0.01 * grad}, {'loss': loss}

  state = {'w': jnp.ones((64, 64), jnp.float32) / 64}
  batches = [jnp.full((128, 64), 0.5 + i, jnp.float32) for i in range(2)]
  compiled = jax.jit(step, donate_argnums=0).lower(state, batches[0]).compile(
      compiler_options=step_profile.TRACE_OPTION)
  p, state = step_profile.profile(compiled, state, batches, 3, compiled.as_text())
  assert state['w'].shape == (64, 64) and not state['w'].is_deleted()
  assert p.steps == 3 and p.wall > 0
  assert p.by_kind['dot'] > 0  # two matmuls per step
  assert p.thunk_ms > p.by_kind['dot']  # and the tanh, the update
  assert p.by_phase['forward'] > 0 and p.by_phase['backward'] > 0
  assert sum(p.by_phase.values()) == pytest.approx(p.thunk_ms)
  assert all(n >= 1 for n in p.phase_thunks.values())  # each phase runs thunks every step
  assert sum(v for n, v in p.busy.items() if n >= 1) > 0
  assert p.busy[0] >= 0
  # its ops were traced from this file: each thunk's line is one of the step's
  lines, first = inspect.getsourcelines(step)
  step_lines = {f'test_step_profile.py:{first + i}' for i in range(len(lines))}
  assert {e[0] for e in p.by_source} <= step_lines | {'?'}
  assert sum(e[3] for e in p.by_source) == pytest.approx(p.thunk_ms)
  text = step_profile.table({'toy': p.to_dict()})
  assert text.splitlines()[0].split()[:3] == ['variant', 'wall', 'ms']
  assert 'toy' in text and 'busiest thunks' in text and 'toy, by phase' in text
  assert 'toy, by source line' in text


def test_source_lines_print_the_first_case_then_each_others_differences():
  entry = lambda where, phase, kind, ms: dict(where=where, phase=phase, kind=kind, ms=ms)
  profiles = {
      'baseline': {'by_source': [entry('model/layers.py:44', 'forward', 'dot', 10.0),
                                 entry('model/attention.py:235', 'backward', 'dot', 4.0)]},
      'unified': {'by_source': [entry('model/layers.py:44', 'forward', 'dot', 10.5),
                                entry('model/layers.py:285', 'backward', 'dot', 7.0)]},
  }
  lines = step_profile.source_lines(profiles, top=2)
  assert lines[0].startswith('baseline, by source line')
  assert lines[1].split() == ['10.00', 'forward', 'dot', 'model/layers.py:44']
  assert lines[2].split() == ['4.00', 'backward', 'dot', 'model/attention.py:235']
  # 17.5 - 14.0 in all; the largest differences first, a line one side lacks as 0 there
  assert lines[3].startswith('unified - baseline, by source line (+3.50 thread ms')
  assert lines[4].split() == ['+7.00', 'backward', 'dot', 'model/layers.py:285']
  assert lines[5].split() == ['-4.00', 'backward', 'dot', 'model/attention.py:235']
  assert len(lines) == 6  # top=2: the +0.50 of layers.py:44 is left out
  assert step_profile.source_lines({'toy': {'by_source': []}}) == []

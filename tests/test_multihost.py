"""Two real processes (jax.distributed on localhost, CPU collectives) train, checkpoint,
restart from the checkpoint and end where one process with two devices ends."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from _util import child_xla_flags

ROOT = Path(__file__).parents[1]
STEPS, CUT = 6, 3


def _worker(workdir: str, stop_at: int) -> None:
  """Runs train() in this process; saves its view of the final params."""
  import jax
  from _util import tiny_config
  from scalejax.train import trainer

  cfg = tiny_config()
  cfg.data.eval_batches = 0
  cfg.train.update(steps=STEPS, log_every=1, eval_every=0)
  cfg.checkpoint.every = CUT
  final = trainer.train(cfg, workdir, stop_at=stop_at or None)
  # Params are replicated (mesh data=2): every process holds a full copy.
  params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), final['state']['params'])
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  info = dict(process=jax.process_index(), processes=jax.process_count(),
              devices=jax.device_count(), local=jax.local_device_count(),
              step=int(final['state']['step']))
  np.savez(os.path.join(workdir, f'params_{info["process"]}_{info["step"]}.npz'), **flat)
  with open(os.path.join(workdir, f'info_{info["process"]}_{info["step"]}.json'), 'w') as f:
    json.dump(info, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', **extra)


def _launch_pair(workdir, stop_at):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = _env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid), XLA_FLAGS=child_xla_flags())
    procs.append(subprocess.Popen([sys.executable, __file__, str(workdir), str(stop_at)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=400))
  finally:
    for p in procs:  # a process whose partner died would wait for it: end it
      if p.poll() is None:
        p.kill()
    outs += [p.communicate() for p in procs[len(outs):]]
  for pid, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {pid} (port {port}) failed:\n{err[-3000:]}'


def _params(workdir, process, step):
  data = np.load(Path(workdir) / f'params_{process}_{step}.npz')
  return {k: data[k] for k in data.files}


def _losses(workdir):
  records = [json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['loss']) for r in records if 'loss' in r]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  multi = tmp_path_factory.mktemp('two_processes')
  _launch_pair(multi, CUT)      # trains to step 3, saves, exits
  _launch_pair(multi, 0)        # new processes restore step 3 and finish
  single = tmp_path_factory.mktemp('one_process')
  env = _env(XLA_FLAGS=child_xla_flags(2))
  out = subprocess.run([sys.executable, __file__, str(single), '0'], env=env,
                       capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  return multi, single


def test_processes_joined_one_two_device_run(runs):
  multi, single = runs
  for pid in range(2):
    info = json.loads((multi / f'info_{pid}_{STEPS}.json').read_text())
    assert info == dict(process=pid, processes=2, devices=2, local=1, step=STEPS)
  assert json.loads((single / f'info_0_{STEPS}.json').read_text())['processes'] == 1
  assert sorted(int(p.name) for p in (multi / 'checkpoints').iterdir() if p.name.isdigit()) == [
      CUT, STEPS]


def test_restarted_two_process_run_matches_one_process(runs):
  multi, single = runs
  want = _params(single, 0, STEPS)
  # Both processes end with the same replicated params, equal to the single process's:
  # each device computes the same shard of the batch in both set-ups, and the gradient
  # all-reduce adds the same two numbers, so the runs agree to the last bit.
  for pid in range(2):
    chex.assert_trees_all_equal(_params(multi, pid, STEPS), want)
  # Only process 0 writes metrics: one record per step, the same losses.
  assert _losses(multi) == _losses(single)
  assert [s for s, _ in _losses(multi)] == list(range(1, STEPS + 1))
  # The first launch really stopped at the cut and the second resumed from its checkpoint.
  assert (multi / f'info_0_{CUT}.json').exists() and (multi / f'info_1_{CUT}.json').exists()


def test_distributed_start_is_decided_by_the_environment(monkeypatch):
  from scalejax.train import distributed
  for var in ('SCALEJAX_DISTRIBUTED', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  assert distributed.wanted() is None
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: True)
  assert distributed.wanted() == 'running on a Cloud TPU VM'
  monkeypatch.setenv('SCALEJAX_DISTRIBUTED', '0')
  assert distributed.wanted() is None
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  monkeypatch.setenv('SCALEJAX_DISTRIBUTED', '')
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  assert distributed.wanted() == 'JAX_COORDINATOR_ADDRESS is set'
  monkeypatch.setenv('SCALEJAX_DISTRIBUTED', 'yes')
  with pytest.raises(ValueError, match="SCALEJAX_DISTRIBUTED='yes'; set it to 1"):
    distributed.wanted()
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    distributed._env_int('JAX_NUM_PROCESSES')


if __name__ == '__main__':
  _worker(sys.argv[1], int(sys.argv[2]))

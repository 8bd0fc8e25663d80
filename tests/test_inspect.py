"""Scale-vector inspection: statistics on hand-made checkpoints, reports and plots."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib
from scalejax.studies import inspect_scales as I
from scalejax.train import trainer
from scalejax.model.decoder import build_model
from scalejax.model import wiring
from _util import tiny_config

ROOT = Path(__file__).parents[1]

D, L = 32, 2  # tiny config: d_model 32, 2 layers, heads 2


def _known_params(variant: str, step: int):
  """Params with hand-set scales and q/k/v/gate/up/head kernels of constant entries."""
  cfg = tiny_config()
  cfg.model.update(variant=variant, tie_embeddings=False)
  model = build_model(config_lib.model_config(cfg, cfg.data.synthetic_vocab))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ramp = np.linspace(0.5, 1.5, D, dtype=np.float32)               # mean 1, min .5, max 1.5
  gamma = np.stack([ramp * (l + step) for l in range(L)])        # layer l: (l + step) * ramp
  blocks = params['blocks']
  if variant == 'baseline':
    blocks['attn_norm']['scale']['gamma'] = gamma
    blocks['mlp_norm']['scale']['gamma'] = 2 * gamma
    params['final_norm']['scale']['gamma'] = ramp
  else:  # unified: magdir, HG; gamma = beta * alpha
    for b in ('q', 'k', 'v'):
      blocks['attn_norm'][b]['alpha'] = gamma
      blocks['attn_norm'][b]['beta'] = np.full((L,), 3.0, np.float32)
  for name, c in (('q', .1), ('k', .2), ('v', .3)):
    blocks['attn'][name]['kernel'] = np.full(blocks['attn'][name]['kernel'].shape, c, np.float32)
  return cfg, params, gamma, ramp


def _write_run(tmp_path, variant, steps=(1, 2)):
  workdir = tmp_path / variant
  mngr = ckpt.manager(str(workdir), keep=5, async_save=False)
  for step in steps:
    cfg, params, _, _ = _known_params(variant, step)
    ckpt.save(mngr, step, {'params': params, 'step': np.int32(step)}, {})
  mngr.wait_until_finished()
  mngr.close()
  (workdir / 'config.json').write_text(config_lib.to_json(cfg))
  return str(workdir)


def test_statistics_of_a_hand_made_checkpoint(tmp_path):
  data = I.inspect_run(_write_run(tmp_path, 'baseline'))
  assert sorted(data['steps']) == [1, 2] and data['variant'] == 'baseline'
  for step in (1, 2):
    _, _, gamma, ramp = _known_params('baseline', step)
    scales = data['steps'][step]['scales']
    for l in range(L):
      g = gamma[l]
      e = scales[f'blocks/attn_norm/scale/layer{l}']
      assert e['role'] == 'input_scale'
      np.testing.assert_allclose([e['mean'], e['std'], e['min'], e['max'], e['norm']],
                                 [g.mean(), g.std(), g.min(), g.max(), np.linalg.norm(g)],
                                 rtol=1e-5)
      assert scales[f'blocks/mlp_norm/scale/layer{l}']['max'] == pytest.approx(2 * g.max())
      # attn_norm feeds q, k and v: ||w_j||^2 = D * (.1^2 + .2^2 + .3^2) for every j
      upper = g ** 2 + D * (0.01 + 0.04 + 0.09)
      p = data['steps'][step]['precond'][f'blocks/attn_norm/scale/layer{l}']
      np.testing.assert_allclose(
          [p['gamma2_mean'], p['mean'], p['min'], p['max'], p['spread'], p['std']],
          [np.mean(g ** 2), upper.mean(), upper.min(), upper.max(), upper.max() / upper.min(),
           upper.std()], rtol=1e-5)
    assert scales['final_norm/scale']['mean'] == pytest.approx(ramp.mean())


def test_effective_gamma_of_magdir_and_hg_consumers(tmp_path):
  data = I.inspect_run(_write_run(tmp_path, 'unified', steps=(3,)))
  _, _, gamma, _ = _known_params('unified', 3)
  e = data['steps'][3]['scales']['blocks/attn_norm/k/layer1']
  assert e['mean'] == pytest.approx(3.0 * gamma[1].mean(), rel=1e-5)   # beta * alpha
  p = data['steps'][3]['precond']['blocks/attn_norm/k/layer1']
  upper = (3.0 * gamma[1]) ** 2 + D * 0.04                              # k feeds W_k only
  assert p['max'] == pytest.approx(upper.max(), rel=1e-5)
  cfg = tiny_config()
  cfg.model.update(variant='unified', tie_embeddings=True)
  model = build_model(config_lib.model_config(cfg, 64))
  names = {s.name: s.kernels for s in wiring.scales(model.config) if s.folds}
  assert names['blocks/attn_norm/v'] == (('blocks', 'attn', 'v', 'kernel'),)
  assert names['final_norm/scale'] == (('embed', 'table'),)
  assert names['blocks/attn/v/post/scale'] == (('blocks', 'attn', 'o', 'kernel'),)


def test_report_and_plots_are_written(tmp_path):
  runs = {'base': I.inspect_run(_write_run(tmp_path, 'baseline')),
          'uni': I.inspect_run(_write_run(tmp_path, 'unified'))}
  paths = I.write_outputs(runs, str(tmp_path / 'out'))
  names = {Path(p).name for p in paths}
  assert {'heatmap_base.png', 'heatmap_uni.png', 'evolution.png', 'report.md',
          'inspect.json'} <= names
  for p in paths:
    if p.endswith('.png'):
      assert Path(p).read_bytes()[:4] == b'\x89PNG' and Path(p).stat().st_size > 5000
  report = (tmp_path / 'out' / 'report.md').read_text()
  assert '| blocks/attn_norm/scale | input_scale | 1 |' in report
  # unified's block input norms: DNP renormalizes every map they feed
  assert runs["uni"]["neutral"] == ['blocks/attn_norm/k', 'blocks/attn_norm/q',
                                        'blocks/attn_norm/v', 'blocks/mlp_norm/gate',
                                        'blocks/mlp_norm/up']
  assert runs['base']['neutral'] == [] and report.count('Function-neutral magnitudes') == 1
  saved = json.loads((tmp_path / 'out' / 'inspect.json').read_text())
  assert saved['base']['steps']['2']['scales']['blocks/attn_norm/scale/layer1']['max'] == \
      pytest.approx(3 * 1.5)
  with pytest.raises(ValueError, match='no checkpoints at steps'):
    I.inspect_run(str(tmp_path / 'baseline'), [7])


def test_trainer_logs_preconditioner_statistics(tmp_path):
  cfg = tiny_config()
  cfg.train.update(steps=2, eval_every=0, log_every=1)
  trainer.train(cfg, str(tmp_path))
  rec = json.loads((tmp_path / 'scale_stats.jsonl').read_text().splitlines()[-1])
  assert rec['step'] == 2
  assert set(rec['precond']['blocks/attn_norm/scale/layer0']) == {
      'mean', 'std', 'min', 'max', 'spread', 'gamma2_mean'}
  means = json.loads((tmp_path / 'scales.jsonl').read_text().splitlines()[-1])
  assert means['precond/spread'] >= 1.0

"""Scale statistics split stacked params per layer using axes metadata, not rank."""

import numpy as np
import pytest

from scalejax.core import roles as R
from scalejax.analysis.scale_stats import role_means, scale_statistics


def test_statistics_per_layer_and_role():
  params = {'stack': {'gamma': np.array([[1., 3.], [2., 2.]]), 'w': np.ones((2, 2, 2))},
            'final': {'gamma': np.array([0., 4.])},
            'qk': {'gamma': np.array([[1., 1.], [5., 5.]])}}
  roles = {'stack': {'gamma': R.INPUT_SCALE, 'w': R.MATRIX},
           'final': {'gamma': R.INPUT_SCALE}, 'qk': {'gamma': R.OUTPUT_SCALE}}
  axes = {'stack': {'gamma': ('layers', 'norm'), 'w': ('layers', 'embed', 'mlp')},
          'final': {'gamma': ('norm',)},
          # a rank-2 scale that is NOT stacked over layers: must stay one entry
          'qk': {'gamma': ('norm', 'norm')}}
  stats = scale_statistics(params, roles, axes)
  assert set(stats) == {'stack/gamma/layer0', 'stack/gamma/layer1', 'final/gamma', 'qk/gamma'}
  l0 = stats['stack/gamma/layer0']
  assert l0['role'] == R.INPUT_SCALE
  assert (l0['mean'], l0['std'], l0['min'], l0['max']) == (2.0, 1.0, 1.0, 3.0)
  assert l0['norm'] == pytest.approx(np.sqrt(10))
  assert stats['stack/gamma/layer1']['std'] == 0.0
  assert stats['qk/gamma']['mean'] == 3.0
  means = role_means(stats)
  assert means['input_scale/mean'] == pytest.approx((2 + 2 + 2) / 3)
  assert means['output_scale/max'] == 5.0

"""The paper's dense ~2B: d_model 2304, 28 layers, 18 heads (2.016B params).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('dense_2b')

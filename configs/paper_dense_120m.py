"""The paper's dense ~0.12B: d_model 640, 12 layers, 10 heads (123.4M params).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('dense_120m')

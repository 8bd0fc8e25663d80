"""The paper's dense ~0.5B: d_model 1280, 20 layers, 20 heads (522.0M params).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('dense_500m')

"""The paper's MoE ~0.5B total: d_model 640, 12 layers, 16 experts of width 1024, top-2
(461.7M params, 131.4M active per token).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('moe_500m')

"""The paper's MoE ~2B total: d_model 1536, 18 layers, 16 experts of width 1280, top-2
(2.024B params, 537.2M active per token).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('moe_2b')

"""The paper's dense ~1B, the Llama-1B of the paper: d_model 1792, 22 layers, 14 heads,
SwiGLU 4778, untied (1,028,065,024 params, 80,640 in scale vectors).

Shape and settings: scalejax/train/presets.py.
"""

from scalejax.train.presets import paper_config


def get_config():
  return paper_config('dense_1b')

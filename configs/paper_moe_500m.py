"""The paper's moe 500m size (see configs/paper_common.py)."""

from configs.paper_common import paper_config


def get_config():
  return paper_config('moe_500m')

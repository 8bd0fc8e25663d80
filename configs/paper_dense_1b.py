"""The paper's dense 1b size (see configs/paper_common.py)."""

from configs.paper_common import paper_config


def get_config():
  return paper_config('dense_1b')

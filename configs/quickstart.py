"""The default run: a small byte-level model on this machine's own Python stdlib.

Needs nothing downloaded: the corpus is the top-level `*.py` files of the running
Python's standard library, read as bytes. A few minutes on a 2-core CPU.
"""

import os
import sysconfig

from scalejax.train.config import base_config


def get_config():
  cfg = base_config()
  cfg.data.update(source='text_files', tokenizer='byte', max_bytes=2_000_000,
                  path=os.path.join(sysconfig.get_paths()['stdlib'], '*.py'),
                  eval_fraction=0.05, eval_batches=16)
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, max_seq_len=128, tie_embeddings=True,
                   scan_unroll=4)
  cfg.train.update(steps=600, batch_size=16, seq_len=128, eval_every=200, log_every=25,
                   sample_tokens=200, sample_prompt='def ')
  cfg.optimizer.update(lr=2e-3, warmup_steps=50, b2=0.99)
  cfg.checkpoint.update(every=200)
  return cfg

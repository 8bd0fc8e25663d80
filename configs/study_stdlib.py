"""Second corpus for the study: this Python's stdlib, byte-level, shakespeare_char's model.

Model, batch, context and optimizer are those of configs/shakespeare_char.py, so the two
corpora differ only in the text and the tokenizer (bytes, vocabulary 256). The corpus is
the top-level `*.py` files of the running Python's standard library (first 2 MB), so it
exists offline on every machine; its exact bytes depend on the Python version (3.11.7 in
docs/RESULTS.md).
"""

import os
import sysconfig

from scalejax.train.config import base_config


def get_config():
  cfg = base_config()
  cfg.data.update(source='text_files', tokenizer='byte', max_bytes=2_000_000,
                  path=os.path.join(sysconfig.get_paths()['stdlib'], '*.py'),
                  eval_fraction=0.05, eval_batches=32)
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, tie_embeddings=True,
                   scan_unroll=4)
  cfg.train.update(steps=2000, batch_size=12, seq_len=64, eval_every=250, log_every=50,
                   sample_tokens=0, sample_prompt='def ')
  cfg.optimizer.update(name='adamw', lr=1e-3, schedule='cosine', warmup_steps=100,
                       min_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  cfg.checkpoint.update(every=500)
  return cfg

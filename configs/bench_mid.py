"""The mid-size CPU benchmark config: 8 layers, d_model 512 (25M matrix params).

Large enough that matmuls dominate, as they do in real runs; small enough that a train
step takes about a second on a 2-core CPU. Char-level tinyshakespeare, so the LM head
is small. `python -m scalejax.cli.bench --config configs/bench_mid.py` (docs/PERFORMANCE.md).
"""

import os

from scalejax.train.config import base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
  cfg = base_config()
  cfg.data.update(source='text_files', tokenizer='char',
                  path=os.path.join(_HERE, '..', 'data', 'tinyshakespeare.txt'),
                  eval_fraction=0.1, eval_batches=4)
  # scan_unroll=n_layers: no layer loop, so no stacked buffers of saved activations to
  # zero-fill every step (on CPU 10-18 ms each at this size; PERFORMANCE.md)
  cfg.model.update(d_model=512, n_layers=8, n_heads=8, max_seq_len=128, tie_embeddings=True,
                   scan_unroll=8)
  cfg.train.update(steps=100, batch_size=8, seq_len=128, eval_every=0, sample_tokens=0)
  cfg.optimizer.update(name='adamw', lr=1e-3, warmup_steps=10, b2=0.99, weight_decay=0.1)
  return cfg

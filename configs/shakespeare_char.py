"""nanoGPT's documented CPU run of shakespeare_char, with a Llama-style model.

nanoGPT: 4 layers, 4 heads, d 128, context 64, batch 12, 2000 iters, lr 1e-3 cosine to
1e-4 with 100 warmup, AdamW (0.9, 0.99), weight decay 0.1 on matrices and embeddings,
no dropout, tied embeddings; it reaches val loss 1.886 on our machines. Differences
here: RoPE instead of learned positions, SwiGLU (width 8d/3) instead of GELU 4d, RMSNorm.
"""

import os

from scalejax.train.config import base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
  cfg = base_config()
  cfg.data.update(source='text_files', tokenizer='char',
                  path=os.path.join(_HERE, '..', 'data', 'tinyshakespeare.txt'),
                  eval_fraction=0.1, eval_batches=140)  # the whole held-out 10%
  cfg.model.update(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, tie_embeddings=True,
                   scan_unroll=4)
  cfg.train.update(steps=2000, batch_size=12, seq_len=64, eval_every=250, log_every=50,
                   sample_tokens=300, sample_prompt='ROMEO:')
  cfg.optimizer.update(name='adamw', lr=1e-3, schedule='cosine', warmup_steps=100,
                       min_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  cfg.checkpoint.update(every=500)
  return cfg

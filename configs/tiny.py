"""A seconds-long CPU config on synthetic data: smoke tests and CI."""

from scalejax.train.config import base_config


def get_config():
  cfg = base_config()
  cfg.data.source = 'synthetic'
  cfg.data.synthetic_vocab = 64
  cfg.data.eval_batches = 2
  cfg.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
  cfg.train.update(steps=20, batch_size=8, seq_len=32, eval_every=10, log_every=5,
                   sample_tokens=0)
  cfg.optimizer.update(lr=3e-3, warmup_steps=2)
  cfg.checkpoint.update(every=10, async_save=False)
  return cfg

"""A seconds-long benchmark config on synthetic data: the CI smoke run of scalejax.bench."""

from scalejax.train.config import base_config


def get_config():
  cfg = base_config()
  cfg.data.update(source='synthetic', synthetic_vocab=64, eval_batches=0)
  cfg.model.update(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
  cfg.train.update(steps=10, batch_size=4, seq_len=16, eval_every=0, sample_tokens=0)
  return cfg

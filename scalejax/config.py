"""The training config: one ConfigDict with typed defaults for every section.

Config files in `configs/` start from `base_config()` and change what they need;
`--config.KEY=VALUE` overrides are type-checked by ml_collections, and an unknown key
is an error. `validate()` checks values before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections

from scalejax import data as data_lib
from scalejax import optim, sharding
from scalejax.model import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  model = dataclasses.asdict(ModelConfig())
  model['vocab_size'] = 0  # 0: the tokenizer's vocabulary size
  cfg = ml_collections.ConfigDict(dict(
      seed=0,
      model=model,
      train=dict(
          steps=1000,
          batch_size=32,       # global, over all processes
          seq_len=128,
          eval_every=200,      # 0: only the final eval
          log_every=10,
          sample_tokens=200,   # tokens of text printed at the end (0: none)
          sample_prompt='',
      ),
      data=data_lib.default_config(),
      optimizer=optim.default_config(),
      checkpoint=dict(
          every=500,           # steps between saves (a final save always happens)
          keep=3,              # newest checkpoints kept
          async_save=True,
      ),
      mesh=sharding.default_config(),
      init_from='',            # workdir of another run: initialise params from it
  ))
  cfg.lock()  # unknown keys are errors, in config files and on the command line
  return cfg


def model_config(cfg, vocab_size: int) -> ModelConfig:
  """The ModelConfig for a run; the tokenizer fixes the vocabulary unless set."""
  fields = cfg.model.to_dict()
  if fields['vocab_size'] == 0:
    fields['vocab_size'] = vocab_size
  elif fields['vocab_size'] < vocab_size:
    raise ValueError(f'model.vocab_size={fields["vocab_size"]} is smaller than the '
                     f'tokenizer vocabulary ({vocab_size}); raise it or set it to 0')
  fields['dual_targets'] = tuple(fields['dual_targets'])
  return ModelConfig(**fields)


def validate(cfg, n_devices: int | None = None) -> None:
  """One clear line per bad value, before any compilation (mesh checked for n_devices)."""
  t = cfg.train
  checks = [
      (t.steps > 0, 'train.steps must be positive'),
      (t.batch_size > 0, 'train.batch_size must be positive'),
      (t.seq_len > 1, 'train.seq_len must be at least 2'),
      (t.seq_len <= cfg.model.max_seq_len,
       f'train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; '
       'lower one or raise the other'),
      (t.eval_every >= 0, 'train.eval_every must be >= 0'),
      (cfg.checkpoint.every > 0, 'checkpoint.every must be positive'),
      (cfg.checkpoint.keep > 0, 'checkpoint.keep must be positive'),
      (cfg.optimizer.lr > 0, 'optimizer.lr must be positive'),
  ]
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
  model_config(cfg, 1 if cfg.model.vocab_size == 0 else cfg.model.vocab_size)
  if cfg.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f'unknown optimizer.name {cfg.optimizer.name!r}; valid: '
                     f'{", ".join(optim.OPTIMIZERS)}')
  if cfg.optimizer.schedule not in optim.SCHEDULES:
    raise ValueError(f'unknown optimizer.schedule {cfg.optimizer.schedule!r}; valid: '
                     f'{", ".join(optim.SCHEDULES)}')
  if cfg.optimizer.norm_decay != 'variant':
    optim.role_rates(cfg.optimizer, 'none')
  sharding.mesh_shape(cfg.mesh, jax.device_count() if n_devices is None else n_devices)


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)

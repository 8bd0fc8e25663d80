"""The training config: one ConfigDict with typed defaults for every section.

Config files in `configs/` start from `base_config()` and change what they need;
`--config.KEY=VALUE` overrides are type-checked by ml_collections, and an unknown key
is an error. `validate()` checks values before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
from ml_collections import ConfigDict

from scalejax import data as data_lib
from scalejax.train import optim
from scalejax.core import sharding
from scalejax.model import attention, moe
from scalejax.model.config import ModelConfig
from scalejax.scales.weight_decay import undecayed_parts


def base_config() -> ConfigDict:
  model = dataclasses.asdict(ModelConfig())
  model['vocab_size'] = 0  # 0: the tokenizer's vocabulary size
  cfg = ConfigDict(dict(
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
          nan_policy='skip',   # key of NAN_POLICIES: what a non-finite loss/grad step does
          max_bad_steps=5,     # 'skip': stop after this many non-finite steps in a row
          allow_config_change=False,  # resume a workdir whose config.json differs
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
      lm_eval=dict(            # lm-eval-harness tasks during training (docs/EVALUATION.md)
          tasks='',            # comma-separated task names ('': none)
          every=0,             # steps between runs (0: only after the last step)
          include_path='',     # folder of task YAML files of your own
          limit=0,             # examples per task (0: all)
          batch_size=16,       # rows per model call
      ),
  ))
  cfg.lock()  # unknown keys are errors, in config files and on the command line
  return cfg


def load_config(path: str | os.PathLike) -> ConfigDict:
  """`get_config()` of a config file, loaded by path as `--config PATH` loads it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config {path}: no such config file')
  spec = importlib.util.spec_from_file_location(
      f'scalejax_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(cfg: ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig for a run; the tokenizer fixes the vocabulary unless set."""
  fields = cfg.model.to_dict()
  if fields['vocab_size'] == 0:
    fields['vocab_size'] = vocab_size
  elif fields['vocab_size'] < vocab_size:
    raise ValueError(f'model.vocab_size={fields["vocab_size"]} is smaller than the '
                     f'tokenizer vocabulary ({vocab_size}); raise it or set it to 0')
  return ModelConfig(**fields)


NAN_POLICIES = {
    'skip': 'skip the update and count it; stop after train.max_bad_steps in a row',
    'stop': 'stop at the first non-finite step (the update is not applied)',
}

# Keys that may differ between a workdir's config.json and a resuming run without
# train.allow_config_change: they say how the run is executed, logged or saved, not
# what is trained. train.steps is here too (extending a run is routine); the trainer
# warns when the lr schedule depends on it.
RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.eval_every',
                     'train.sample_tokens', 'train.sample_prompt', 'train.nan_policy',
                     'train.max_bad_steps', 'train.allow_config_change', 'checkpoint.*',
                     'mesh.*', 'init_from', 'data.tfds_data_dir', 'model.attention_impl',
                     'model.attention_block_q', 'model.attention_block_kv', 'lm_eval.*')


def validate(cfg: ConfigDict, n_devices: int | None = None) -> None:
  """Raises ValueError with one line naming the first bad value and its fix.

  Runs before anything is built or compiled; the mesh is checked against
  `n_devices` (default: this process's jax.device_count()). Unknown keys and wrong types never get
  here: the locked ConfigDict rejects them when the config is loaded or overridden.
  """
  t, m, o, e = cfg.train, cfg.model, cfg.optimizer, cfg.lm_eval
  checks = [
      (t.steps > 0, f'train.steps={t.steps} must be positive'),
      (t.batch_size > 0, f'train.batch_size={t.batch_size} must be positive'),
      (t.seq_len > 1, f'train.seq_len={t.seq_len} must be at least 2'),
      (t.seq_len <= m.max_seq_len,
       f'train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; '
       'lower one or raise the other'),
      (t.eval_every >= 0, f'train.eval_every={t.eval_every} must be >= 0 (0: final eval only)'),
      (t.log_every > 0, f'train.log_every={t.log_every} must be positive'),
      (t.sample_tokens >= 0, f'train.sample_tokens={t.sample_tokens} must be >= 0'),
      (t.nan_policy in NAN_POLICIES,
       f'unknown train.nan_policy {t.nan_policy!r}; valid: {", ".join(NAN_POLICIES)}'),
      (t.max_bad_steps >= 1, f'train.max_bad_steps={t.max_bad_steps} must be at least 1'),
      (cfg.checkpoint.every > 0, f'checkpoint.every={cfg.checkpoint.every} must be positive'),
      (cfg.checkpoint.keep > 0, f'checkpoint.keep={cfg.checkpoint.keep} must be positive'),
      (m.d_model > 0 and m.n_layers > 0 and m.n_heads > 0,
       'model.d_model, model.n_layers and model.n_heads must be positive'),
      (m.n_kv_heads >= 0 and m.head_dim >= 0 and m.d_ff >= 0 and m.vocab_size >= 0,
       'model.n_kv_heads, head_dim, d_ff and vocab_size must be >= 0 (0: the default)'),
      (m.max_seq_len > 0, f'model.max_seq_len={m.max_seq_len} must be positive'),
      (m.norm_eps > 0, f'model.norm_eps={m.norm_eps} must be positive'),
      (m.scan_unroll >= 1, f'model.scan_unroll={m.scan_unroll} must be at least 1'),
      (m.attention_impl != 'splash' or not attention.splash_unsupported(t.seq_len),
       f'model.attention_impl=splash: {attention.splash_unsupported(t.seq_len)}'),
      (o.lr > 0, f'optimizer.lr={o.lr} must be positive'),
      (o.warmup_steps >= 0, f'optimizer.warmup_steps={o.warmup_steps} must be >= 0'),
      (0 <= o.min_lr_ratio <= 1, f'optimizer.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]'),
      (0 < o.decay_fraction <= 1,
       f'optimizer.decay_fraction={o.decay_fraction} must lie in (0, 1]'),
      (o.weight_decay >= 0, f'optimizer.weight_decay={o.weight_decay} must be >= 0'),
      (0 <= o.b1 < 1 and 0 <= o.b2 < 1,
       f'optimizer.b1={o.b1} and optimizer.b2={o.b2} must lie in [0, 1)'),
      (o.eps >= 0, f'optimizer.eps={o.eps} must be >= 0'),
      (0 <= o.momentum < 1, f'optimizer.momentum={o.momentum} must lie in [0, 1)'),
      (o.grad_clip >= 0, f'optimizer.grad_clip={o.grad_clip} must be >= 0 (0: no clipping)'),
      (o.scale_lr_mult >= 0, f'optimizer.scale_lr_mult={o.scale_lr_mult} must be >= 0'),
      (e.every >= 0, f'lm_eval.every={e.every} must be >= 0 (0: only after the last step)'),
      (e.limit >= 0, f'lm_eval.limit={e.limit} must be >= 0 (0: every example)'),
      (e.batch_size > 0, f'lm_eval.batch_size={e.batch_size} must be positive'),
      (not e.include_path or os.path.isdir(e.include_path),
       f'lm_eval.include_path={e.include_path} is not a directory; name a folder of lm-eval '
       "task YAML files (or '' for lm-eval's own tasks)"),
      (not e.tasks.strip() or cfg.data.source != 'synthetic',
       'lm_eval.tasks needs a text tokenizer and data.source=synthetic has token ids only; '
       "train on text (data.source=text_files or tfds) or set lm_eval.tasks=''"),
  ]
  for ok, msg in checks:
    if not ok:
      raise ValueError(msg)
  _validate_moe(cfg)
  # ModelConfig checks the variant name, heads vs d_model, kv-heads vs heads, norms ...
  model_config(cfg, 1 if m.vocab_size == 0 else m.vocab_size)
  if o.name not in optim.OPTIMIZERS:
    raise ValueError(f'unknown optimizer.name {o.name!r}; valid: {", ".join(optim.OPTIMIZERS)}')
  if o.schedule not in optim.SCHEDULES:
    raise ValueError(f'unknown optimizer.schedule {o.schedule!r}; valid: '
                     f'{", ".join(optim.SCHEDULES)}')
  if o.norm_decay != 'variant':
    optim.role_rates(o, 'none')
  undecayed_parts(o.magdir_decay)
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(
      cfg.mesh, jax.device_count() if n_devices is None else n_devices)))
  if m.mlp == 'moe' and m.moe_dispatch == 'grouped' and sizes['expert'] > 1:
    raise ValueError(moe.grouped_mesh_error(sizes['expert']))
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']  # the `batch` logical axis
  if t.batch_size % shards:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by the {shards} batch '
                     f'shards of the mesh (data*fsdp*expert = {sizes["data"]}*{sizes["fsdp"]}'
                     f'*{sizes["expert"]}); use a multiple of {shards}')


def _validate_moe(cfg: ConfigDict) -> None:
  """The MoE check that needs the mesh; ModelConfig checks the model.moe_* keys."""
  m, e = cfg.model, cfg.mesh.expert
  if m.mlp == 'moe' and e > 1 and m.moe_experts % e:
    raise ValueError(f'mesh.expert={e} must divide model.moe_experts={m.moe_experts}')


def resume_changes(saved: dict, cfg: ConfigDict) -> tuple[list[str], list[str]]:
  """(refused, allowed): 'key: old -> new' lines between a saved config and `cfg`.

  A key the saved config lacks is not a change when `cfg` holds its default (the
  saved config predates the key).
  """
  new, old = _flat(json.loads(to_json(cfg))), _flat(saved)
  default = _flat(json.loads(to_json(base_config())))
  refused, allowed = [], []
  for key in sorted(set(new) | set(old)):
    if key not in old and new.get(key) == default.get(key):
      continue
    a, b = old.get(key, '(absent)'), new.get(key, '(absent)')
    if a == b:
      continue
    line = f'{key}: {a!r} -> {b!r}'
    ok = any(key == p or (p.endswith('.*') and key.startswith(p[:-1]))
             for p in RESUMABLE_CHANGES)
    (allowed if ok else refused).append(line)
  return refused, allowed


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def to_json(cfg: ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)

"""Load a finished or running workdir: its config, model and params (the one run loader)."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from scalejax.data import load_tokenizer
from scalejax.model.decoder import build_model
from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib


def load_run(workdir: str, step: int | None = None):
  """(cfg, graphdef, params, tokenizer) of a workdir's newest checkpoint (or `step`'s)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a scalejax workdir?')
  with open(path) as f:
    saved = json.load(f)
  cfg = ml_collections.ConfigDict(saved)
  tokenizer = load_tokenizer(cfg.data, workdir)
  model_cfg = config_lib.model_config(cfg, tokenizer.vocab_size)
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, cfg.seed))
  graphdef, abstract_params = nnx.split(abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(abstract_params))
  params, _ = ckpt.restore_params(workdir, target, step)
  return cfg, graphdef, params, tokenizer

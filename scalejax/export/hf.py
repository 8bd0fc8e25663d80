"""A scalejax decoder as a Hugging Face transformers checkpoint, with its scales folded.

`export(model, out, tokenizer)` writes `config.json`, `model.safetensors`,
`generation_config.json` (when the tokenizer has an end-of-document id) and the
tokenizer's files (export/tokenizer.py), which `AutoModelForCausalLM.from_pretrained`
loads as `LlamaForCausalLM`, or as `Qwen3ForCausalLM` for a model with QK-norm. The
weights are written with NumPy and safetensors only: exporting needs no torch.

What each scale becomes (the choice: fold whatever folds), all exact (the same function in exact arithmetic; float32
rounding only):

- An input-role scale that folds (wiring.Scale.folds: its consumers are kernels reached
  through channelwise ops) moves into the rows of the kernels it feeds,
  `(gamma * n) @ W = n @ (diag(gamma) W)` (analysis/folding.py), and its norm is written
  with weight 1. That covers a block's shared norm, HG's per-branch scales (one HF norm
  cannot hold three vectors, three kernels can) and an untied model's final norm.
- The final norm of a tied-embedding model cannot fold: its table is also the input
  embedding. It stays where HF applies it too, in `model.norm.weight`.
- DP's output scale u, `y = u * (x @ W)`: into its own kernel's columns, see
  `analysis/folding.py:fold_output_scales`.
- QK-norm's scales (output role: RoPE and the softmax follow) stay in Qwen3's
  `self_attn.q_norm` / `k_norm`, which apply RMSNorm per head after the projection and
  before RoPE, as our attention does.

What no exported architecture holds is refused by `unsupported`, naming the scales.
Mapping facts checked against transformers' Llama and Qwen3 code: RoPE rotates the two
halves of each head (`rotate_half`, as layers.rope does), so q and k need no
permutation; kernels are stored [out, in] (ours [in, out]); RMSNorm is
`x * rsqrt(mean(x^2) + eps) * weight`; the MLP is `down(silu(gate(x)) * up(x))`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from scalejax.analysis import folding
from scalejax.core import roles as R
from scalejax.export import tokenizer as tokenizer_lib
from scalejax.model import wiring
from scalejax.model.config import ModelConfig
from scalejax.scales.variants import VARIANTS

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
CONFIG_FILE, WEIGHTS_FILE = 'config.json', 'model.safetensors'
GENERATION_FILE = 'generation_config.json'
# What an export writes besides the tokenizer's files; --overwrite replaces only these.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE)

_LAYER = 'model.layers.{i}.'
# Module path of each of our linear maps (wiring.Kernel.path without the param) -> the HF
# module holding it; '{i}' is the layer.
HF_KERNELS = {
    ('embed',): 'model.embed_tokens',
    **{wiring.ATTN + (n,): _LAYER + f'self_attn.{n}_proj' for n in ('q', 'k', 'v', 'o')},
    **{wiring.MLP_PATH + (n,): _LAYER + f'mlp.{n}_proj' for n in ('gate', 'up', 'down')},
    wiring.HEAD[:1]: 'lm_head',
}
# Module path of each of our norms -> the HF norm whose weight holds its one scale vector
# (Qwen3's q_norm / k_norm only with QK-norm). Norms not named here must fold away.
HF_NORMS = {
    ('blocks', 'attn_norm'): _LAYER + 'input_layernorm',
    ('blocks', 'mlp_norm'): _LAYER + 'post_attention_layernorm',
    ('final_norm',): 'model.norm',
    wiring.ATTN + ('q_norm',): _LAYER + 'self_attn.q_norm',
    wiring.ATTN + ('k_norm',): _LAYER + 'self_attn.k_norm',
}
EXPORTABLE_VARIANTS = tuple(n for n, v in VARIANTS.items() if v.dual != 'dnp')


def architecture(config: ModelConfig) -> str:
  """'qwen3' for a model with QK-norm, else 'llama' (key of ARCHITECTURES)."""
  return 'qwen3' if config.qk_norm else 'llama'


def unsupported(config: ModelConfig) -> str | None:
  """Why `config`'s model has no exact Hugging Face export, on one line (None: it has).

  Each reason names the scales in the way (their wiring names) and what would carry them.
  """
  scales = wiring.scales(config)

  def names(keep) -> str:
    return ', '.join(s.name for s in scales if keep(s))

  def feeds_mlp(s: wiring.Scale) -> bool:
    return any(c.kernel is not None and c.kernel.path[:2] == wiring.MLP_PATH for c in s.consumers)

  why = []
  if config.dual == 'dnp':
    why.append(f'DNP normalizes the output of each wrapped map ({names(_is_dnp)}): that takes '
               'a norm after the q/k/v/gate/up projections, which neither Llama nor Qwen3 '
               '(nor another transformers decoder) has')
  if config.placement == 'post':
    why.append(f"Post-Norm's norms ({names(lambda s: s.path[0] == 'blocks')}) follow each "
               'residual add and feed the residual stream: that takes a Post-LN decoder; '
               'Llama and Qwen3 are Pre-Norm')
  if config.placement == 'sandwich':
    out_norms = names(lambda s: s.path[1] in ('attn_out_norm', 'mlp_out_norm'))
    why.append(f'the sandwich output norms ({out_norms}) take a norm after each sub-layer, '
               "as Gemma 2's post-attention and post-feedforward norms (not exported: Gemma "
               'differs elsewhere too); Llama and Qwen3 have none')
  if config.mlp == 'moe':
    why.append(f'the MoE MLP fed by {names(feeds_mlp)} (router and experts) takes a '
               'sparse-MoE architecture (Mixtral-style, not exported); Llama and Qwen3 have '
               'dense MLPs')
  if config.norm != 'rms':
    why.append(f'norm={config.norm}: the norms of {names(lambda s: not _is_dp(config, s))} '
               'subtract the mean, which takes a LayerNorm decoder (GPT-NeoX-style, not '
               "exported); Llama and Qwen3's RMSNorm does not")
  if config.norm_bias:
    biases = ', '.join('/'.join(s.bias) for s in scales if s.bias)
    why.append(f'the norm biases {biases} take norms with a bias; Llama and Qwen3 have none')
  if architecture(config) == 'llama' and config.d_model % config.n_heads:
    why.append(f'd_model={config.d_model} is not a multiple of n_heads={config.n_heads}, '
               'which LlamaConfig requires')
  if not why:
    return None
  return (f'cannot export this {config.variant} model exactly to Hugging Face: '
          f'{"; ".join(why)} (exportable: variants {", ".join(EXPORTABLE_VARIANTS)} with '
          'placement=pre, norm=rms, no norm bias and a dense MLP; qk_norm exports as Qwen3)')


def _is_dnp(s: wiring.Scale) -> bool:
  return s.path[-2:-1] == ('post',)  # DNP's norm at `<map>/post`, its scale at `.../post/scale`


def _is_dp(config: ModelConfig, s: wiring.Scale) -> bool:
  return config.dual == 'dp' and s.path[-1] == 'post'


def folded(model):
  """A copy of `model` with every scale that folds moved into its kernels: DP's output
  scales into their own kernels' columns, then every input scale that folds into the
  rows of what it feeds (folding.fold_input_scales). The function is unchanged."""
  model = folding.copy_model(model)
  folding.fold_output_scales(model)
  return folding.fold_input_scales(model)[0]


def folded_arrays(model) -> tuple[dict, dict[str, np.ndarray | None]]:
  """(params, gammas) of `folded(model)` in NumPy: its param tree, and the effective gamma
  of every scale by wiring name (None for the `none` form).

  One compiled program: done op by op, the fold's many small array ops would each be
  compiled on their own, which costs more than the fold.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    model = folded(nnx.merge(graphdef, state))
    return R.params_of(model), {s.name: wiring.form_gamma(wiring.module_at(model, s.path))
                                for s in wiring.scales(model.config)}
  return jax.device_get(run(state))


def hf_state(model) -> dict[str, np.ndarray]:
  """The HF tensors of `model` with its scales folded (`folded`): float32, kernels [out, in].

  Every param must land somewhere: a kernel in its HF module, a scale in its norm's HF
  weight, or (a scale with no HF norm) it must be the identity after folding. Anything
  else raises, so a model part this export does not know cannot be dropped silently.
  """
  config = model.config
  params, gammas = folded_arrays(model)
  scales = wiring.scales(config)
  layers = config.n_layers
  out, placed = {}, set()

  def put(name: str, w, stacked: bool) -> None:  # '{i}' in `name`: one tensor per layer
    w = np.asarray(w, np.float32)
    for i in range(layers) if stacked else (None,):
      out[name.format(i=i) + '.weight'] = np.ascontiguousarray(w if i is None else w[i])

  for k in wiring.kernels(config):
    w = _at(params, k.path)  # [*stack, d_in, d_out]; the table [vocab, d] in both
    put(HF_KERNELS[k.path[:-1]], w if k.role == R.EMBEDDING else np.swapaxes(w, -1, -2),
        k.stack == ('layers',))
    placed.add(k.path)
  for norm_path, name in HF_NORMS.items():
    branches = [s for s in scales if s.path[:-1] == norm_path]
    if not branches:
      continue
    # One branch: its gamma (1 if it folded). HG's branches: each folded into its kernels.
    gamma = gammas[branches[0].name] if len(branches) == 1 else None
    shape = ((layers,) if '{i}' in name else ()) + (branches[0].dim,)
    put(name, np.ones(shape, np.float32) if gamma is None else gamma, '{i}' in name)
    if len(branches) == 1:
      placed.add(branches[0].path)
  for s in scales:
    gamma = gammas[s.name]
    if s.path not in placed and gamma is not None and not np.allclose(gamma, 1, rtol=0, atol=1e-6):
      raise ValueError(f'scale {s.name} did not fold and has no place in the HF model')
    placed.add(s.path)
  paths = [tuple(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  stray = [p for p in paths if not any(p[:len(q)] == q for q in placed)]
  if stray:
    raise ValueError(f'params {["/".join(p) for p in stray]} have no place in the HF model')
  return out


def _at(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def hf_config(config: ModelConfig, eos_id: int | None = None) -> dict:
  """config.json for transformers 5: a LlamaConfig / Qwen3Config as a dict.

  Every field the model's forward reads is written, so no transformers default decides
  anything (LlamaConfig's default bos/eos ids 1/2, for one, are not ours).
  """
  arch = architecture(config)
  out = {
      'architectures': [ARCHITECTURES[arch]],
      'model_type': arch,
      'vocab_size': config.vocab_size,
      'hidden_size': config.d_model,
      'intermediate_size': config.resolved_d_ff,
      'num_hidden_layers': config.n_layers,
      'num_attention_heads': config.n_heads,
      'num_key_value_heads': config.resolved_n_kv_heads,
      'head_dim': config.resolved_head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': config.max_seq_len,
      'rms_norm_eps': config.norm_eps,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': float(config.rope_theta)},
      'tie_word_embeddings': config.tie_embeddings,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'bos_token_id': None,  # our tokenizers add no begin-of-sequence token
      'eos_token_id': eos_id,
      'pad_token_id': None,
      'dtype': 'float32',
      'use_cache': True,
  }
  if arch == 'llama':
    out.update(mlp_bias=False, pretraining_tp=1)
  else:  # every layer full causal attention, as ours
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers,
               layer_types=['full_attention'] * config.n_layers)
  return out


def generation_config(eos_id: int) -> dict:
  """Generation stops at the end-of-document id, where a training document ended."""
  return {'bos_token_id': None, 'eos_token_id': eos_id, 'pad_token_id': eos_id}


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
  """ValueError unless `out` is absent or empty, or `overwrite` is set."""
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f'--out {out} is a file, not a directory: choose another --out')
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ValueError(f'--out {out} exists and is not empty: choose a new --out, or pass '
                     '--overwrite to replace the export files in it')


def export(model, out: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> list[str]:
  """Writes the HF directory `out` for a built decoder and its tokenizer; returns the
  names of the files written.

  Refused (ValueError, one line, before anything is written) when the model has no
  exact export (`unsupported`) or `out` holds files and `overwrite` is not set. With
  `overwrite`, the files an export writes are replaced; other files are left alone.
  """
  config = model.config
  why = unsupported(config)
  if why:
    raise ValueError(why)
  check_out(out, overwrite)
  state = hf_state(model)
  eos_id = getattr(tokenizer, 'eod_id', None)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name in MODEL_FILES + tokenizer_lib.FILES:
    (out / name).unlink(missing_ok=True)  # a stale file of an earlier export
  save_file(state, str(out / WEIGHTS_FILE), metadata={'format': 'pt'})
  written = [WEIGHTS_FILE, CONFIG_FILE]
  _write_json(out / CONFIG_FILE, hf_config(config, eos_id))
  if eos_id is not None:
    _write_json(out / GENERATION_FILE, generation_config(eos_id))
    written.append(GENERATION_FILE)
  if tokenizer is not None:
    written += tokenizer_lib.save(tokenizer, out, model_max_length=config.max_seq_len)
  return written


def _write_json(path: Path, data: dict) -> None:
  path.write_text(json.dumps(data, indent=2, sort_keys=True) + '\n')

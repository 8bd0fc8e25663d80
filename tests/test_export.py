"""Hugging Face export: every exportable variant, loaded back in transformers, computes our
logits and greedy continuations; the others are refused naming their scales; tokenizers
give our ids; the command end to end.

Scales are randomized before export: at init every gamma is 1 and folding them would be
exact whatever the fold did. Weights are drawn with a larger std than training's init,
so that the two largest logits along each greedy continuation stay further apart than
the logits tolerance (the frameworks differ by about 1e-6): the continuation is decided
by the model, not by float32 rounding.
"""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from scalejax.analysis import folding
from scalejax.cli import common
from scalejax.cli import export as export_cli
from scalejax.data.tokenizers import (ByteTokenizer, CharTokenizer, IdTokenizer,
                                      SentencePieceTokenizer)
from scalejax.export import hf
from scalejax.export import tokenizer as tokenizer_lib
from scalejax.model import sampling, wiring
from scalejax.model.config import ModelConfig
from scalejax.model.decoder import build_model
from scalejax.scales.norms import make_scale
from scalejax.train import checkpoint as ckpt
from scalejax.train import config as config_lib

from _util import SHAKESPEARE, randomize_scales, tiny_config

VOCAB, PROMPT, NEW = 256, 8, 32
STD = 0.2  # of every weight (see the module docstring)
ATOL = 1e-4  # on logits of a few units
TEXTS = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\n',
         ' Speak, speak.  ', '')

# name -> ModelConfig fields: every exportable variant, tied and untied, MHA, GQA and MQA,
# both scale storages, and QK-norm (exported as Qwen3).
EXPORTABLE = {
    'baseline': dict(variant='baseline'),
    'baseline_tied_gqa': dict(variant='baseline', tie_embeddings=True, n_kv_heads=2),
    'no_scale': dict(variant='no_scale', n_kv_heads=2),
    'hg_gqa': dict(variant='hg', n_kv_heads=2),
    'hg_tied': dict(variant='hg', tie_embeddings=True),
    'magdir_mqa': dict(variant='magdir', n_kv_heads=1),
    'magdir_unit_tied_delta': dict(variant='magdir_unit', tie_embeddings=True,
                                   scale_storage='delta'),
    'dp_gqa': dict(variant='dp', n_kv_heads=2),
    'dp_qk_norm_tied': dict(variant='dp', qk_norm=True, tie_embeddings=True, n_kv_heads=2),
}
# Where sampling.generate itself runs (its own compile); elsewhere our greedy continuation
# is read off one forward pass (`_greedy_from_logits`).
GENERATE = ('baseline',)
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=STD)


def _config(**fields) -> ModelConfig:
  return ModelConfig(**{**SMALL, **fields})


def _model(config: ModelConfig, seed: int = 1):
  """A model built as build_model builds it, with N(0, STD) weights drawn on the host (no
  init program to compile per shape) and random positive scales (_util.randomize_scales)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config)))
  rng = np.random.default_rng(seed)
  nnx.replace_by_pure_dict(state, jax.tree.map(
      lambda x: rng.normal(0, STD, x.shape).astype(np.float32), nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  randomize_scales(model, seed=seed)
  return model


def _identity_scales(model):
  """A copy with every scale at gamma = 1: what a fold that moved nothing would match."""
  model = folding.copy_model(model)
  for s in wiring.scales(model.config):
    folding.reset_to_identity(wiring.module_at(model, s.path),
                              make_scale(model.config.norm_spec, s.dim, s.role))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens_BxL):
  """Our float32 logits; compiled once per model structure (the command's run reuses one)."""
  return nnx.merge(graphdef, params)(tokens_BxL)


@pytest.fixture(scope='module')
def transformers():
  torch = pytest.importorskip('torch')
  torch.set_num_threads(1)  # tiny models: threads only add start-up and contention
  return pytest.importorskip('transformers')


def _hf_logits(hf_model, tokens_BxL):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return hf_model(torch.tensor(tokens_BxL)).logits.numpy()


def _hf_greedy(hf_model, prompt: list[int]) -> list[int]:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _our_greedy(graphdef, params, prompt: list[int]) -> list[int]:
  """sampling.generate at temperature 0, its window as long as prompt and continuation (it
  never slides: the same context HF's cache keeps)."""
  text = sampling.generate(graphdef, params, IdTokenizer(VOCAB), ' '.join(map(str, prompt)), NEW,
                           PROMPT + NEW, temperature=0)
  return [int(t) for t in text.split()]


def _greedy_from_logits(logits_LxV, prompt_len: int) -> list[int]:
  """The greedy continuation of a sequence's first `prompt_len` tokens, read off the logits
  of the whole sequence: a causal model's logits at position t see tokens <= t only, so
  when every next token is the argmax of the logits before it, decoding one token at a
  time would have produced exactly these tokens."""
  return np.argmax(logits_LxV[prompt_len - 1:-1], axis=-1).tolist()


@pytest.mark.parametrize('name', EXPORTABLE)
def test_export_computes_our_logits_and_greedy_continuation(tmp_path, transformers, name):
  model = _model(_config(**EXPORTABLE[name]))
  graphdef, params = nnx.split(model)
  written = hf.export(model, tmp_path)
  assert sorted(written) == ['config.json', 'model.safetensors']  # no tokenizer, no eod id
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert type(theirs).__name__ == hf.ARCHITECTURES[hf.architecture(model.config)]
  assert str(theirs.dtype) == 'torch.float32'

  prompt = np.random.default_rng(0).integers(0, VOCAB, PROMPT).tolist()
  continuation = _hf_greedy(theirs, prompt)
  assert len(continuation) == NEW  # no end-of-sequence id: it never stops early
  tokens_1xL = np.array([prompt + continuation])
  ours = np.asarray(_logits(graphdef, params, tokens_1xL))
  np.testing.assert_allclose(_hf_logits(theirs, tokens_1xL), ours, rtol=0, atol=ATOL)
  top2 = np.sort(ours[0, PROMPT - 1:-1], axis=-1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > ATOL, 'a near-tie: rounding would pick the token'
  assert _greedy_from_logits(ours[0], PROMPT) == continuation
  if name in GENERATE:
    assert _our_greedy(graphdef, params, prompt) == continuation


def test_the_check_has_teeth(tmp_path, transformers):
  """The randomized scales change the function well beyond the tolerance, and an export
  whose fold moved nothing is refused rather than written wrong."""
  model = _model(_config(**EXPORTABLE['hg_gqa']))
  graphdef, params = nnx.split(model)
  tokens_1xL = np.random.default_rng(0).integers(0, VOCAB, (1, PROMPT + NEW))
  plain = _logits(graphdef, nnx.split(_identity_scales(model))[1], tokens_1xL)
  assert np.abs(np.asarray(plain) - np.asarray(_logits(graphdef, params, tokens_1xL))).max() > 0.1
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(hf, 'folded', folding.copy_model)
    with pytest.raises(ValueError, match='blocks/attn_norm/q did not fold and has no place'):
      hf.export(model, tmp_path)


def test_what_each_scale_becomes():
  """Input scales fold into kernel rows, DP's u into its own kernel's columns; a tied
  model's final norm and QK-norm stay in HF's norm weights."""
  model = _model(_config(variant='dp', qk_norm=True, tie_embeddings=True))
  state = hf.hf_state(model)
  gamma = lambda form: np.asarray(wiring.form_gamma(form))
  attn = model.blocks.attn
  np.testing.assert_array_equal(state['model.norm.weight'], gamma(model.final_norm.scale))
  np.testing.assert_array_equal(state['model.layers.1.self_attn.q_norm.weight'],
                                gamma(attn.q_norm.scale)[1])
  np.testing.assert_array_equal(state['model.layers.0.input_layernorm.weight'], 1.0)
  assert 'lm_head.weight' not in state
  # W_q of layer 0 ([out, in] in HF): rows times the input norm's gamma, columns times u
  v, u = gamma(model.blocks.attn_norm.scale)[0], gamma(attn.q.post)[0]
  w_DxQ = np.asarray(attn.q.kernel[...])[0]
  np.testing.assert_allclose(state['model.layers.0.self_attn.q_proj.weight'],
                             (v[:, None] * w_DxQ * u[None, :]).T, rtol=1e-6)


# name -> (ModelConfig fields, the wiring names the refusal must give)
REFUSED = {
    'dnp': (dict(variant='dnp'), ['blocks/attn/q/post/scale', 'blocks/attn/v/post/scale',
                                  'blocks/mlp/gate/post/scale', 'blocks/mlp/up/post/scale']),
    'unified': (dict(variant='unified'), ['blocks/attn/k/post/scale', 'blocks/mlp/up/post/scale']),
    'sandwich': (dict(placement='sandwich'), ['blocks/attn_out_norm/scale',
                                              'blocks/mlp_out_norm/scale']),
    'sandwich_qk_norm': (dict(placement='sandwich', qk_norm=True), ['blocks/attn_out_norm/scale']),
    'post': (dict(placement='post'), ['blocks/attn_norm/scale', 'blocks/mlp_norm/scale']),
    'moe': (dict(mlp='moe', moe_experts=2, moe_top_k=1), ['blocks/mlp_norm/scale']),
    'layer_norm': (dict(norm='layer'), ['blocks/attn_norm/scale', 'blocks/mlp_norm/scale',
                                        'final_norm/scale']),
    'norm_bias': (dict(norm_bias=True), ['blocks/attn_norm/scale_bias', 'final_norm/scale_bias']),
}


@pytest.mark.parametrize('name', REFUSED)
def test_unexportable_models_are_refused_in_one_line_naming_the_scales(name):
  fields, blocking = REFUSED[name]
  why = hf.unsupported(_config(**fields))
  assert why is not None and why.startswith('cannot export this') and '\n' not in why
  for scale in blocking:
    assert scale in why, (scale, why)


def test_export_refuses_before_writing(tmp_path):
  config = _config(variant='unified')
  model = nnx.eval_shape(lambda: build_model(config))  # no weight is read
  with pytest.raises(ValueError) as e:
    hf.export(model, tmp_path / 'out')
  assert str(e.value) == hf.unsupported(config) and not (tmp_path / 'out').exists()


def test_refusals_say_what_would_carry_the_scales():
  assert 'a norm after the q/k/v/gate/up projections' in hf.unsupported(_config(variant='dnp'))
  assert 'Post-LN decoder' in hf.unsupported(_config(placement='post'))
  assert 'sparse-MoE architecture' in hf.unsupported(_config(mlp='moe', moe_experts=2,
                                                              moe_top_k=1))
  assert 'LayerNorm decoder' in hf.unsupported(_config(norm='layer'))
  assert 'LlamaConfig requires' in hf.unsupported(_config(n_heads=3, head_dim=8))
  assert hf.unsupported(_config(n_heads=3, head_dim=8, qk_norm=True)) is None  # Qwen3 takes it
  for name in hf.EXPORTABLE_VARIANTS:
    assert hf.unsupported(_config(variant=name)) is None


# --- tokenizers -------------------------------------------------------------------

def _check_ids(ours, theirs_encode, theirs_decode, texts):
  for text in texts:
    ids = ours.encode(text)
    assert list(theirs_encode(text)) == list(ids), text
    assert theirs_decode(ids) == ours.decode(ids), text


def test_byte_tokenizer_gives_utf8_bytes():
  ours, theirs = ByteTokenizer(), tokenizer_lib.byte_tokenizer()
  texts = TEXTS + ('héllo wörld 🙂 \0 ÄÖÜ — ≠\n\t', '<0x41> [UNK] </s>')
  _check_ids(ours, lambda t: theirs.encode(t).ids, theirs.decode, texts)
  assert theirs.get_vocab_size() == 256


def test_char_tokenizer_gives_sorted_character_ids():
  ours = CharTokenizer.from_text(''.join(TEXTS) + 'äé\0')
  theirs = tokenizer_lib.char_tokenizer(ours.chars)
  _check_ids(ours, lambda t: theirs.encode(t).ids, theirs.decode, TEXTS + ('\0äé \n',))
  with pytest.raises(ValueError):
    ours.encode('Q')
  with pytest.raises(Exception, match='UNK'):  # not mapped to some id: refused, as ours
    theirs.encode('Q')


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  from scalejax.cli import train_spm  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp('spm')
  corpus = tmp / 'corpus.txt'
  corpus.write_text(SHAKESPEARE.read_text()[:8000])
  return train_spm.train(str(corpus), 120, str(tmp / 'tiny'))


@pytest.mark.parametrize('kind', ['byte', 'char', 'sentencepiece'])
def test_transformers_loads_the_tokenizer_with_our_ids(tmp_path, transformers, spm_model, kind):
  ours = {'byte': ByteTokenizer,
          'char': lambda: CharTokenizer.from_text(SHAKESPEARE.read_text()[:8000]),
          'sentencepiece': lambda: SentencePieceTokenizer(spm_model)}[kind]()
  written = tokenizer_lib.save(ours, tmp_path, model_max_length=64)
  assert 'tokenizer_config.json' in written
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  texts = TEXTS + (('héllo 🙂\n',) if kind == 'byte' else ())
  _check_ids(ours, theirs.encode, theirs.decode, texts)
  assert theirs.model_max_length == 64
  if kind == 'sentencepiece':  # an unknown character is SentencePiece's unknown id there too
    assert theirs.encode('h\u00e9') == ours.encode('h\u00e9')


# --- the command ------------------------------------------------------------------

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """What a byte-level train.py run leaves, written with the trainer's own checkpoint
  code: config.json and the params of steps 1 and 2 (two different models)."""
  cfg = tiny_config()
  cfg.data.update(source='text_files', path=str(SHAKESPEARE), tokenizer='byte')
  # The model of EXPORTABLE['hg_gqa'] (vocabulary 0: the byte tokenizer's 256), so our
  # logits reuse that test's compiled forward.
  cfg.model.update(**{k: v for k, v in SMALL.items() if k != 'vocab_size'}, **EXPORTABLE['hg_gqa'])
  config = config_lib.model_config(cfg, ByteTokenizer.vocab_size)
  assert config == _config(**EXPORTABLE['hg_gqa'])
  workdir = tmp_path_factory.mktemp('run')
  models = {step: _model(config, seed=step) for step in (1, 2)}
  mngr = ckpt.manager(str(workdir), keep=5)
  for step, model in models.items():
    ckpt.save(mngr, step, {'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           'step': np.int32(step)}, {})
  mngr.wait_until_finished()
  mngr.close()
  (workdir / 'config.json').write_text(config_lib.to_json(cfg))
  return workdir, models


def _export(*argv):
  fv = common.parse_flags(export_cli.define_flags, list(argv))
  return export_cli.main(['export'], fv)


def test_command_exports_a_run(tmp_path, run_dir, transformers):
  workdir, models = run_dir
  out = tmp_path / 'hf'
  written = _export('--workdir', str(workdir), '--out', str(out))
  assert set(written) == {'config.json', 'model.safetensors', 'generation_config.json',
                          'tokenizer.json', 'tokenizer_config.json'}
  assert json.loads((out / 'generation_config.json').read_text())['eos_token_id'] == 0  # NUL
  ours_tok = ByteTokenizer()
  ids = ours_tok.encode(TEXTS[0])[:PROMPT + NEW]
  assert transformers.AutoTokenizer.from_pretrained(out).encode(TEXTS[0])[:PROMPT + NEW] == ids

  def check(step):  # the export computes that step's model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    graphdef, params = nnx.split(models[step])
    ours = np.asarray(_logits(graphdef, params, np.array([ids])))
    np.testing.assert_allclose(_hf_logits(theirs, np.array([ids])), ours, rtol=0, atol=ATOL)
  check(2)  # the newest step by default

  with pytest.raises(ValueError, match=r'exists and is not empty: .* --overwrite'):
    _export('--workdir', str(workdir), '--out', str(out))
  (out / 'notes.txt').write_text('kept')
  _export('--workdir', str(workdir), '--out', str(out), '--step', '1', '--overwrite')
  check(1)
  assert (out / 'notes.txt').read_text() == 'kept'


def test_command_names_bad_input(tmp_path, run_dir):
  workdir, _ = run_dir
  with pytest.raises(FileNotFoundError, match='nowhere: no such directory'):
    _export('--workdir', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o'))
  with pytest.raises(FileNotFoundError, match='no config.json there'):
    _export('--workdir', str(tmp_path), '--out', str(tmp_path / 'o'))
  with pytest.raises(ValueError, match=r'--step 7: .* at that step; kept steps: \[1, 2\]'):
    _export('--workdir', str(workdir), '--out', str(tmp_path / 'o'), '--step', '7')
  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(workdir / 'config.json', empty / 'config.json')
  with pytest.raises(FileNotFoundError, match='has no checkpoint yet'):
    _export('--workdir', str(empty), '--out', str(tmp_path / 'o'))
  saved = json.loads((empty / 'config.json').read_text())
  saved['model']['variant'] = 'dnp'
  (empty / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r'cannot export this dnp model .*\(blocks/attn/q/post/'):
    _export('--workdir', str(empty), '--out', str(tmp_path / 'o'))
  assert not (tmp_path / 'o').exists()

"""The `scalejax` model type of lm-eval-harness: a decoder's params scored and run in JAX.

`ScalejaxLM` answers lm-eval's three request kinds from (graphdef, params, tokenizer,
seq_len): `loglikelihood` (multiple choice, LAMBADA), `loglikelihood_rolling`
(perplexity) and greedy `generate_until`. Requests are sorted by length and padded to
a few bucket lengths (powers of two up to seq_len) with a fixed batch size, so jit
compiles one program per bucket however many requests there are. Padding goes on the
right, where a causal model cannot see it.

Context beyond seq_len is cut from the left, as lm-eval's Hugging Face model does. A
continuation longer than seq_len is scored in pieces of at most seq_len tokens, each
with the longest context that fits (the windows lm-eval's rolling log-likelihood uses).

A workdir is read by the run loader of the train layer, which sits above this one:
`register(load_run)` makes `--model scalejax --model_args workdir=DIR[,step=N,
batch_size=B]` known to lm-eval in this process (the commands call it); the trainer's
hook builds a `ScalejaxLM` from its own params directly.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from scalejax.core import sharding

log = logging.getLogger('scalejax')

MODEL_TYPE = 'scalejax'
SMALLEST_BUCKET = 16
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256

# (workdir, step or None) -> (cfg, graphdef, params, tokenizer), as
# scalejax.train.runs.load_run returns them.
RunLoader = Callable[[str, int | None], tuple[Any, Any, Any, Any]]


def buckets(seq_len: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
  """The padded lengths: powers of two from `smallest` below seq_len, and seq_len."""
  out, n = [], smallest
  while n < seq_len:
    out.append(n)
    n *= 2
  return (*out, seq_len)


def _forward(graphdef, params, tokens_BxT, targets_BxT, mask_BxT):
  """(log p(target) at the masked positions, 0 elsewhere; the argmax token at every
  position). One program serves scoring and greedy generation, so each bucket compiles
  once. The host sums the log-probs in float64: float32 sums of a long text in two
  orders differ by more than 1e-5."""
  logits_BxTxV = nnx.merge(graphdef, params)(tokens_BxT)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  target_logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  target_logp_BxT = jnp.where(mask_BxT, target_logp_BxT, 0.0)
  argmax_BxT = jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
  # Replicated under a training mesh, so every process can read them (no-op without one).
  return (sharding.constrain(target_logp_BxT, (None, None)),
          sharding.constrain(argmax_BxT, (None, None)))


class ScalejaxLM(TemplateLM):
  """lm-eval's model interface over a scalejax decoder.

  `seq_len` is the longest input the model sees (the run's train.seq_len: what it was
  trained on). `batch_size` rows are scored per call; a short last batch is padded.
  `params` may be replaced between calls (same shapes: nothing recompiles).
  """

  def __init__(self, graphdef, params, tokenizer, seq_len: int,
               batch_size: int = DEFAULT_BATCH_SIZE,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, progress: bool = True) -> None:
    super().__init__()
    if seq_len < 2:
      raise ValueError(f'seq_len={seq_len} must be at least 2')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be positive')
    self.graphdef, self.params = graphdef, params
    # Not `self.tokenizer`: lm-eval reads that attribute as a Hugging Face tokenizer
    # (chat templates).
    self.text_tokenizer = tokenizer
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.max_gen_toks = max_gen_toks
    self.progress = progress  # tqdm bars (off inside the trainer, which has its own)
    self.buckets = buckets(seq_len)
    self._forward = jax.jit(functools.partial(_forward, graphdef))

  # -- what TemplateLM needs ---------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    # The end-of-document id separates documents in training, so it is what a text's
    # first token was predicted from; a vocabulary without one starts from id 0.
    eod = getattr(self.text_tokenizer, 'eod_id', None)
    return 0 if eod is None else int(eod)

  @property
  def tokenizer_name(self) -> str:
    return f'scalejax-{self.text_tokenizer.name}'

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # scalejax tokenizers add no special tokens
    return list(self.text_tokenizer.encode(string))

  def tok_decode(self, tokens: list[int]) -> str:
    return self.text_tokenizer.decode(tokens)

  # -- scoring -----------------------------------------------------------------------

  def bucket(self, length: int) -> int:
    """The smallest bucket that holds `length` tokens."""
    return next(b for b in self.buckets if b >= length)

  def _pieces(self, context: list[int], continuation: list[int]
              ) -> list[tuple[list[int], list[int]]]:
    """(model input, its last len(targets) positions' targets) of each piece of at
    most seq_len continuation tokens, the input cut to the last seq_len tokens."""
    whole = context + continuation
    out = []
    for start in range(len(context), len(whole), self.seq_len):
      end = min(start + self.seq_len, len(whole))
      out.append((whole[max(0, end - 1 - self.seq_len):end - 1], whole[start:end]))
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    # TemplateLM tokenizes the requests (its own progress bar) and calls
    # _loglikelihood_tokens.
    return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            ) -> list[tuple[float, bool]]:
    """[(log p(continuation | context), greedy)] of (cache key, context, continuation)
    token requests (TemplateLM tokenizes them; an empty context is the eot token)."""
    rows = []  # (request index, input, targets): every piece of every request
    for i, (_, context, continuation) in enumerate(requests):
      pieces = self._pieces(list(context) or [self.prefix_token_id], list(continuation))
      rows += [(i, inp, targets) for inp, targets in pieces]
    # Longest first (lm-eval's order): each batch pads to the bucket of its first row.
    collator = Collator(rows, sort_fn=lambda r: (-len(r[1]), tuple(r[1])))
    ll, greedy = [0.0] * len(requests), [True] * len(requests)
    bar = tqdm(total=len(rows), disable=disable_tqdm or not self.progress, desc='loglikelihood')
    for chunk in collator.get_batched(n=self.batch_size):
      width = self.bucket(max(len(inp) for _, inp, _ in chunk))
      tokens_BxT = np.zeros((self.batch_size, width), np.int32)
      targets_BxT = np.zeros((self.batch_size, width), np.int32)
      mask_BxT = np.zeros((self.batch_size, width), bool)
      for b, (_, inp, targets) in enumerate(chunk):
        n = len(inp)
        tokens_BxT[b, :n] = inp
        # Position j predicts input token j + 1; the targets are the last ones.
        targets_BxT[b, n - len(targets):n] = targets
        mask_BxT[b, n - len(targets):n] = True
      logp_BxT, argmax_BxT = jax.device_get(
          self._forward(self.params, tokens_BxT, targets_BxT, mask_BxT))
      ll_B = logp_BxT.astype(np.float64).sum(axis=-1)
      greedy_B = np.all((argmax_BxT == targets_BxT) | ~mask_BxT, axis=-1)
      for b, (i, _, _) in enumerate(chunk):
        ll[i] += float(ll_B[b])
        greedy[i] = greedy[i] and bool(greedy_B[b])
      bar.update(len(chunk))
    bar.close()
    out = list(zip(ll, greedy))
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole text, from the eot token, in lm-eval's rolling
    windows of seq_len tokens (every token predicted once, with the longest context
    a window allows)."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for window in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.seq_len, context_len=1):
        context, continuation = lm_utils.make_disjoint_window(window)
        windows.append((None, context, continuation))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, scores):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # -- generation --------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, each cut before the first of its `until` strings (and the
    end-of-document token), at most `max_gen_toks` tokens."""
    args = [req.args for req in requests]
    # Batches share generation kwargs (lm-eval's grouping), longest context first.
    collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                        group_by='gen_kwargs', group_fn=lambda a: a[1])
    eos = (self.tok_decode([self.eot_token_id])
           if getattr(self.text_tokenizer, 'eod_id', None) is not None else None)
    out = []
    bar = tqdm(total=len(args), disable=disable_tqdm or not self.progress, desc='generate_until')
    for chunk in collator.get_batched(n=self.batch_size):
      kwargs = normalize_gen_kwargs(chunk[0][1], default_max_gen_toks=self.max_gen_toks)
      if kwargs.get('do_sample'):
        raise ValueError(f'generation kwargs {chunk[0][1]} ask for sampling; the scalejax '
                         'model decodes greedily: set do_sample=false, temperature=0')
      until = handle_stop_sequences(kwargs['until'], eos)
      texts = self.greedy([self.tok_encode(c) for c, _ in chunk], until,
                          kwargs['max_gen_toks'])
      for (context, gen_kwargs), text in zip(chunk, texts):
        out.append(text)
        self.cache_hook.add_partial('generate_until', (context, gen_kwargs), text)
      bar.update(len(chunk))
    bar.close()
    return collator.get_original(out)

  def greedy(self, contexts: list[list[int]], until: list[str], max_tokens: int
             ) -> list[str]:
    """Greedy continuations of up to `batch_size` token contexts, each decoded and cut
    before its first stop string. The model sees the last seq_len tokens (a sliding
    window, so any number of tokens can follow a context of any length)."""
    rows = [list(c) or [self.prefix_token_id] for c in contexts]
    width = self.bucket(min(self.seq_len, max(map(len, rows)) + max_tokens))
    generated: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    # Generation reads the argmax only: no targets to score.
    no_targets_BxT = np.zeros((self.batch_size, width), np.int32)
    no_mask_BxT = np.zeros((self.batch_size, width), bool)
    for _ in range(max_tokens):
      if all(done):
        break
      tokens_BxT = np.zeros((self.batch_size, width), np.int32)
      last_B = np.zeros((self.batch_size,), np.int32)
      for b, (row, gen) in enumerate(zip(rows, generated)):
        window = (row + gen)[-width:]
        tokens_BxT[b, :len(window)] = window
        last_B[b] = len(window) - 1
      _, argmax_BxT = jax.device_get(
          self._forward(self.params, tokens_BxT, no_targets_BxT, no_mask_BxT))
      for b, gen in enumerate(generated):
        if not done[b]:
          gen.append(int(argmax_BxT[b, last_B[b]]))
          text = self.tok_decode(gen)
          done[b] = any(stop and stop in text for stop in until)
    return [postprocess_generated_text(self.tok_decode(gen), until, None) for gen in generated]


class WorkdirLM(ScalejaxLM):
  """The `scalejax` model type: the newest (or `step`'s) checkpoint of a train.py
  workdir, `--model_args workdir=DIR[,step=N,batch_size=B,max_gen_toks=N]`.

  The workdir is read by the run loader `register` was given. lm-eval's `device`
  is not used: JAX runs on its default backend (JAX_PLATFORMS chooses it).
  """

  load_run: ClassVar[RunLoader | None] = None

  def __init__(self, workdir: str, step: int | None = None,
               batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None) -> None:
    del device
    loader = type(self).load_run
    if loader is None:
      raise RuntimeError('no run loader: call scalejax.eval.harness.register(load_run) '
                         'before lm-eval builds a scalejax model')
    cfg, graphdef, params, tokenizer = loader(str(workdir), None if step is None else int(step))
    super().__init__(graphdef, params, tokenizer, cfg.train.seq_len,
                     _batch_size(batch_size, max_batch_size), int(max_gen_toks))
    log.info('lm-eval model: %s (step %s), seq_len %d, batch size %d', workdir,
             'newest' if step is None else step, self.seq_len, self.batch_size)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    # lm-eval passes its own --batch_size (default 1) next to model_args: a batch_size
    # in model_args is the more specific ask and wins.
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
  """lm-eval's batch size: a number, or `auto[:N]`, which here is the default batch
  size (capped by --max_batch_size): rows are padded to a fixed batch anyway."""
  if isinstance(batch_size, str) and batch_size.startswith('auto'):
    return min(DEFAULT_BATCH_SIZE, max_batch_size or DEFAULT_BATCH_SIZE)
  try:
    return int(batch_size)
  except ValueError:
    raise ValueError(f'batch_size={batch_size!r} is not a number or auto') from None


def register(load_run: RunLoader) -> None:
  """Makes `scalejax` a model type of lm-eval in this process, built from workdirs
  that `load_run` reads (calling it again replaces the loader)."""
  WorkdirLM.load_run = staticmethod(load_run)
  register_model(MODEL_TYPE)(WorkdirLM)

"""lm-eval-harness on scalejax models: the `scalejax` model type against hand computations
of the same log-likelihoods and greedy continuations, the shipped offline tasks, the
training hook, the commands. Nothing here touches the network."""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from scalejax.cli import common
from scalejax.cli import eval as eval_cli
from scalejax.cli import lm_eval as lm_eval_cli
from scalejax.eval import harness, runner
from scalejax.train import trainer
from scalejax.train.runs import load_run
from _util import ROOT, SHAKESPEARE, tiny_config

TASKS = 'tests/data/lm_eval_tasks'  # relative: the YAML files' data_files are too
MC, PPL, GEN = 'scalejax_tiny_mc', 'scalejax_tiny_ppl', 'scalejax_tiny_gen'
SEQ_LEN, BATCH = 64, 8  # one batch size everywhere: each bucket compiles once
HOOK_EVERY, STEPS = 15, 30


def _docs(name: str) -> list[dict]:
  return [json.loads(l) for l in (ROOT / TASKS / f'{name}.jsonl').read_text().splitlines()]


def _local_tasks(**kwargs):
  """lm-eval's TaskManager without its own ~15,000 task files: indexing them takes tens
  of seconds of CPU at every start of lm-eval's command line, and the tasks here are the
  include path's (runner.task_manager reads only the include path when it suffices)."""
  from lm_eval.tasks import manager
  return manager.TaskManager(**{**kwargs, 'include_defaults': False})


def _blocked(*args, **kwargs):
  raise AssertionError(f'network access: {args}')


@pytest.fixture(scope='module', autouse=True)
def offline(tmp_path_factory):
  """Hugging Face offline with a fresh cache, sockets refused, the working directory at the
  repository's top (datasets.load_dataset reads data_files relative to it)."""
  import datasets
  cache = tmp_path_factory.mktemp('hf')
  with pytest.MonkeyPatch.context() as mp:
    for key, value in {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'HF_HOME': cache,
                       'HF_DATASETS_CACHE': cache / 'datasets'}.items():
      mp.setenv(key, str(value))
    mp.setattr(datasets.config, 'HF_DATASETS_CACHE', cache / 'datasets')
    mp.setattr(datasets.config, 'HF_DATASETS_OFFLINE', True)
    mp.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    mp.setattr(socket.socket, 'connect', _blocked)
    mp.chdir(ROOT)
    yield


@dataclasses.dataclass
class Trained:
  workdir: Path
  final: dict  # trainer.train's result: the last step's state, the Run
  cli: subprocess.Popen | None  # scalejax-lm-eval on the workdir, if its test runs
  cli_out: Path


@pytest.fixture(scope='module')
def trained(request, tmp_path_factory):
  """A byte-level model trained on Shakespeare with the lm-eval hook on. lm-eval's command
  line on its workdir starts at once, in a subprocess (when its test is selected): it
  runs while this process does the other tests (the machine has two cores)."""
  cfg = tiny_config()
  cfg.data.update(source='text_files', path=str(SHAKESPEARE), tokenizer='byte',
                  eval_batches=0, max_bytes=100_000)  # no eval loss: one compile less
  cfg.train.update(steps=STEPS, seq_len=SEQ_LEN, eval_every=0, log_every=10)
  cfg.checkpoint.every = STEPS
  cfg.lm_eval.update(tasks=f'{MC},{PPL},{GEN}', every=HOOK_EVERY, include_path=TASKS,
                     batch_size=BATCH)
  workdir = tmp_path_factory.mktemp('run')
  final = trainer.train(cfg, str(workdir))
  out = tmp_path_factory.mktemp('cli')
  wanted = any(i.name == test_lm_eval_command_line_runs_the_scalejax_model.__name__
               for i in request.session.items)
  run = Trained(workdir, final, _start_lm_eval_cli(workdir, out) if wanted else None, out)
  yield run
  if run.cli is not None and run.cli.poll() is None:
    run.cli.kill()


def _start_lm_eval_cli(workdir: Path, out: Path) -> subprocess.Popen:
  """`python -m scalejax.cli.lm_eval ARGS` on two shipped tasks, with lm-eval's
  TaskManager reading only the include path (see _local_tasks) and torch hidden, as in an
  install without it; output and logs go to files in `out`."""
  shim = ('import functools, runpy, lm_eval.tasks, lm_eval.utils; '
          'lm_eval.tasks.TaskManager = functools.partial(lm_eval.tasks.TaskManager, '
          'include_defaults=False); '
          'lm_eval.utils.is_torch_available = lm_eval.utils.is_transformers_available = '
          'lambda: False; '
          'runpy.run_module("scalejax.cli.lm_eval", run_name="__main__", alter_sys=True)')
  argv = ['--model', 'scalejax', '--model_args', f'workdir={workdir},batch_size={BATCH}',
          '--tasks', f'{MC},{PPL}', '--include_path', TASKS, '--output_path', str(out)]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  with open(out / 'stdout', 'w') as stdout, open(out / 'stderr', 'w') as stderr:
    return subprocess.Popen([sys.executable, '-c', shim, *argv], cwd=ROOT, env=env,
                            stdout=stdout, stderr=stderr, text=True)


@pytest.fixture(scope='module')
def model(trained):
  """The hand computations, from the run's last checkpoint."""
  cfg, graphdef, params, tokenizer = load_run(str(trained.workdir))
  assert cfg.train.seq_len == SEQ_LEN
  return Hand(graphdef, params, tokenizer)


class Hand:
  """The model's numbers by hand: one forward of rows padded to SEQ_LEN (not the
  harness's buckets), log_softmax, sums in float64."""

  ROWS = 8

  def __init__(self, graphdef, params, tokenizer):
    self.graphdef, self.params, self.tok = graphdef, params, tokenizer
    self.logp = jax.jit(lambda x: jax.nn.log_softmax(nnx.merge(graphdef, params)(x), -1))

  def rows(self, inputs: list[list[int]]) -> list[np.ndarray]:
    """log p(next token) [len(input), V] of each input."""
    out = []
    for i in range(0, len(inputs), self.ROWS):
      chunk = inputs[i:i + self.ROWS]
      x = np.zeros((self.ROWS, SEQ_LEN), np.int32)
      for r, inp in enumerate(chunk):
        x[r, :len(inp)] = inp
      lp = np.asarray(self.logp(x), np.float64)
      out += [lp[r, :len(inp)] for r, inp in enumerate(chunk)]
    return out

  def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of token pairs, as lm-eval's Hugging Face
    model computes it: the last SEQ_LEN + 1 tokens, the continuation's positions scored;
    a continuation longer than SEQ_LEN is a sum over SEQ_LEN chunks, each conditioned on
    everything before it."""
    flat, owner = [], []
    for i, (ctx, cont) in enumerate(pairs):
      for s in range(0, len(cont), SEQ_LEN):
        flat.append((ctx + cont[:s], cont[s:s + SEQ_LEN]))
        owner.append(i)
    lps = self.rows([(c + k)[-(SEQ_LEN + 1):-1] for c, k in flat])
    ll, greedy = [0.0] * len(pairs), [True] * len(pairs)
    for i, (_, cont), lp in zip(owner, flat, lps):
      scored = lp[len(lp) - len(cont):]
      ll[i] += sum(scored[j, t] for j, t in enumerate(cont))
      greedy[i] &= all(scored[j].argmax() == t for j, t in enumerate(cont))
    return list(zip(ll, greedy))

  def text_loglikelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
    eod = self.tok.eod_id
    return [ll for ll, _ in self.loglikelihood(
        [(self.tok.encode(c) or [eod], self.tok.encode(k)) for c, k in pairs])]

  def rolling(self, text: str) -> float:
    """log p(text) from the end-of-document token, in chunks of SEQ_LEN tokens."""
    return self.loglikelihood([([self.tok.eod_id], self.tok.encode(text))])[0][0]

  def greedy(self, prompts: list[str], until: list[str], max_tokens: int) -> list[str]:
    """Greedy continuations, all prompts a step at a time: the argmax after the last
    SEQ_LEN tokens, until a stop string (or the end-of-document byte) appears."""
    ids = [self.tok.encode(p) or [self.tok.eod_id] for p in prompts]
    outs, done = [[] for _ in prompts], [False] * len(prompts)
    stops = until + ['\0']
    for _ in range(max_tokens):
      live = [i for i in range(len(prompts)) if not done[i]]
      if not live:
        break
      for i, lp in zip(live, self.rows([(ids[i] + outs[i])[-SEQ_LEN:] for i in live])):
        outs[i].append(int(lp[-1].argmax()))
        done[i] = any(s in self.tok.decode(outs[i]) for s in stops)
    texts = []
    for out in outs:
      text = self.tok.decode(out)
      for s in stops:
        text = text.split(s)[0]
      texts.append(text)
    return texts


def _instances(kind: str, args: list[tuple]):
  from lm_eval.api.instance import Instance
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_buckets():
  assert harness.buckets(64) == (16, 32, 64)
  assert harness.buckets(100) == (16, 32, 64, 100)
  assert harness.buckets(8) == (8,)


def _hook_lm(trained) -> tuple[harness.ScalejaxLM, object]:
  """The model type on the last step's params as the hook holds them (on the run's mesh),
  and the mesh: the hook's programs, compiled once (the persistent compilation cache)."""
  run, state = trained.final['run'], trained.final['state']
  return (harness.ScalejaxLM(run.graphdef, state['params'], run.data.tokenizer, SEQ_LEN,
                             BATCH), run.mesh)


def test_loglikelihood_matches_the_hand_computation(trained, model):
  lm, mesh = _hook_lm(trained)
  verse = SHAKESPEARE.read_text()[:400]
  pairs = [('ROMEO:', ' I'), ('', 'Hello'), ('First Citizen:\n', 'Before we proceed'),
           (verse[:150], ' any further'),         # context longer than SEQ_LEN
           ('a', verse[200:300]),                 # continuation longer than SEQ_LEN
           (verse[:20], verse[20:60]), ('KING', ' RICHARD'), ('x' * 70, 'yz'),
           (verse[:3], verse[3:9]), ('To be, or not to be', ', that is the question')]
  with jax.set_mesh(mesh):
    got = lm.loglikelihood(_instances('loglikelihood', pairs))
  # lm-eval moves a context's trailing whitespace into the continuation.
  want = model.loglikelihood([
      (model.tok.encode(c.rstrip()) or [0], model.tok.encode(c[len(c.rstrip()):] + k))
      for c, k in pairs])
  for (c, k), (ll, greedy), (ll_hand, greedy_hand) in zip(pairs, got, want):
    assert abs(ll - ll_hand) < 1e-5, (c, k, ll, ll_hand)
    assert greedy == greedy_hand, (c, k)
  assert all(ll < 0 for ll, _ in got)
  # Alone in its batch (other neighbours: padding rows), a request scores the same.
  with jax.set_mesh(mesh):
    [(alone, _)] = lm.loglikelihood(_instances('loglikelihood', [pairs[3]]))
  assert alone == pytest.approx(got[3][0], abs=1e-5)


def test_generate_until_matches_a_hand_greedy_loop(trained, model):
  lm, mesh = _hook_lm(trained)
  verse = SHAKESPEARE.read_text()
  first = {'until': ['\n', ','], 'max_gen_toks': 10}
  asks = [('ROMEO:\n', first), ('KING', first), ('', first),
          (verse[:100], first),  # longer than SEQ_LEN: the window slides
          ('First', {'until': ['e'], 'max_gen_toks': 8})]  # other kwargs: another batch
  with jax.set_mesh(mesh):
    got = lm.generate_until(_instances('generate_until', asks))
  assert got[:4] == model.greedy([p for p, _ in asks[:4]], first['until'], 10)
  assert got[4:] == model.greedy(['First'], ['e'], 8)
  for (_, kw), text in zip(asks, got):
    assert not any(s in text for s in kw['until'])
    assert len(model.tok.encode(text)) <= kw['max_gen_toks']
  assert any(got)


def _mc_scores(model, docs: list[dict]) -> dict[str, float]:
  """acc and acc_norm of multiple-choice docs: the choice of highest log-likelihood, and
  of highest log-likelihood per character of the choice (lm-eval's acc_norm)."""
  acc, acc_norm = [], []
  for d in docs:
    ll = np.array(model.text_loglikelihood(
        [(f'Question: {d["question"]}\nAnswer:', ' ' + c) for c in d['choices']]))
    acc.append(ll.argmax() == d['label'])
    acc_norm.append((ll / [len(c) for c in d['choices']]).argmax() == d['label'])
  return {f'lm_eval/{MC}/acc': np.mean(acc), f'lm_eval/{MC}/acc_norm': np.mean(acc_norm)}


def _hand_scores(model) -> dict[str, float]:
  """The shipped tasks' metrics, computed from the task files by hand."""
  out = _mc_scores(model, _docs('tiny_mc'))
  texts = [d['text'] for d in _docs('tiny_ppl')]
  ll = sum(model.rolling(t) for t in texts)
  words = sum(len(re.split(r'\s+', t)) for t in texts)
  n_bytes = sum(len(t.encode()) for t in texts)
  out[f'lm_eval/{PPL}/word_perplexity'] = math.exp(-ll / words)
  out[f'lm_eval/{PPL}/byte_perplexity'] = math.exp(-ll / n_bytes)
  out[f'lm_eval/{PPL}/bits_per_byte'] = -ll / n_bytes / math.log(2)
  gen = _docs('tiny_gen')
  out[f'lm_eval/{GEN}/exact_match'] = np.mean(
      [a == d['answer'] for a, d in zip(model.greedy([d['prompt'] for d in gen], ['\n'], 8), gen)])
  return out


def _records(workdir: Path) -> list[dict]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if any(k.startswith('lm_eval/') for k in r)]


def test_training_hook_logs_the_hand_computed_scores(trained, model):
  records = _records(trained.workdir)
  assert [r['step'] for r in records] == [HOOK_EVERY, STEPS]
  hand = _hand_scores(model)  # of the final params: the checkpoint of the last step
  assert set(records[-1]) == {'step', *hand}
  for key, value in hand.items():
    assert records[-1][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert trained.final[key] == records[-1][key]
  assert 1 < hand[f'lm_eval/{PPL}/byte_perplexity'] < 256  # better than uniform bytes
  assert records[0] != records[-1]  # the params moved between the two runs


def test_scalejax_eval_command_writes_lm_eval_results(trained, model, tmp_path, monkeypatch):
  import lm_eval.utils
  # What an install without torch reports (torch is no dependency of scalejax): lm-eval
  # would import it and run its environment probes for the results' report.
  monkeypatch.setattr(lm_eval.utils, 'is_torch_available', lambda: False)
  monkeypatch.setattr(lm_eval.utils, 'is_transformers_available', lambda: False)
  out = tmp_path / 'results.json'
  fv = common.parse_flags(eval_cli.define_flags, [
      '--workdir', str(trained.workdir), '--tasks', MC, '--include_path', TASKS, '--limit', '5',
      '--batch_size', str(BATCH), '--out', str(out)])
  with contextlib.redirect_stdout(io.StringIO()):
    eval_cli.main(['scalejax-eval'], fv)
  saved = json.loads(out.read_text())
  assert saved['metrics'] == pytest.approx(_mc_scores(model, _docs('tiny_mc')[:5]))
  assert saved['results'][MC]['acc,none'] == saved['metrics'][f'lm_eval/{MC}/acc']
  assert saved['config']['model'] == 'scalejax' and saved['n-samples'][MC]['effective'] == 5


def _one_line_error(module, argv: list[str], capsys, alone: bool = True) -> str:
  """The error line of `module.run()` for this command line (exit status 1): all of
  stderr, or with `alone=False` its last line (lm-eval's command line logs before it)."""
  saved = sys.argv
  sys.argv = argv
  try:
    with pytest.raises(SystemExit) as e:
      module.run()
  finally:
    sys.argv = saved
    fv = flags.FlagValues()
    module.define_flags(fv)
    for name in fv:  # as a fresh process would not have them
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1, err
  assert ': error: ' in err[-1] and (len(err) == 1 or not alone), err
  return err[-1]


def test_bad_input_is_one_line(trained, tmp_path, monkeypatch, capsys):
  workdir = trained.workdir
  monkeypatch.setattr('lm_eval.tasks.TaskManager', _local_tasks)
  # lm-eval's command line would add a log handler bound to this test's captured stderr.
  monkeypatch.setattr('lm_eval.utils._LOGGING_CONFIGURED', True)
  base = ['scalejax-eval', '--out', str(tmp_path / 'r.json')]
  msg = _one_line_error(eval_cli, base + ['--workdir', str(tmp_path), '--tasks', MC], capsys)
  assert f'--workdir {tmp_path} is not a scalejax run (no config.json)' in msg
  msg = _one_line_error(eval_cli, base + ['--workdir', str(workdir), '--tasks', MC,
                                          '--include_path', 'no/such/dir'], capsys)
  assert '--include_path no/such/dir: no such directory' in msg
  msg = _one_line_error(eval_cli, base + ['--workdir', str(workdir), '--tasks', 'hellaswg',
                                          '--include_path', TASKS], capsys)
  assert 'unknown lm-eval task hellaswg; `scalejax-lm-eval ls tasks` lists the' in msg
  msg = _one_line_error(lm_eval_cli, [
      'scalejax-lm-eval', '--model', 'scalejax', '--model_args', f'workdir={tmp_path}',
      '--tasks', MC, '--include_path', TASKS], capsys, alone=False)
  assert 'config.json not found' in msg
  msg = _one_line_error(lm_eval_cli, [
      'scalejax-lm-eval', '--model', 'scalejax', '--model_args', f'workdir={workdir}',
      '--tasks', 'nosuchtask', '--include_path', TASKS], capsys, alone=False)
  assert 'Tasks not found: nosuchtask; `scalejax-lm-eval ls tasks` lists' in msg


def test_unknown_hook_task_fails_before_anything_is_written(tmp_path, monkeypatch):
  # (The hook's other keys: tests/test_validation.py.)
  monkeypatch.setattr('lm_eval.tasks.TaskManager', _local_tasks)
  cfg = tiny_config()
  cfg.data.update(source='text_files', path=str(SHAKESPEARE), tokenizer='byte')
  cfg.lm_eval.update(tasks=f'{MC},hellaswg', include_path=TASKS)
  with pytest.raises(ValueError, match='unknown lm-eval task hellaswg; .* lm_eval.include_path'):
    trainer.train(cfg, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_model_type_from_model_args(trained):
  workdir = trained.workdir
  from lm_eval.api.registry import get_model
  harness.register(load_run)
  cls = get_model('scalejax')
  lm = cls.create_from_arg_string(f'workdir={workdir},step={STEPS},batch_size=4',
                                  {'batch_size': 1, 'device': 'cuda:0', 'max_batch_size': None})
  assert (lm.batch_size, lm.seq_len) == (4, SEQ_LEN)  # model_args win over --batch_size
  lm = cls.create_from_arg_obj({'workdir': str(workdir)}, {'batch_size': 'auto'})
  assert lm.batch_size == harness.DEFAULT_BATCH_SIZE
  with pytest.raises(ValueError, match='no checkpoint at step 7'):
    cls.create_from_arg_obj({'workdir': str(workdir), 'step': 7})


# Last: the command has run in its subprocess since the training finished (`trained`).
@pytest.mark.subprocess
def test_lm_eval_command_line_runs_the_scalejax_model(trained):
  assert trained.cli.wait(timeout=300) == 0, (trained.cli_out / 'stderr').read_text()[-3000:]
  [path] = trained.cli_out.rglob('results_*.json')
  got = runner.flat_metrics(json.loads(path.read_text()))
  logged = _records(trained.workdir)[-1]  # the hook's scores of the same (last) params
  assert set(got) == {k for k in logged if f'/{GEN}/' not in k and k != 'step'}
  for key, value in got.items():
    assert value == pytest.approx(logged[key], rel=1e-6), key
  stdout = (trained.cli_out / 'stdout').read_text()
  assert MC in stdout and 'acc_norm' in stdout  # lm-eval's table

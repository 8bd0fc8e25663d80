"""Tests for scalejax.data: determinism, resume, packing, sharding, errors."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from scalejax.data import build_data, default_config, load_tokenizer
from scalejax.data import sources
from scalejax.data import tokenizers

from _util import SHAKESPEARE

REPO = Path(__file__).parents[1]


def _cfg(**overrides):
  cfg = default_config()
  cfg.path = str(SHAKESPEARE)
  cfg.update(overrides)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {'inputs', 'targets'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _rows(batches, key='inputs'):
  return np.concatenate([b[key] for b in batches])


# Determinism, epochs and resume.


def test_same_seed_same_batches_other_seed_other_order():
  kw = dict(seq_len=32, batch_size=8)
  a = _take(build_data(_cfg(), seed=1, **kw).train_iter, 5)
  b = _take(build_data(_cfg(), seed=1, **kw).train_iter, 5)
  c = _take(build_data(_cfg(), seed=2, **kw).train_iter, 5)
  _assert_batches_equal(a, b)
  assert not np.array_equal(_rows(a), _rows(c))
  assert a[0]['inputs'].shape == (8, 32) and a[0]['inputs'].dtype == np.int32


def test_each_epoch_is_a_new_permutation_of_the_same_windows():
  seq_len, windows = 16, 40  # 5 batches of 8 per epoch
  cfg = _cfg(max_bytes=seq_len * windows + 1, eval_fraction=0.0)
  batches = _take(build_data(cfg, seq_len=seq_len, batch_size=8,
                             seed=0).train_iter, 10)
  first, second = _rows(batches[:5]), _rows(batches[5:])
  assert not np.array_equal(first, second)
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))
  assert len({bytes(r) for r in first}) == windows


@pytest.mark.parametrize('shuffle', [True, False])
def test_resume_from_json_state_continues_the_same_stream(shuffle):
  kw = dict(seq_len=32, batch_size=4, seed=3)
  it = build_data(_cfg(shuffle=shuffle), **kw).train_iter
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  fresh = build_data(_cfg(shuffle=shuffle), **kw).train_iter
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


# Packing and splits.


def test_one_epoch_of_windows_is_the_train_stream_without_loss_or_repeat():
  seq_len, batch = 64, 16
  cfg = _cfg(shuffle=False)
  data = build_data(cfg, seq_len=seq_len, batch_size=batch, seed=0)
  raw = SHAKESPEARE.read_bytes()
  stream = np.frombuffer(raw[:int(len(raw) * 0.9)], np.uint8).astype(np.int32)
  assert data.train_tokens == len(stream)
  n = (len(stream) - 1) // seq_len
  batches = _take(data.train_iter, -(-n // batch))
  inputs, targets = _rows(batches)[:n], _rows(batches, 'targets')[:n]
  np.testing.assert_array_equal(inputs.ravel(), stream[:n * seq_len])
  np.testing.assert_array_equal(targets.ravel(), stream[1:n * seq_len + 1])
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])


def test_eval_batches_are_fixed_and_come_from_the_held_out_tail():
  kw = dict(seq_len=32, batch_size=4, seed=0)
  a, b = build_data(_cfg(), **kw), build_data(_cfg(shuffle=False), **kw)
  assert len(a.eval_batches) == 8
  _assert_batches_equal(a.eval_batches, b.eval_batches)
  raw = SHAKESPEARE.read_bytes()
  tail = np.frombuffer(raw[int(len(raw) * 0.9):], np.uint8)
  assert a.eval_tokens == len(tail)
  np.testing.assert_array_equal(_rows(a.eval_batches).ravel(),
                                tail[:8 * 4 * 32])


@pytest.mark.parametrize('source', ['text_files', 'synthetic'])
def test_processes_get_disjoint_slices_that_make_up_the_global_batch(source):
  kw = dict(seq_len=16, batch_size=8, seed=5)
  whole = build_data(_cfg(source=source), **kw)
  parts = [build_data(_cfg(source=source), process_index=i, process_count=2,
                      **kw) for i in range(2)]
  halves = [_take(p.train_iter, 4) for p in parts]
  assert halves[0][0]['inputs'].shape == (4, 16)
  for w, h0, h1 in zip(_take(whole.train_iter, 4), *halves):
    for key in w:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), w[key])
  assert len(whole.eval_batches) == len(parts[1].eval_batches) == 8
  for w, h0, h1 in zip(whole.eval_batches, parts[0].eval_batches,
                       parts[1].eval_batches):
    np.testing.assert_array_equal(
        np.concatenate([h0['inputs'], h1['inputs']]), w['inputs'])


# Tokenizers.


def test_char_tokenizer_on_tinyshakespeare_matches_nanogpt(tmp_path):
  cfg = _cfg(tokenizer='char')
  data = build_data(cfg, seq_len=64, batch_size=12, seed=0, workdir=tmp_path)
  tok = data.tokenizer
  assert tok.vocab_size == 65
  assert (data.train_tokens, data.eval_tokens) == (1_003_854, 111_540)
  text = SHAKESPEARE.read_text()[:500]
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode('\n !') == [0, 1, 2]  # sorted characters, like nanoGPT
  assert next(data.train_iter)['inputs'].max() < 65
  # The sampler rebuilds it from the workdir alone, without the corpus.
  assert (tmp_path / tokenizers.CHAR_VOCAB_FILE).is_file()
  again = load_tokenizer(_cfg(tokenizer='char', path='/no/such/corpus'),
                         tmp_path)
  assert again.chars == tok.chars
  with pytest.raises(ValueError, match='not in the 65-character vocabulary'):
    tok.encode('€')


def test_byte_tokenizer_round_trip_and_lossless_bytes():
  tok = tokenizers.ByteTokenizer()
  text = 'héllo wörld ✓\n'
  ids = tok.encode(text)
  assert tok.vocab_size == 256 and max(ids) < 256
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode_array(text), ids)
  assert tok.decode([0xff, ord('a')]) == '\ufffda'  # errors='replace'


def test_train_spm_command_and_sentencepiece_pipeline(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(SHAKESPEARE.read_text()[:100_000])
  prefix = tmp_path / 'spm' / 'tiny'
  subprocess.run(
      [sys.executable, '-m', 'scalejax.cli.train_spm', '--input',
       str(corpus), '--vocab_size', '200', '--model_prefix', str(prefix)],
      cwd=REPO, check=True, capture_output=True)
  cfg = _cfg(path=str(corpus), tokenizer='sentencepiece',
             spm_model=str(prefix) + '.model')
  data = build_data(cfg, seq_len=32, batch_size=4, seed=0)
  tok = data.tokenizer
  assert tok.vocab_size == 200 and tok.name == 'sentencepiece'
  text = corpus.read_text()[:1000]
  assert tok.decode(tok.encode(text)) == text
  assert data.train_tokens < 90_000  # pieces are longer than characters
  assert 0 <= next(data.train_iter)['inputs'].min()
  assert next(data.train_iter)['inputs'].max() < 200
  assert len(data.eval_batches) == 8


def test_synthetic_source_is_seeded_and_learnable():
  a = sources.synthetic_tokens(50_000, 64, seed=0)
  b = sources.synthetic_tokens(50_000, 64, seed=0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sources.synthetic_tokens(50_000, 64, seed=1))
  assert a.min() >= 0 and a.max() < 64
  # A bigram table predicts most next tokens.
  counts = np.zeros((64, 64))
  np.add.at(counts, (a[:-1], a[1:]), 1)
  assert counts.max(axis=1).sum() / counts.sum() > 0.9
  data = build_data(_cfg(source='synthetic', synthetic_vocab=64), seq_len=16,
                    batch_size=4, seed=0)
  assert data.tokenizer.vocab_size == 64
  assert next(data.train_iter)['inputs'].max() < 64


# TFDS, prepared locally as array_record without TensorFlow.

TFDS_NAME = 'scalejax_tiny_docs'


def _tfds_doc(split, i):
  return f'{split} doc {i}: ' + 'la ' * (i % 11) + 'é.'


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip('tensorflow_datasets')
  tfds.disable_progress_bar()

  class ScalejaxTinyDocs(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples('train', 300),
              'validation': self._generate_examples('validation', 60)}

    def _generate_examples(self, split, n):
      for i in range(n):
        yield i, {'text': _tfds_doc(split, i)}

  data_dir = tmp_path_factory.mktemp('tfds')
  ScalejaxTinyDocs(data_dir=data_dir,
                   file_format='array_record').download_and_prepare()
  return data_dir


def _tfds_cfg(tfds_dir, **overrides):
  return _cfg(source='tfds', tfds_name=TFDS_NAME, tfds_data_dir=str(tfds_dir),
              **overrides)


def test_tfds_eval_windows_are_the_documents_joined_by_eod(tfds_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data = build_data(_tfds_cfg(tfds_dir), seq_len=16, batch_size=4, seed=0)
  docs = tfds.data_source(TFDS_NAME, split='validation', data_dir=tfds_dir,
                          download=False)
  stream = b''.join(d['text'] + b'\0' for d in docs)
  windows = _rows(data.eval_batches)  # int32[8*4, 16]
  assert len(data.eval_batches) == 8
  assert data.eval_tokens == 8 * 4 * 17
  targets = _rows(data.eval_batches, 'targets')
  got = np.concatenate([windows, targets[:, -1:]], axis=1).ravel()
  assert bytes(got.astype(np.uint8)) == stream[:len(got)]


def test_tfds_train_resume_and_sharding(tfds_dir):
  kw = dict(seq_len=16, batch_size=4, seed=7)
  it = build_data(_tfds_cfg(tfds_dir), **kw).train_iter
  # Past the first 1024-window shuffle buffer, where the packer's saved
  # state points inside a document.
  _take(it, 300)
  state = json.loads(json.dumps(it.get_state()))
  assert state['parent_window_start_state']['remainder_slices'] != {
      'tokens': [-1, -1]}
  expected = _take(it, 5)
  fresh = build_data(_tfds_cfg(tfds_dir), **kw).train_iter
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)

  whole = _take(build_data(_tfds_cfg(tfds_dir), **kw).train_iter, 3)
  halves = [_take(build_data(_tfds_cfg(tfds_dir), process_index=i,
                             process_count=2, **kw).train_iter, 3)
            for i in range(2)]
  for w, h0, h1 in zip(whole, *halves):
    np.testing.assert_array_equal(
        np.concatenate([h0['inputs'], h1['inputs']]), w['inputs'])
  other = _take(build_data(_tfds_cfg(tfds_dir), **{**kw, 'seed': 8})
                .train_iter, 3)
  assert not np.array_equal(_rows(whole), _rows(other))


def test_tfds_char_tokenizer_gets_an_eod_character(tfds_dir, tmp_path):
  data = build_data(_tfds_cfg(tfds_dir, tokenizer='char'), seq_len=16,
                    batch_size=4, seed=0, workdir=tmp_path)
  tok = data.tokenizer
  assert tok.eod_id is not None and tok.chars[tok.eod_id] == '\0'
  assert 'é' in tok.chars
  assert next(data.train_iter)['inputs'].max() < tok.vocab_size


def test_tfds_errors_say_what_to_do(tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='not prepared.*tfds build'):
    build_data(_tfds_cfg(tmp_path), seq_len=16, batch_size=4, seed=0)
  with pytest.raises(ValueError, match="no feature 'body'.*tfds_text_key"):
    build_data(_tfds_cfg(tfds_dir, tfds_text_key='body'), seq_len=16,
               batch_size=4, seed=0)
  with pytest.raises(ValueError, match="no split 'test'"):
    build_data(_tfds_cfg(tfds_dir, tfds_eval_split='test'), seq_len=16,
               batch_size=4, seed=0)
  with pytest.raises(ValueError, match='fewer tokens than one batch'):
    build_data(_tfds_cfg(tfds_dir), seq_len=512, batch_size=8, seed=0)


# Clear errors.


def _build(cfg, **kw):
  return build_data(cfg, **{'seq_len': 16, 'batch_size': 4, 'seed': 0, **kw})


def test_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist; set data.path'):
    _build(_cfg(path=str(tmp_path / 'missing.txt')))
  with pytest.raises(FileNotFoundError, match='matches no files'):
    _build(_cfg(path=str(tmp_path / '*.txt')))
  with pytest.raises(FileNotFoundError, match='data.path is empty'):
    _build(_cfg(path=''))
  with pytest.raises(FileNotFoundError, match='holds no files'):
    _build(_cfg(path=str(tmp_path)))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='corpus is empty'):
    _build(_cfg(path=str(tmp_path / 'empty.txt')))


def test_too_short_splits(tmp_path):
  short = tmp_path / 'short.txt'
  short.write_text('x' * 12)
  with pytest.raises(ValueError, match='train split has 10 tokens.*seq_len'):
    _build(_cfg(path=str(short)))
  with pytest.raises(ValueError, match='eval split has .* than one batch'):
    _build(_cfg(max_bytes=600))  # eval: 60 < 4*16+1


def test_directory_and_glob_read_sorted_files(tmp_path):
  (tmp_path / 'b.txt').write_text('B' * 100)
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'a.txt').write_text('A' * 100)
  (tmp_path / 'a.txt').write_text('a' * 100)
  read = sources.read_text_files
  assert read(str(tmp_path)) == 'a' * 100 + 'B' * 100 + 'A' * 100
  assert read(str(tmp_path / '*.txt')) == 'a' * 100 + 'B' * 100
  assert read(str(tmp_path), max_bytes=150) == 'a' * 100 + 'B' * 50


@pytest.mark.parametrize('tokenizer', ['char', 'sentencepiece'])
def test_undecodable_bytes_name_file_and_offset(tmp_path, tokenizer):
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(b'hello world\n' * 10 + b'\xff\xfe' + b'more text\n' * 10)
  with pytest.raises(ValueError, match=r'bad\.txt: not valid UTF-8 at byte '
                     r'offset 120.*tokenizer=byte'):
    _build(_cfg(path=str(bad), tokenizer=tokenizer, spm_model='unused'))
  # The byte tokenizer takes any bytes.
  data = _build(_cfg(path=str(bad), eval_fraction=0.0))
  assert data.train_tokens == bad.stat().st_size


def test_max_bytes_never_splits_a_character(tmp_path):
  f = tmp_path / 'utf8.txt'
  f.write_text('é' * 100)  # 2 bytes each
  assert sources.read_text_files(str(f), max_bytes=51) == 'é' * 25


def test_name_and_shape_errors(tmp_path):
  with pytest.raises(ValueError,
                     match='Unknown data.source .*text_files, tfds, synthetic'):
    _build(_cfg(source='csv'))
  with pytest.raises(ValueError, match='Unknown data.tokenizer .*byte, char, '
                     'sentencepiece'):
    _build(_cfg(tokenizer='bpe'))
  with pytest.raises(ValueError, match='not divisible by process_count=3'):
    _build(_cfg(), process_count=3)
  with pytest.raises(FileNotFoundError, match='set data.spm_model'):
    _build(_cfg(tokenizer='sentencepiece', spm_model=str(tmp_path / 'x.model')))


def test_default_config_is_typed():
  cfg = default_config()
  assert cfg.source == 'text_files' and cfg.tokenizer == 'byte'
  assert cfg.eval_fraction == 0.1 and cfg.eval_batches == 8
  assert cfg.max_bytes == 0 and cfg.shuffle is True
  with pytest.raises(TypeError):
    cfg.eval_batches = 'eight'

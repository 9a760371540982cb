"""Tokenizers: CLIP BPE ids equal open_clip's; SentencePiece layout, remapping and training."""
import gzip
import importlib.util
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from mobileclip_jax import torch_compat
from mobileclip_jax.data import tokenizer as tokenizer_lib

# Building blocks of the parity corpus: each hits a different step of open_clip's pipeline.
_ASCII_WORDS = ('a photo of the dog cat sitting on table red blue man woman holding umbrella '
                'street city near beautiful sunset over mountains with and two people playing '
                'soccer field Photograph BLACK-and-white x-ray e-mail iPhone USB-C').split()
_UNICODE_WORDS = (
    'café', 'naïve', 'Straße', 'İstanbul', 'Ångström', 'ÉCOLE', 'façade', 'Ωμέγα', 'Привет', 'мир',
    '北京', '東京タワー', '日本語の写真', '한국어', '중국', 'مرحبا', 'بالعالم', 'שלום', 'हिन्दी', 'ไทย',
    '🎉', '👍🏽', '👩\u200d👩\u200d👧', '🇫🇷', '❤️', 'e\u0301te\u0301', 'n\u0303o', 'a\u0308\u0304',
    'ﬁsh', 'ﬂower', 'ＬＯＵＤ', 'ｶﾀｶﾅ', '“quoted”', '‘single’', '—', '…', '½', '²', '٣', '①',
    'ſ', '\u212a', 'ǅ', '\u00a0', '\u3000', '\u2028', '\u0085', '\u200b', '\ufeff', '\ud83d\ude00',
    '\udc80', '\x00', '\x07', '\x1b[31mred\x1b[0m', '\x7f', '\x9d')
_HTML = ('&amp;', '&lt;', '&gt;', '&#39;', '&quot;', '&nbsp;', '&eacute;', '&#x2019;', '&amp;amp;',
         '&amp;lt;b&amp;gt;', '&hellip;', '&copy;', '&bogus;', '&', '&#', '&#0;', '&AMP;',
         'P&EACUTE;REZ', '<b>bold</b>', 'AT&T', 'a&b')
_SYMBOLS = ('...', '!!!', '?!', '12345', '3.14', '1,000,000', '--', '(', ')', '"', '#hashtag',
            '@user', 'http://x.com/a?b=c&d=e', '$5', '100%', "'s", "'t", "'re", "'ve", "'m", "'ll",
            "'d", "'S", "'LL", "'ſ", "o'clock", "rock'n'roll", "don't", "It's", "''",
            '<start_of_text>', '<END_OF_TEXT>', '<start_of_text', '</w>', '\t', '\r\n', '\n', '_',
            '~^`|\\')
_SEPARATORS = (' ', ' ', ' ', '', '  ', '\n', '\t', ' \r\n ', '\u3000', '\u00a0')


def _mojibake(text: str, rng: random.Random) -> str:
  """UTF-8 text mis-decoded as a legacy single-byte encoding (what ftfy repairs)."""
  return text.encode('utf-8').decode(rng.choice(['latin-1', 'cp1252', 'macroman']),
                                     errors='replace')


def _random_text(rng: random.Random) -> str:
  """A caption-like string mixing words, unicode, entities, symbols and mojibake."""
  kind = rng.random()
  if kind < 0.05:  # Raw printable-ASCII soup: exercises the ASCII pre-tokenizer on every symbol.
    return ''.join(rng.choices([chr(c) for c in range(32, 127)], k=rng.randint(0, 60)))
  if kind < 0.08:  # Random code points from the BMP and beyond (no lone surrogates here).
    return ''.join(chr(rng.choice([rng.randint(0x20, 0xd7ff), rng.randint(0xe000, 0x2ffff)]))
                   for _ in range(rng.randint(1, 40)))
  num_pieces = rng.randint(60, 160) if rng.random() < 0.1 else rng.randint(0, 25)
  pieces = []
  for _ in range(num_pieces):
    source = rng.random()
    if source < 0.55:
      piece = rng.choice(_ASCII_WORDS)
    elif source < 0.75:
      piece = rng.choice(_UNICODE_WORDS)
    elif source < 0.85:
      piece = rng.choice(_HTML)
    elif source < 0.95:
      piece = rng.choice(_SYMBOLS)
    else:
      piece = _mojibake(rng.choice(_UNICODE_WORDS[:20]), rng)
    pieces.append(rng.choice([piece, piece, piece.upper(), piece.capitalize()]))
  return ''.join(p + rng.choice(_SEPARATORS) for p in pieces)


@pytest.fixture(scope='module')
def varied_texts() -> list[str]:
  rng = random.Random(1234)
  fixed = ['', ' ', '\n\t \u3000', 'a photo of a cat', '&amp;', '&amp;amp;', 'sÃ³',
           'âœ” No problems', '<start_of_text><end_of_text>', "it's a dog's life, isn't it?",
           'word ' * 200, '7' * 100]
  return fixed + [_random_text(rng) for _ in range(2500)]


@pytest.fixture(scope='module')
def clip_tokenizer() -> tokenizer_lib.ClipTokenizer:
  try:
    return tokenizer_lib.ClipTokenizer()
  except FileNotFoundError as e:
    pytest.skip(f'no CLIP vocabulary: {e}')


@pytest.fixture(scope='module')
def open_clip_tokenizer():
  try:
    open_clip = torch_compat.import_open_clip()
  except ImportError:
    pytest.skip('open_clip is not installed (pip install -e .[test])')
  return open_clip.get_tokenizer('MobileCLIP2-S0')


def test_clip_known_ids(clip_tokenizer):
  # OpenAI CLIP's ids for "a photo of a cat" (a=320, photo=1125, of=539, cat=2368).
  rows = clip_tokenizer('a photo of a cat', context_length=10)
  np.testing.assert_array_equal(rows, [[49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]])
  assert rows.dtype == np.int32
  assert (clip_tokenizer.vocab_size, clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id,
          clip_tokenizer.pad_token_id) == (49408, 49406, 49407, 0)
  assert clip_tokenizer.decode(rows[0]) == 'a photo of a cat'


# The whole corpus at the default length; a third of it (the costly part is ftfy, in both
# tokenizers) at a short and a long length.
@pytest.mark.parametrize('context_length, num_texts', [(77, None), (16, 900), (128, 900)])
def test_clip_ids_equal_open_clip(clip_tokenizer, open_clip_tokenizer, varied_texts,
                                  context_length, num_texts):
  texts = varied_texts[:num_texts]
  ours = clip_tokenizer(texts, context_length)
  theirs = open_clip_tokenizer(texts, context_length).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(texts), context_length)
  differ = np.flatnonzero((ours != theirs).any(axis=1))
  assert differ.size == 0, (f'{differ.size} rows differ from open_clip, first text: '
                            f'{texts[differ[0]]!r}: {ours[differ[0]]} vs {theirs[differ[0]]}')
  # The corpus must exercise truncation, padding and the non-ASCII path to mean anything.
  is_full = ours[:, -1] == clip_tokenizer.eot_token_id
  assert 0.02 < is_full.mean() < 0.9
  assert sum(not t.isascii() for t in texts) > len(texts) / 3


def test_clip_small_cache_gives_same_ids(varied_texts, open_clip_tokenizer):
  tokenizer = tokenizer_lib.ClipTokenizer(cache_size=8)  # Evicts all the time.
  texts = varied_texts[:300]
  np.testing.assert_array_equal(tokenizer(texts), open_clip_tokenizer(texts).numpy())


def test_clip_pickles(clip_tokenizer, varied_texts):
  restored = pickle.loads(pickle.dumps(clip_tokenizer))
  np.testing.assert_array_equal(restored(varied_texts[:100]), clip_tokenizer(varied_texts[:100]))


def test_call_argument_errors(clip_tokenizer):
  assert clip_tokenizer([]).shape == (0, 77)
  with pytest.raises(ValueError, match='context_length=1'):
    clip_tokenizer('a cat', context_length=1)
  with pytest.raises(TypeError, match=r'texts\[1\] is a bytes'):
    clip_tokenizer(['a cat', b'a dog'])


def test_clip_vocab_found_without_importing_torch(tmp_path):
  if importlib.util.find_spec('open_clip') is None:
    pytest.skip('open_clip is not installed')
  code = ('import sys\n'
          'from mobileclip_jax.data.tokenizer import ClipTokenizer\n'
          'assert ClipTokenizer()("a cat")[0, 2] == 2368\n'
          'heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip")]\n'
          'assert not heavy, heavy\n')
  env = {k: v for k, v in os.environ.items() if k != tokenizer_lib.CLIP_VOCAB_ENV_VAR}
  subprocess.run([sys.executable, '-c', code], check=True, env=env, cwd=tmp_path)


def test_clip_vocab_from_env_var(clip_tokenizer, monkeypatch):
  monkeypatch.setenv(tokenizer_lib.CLIP_VOCAB_ENV_VAR, clip_tokenizer.vocab_path)
  assert tokenizer_lib.find_clip_vocab() == tokenizer_lib.find_clip_vocab(clip_tokenizer.vocab_path)
  monkeypatch.setenv(tokenizer_lib.CLIP_VOCAB_ENV_VAR, '/no/such/vocab.txt.gz')
  with pytest.raises(FileNotFoundError, match=f'{tokenizer_lib.CLIP_VOCAB_ENV_VAR}=.*/no/such'):
    tokenizer_lib.ClipTokenizer()


def test_clip_vocab_not_found(monkeypatch):
  monkeypatch.delenv(tokenizer_lib.CLIP_VOCAB_ENV_VAR, raising=False)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, package=None: None)
  with pytest.raises(FileNotFoundError) as error:
    tokenizer_lib.ClipTokenizer()
  for hint in (tokenizer_lib.CLIP_VOCAB_ENV_VAR, 'open_clip package (not installed)', 'vocab_path',
               'pip install open-clip-torch'):
    assert hint in str(error.value)
  with pytest.raises(FileNotFoundError, match='/no/such/file.txt.gz'):
    tokenizer_lib.ClipTokenizer('/no/such/file.txt.gz')


def test_clip_malformed_vocab(tmp_path):
  bad_line = tmp_path / 'bad_line.txt.gz'
  bad_line.write_bytes(gzip.compress('#version: 0.2\ni n\nabc\n'.encode()))
  with pytest.raises(ValueError, match="line 3: 'abc'"):
    tokenizer_lib.ClipTokenizer(bad_line)
  not_gzip = tmp_path / 'plain.txt'
  not_gzip.write_text('#version: 0.2\ni n\n')
  with pytest.raises(ValueError, match='not a gzipped'):
    tokenizer_lib.ClipTokenizer(not_gzip)


@pytest.mark.parametrize('spec', ['', 'bpe', 'CLIP', 'clip:', 'sentencepiece', 'sentencepiece:'])
def test_get_tokenizer_bad_spec(spec):
  with pytest.raises(ValueError, match="valid forms: 'clip'"):
    tokenizer_lib.get_tokenizer(spec)


def test_get_tokenizer_specs(clip_tokenizer, sentencepiece_model):
  assert isinstance(tokenizer_lib.get_tokenizer('clip'), tokenizer_lib.ClipTokenizer)
  by_path = tokenizer_lib.get_tokenizer(f'clip:{clip_tokenizer.vocab_path}')
  assert by_path.vocab_path == clip_tokenizer.vocab_path
  path, _ = sentencepiece_model
  assert tokenizer_lib.get_tokenizer(f'sentencepiece:{path}').model_path == path
  with pytest.raises(FileNotFoundError, match='/no/such.model'):
    tokenizer_lib.get_tokenizer('sentencepiece:/no/such.model')


# ---------------------------------------------------------------------------------------------
# SentencePiece.

_SUBJECTS = ('dog cat horse bird child woman man car bicycle train boat plane pizza cake bowl '
             'laptop phone clock vase kite surfboard giraffe elephant zebra sheep').split()
_PLACES = ('street beach kitchen park field table road river city snow grass room desk '
           'mountain forest market station').split()
_ADJECTIVES = 'red small large white black old young wooden busy quiet green yellow'.split()
_VERBS = 'sitting standing running lying riding holding eating looking playing parked'.split()


def _synthetic_captions(num: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  captions = []
  for _ in range(num):
    caption = (f'a {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} '
               f'on the {rng.choice(_PLACES)}')
    if rng.random() < 0.5:
      caption += f' with {rng.randint(2, 9)} {rng.choice(_SUBJECTS)}s'
    captions.append(caption)
  return captions


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('spm') / 'sub' / 'captions.model')
  tokenizer = tokenizer_lib.train_sentencepiece(_synthetic_captions(2000), 300, path,
                                                num_threads=1)
  return path, tokenizer


def test_sentencepiece_layout(sentencepiece_model):
  _, tokenizer = sentencepiece_model
  vocab_size = tokenizer.vocab_size
  assert 100 < vocab_size <= 300
  assert (tokenizer.pad_token_id, tokenizer.sot_token_id, tokenizer.eot_token_id) == (
      0, vocab_size - 2, vocab_size - 1)
  captions = _synthetic_captions(200, seed=1) + ['', 'a dog']
  rows = tokenizer(captions, context_length=24)
  assert rows.dtype == np.int32 and rows.shape == (len(captions), 24)
  lengths = np.array([len(tokenizer.encode(c)) for c in captions])
  assert lengths.max() <= 22 and lengths[-2] == 0  # No truncation in this batch.
  assert (rows[:, 0] == tokenizer.sot_token_id).all()
  # The text towers pool at argmax(id): it must be the EOT slot, right after the text.
  np.testing.assert_array_equal(rows.argmax(axis=1), lengths + 1)
  assert (rows == tokenizer.eot_token_id).sum(axis=1).tolist() == [1] * len(captions)
  columns = np.arange(24)
  body = (columns >= 1) & (columns <= lengths[:, None])
  assert ((rows[body] >= 1) & (rows[body] < tokenizer.sot_token_id)).all()
  assert (rows[columns > lengths[:, None] + 1] == 0).all()


def test_sentencepiece_ids_follow_documented_mapping(sentencepiece_model):
  path, tokenizer = sentencepiece_model
  processor = spm.SentencePieceProcessor(model_file=path)
  assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (
      0, 1, 2, 3)
  assert processor.get_piece_size() == tokenizer.vocab_size
  unknown_char = 'a dog on the moon ☾'
  assert processor.unk_id() in processor.encode(unknown_char)
  for caption in _synthetic_captions(50, seed=2) + [unknown_char]:
    # unk (1) keeps its id; pieces p >= 4 become p - 2.
    expected = [i - 2 if i >= 4 else i for i in processor.encode(caption)]
    assert tokenizer.encode(caption) == expected


def test_sentencepiece_truncation_keeps_eot_last(sentencepiece_model):
  _, tokenizer = sentencepiece_model
  caption = ' '.join(_synthetic_captions(10, seed=3))
  ids = tokenizer.encode(caption)
  assert len(ids) > 30
  row = tokenizer(caption, context_length=8)[0]
  np.testing.assert_array_equal(row, [tokenizer.sot_token_id, *ids[:6], tokenizer.eot_token_id])


def test_sentencepiece_decode_round_trip(sentencepiece_model):
  _, tokenizer = sentencepiece_model
  captions = _synthetic_captions(100, seed=4)
  rows = tokenizer(captions)
  assert [tokenizer.decode(row) for row in rows] == captions
  assert tokenizer.pieces(rows[0][:2]) == ['<sot>', '▁a']


@pytest.mark.parametrize('layout, extra_ids', [
    (dict(pad_id=-1, unk_id=0, bos_id=1, eos_id=2), 1),  # SentencePiece's defaults: no pad.
    (dict(pad_id=0, unk_id=1, bos_id=-1, eos_id=-1), 2),  # No bos/eos: SOT, EOT appended.
    (dict(pad_id=3, unk_id=2, bos_id=1, eos_id=0), 0),  # Everything reordered.
])
def test_sentencepiece_remaps_any_special_layout(tmp_path, layout, extra_ids):
  path = str(tmp_path / 'layout.model')
  tokenizer = tokenizer_lib.train_sentencepiece(_synthetic_captions(500), 150, path, **layout)
  num_pieces = spm.SentencePieceProcessor(model_file=path).get_piece_size()
  assert tokenizer.vocab_size == num_pieces + extra_ids
  captions = _synthetic_captions(50, seed=5)
  rows = tokenizer(captions)
  lengths = np.array([len(tokenizer.encode(c)) for c in captions])
  np.testing.assert_array_equal(rows.argmax(axis=1), lengths + 1)
  assert (rows[:, 0] == tokenizer.vocab_size - 2).all() and rows.max() == tokenizer.vocab_size - 1
  assert [tokenizer.decode(row) for row in rows] == captions


def test_sentencepiece_pickles(sentencepiece_model):
  _, tokenizer = sentencepiece_model
  captions = _synthetic_captions(20, seed=6)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer))(captions),
                                tokenizer(captions))


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(ValueError, match='no non-blank captions'):
    tokenizer_lib.train_sentencepiece(['', '  '], 100, str(tmp_path / 'empty.model'))
  not_a_model = tmp_path / 'garbage.model'
  not_a_model.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='garbage.model is not a SentencePiece model'):
    tokenizer_lib.SentencePieceTokenizer(str(not_a_model))


def test_train_tokenizer_cli(tmp_path):
  captions = tmp_path / 'captions.txt'
  captions.write_text('\n'.join(_synthetic_captions(300)))
  out = tmp_path / 'cli.model'
  script = os.path.join(os.path.dirname(__file__), os.pardir, 'launch', 'train_tokenizer.py')
  result = subprocess.run(
      [sys.executable, script, f'--captions={captions}', '--vocab_size=120', f'--out={out}'],
      check=True, capture_output=True, text=True)
  vocab_size = tokenizer_lib.SentencePieceTokenizer(str(out)).vocab_size
  assert f'vocab_size {vocab_size} (asked 120)' in result.stdout
  assert "pieces ['▁a'" in result.stdout

"""Text tokenizers: CLIP byte-level BPE (id-exact with open_clip) and SentencePiece.

Both tokenizers map a batch of strings to a padded int32 array [N, context_length] laid out as
`SOT, ids..., EOT, 0, 0, ...`. A text longer than the context is cut so that EOT still sits in
the last slot. The text towers pool at argmax(token id), so every tokenizer here gives EOT the
largest id of its vocabulary; padding is 0.

Configs name a tokenizer with a spec string, see `get_tokenizer`:
  'clip'                            CLIP BPE with the vocabulary found automatically
  'clip:/path/bpe_vocab.txt.gz'     CLIP BPE with that vocabulary file
  'sentencepiece:/path/model.model' a SentencePiece model (e.g. from `train_sentencepiece`)
"""
import abc
import functools
import gzip
import html
import importlib.util
import io
import itertools
import os
import re
from typing import Iterable, Iterator, Sequence

from etils import epath
import ftfy
import numpy as np
import regex
import sentencepiece as spm

DEFAULT_CONTEXT_LENGTH = 77
CLIP_VOCAB_ENV_VAR = 'MOBILECLIP_JAX_BPE_VOCAB'
CLIP_VOCAB_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'
# CLIP's vocabulary: 256 byte symbols, the same with the end-of-word mark, 48894 merges, SOT, EOT.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = '</w>'
_CLIP_SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')
# CLIP's pre-tokenizer, after its special tokens: contractions, letter runs, single digits, and
# runs of everything else but whitespace. IGNORECASE matters even on lower-cased text, e.g. "'ſ"
# matches "'s".
_CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same split on cleaned ASCII text (lower-case, no whitespace but ' '), where \p{L} is [a-z] and
# \p{N} is [0-9]: the stdlib engine runs it ~2x faster than `regex` runs the Unicode pattern.
_CLIP_ASCII_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""
# Default bound on the per-word BPE cache of a ClipTokenizer (entries are short tuples).
_CLIP_CACHE_SIZE = 1 << 20


class Tokenizer(abc.ABC):
  """A text tokenizer with CLIP's layout: SOT, ids, EOT, padding (0); EOT is the largest id."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the text tower's embedding table size); ids are in [0, vocab_size)."""

  @property
  @abc.abstractmethod
  def sot_token_id(self) -> int:
    """Id of the start-of-text token, first in every row."""

  @property
  @abc.abstractmethod
  def eot_token_id(self) -> int:
    """Id of the end-of-text token, the largest id of the vocabulary."""

  @property
  def pad_token_id(self) -> int:
    """Id that fills a row after EOT."""
    return 0

  @abc.abstractmethod
  def _encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts without SOT/EOT: (ids of all texts concatenated int32, lengths [N] int64)."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids: a leading SOT is dropped and decoding stops at the first EOT."""

  def encode(self, text: str) -> list[int]:
    """Ids of one text, without SOT/EOT and without truncation."""
    flat, _ = self._encode_flat([text])
    return flat.tolist()

  def __call__(self, texts: str | Sequence[str],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """Tokenizes and pads texts.

    Args:
      texts: one string or a sequence of N strings.
      context_length: row length, at least 2 (room for SOT and EOT).

    Returns:
      int32 [N, context_length] (N = 1 for a single string): SOT, the text's ids, EOT, then
      pad_token_id. A text with more than context_length - 2 ids keeps its first
      context_length - 2 ids, so EOT lands in the last slot.
    """
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f'context_length={context_length} leaves no room for SOT and EOT; use >= 2.')
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f'texts[{i}] is a {type(text).__name__}, not a str; decode bytes with '
                        '.decode("utf-8") before tokenizing.')
    flat, lengths = self._encode_flat(texts)
    return _pack_rows(flat, lengths, self.sot_token_id, self.eot_token_id, self.pad_token_id,
                      context_length)


def _pack_rows(flat: np.ndarray, lengths: np.ndarray, sot: int, eot: int, pad: int,
               context_length: int) -> np.ndarray:
  """Lays out concatenated ids as rows [SOT, ids[:context_length - 2], EOT, pad...], int32."""
  body = context_length - 2
  kept = np.minimum(lengths, body)
  if flat.size > kept.sum():  # Drop the tail of each over-long text.
    starts = np.cumsum(lengths) - lengths
    position_in_text = np.arange(flat.size) - np.repeat(starts, lengths)
    flat = flat[position_in_text < body]
  rows = np.full((len(lengths), context_length), pad, np.int32)
  rows[:, 0] = sot
  columns = np.arange(context_length)
  rows[(columns >= 1) & (columns <= kept[:, None])] = flat
  rows[np.arange(len(lengths)), kept + 1] = eot
  return rows


def _ids_before_eot(ids: Sequence[int] | np.ndarray, sot: int, eot: int) -> list[int]:
  """The ids of one row between a leading SOT and the first EOT."""
  ids = [int(i) for i in ids]
  if ids and ids[0] == sot:
    ids = ids[1:]
  if eot in ids:
    ids = ids[:ids.index(eot)]
  return ids


# ---------------------------------------------------------------------------------------------
# CLIP BPE.


def find_clip_vocab(vocab_path: str | os.PathLike[str] | None = None) -> epath.Path:
  """Locates CLIP's BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz format).

  Order: `vocab_path` when given; else the file named by the env var MOBILECLIP_JAX_BPE_VOCAB;
  else the copy bundled with an installed open_clip package (found without importing it, so
  torch is not loaded). Nothing is downloaded.

  Raises:
    FileNotFoundError: the named file does not exist, or no vocabulary was found; the message
      lists where it looked and how to fix it.
  """
  if vocab_path is not None:
    path = epath.Path(vocab_path)
    if not path.exists():
      raise FileNotFoundError(f'CLIP BPE vocabulary {os.fspath(vocab_path)!r} does not exist. '
                              f'Pass the path of a {CLIP_VOCAB_FILENAME} file.')
    return path
  env_path = os.environ.get(CLIP_VOCAB_ENV_VAR)
  if env_path:
    path = epath.Path(env_path)
    if not path.exists():
      raise FileNotFoundError(f'{CLIP_VOCAB_ENV_VAR}={env_path!r} names no file. Point it at a '
                              f'{CLIP_VOCAB_FILENAME} file, or unset it to use open_clip\'s copy.')
    return path
  looked = [f'env var {CLIP_VOCAB_ENV_VAR} (unset)']
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    looked.append('the open_clip package (not installed)')
  else:
    path = epath.Path(list(spec.submodule_search_locations)[0]) / CLIP_VOCAB_FILENAME
    if path.exists():
      return path
    looked.append(f'{path} (missing)')
  raise FileNotFoundError(
      f'No CLIP BPE vocabulary ({CLIP_VOCAB_FILENAME}) found; looked at: {"; ".join(looked)}. '
      f'Fix: pass its path (ClipTokenizer(vocab_path=...) or the spec "clip:/path/to/'
      f'{CLIP_VOCAB_FILENAME}"), set {CLIP_VOCAB_ENV_VAR}=/path/to/{CLIP_VOCAB_FILENAME}, or '
      '`pip install open-clip-torch`, which bundles it.')


def _byte_symbols() -> list[str]:
  """CLIP's printable stand-in for each byte value: symbols[b] is one character.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) take
  the characters from U+0100 on, in byte order. BPE then never sees whitespace or controls.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  symbols = [''] * 256
  for b in printable:
    symbols[b] = chr(b)
  others = [b for b in range(256) if not symbols[b]]
  for n, b in enumerate(others):
    symbols[b] = chr(256 + n)
  return symbols


def _read_clip_merges(path: epath.Path) -> list[tuple[str, str]]:
  """The BPE merges of a CLIP vocabulary file, in priority order (at most 48894, like open_clip)."""
  try:
    text = gzip.decompress(path.read_bytes()).decode('utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'CLIP BPE vocabulary {path} is not a gzipped UTF-8 text file ({e}); expected '
                     f'the {CLIP_VOCAB_FILENAME} format.') from e
  # Line 0 is a version header; each following line is one merge "left right".
  lines = text.rstrip('\n').split('\n')[1:1 + _CLIP_NUM_MERGES]
  merges = []
  for line_number, line in enumerate(lines, start=2):
    pair = line.split()
    if len(pair) != 2:
      raise ValueError(f'CLIP BPE vocabulary {path}, line {line_number}: {line!r} is not a merge '
                       f'"left right"; expected the {CLIP_VOCAB_FILENAME} format.')
    merges.append((pair[0], pair[1]))
  if not merges:
    raise ValueError(f'CLIP BPE vocabulary {path} holds no merges; expected the '
                     f'{CLIP_VOCAB_FILENAME} format.')
  return merges


def _clean_clip_text(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, whitespace collapse, lower-case."""
  # ftfy and html.unescape leave printable ASCII without '&' unchanged (every ftfy fix targets
  # non-ASCII, control characters or line breaks). Most captions skip them, which makes the
  # whole tokenizer ~4x faster.
  if not (text.isascii() and text.isprintable() and '&' not in text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


class ClipTokenizer(Tokenizer):
  """CLIP's byte-level BPE tokenizer, with exactly the ids of open_clip's SimpleTokenizer.

  That is the tokenizer of every released MobileCLIP/MobileCLIP2 and OpenAI CLIP model:
  vocabulary 49408, SOT 49406, EOT 49407, pad 0. Text is cleaned (ftfy, HTML unescape,
  whitespace, lower-case), split with CLIP's regex, each piece's UTF-8 bytes are BPE-merged. The
  literal strings '<start_of_text>' and '<end_of_text>' in a text become SOT/EOT, as in open_clip.

  BPE results are cached per word (bounded; the cache is emptied when it reaches `cache_size`).
  Instances pickle, so they can be sent to data-loader workers.
  """

  def __init__(self, vocab_path: str | os.PathLike[str] | None = None,
               cache_size: int = _CLIP_CACHE_SIZE):
    """Loads the vocabulary.

    Args:
      vocab_path: a CLIP vocabulary file (bpe_simple_vocab_16e6.txt.gz format); None finds one
        with `find_clip_vocab`.
      cache_size: most words whose BPE ids are kept.
    """
    self.vocab_path = os.fspath(find_clip_vocab(vocab_path))
    merges = _read_clip_merges(epath.Path(self.vocab_path))
    self._byte_symbols = _byte_symbols()
    self._symbol_bytes = {symbol: b for b, symbol in enumerate(self._byte_symbols)}
    # The vocabulary starts with the byte symbols in code point order (not byte order).
    byte_vocab = sorted(self._byte_symbols)
    symbols = [*byte_vocab, *(s + _END_OF_WORD for s in byte_vocab),
               *(left + right for left, right in merges), *_CLIP_SPECIAL_TOKENS]
    self._symbols = symbols
    self._symbol_ids = {symbol: i for i, symbol in enumerate(symbols)}
    self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._special_ids = {token: (self._symbol_ids[token],) for token in _CLIP_SPECIAL_TOKENS}
    self._pattern = regex.compile(
        '|'.join([*map(regex.escape, _CLIP_SPECIAL_TOKENS), _CLIP_WORD_PATTERN]), regex.IGNORECASE)
    self._ascii_pattern = re.compile(
        '|'.join([*map(re.escape, _CLIP_SPECIAL_TOKENS), _CLIP_ASCII_WORD_PATTERN]))
    self._cache_size = cache_size
    self._cache: dict[str, tuple[int, ...]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self._symbols)

  @property
  def sot_token_id(self) -> int:
    return self._symbol_ids[_CLIP_SPECIAL_TOKENS[0]]

  @property
  def eot_token_id(self) -> int:
    return self._symbol_ids[_CLIP_SPECIAL_TOKENS[1]]

  def _bpe(self, word: str) -> list[str]:
    """Merges a word's byte symbols; the last symbol carries the end-of-word mark."""
    parts = [*word[:-1], word[-1] + _END_OF_WORD]
    ranks = self._merge_ranks
    while len(parts) > 1:
      best_rank, best_pair = None, None
      for pair in zip(parts, parts[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best_pair = rank, pair
      if best_pair is None:
        break
      left, right = best_pair
      merged, i = [], 0
      while i < len(parts):  # Merge every occurrence, scanning left to right.
        if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
          merged.append(left + right)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _word_ids(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized word (cache miss path)."""
    ids = self._special_ids.get(word)
    if ids is None:
      byte_symbols = self._byte_symbols
      symbols = ''.join([byte_symbols[b] for b in word.encode('utf-8')])
      ids = tuple(self._symbol_ids[s] for s in self._bpe(symbols))
    if len(self._cache) >= self._cache_size:
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def _encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    cache, word_ids = self._cache, self._word_ids
    findall, ascii_findall = self._pattern.findall, self._ascii_pattern.findall
    flat: list[int] = []
    lengths = np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
      start = len(flat)
      text = _clean_clip_text(text)
      for word in (ascii_findall if text.isascii() else findall)(text):
        flat.extend(cache.get(word) or word_ids(word))
      lengths[i] = len(flat) - start
    return np.asarray(flat, np.int32), lengths

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids (lower-cased and re-spaced by BPE; not the original string)."""
    ids = _ids_before_eot(ids, self.sot_token_id, self.eot_token_id)
    symbols = ''.join(self._symbols[i] for i in ids).replace(_END_OF_WORD, ' ')
    data = bytes(self._symbol_bytes.get(c, ord(' ')) for c in symbols)  # ' ' ends a word.
    return data.decode('utf-8', errors='replace').strip()


# ---------------------------------------------------------------------------------------------
# SentencePiece.


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with ids remapped to CLIP's layout (pad 0, SOT and EOT the largest).

  Id mapping from the model's ids (P pieces, with optional pad/bos/eos control pieces):
    - the model's pad piece (or, if it has none, a new slot) -> 0;
    - every other piece, in the model's order -> 1, 2, ... (unk included);
    - bos -> SOT = vocab_size - 2, eos -> EOT = vocab_size - 1 (new ids when the model has none).
  For a model from `train_sentencepiece` (pad 0, unk 1, bos 2, eos 3, pieces 4...) that is: pad 0,
  unk 1, piece p -> p - 2, SOT = P - 2, EOT = P - 1, vocab_size = P.

  Text goes to SentencePiece as is (its model normalizes, NFKC by default); no lower-casing.
  """

  def __init__(self, model_path: str | os.PathLike[str]):
    """Loads a SentencePiece model file (local or any path etils.epath can read)."""
    path = epath.Path(model_path)
    if not path.exists():
      raise FileNotFoundError(f'SentencePiece model {os.fspath(model_path)!r} does not exist; '
                              'train one with launch/train_tokenizer.py or pass an existing '
                              '.model file.')
    self.model_path = os.fspath(model_path)
    try:
      self._processor = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except RuntimeError as e:
      raise ValueError(f'{self.model_path} is not a SentencePiece model ({e}).') from e
    num_pieces = self._processor.get_piece_size()
    pad, bos, eos = self._processor.pad_id(), self._processor.bos_id(), self._processor.eos_id()
    plain = [i for i in range(num_pieces) if i not in (pad, bos, eos)]
    self._vocab_size = len(plain) + 3  # pad, pieces, SOT, EOT
    self._to_ours = np.zeros(num_pieces, np.int32)
    self._to_ours[plain] = np.arange(1, len(plain) + 1)
    self._to_model = np.full(self._vocab_size, -1, np.int64)  # -1: no piece (pad, SOT, EOT)
    self._to_model[1:len(plain) + 1] = plain
    for model_id, our_id in ((pad, 0), (bos, self.sot_token_id), (eos, self.eot_token_id)):
      if model_id >= 0:
        self._to_ours[model_id] = our_id

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def sot_token_id(self) -> int:
    return self._vocab_size - 2

  @property
  def eot_token_id(self) -> int:
    return self._vocab_size - 1

  def _encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    model_ids = self._processor.encode(list(texts))  # The list is encoded in C++.
    lengths = np.fromiter(map(len, model_ids), np.int64, len(model_ids))
    flat = np.fromiter(itertools.chain.from_iterable(model_ids), np.int32, int(lengths.sum()))
    return self._to_ours[flat], lengths

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    model_ids = self._to_model[_ids_before_eot(ids, self.sot_token_id, self.eot_token_id)]
    return self._processor.decode(model_ids[model_ids >= 0].tolist())

  def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
    """The SentencePiece piece of each id ('▁' marks a word start); '<pad>', '<sot>', '<eot>'."""
    named = {self.pad_token_id: '<pad>', self.sot_token_id: '<sot>', self.eot_token_id: '<eot>'}
    return [named.get(int(i)) or self._processor.id_to_piece(int(self._to_model[i])) for i in ids]


def train_sentencepiece(captions: Iterable[str], vocab_size: int,
                        model_path: str | os.PathLike[str], **options) -> SentencePieceTokenizer:
  """Trains a BPE SentencePiece model on captions and writes it to model_path.

  Args:
    captions: any iterable of caption strings (read once, streamed to the trainer); blank ones
      are skipped.
    vocab_size: vocabulary size of the resulting tokenizer, SOT and EOT included. It is an upper
      bound: a corpus with fewer distinct merges yields fewer (hard_vocab_limit=False).
    model_path: where the .model file goes (parent folders are created).
    **options: SentencePieceTrainer options that override the defaults here, e.g.
      `input_sentence_size=2_000_000, shuffle_input_sentence=True` to subsample a big corpus,
      `normalization_rule_name='nmt_nfkc_cf'` to case-fold, `byte_fallback=True`.

  Returns:
    The trained tokenizer (pad 0, SOT vocab_size - 2, EOT vocab_size - 1, see
    SentencePieceTokenizer).
  """
  num_captions = 0

  def nonblank_captions() -> Iterator[str]:
    nonlocal num_captions
    for caption in captions:
      if caption.strip():
        num_captions += 1
        yield caption

  settings = dict(model_type='bpe', vocab_size=vocab_size, hard_vocab_limit=False,
                  character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                  num_threads=os.cpu_count() or 1, minloglevel=2)
  settings.update(options)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=nonblank_captions(), model_writer=model,
                                   **settings)
  except RuntimeError as e:
    if num_captions == 0:
      raise ValueError('train_sentencepiece got no non-blank captions; check the caption '
                       'source.') from e
    raise
  path = epath.Path(model_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.getvalue())
  return SentencePieceTokenizer(path)


# ---------------------------------------------------------------------------------------------
# Spec strings.

@functools.lru_cache(maxsize=None)
def _clip_tokenizer(vocab_path: str | None) -> ClipTokenizer:
  """One per vocabulary and process: a published file, read in 0.1 s, that every evaluator,
  loader and captioner of a run would read again (a SentencePiece model may be retrained in
  place, so it is read each time)."""
  return ClipTokenizer(vocab_path)


_SPEC_FORMS = ("'clip' (vocabulary found automatically), "
               f"'clip:/path/to/{CLIP_VOCAB_FILENAME}', 'sentencepiece:/path/to/model.model'")


def get_tokenizer(spec: str = 'clip') -> Tokenizer:
  """Builds the tokenizer named by a config spec string.

  Args:
    spec: 'clip', 'clip:VOCAB_PATH' or 'sentencepiece:MODEL_PATH'. Only the first ':' separates,
      so paths such as gs://... work.

  Raises:
    ValueError: the spec has none of these forms.
  """
  kind, separator, path = spec.partition(':')
  if kind == 'clip' and (path or not separator):
    return _clip_tokenizer(path or None)
  if kind == 'sentencepiece' and path:
    return SentencePieceTokenizer(path)
  raise ValueError(f'Unknown tokenizer spec {spec!r}; valid forms: {_SPEC_FORMS}.')

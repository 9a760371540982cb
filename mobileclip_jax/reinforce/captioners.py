"""Synthetic captions: the captioner interface, and quality control of near-duplicate captions.

A captioner maps a batch of `CaptionInput`s (the decoded image, the sample's json labels and
the synthetic captions the source already has) to `num_captions` captions per input, which go to
its own syn.json key. Built in: 'existing' takes the source's captions under its key as they are;
'coca' samples them from a CoCa model trained here or converted from open_clip
(coca_captioner.py); plugins register others with `register_captioner` (the demo world's 'demo'
captioner: mobileclip_jax/demo/sources.py).

A run takes a list of captioner specs (`launch/reinforce.py --captioners=SPEC,SPEC,...`):
  KIND[:TAG][:key=value...]          e.g. existing, demo:temperature=0.5, demo:a:temperature=0.5
  KIND:TAG=PATH[:key=value...]       kinds that load a model, e.g. coca:mscoco=/runs/coca:top_p=0.95
Captioner KIND writes syn.json key `syn_text_<TAG>` (DFNDR's layout, one key per captioner), or
`syn_text` without a TAG (DataCompDR's single key); option values are Python literals.

Quality control (seed-improvements.md part b): independently sampled captions of one image are
often the same sentence, which wastes caption slots and their teacher embeddings. Caption j of
an image is an *offender* if it is empty after normalization (e.g. a generation that ended
before its first word), or equals an earlier kept caption after normalization (lower-case,
punctuation removed, whitespace collapsed), or its cosine similarity with an earlier kept
caption, averaged over the teachers, is above a threshold. Offenders are regenerated and
re-checked, up to a number of rounds; captions are kept greedily in order, so once no offender
is left every pair of an image's captions is below the threshold. `CaptionStats` measures a
caption set before and after: empty, exact and near duplicate rates, the mean pairwise cosine
and distinct-n.
"""
import abc
import ast
import dataclasses
import re
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mobileclip_jax import plugins
from mobileclip_jax.data import errors
from mobileclip_jax.data.errors import CorruptSampleError

# Reasons for CorruptSampleError raised by captioners' `check`.
TOO_FEW_CAPTIONS = 'too_few_captions'
DISTINCT_N = (1, 2)
SYN_KEY = 'syn_text'  # DataCompDR's key; a captioner with a TAG writes SYN_KEY + '_' + TAG.


@dataclasses.dataclass
class CaptionInput:
  """What a captioner may look at for one sample.

  Attributes:
    shard, key, uid: where the sample came from (for error messages).
    image: the decoded RGB image.
    labels: the sample's json member as a dict ({} when it has none).
    existing: the source's synthetic captions by syn.json key ({} when it has none).
  """
  shard: str
  key: str
  uid: str
  image: Image.Image
  labels: Dict[str, Any]
  existing: Dict[str, List[str]] = dataclasses.field(default_factory=dict)


class Captioner(abc.ABC):
  """Makes synthetic captions for a batch of samples."""
  name: str = ''
  # False when asking again cannot give a different caption (nothing to regenerate).
  can_regenerate: bool = True
  # The syn.json key it writes (set by `make_captioner` from the spec's TAG).
  syn_key: str = SYN_KEY
  # The tokenizer spec of a captioning model (its vocabulary bounds what it can write), refused
  # by the generation when it differs from the student's; None for captioners without one.
  tokenizer: Optional[str] = None

  def check(self, item: CaptionInput, num_captions: int) -> None:
    """Raises CorruptSampleError if this sample cannot be captioned (called per sample)."""
    del item, num_captions

  @abc.abstractmethod
  def __call__(self, batch: Sequence[CaptionInput], num_captions: int,
               rng: np.random.Generator) -> List[List[str]]:
    """`num_captions` captions for each input: a list (batch) of lists of strings."""

  def describe(self) -> Dict[str, Any]:
    """The captioner's settings, recorded with the dataset."""
    return {'name': self.name}


class ExistingCaptioner(Captioner):
  """The synthetic captions the source already has under its key, the first `num_captions`."""
  name = 'existing'
  can_regenerate = False

  def check(self, item: CaptionInput, num_captions: int) -> None:
    texts = item.existing.get(self.syn_key)
    if texts is None:
      raise CorruptSampleError(item.shard, item.key, errors.MISSING_MEMBER,
                               f'no syn.json[{self.syn_key!r}] captions to keep '
                               '(--captioners=existing needs them; use a captioner that makes '
                               'captions instead)')
    if len(texts) < num_captions:
      raise CorruptSampleError(item.shard, item.key, TOO_FEW_CAPTIONS,
                               f'syn.json[{self.syn_key!r}] has {len(texts)} captions, '
                               f'{num_captions} are needed (lower --num_syn)')

  def __call__(self, batch, num_captions, rng):
    del rng
    return [list(item.existing[self.syn_key][:num_captions]) for item in batch]

  def describe(self):
    return {'name': self.name, 'syn_key': self.syn_key}


def _coca(path: str, **options) -> Captioner:
  from mobileclip_jax.reinforce import coca_captioner  # pylint: disable=g-import-not-at-top
  return coca_captioner.CocaCaptioner(path, **options)


# name -> (factory, takes_path): factory(syn_key, [path,] **options) -> Captioner.
_FACTORIES: Dict[str, Tuple[Callable[..., Captioner], bool]] = {
    'existing': (lambda syn_key: ExistingCaptioner(), False),
    'coca': (lambda syn_key, path, **options: _coca(path, **options), True)}


def register_captioner(name: str, factory: Callable[..., Captioner],
                       takes_path: bool = False) -> None:
  """Adds a captioner: `factory(syn_key, **options)` builds it (options from its spec), or with
  `takes_path` `factory(syn_key, path, **options)` (a model to load: KIND:TAG=PATH)."""
  if name in _FACTORIES:
    raise ValueError(f'Captioner {name!r} is registered already.')
  _FACTORIES[name] = (factory, takes_path)


def names() -> Tuple[str, ...]:
  """The captioners, plugins' included."""
  plugins.load()
  return tuple(_FACTORIES)


_SEGMENT = re.compile(r':(?=\w+(?:=|:|$))')  # A ':' before a TAG, TAG=PATH or key=value.


def make_captioner(spec: str) -> Captioner:
  """The captioner of one spec (see the module docstring), its `syn_key` set from the TAG."""
  kind, _, rest = spec.strip().partition(':')
  segments = _SEGMENT.split(rest) if rest else []
  if kind not in names():
    raise ValueError(f'Unknown captioner {kind!r} in {spec!r}; known: {", ".join(names())}.')
  factory, takes_path = _FACTORIES[kind]
  tag = path = None
  if takes_path:
    first = segments.pop(0) if segments else ''
    tag, sep, path = first.partition('=')
    if not (sep and tag and path):
      raise ValueError(f'Captioner spec {spec!r}: {kind} loads a model, write {kind}:TAG=PATH '
                       '(a training run or model checkpoint), e.g. coca:mscoco=/runs/coca.')
  elif segments and '=' not in segments[0]:
    tag = segments.pop(0)
  if tag is not None and not re.fullmatch(r'[A-Za-z0-9_]+', tag):
    raise ValueError(f'Captioner spec {spec!r}: TAG {tag!r} must be letters, digits and _ (it '
                     f'names the syn.json key {SYN_KEY}_TAG).')
  options = {}
  for item in segments:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Captioner spec {spec!r}: options are key=value, got {item!r}.')
    try:
      options[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise ValueError(f'Captioner spec {spec!r}: option {key!r} needs a Python literal (a '
                       f'number, True/False or a quoted string), got {value!r}.') from None
  syn_key = f'{SYN_KEY}_{tag}' if tag else SYN_KEY
  args = (syn_key, path) if takes_path else (syn_key,)
  try:
    captioner = factory(*args, **options)
  except TypeError as e:
    raise ValueError(f'Captioner spec {spec!r}: {e}') from None
  captioner.syn_key = syn_key
  return captioner


def make_captioners(specs: Sequence[str]) -> List[Captioner]:
  """The captioners of `specs`, in order; their syn.json keys must differ."""
  made = [make_captioner(spec) for spec in specs]
  if not made:
    raise ValueError('Give at least one captioner (e.g. --captioners=existing).')
  keys = [c.syn_key for c in made]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise ValueError(f'Captioners {list(specs)} write the same syn.json key {repeated}: give each '
                     'its own TAG (KIND:TAG...).')
  return made


# ----------------------------------------------------------------------------------------------
# Similarity.


def normalize_caption(text: str) -> str:
  """Lower-case, Unicode punctuation removed, whitespace collapsed: the exact-match form."""
  text = ''.join(ch for ch in text.lower() if not unicodedata.category(ch).startswith('P'))
  return ' '.join(text.split())


def similarity_matrix(emb: np.ndarray, num_teachers: int) -> np.ndarray:
  """[S, S] cosine similarity averaged over teachers.

  `emb` [S, D] holds concatenated unit-norm per-teacher slices, so the dot product of two rows
  is the sum of the per-teacher cosines.
  """
  emb = np.asarray(emb, np.float32)
  return emb @ emb.T / num_teachers


def find_offenders(captions: Sequence[str], emb: np.ndarray, num_teachers: int,
                   threshold: float) -> List[int]:
  """Indices of the captions to regenerate, kept greedily in order (see the module docstring).

  Args:
    captions: one image's S synthetic captions.
    emb: [S, D] their teacher-ensemble embeddings (unit-norm per teacher).
    num_teachers: number of teachers in `emb`.
    threshold: averaged cosine above which two captions are near-duplicates.
  """
  normalized = [normalize_caption(c) for c in captions]
  sim = similarity_matrix(emb, num_teachers)
  kept, offenders = [], []
  for j, text in enumerate(normalized):
    if not text or any(normalized[i] == text or sim[i, j] > threshold for i in kept):
      offenders.append(j)
    else:
      kept.append(j)
  return offenders


def _ngrams(words: Sequence[str], n: int) -> List[Tuple[str, ...]]:
  return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@dataclasses.dataclass
class CaptionStats:
  """Duplicate and diversity measures of per-image caption sets, as mergeable sums.

  Per image with S captions: caption j is empty if nothing is left after normalization, an
  exact duplicate if its normalized text equals that of an earlier caption, a near duplicate if it is an exact one or its averaged cosine with an
  earlier caption is above the threshold; all S(S-1)/2 pairs enter the mean cosine; distinct-n
  is (distinct n-grams / n-grams) over the image's captions, averaged over images.
  """
  images: int = 0
  captions: int = 0
  empty: int = 0
  exact_duplicates: int = 0
  near_duplicates: int = 0
  images_with_duplicates: int = 0
  pairs: int = 0
  cosine_sum: float = 0.0
  distinct_sum: Dict[str, float] = dataclasses.field(
      default_factory=lambda: {str(n): 0.0 for n in DISTINCT_N})
  distinct_images: Dict[str, int] = dataclasses.field(
      default_factory=lambda: {str(n): 0 for n in DISTINCT_N})

  def add(self, captions: Sequence[str], emb: np.ndarray, num_teachers: int,
          threshold: float) -> None:
    """Adds one image's captions and their embeddings [S, D]."""
    normalized = [normalize_caption(c) for c in captions]
    sim = similarity_matrix(emb, num_teachers)
    near_any = False
    self.empty += sum(not text for text in normalized)
    for j, text in enumerate(normalized):
      exact = text in normalized[:j]
      near = exact or (j > 0 and float(sim[:j, j].max()) > threshold)
      self.exact_duplicates += exact
      self.near_duplicates += near
      near_any = near_any or near
    self.images += 1
    self.captions += len(captions)
    self.images_with_duplicates += near_any
    upper = np.triu_indices(len(captions), k=1)
    self.pairs += len(upper[0])
    self.cosine_sum += float(sim[upper].sum())
    words = [text.split() for text in normalized]
    for n in DISTINCT_N:
      grams = [g for w in words for g in _ngrams(w, n)]
      if grams:
        self.distinct_sum[str(n)] += len(set(grams)) / len(grams)
        self.distinct_images[str(n)] += 1

  def merge(self, other: 'CaptionStats') -> None:
    for field in ('images', 'captions', 'empty', 'exact_duplicates', 'near_duplicates',
                  'images_with_duplicates', 'pairs', 'cosine_sum'):
      setattr(self, field, getattr(self, field) + getattr(other, field))
    for n in self.distinct_sum:
      self.distinct_sum[n] += other.distinct_sum[n]
      self.distinct_images[n] += other.distinct_images[n]

  def rates(self) -> Dict[str, float]:
    """The derived measures: empty and duplicate rates, mean pairwise cosine, distinct-n."""
    ratio = lambda a, b: a / b if b else 0.0
    out = {'empty_rate': ratio(self.empty, self.captions),
           'exact_duplicate_rate': ratio(self.exact_duplicates, self.captions),
           'near_duplicate_rate': ratio(self.near_duplicates, self.captions),
           'image_duplicate_rate': ratio(self.images_with_duplicates, self.images),
           'mean_pairwise_cosine': ratio(self.cosine_sum, self.pairs)}
    for n in DISTINCT_N:
      out[f'distinct_{n}'] = ratio(self.distinct_sum[str(n)], self.distinct_images[str(n)])
    return out

  def to_json(self) -> Dict[str, Any]:
    return {**dataclasses.asdict(self), 'rates': self.rates()}

  @classmethod
  def from_json(cls, data: Dict[str, Any]) -> 'CaptionStats':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass
class QualityReport:
  """Caption measures before and after regeneration, and what regeneration did.

  Attributes:
    before: the captions as first made.
    after: the captions as stored.
    regenerated: captions asked for again (an offender regenerated r times counts r times).
    unresolved: offenders left after the last round (also every offender of a captioner that
      cannot regenerate).
  """
  before: CaptionStats = dataclasses.field(default_factory=CaptionStats)
  after: CaptionStats = dataclasses.field(default_factory=CaptionStats)
  regenerated: int = 0
  unresolved: int = 0

  def merge(self, other: 'QualityReport') -> None:
    self.before.merge(other.before)
    self.after.merge(other.after)
    self.regenerated += other.regenerated
    self.unresolved += other.unresolved

  def to_json(self) -> Dict[str, Any]:
    return {'before': self.before.to_json(), 'after': self.after.to_json(),
            'regenerated': self.regenerated, 'unresolved': self.unresolved}

  @classmethod
  def from_json(cls, data: Dict[str, Any]) -> 'QualityReport':
    return cls(CaptionStats.from_json(data['before']), CaptionStats.from_json(data['after']),
               int(data['regenerated']), int(data['unresolved']))

  def summary(self, syn_key: str = SYN_KEY) -> str:
    before, after = self.before.rates(), self.after.rates()
    lines = [f'Synthetic captions {syn_key}: {self.after.captions} of {self.after.images} images; '
             f'{self.regenerated} regenerated, {self.unresolved} duplicates left.']
    for name in before:
      lines.append(f'  {name}: {before[name]:.4f} -> {after[name]:.4f}')
    return '\n'.join(lines)


def deduplicate(items: Sequence[CaptionInput], captions: List[List[str]], emb: np.ndarray, *,
                captioner: Captioner, embed_texts: Callable[[Sequence[str]], np.ndarray],
                num_teachers: int, threshold: float, max_regenerate: int,
                rng: np.random.Generator) -> Tuple[List[List[str]], np.ndarray, QualityReport]:
  """Regenerates offending captions up to `max_regenerate` rounds (see the module docstring).

  Args:
    items: the N samples the captions belong to.
    captions: N lists of S captions.
    emb: [N, S, D] their teacher-ensemble embeddings.
    captioner: asked for one new caption per offender per round.
    embed_texts: texts -> [len, D] embeddings with the same teachers.
    num_teachers: number of teachers in D.
    threshold: averaged-cosine threshold for near duplicates.
    max_regenerate: most rounds of regeneration (0: only measure).
    rng: passed to the captioner.

  Returns:
    (captions, emb [N, S, D], report); inputs are not modified.
  """
  captions = [list(c) for c in captions]
  emb = np.array(emb, np.float32)
  report = QualityReport()
  for c, e in zip(captions, emb):
    report.before.add(c, e, num_teachers, threshold)
  rounds = max_regenerate if captioner.can_regenerate else 0
  offenders = []
  for round_index in range(rounds + 1):
    offenders = [(i, j) for i, (c, e) in enumerate(zip(captions, emb))
                 for j in find_offenders(c, e, num_teachers, threshold)]
    if not offenders or round_index == rounds:
      break
    fresh = captioner([items[i] for i, _ in offenders], 1, rng)
    texts = [f[0] for f in fresh]
    new_emb = embed_texts(texts)
    for (i, j), text, row in zip(offenders, texts, new_emb):
      captions[i][j], emb[i, j] = text, row
    report.regenerated += len(offenders)
  report.unresolved = len(offenders)
  for c, e in zip(captions, emb):
    report.after.add(c, e, num_teachers, threshold)
  return captions, emb, report

"""Synthetic captions: the captioner interface, and quality control of near-duplicate captions.

A captioner maps a batch of `CaptionInput`s (the decoded image, the sample's json labels and
any synthetic captions the source already has) to `num_captions` captions per input. Built in:
'existing' takes the source's syn.json captions as they are; plugins register others with
`register_captioner` (the demo world's 'demo' captioner: mobileclip_jax/demo/sources.py).

Quality control (seed-improvements.md part b): independently sampled captions of one image are
often the same sentence, which wastes caption slots and their teacher embeddings. Caption j of
an image is an *offender* if it is empty after normalization, or equals an earlier kept caption
after normalization (lower-case, punctuation removed, whitespace collapsed), or its cosine
similarity with an earlier kept caption, averaged over the teachers, is above a threshold.
Offenders are regenerated and re-checked, up to a number of rounds; captions are kept greedily
in order, so once no offender is left every pair of an image's captions is below the threshold.
`CaptionStats` measures a caption set before and after: exact and near duplicate rates, the mean
pairwise cosine and distinct-n.
"""
import abc
import ast
import dataclasses
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


@dataclasses.dataclass
class CaptionInput:
  """What a captioner may look at for one sample.

  Attributes:
    shard, key, uid: where the sample came from (for error messages).
    image: the decoded RGB image.
    labels: the sample's json member as a dict ({} when it has none).
    existing: the source's synthetic captions under the syn key, or None.
  """
  shard: str
  key: str
  uid: str
  image: Image.Image
  labels: Dict[str, Any]
  existing: Optional[List[str]] = None


class Captioner(abc.ABC):
  """Makes synthetic captions for a batch of samples."""
  name: str = ''
  # False when asking again cannot give a different caption (nothing to regenerate).
  can_regenerate: bool = True

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
  """The synthetic captions the source already has (its syn.json), the first `num_captions`."""
  name = 'existing'
  can_regenerate = False

  def __init__(self, syn_key: str = 'syn_text'):
    self.syn_key = syn_key

  def check(self, item: CaptionInput, num_captions: int) -> None:
    if item.existing is None:
      raise CorruptSampleError(item.shard, item.key, errors.MISSING_MEMBER,
                               f'no syn.json[{self.syn_key!r}] captions to keep '
                               '(--captioner=existing needs them; use a captioner that makes '
                               'captions instead)')
    if len(item.existing) < num_captions:
      raise CorruptSampleError(item.shard, item.key, TOO_FEW_CAPTIONS,
                               f'syn.json[{self.syn_key!r}] has {len(item.existing)} captions, '
                               f'{num_captions} are needed (lower --num_syn)')

  def __call__(self, batch, num_captions, rng):
    del rng
    return [list(item.existing[:num_captions]) for item in batch]

  def describe(self):
    return {'name': self.name, 'syn_key': self.syn_key}


# name -> factory(syn_key, **options) -> Captioner.
_FACTORIES: Dict[str, Callable[..., Captioner]] = {
    'existing': lambda syn_key: ExistingCaptioner(syn_key)}


def register_captioner(name: str, factory: Callable[..., Captioner]) -> None:
  """Adds a captioner: `factory(syn_key, **options)` builds it (options from its spec)."""
  if name in _FACTORIES:
    raise ValueError(f'Captioner {name!r} is registered already.')
  _FACTORIES[name] = factory


def names() -> Tuple[str, ...]:
  """The captioners, plugins' included."""
  plugins.load()
  return tuple(_FACTORIES)


def make_captioner(spec: str, syn_key: str = 'syn_text') -> Captioner:
  """The captioner of `spec`, 'NAME' or 'NAME:key=value,...' (e.g. 'demo:temperature=0.5')."""
  name, _, text = spec.partition(':')
  if name not in names():
    raise ValueError(f'Unknown captioner {name!r}; known: {", ".join(names())}.')
  options = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Captioner spec {spec!r}: options are key=value, got {item!r}.')
    options[key.strip()] = ast.literal_eval(value.strip())
  try:
    return _FACTORIES[name](syn_key, **options)
  except TypeError as e:
    raise ValueError(f'Captioner spec {spec!r}: {e}') from None


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

  Per image with S captions: caption j is an exact duplicate if its normalized text equals that
  of an earlier caption, a near duplicate if it is an exact one or its averaged cosine with an
  earlier caption is above the threshold; all S(S-1)/2 pairs enter the mean cosine; distinct-n
  is (distinct n-grams / n-grams) over the image's captions, averaged over images.
  """
  images: int = 0
  captions: int = 0
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
    for field in ('images', 'captions', 'exact_duplicates', 'near_duplicates',
                  'images_with_duplicates', 'pairs', 'cosine_sum'):
      setattr(self, field, getattr(self, field) + getattr(other, field))
    for n in self.distinct_sum:
      self.distinct_sum[n] += other.distinct_sum[n]
      self.distinct_images[n] += other.distinct_images[n]

  def rates(self) -> Dict[str, float]:
    """The derived measures: duplicate rates, mean pairwise cosine, distinct-n."""
    ratio = lambda a, b: a / b if b else 0.0
    out = {'exact_duplicate_rate': ratio(self.exact_duplicates, self.captions),
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

  def summary(self) -> str:
    before, after = self.before.rates(), self.after.rates()
    lines = [f'Synthetic captions: {self.after.captions} of {self.after.images} images; '
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

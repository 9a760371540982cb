"""Captions of demo-world scenes: noisy web-like ground truth, and the accurate captioner.

Ground-truth captions imitate web alt-text. With effective rates r = min(1, rate * caption_noise)
(`DemoWorldConfig.caption_rates`):
  - uninformative (r_uninformative): the caption is junk with no content ('IMG_4821.jpg').
  - otherwise the main shape is always named, and each of colour, size, style, position, the
    other objects and the background is omitted independently with probability r_omit; the
    number of objects ('two shapes: ...') is stated with probability (1 - r_omit) / 2;
  - wrong (r_wrong): the main shape or (if mentioned) colour is replaced by a value that no
    object in the scene has;
  - filler (r_filler): an irrelevant phrase ('check out my new wallpaper') is added.
`DemoCaptioner` plays the captioner of the real recipe: its captions name every object's size,
colour and shape, often positions and background, and are never wrong.
"""
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from mobileclip_jax.demo import world
from mobileclip_jax.demo.world import DemoWorldConfig, Labels

COUNT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five')
# Phrasings, canonical first: the captioner's temperature ranks by this order and zero-shot class
# names use the first entry.
SIZE_WORDS = {'small': ('small', 'little', 'tiny'),
              'medium': ('medium', 'medium-sized', 'mid-sized'),
              'large': ('large', 'big', 'huge')}
STYLE_WORDS = {'filled': ('solid', 'filled'), 'outline': ('outlined', 'hollow', 'outline')}
POSITION_PHRASES = {
    'left': ('on the left', 'on the left side', 'to the left'),
    'right': ('on the right', 'on the right side', 'to the right'),
    'top': ('at the top', 'near the top', 'in the upper part'),
    'bottom': ('at the bottom', 'near the bottom', 'in the lower part'),
    'centre': ('in the centre', 'in the middle', 'in the center')}
TEXTURE_WORDS = {'flat': ('plain', 'flat', 'blank'),
                 'gradient': ('gradient', 'shaded', 'fading'),
                 'stripes': ('striped', 'stripy', 'lined'),
                 'dots': ('dotted', 'polka-dot', 'spotted'),
                 'noise': ('noisy', 'grainy', 'speckled')}
# Irrelevant web phrases; none contains an attribute word.
FILLER_PHRASES = (
    'check out my new wallpaper', 'free download', 'high quality', 'best seller',
    'click to enlarge', 'image may contain', 'new in the shop', 'my latest design', 'hand made',
    'for my portfolio', 'stock image', 'all rights reserved', '#art #design', 'so cool')
# Alt-text with no content at all; '#' is replaced by digits.
JUNK_CAPTIONS = ('untitled', 'IMG_####.jpg', 'DSC_####', 'screenshot ####', 'photo',
                 'file ####', 'no description available', 'wallpaper')
_GT_FRAMES = ('{}', '{}', '{}', 'a picture of {}', '{} clip art', '{} - vector illustration',
              'simple drawing of {}', '{} icon', 'photo of {}')
_FILLER_SEPARATORS = (' - ', ' | ', ', ', '. ')


class _Phraser:
  """Picks among phrasings, canonical first, with p_i ~ exp(-i / temperature).

  temperature None (or inf) picks uniformly; 0 always picks the first (canonical) option.
  """

  def __init__(self, rng: np.random.Generator, temperature: float | None):
    self.rng = rng
    self.temperature = temperature

  def __call__(self, options: Sequence[Any]) -> Any:
    if self.temperature is None or math.isinf(self.temperature):
      return world.pick(self.rng, options)
    if self.temperature <= 0:
      return options[0]
    return world.pick_weighted(self.rng, options, _rank_probs(len(options), self.temperature))


@functools.lru_cache(maxsize=None)
def _rank_probs(n: int, temperature: float) -> tuple[float, ...]:
  w = np.exp(-np.arange(n) / temperature)
  return tuple(w / w.sum())


def _with_article(phrase: str) -> str:
  return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _object_phrase(obj: Mapping[str, str], say: _Phraser, *, size: bool, style: bool, color: bool,
                   position: bool) -> str:
  """E.g. 'large outlined red star on the left'; flags choose what is mentioned."""
  words = [say(SIZE_WORDS[obj['size']])] if size else []
  if style:
    words.append(say(STYLE_WORDS[obj['style']]))
  if color:
    words.append(obj['color'])
  words.append(obj['shape'])
  if position:
    words.append(say(POSITION_PHRASES[obj['position']]))
  return ' '.join(words)


def _background_phrase(labels: Labels, say: _Phraser) -> str:
  return f"{say(TEXTURE_WORDS[labels['texture']])} {labels['background_color']} background"


def count_phrase(count: int) -> str:
  return f"{COUNT_WORDS[count]} shape{'s' if count > 1 else ''}"


def _join(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def gt_caption(labels: Labels, config: DemoWorldConfig, rng: np.random.Generator) -> str:
  """A noisy web-like caption of a scene's labels, with `config.caption_rates()` (module doc)."""
  rates = config.caption_rates()
  say = _Phraser(rng, None)
  if rng.random() < rates['uninformative']:
    return ''.join(str(int(rng.random() * 10)) if ch == '#' else ch for ch in say(JUNK_CAPTIONS))
  keep = {part: rng.random() >= rates['omit']
          for part in ('color', 'size', 'style', 'position', 'others', 'background')}
  keep['count'] = rng.random() < (1 - rates['omit']) / 2
  main = dict(labels['objects'][0])
  if rng.random() < rates['wrong']:
    field = 'color' if keep['color'] and rng.random() < 0.5 else 'shape'
    present = {o[field] for o in labels['objects']}
    vocab = config.colors if field == 'color' else config.shapes
    main[field] = say([v for v in vocab if v not in present])
  text = _object_phrase(main, say, size=keep['size'], style=keep['style'], color=keep['color'],
                        position=keep['position'])
  phrases = [say((_with_article(text), text))]
  if keep['others']:
    phrases += [_with_article(f"{o['color']} {o['shape']}") for o in labels['objects'][1:]]
  text = _join(phrases)
  if keep['background']:
    text += ' on ' + _with_article(_background_phrase(labels, say))
  if keep['count']:
    text = f"{count_phrase(labels['count'])}: {text}"
  text = say(_GT_FRAMES).format(text)
  if rng.random() < rates['filler']:
    filler, separator = say(FILLER_PHRASES), say(_FILLER_SEPARATORS)
    text = f'{text}{separator}{filler}' if rng.random() < 0.5 else f'{filler}{separator}{text}'
  return text


# Captioner templates, canonical first. Slots: objects (every object, described), count
# ('two shapes'), bg ('a striped navy background').
_CAPTIONER_TEMPLATES = (
    '{objects} on {bg}.',
    '{count} on {bg}: {objects}.',
    '{bg} with {objects}.',
    'an illustration of {objects}, drawn on {bg}.',
    'a picture showing {objects}.',
    'there is {objects} on {bg}.',
)


class DemoCaptioner:
  """Accurate, descriptive captions of demo-world labels: the stand-in for a real captioner.

  Every caption names the size, colour and shape of every object (main object first), never a
  wrong value; positions, 'solid' and the background appear depending on the phrasing.
  `temperature` is the diversity knob: 0 always gives the canonical caption (positions included),
  larger values spread over phrasings (rank-weighted, p ~ exp(-rank / temperature)), so
  duplicates are common at low values and rare at high ones.
  """

  def __init__(self, temperature: float = 0.7):
    if temperature < 0:
      raise ValueError(f'DemoCaptioner needs temperature >= 0, got {temperature}.')
    self.temperature = temperature

  def caption(self, labels: Labels, rng: np.random.Generator) -> str:
    """One caption of one scene's labels (a `Scene.labels()` dict)."""
    say = _Phraser(rng, self.temperature)
    position = say((True, False))  # canonical: with positions
    objects = []
    for o in labels['objects']:
      # 'outlined' is always said; 'solid' only sometimes (canonical: not).
      style = o['style'] == 'outline' or say((False, True))
      objects.append(_with_article(
          _object_phrase(o, say, size=True, style=style, color=True, position=position)))
    return say(_CAPTIONER_TEMPLATES).format(
        objects=_join(objects), count=count_phrase(labels['count']),
        bg=_with_article(_background_phrase(labels, say)))

  def __call__(self, labels_batch: Sequence[Labels], num_captions: int,
               rng: np.random.Generator) -> list[list[str]]:
    """`num_captions` captions for each labels dict: a list (batch) of lists of strings."""
    return [[self.caption(labels, rng) for _ in range(num_captions)] for labels in labels_batch]

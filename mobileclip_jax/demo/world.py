"""The demo world's scenes: vocabularies, the world config, and seeded scene sampling.

A scene is a textured background and 1-3 objects. The first object is the *main* object: it is
drawn last (on top), is the largest, and is what the per-image labels describe.

  objects     shape (SHAPES), colour (OBJECT_COLORS), size (small/medium/large, from the radius),
              position (anchor left/right/top/bottom/centre, jittered), style (filled/outline)
  background  texture (TEXTURES) in a colour (BACKGROUND_COLORS), two tones of it

Geometry lives in normalized [0, 1] image coordinates, so render.py draws the same layout at any
resolution. Splits are independent index streams of one seed: sample `i` of split `s` is a pure
function of (config, seed, s, i) (`rng`). Held-out (shape, colour) pairs
(`DemoWorldConfig.heldout_pairs`) never appear, on any object, in 'train' or 'val'; every
'heldout' scene's main object is one of them (its other objects are not), for a compositional
generalization test.
"""
import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

Labels = dict[str, Any]
Rgb = tuple[int, int, int]

SPLITS = ('train', 'val', 'heldout')
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond', 'hexagon', 'heart')
OBJECT_COLORS: Mapping[str, Rgb] = {
    'red': (215, 35, 35),
    'orange': (245, 135, 20),
    'yellow': (240, 215, 30),
    'green': (35, 160, 60),
    'cyan': (30, 195, 205),
    'blue': (40, 75, 215),
    'purple': (135, 50, 185),
    'pink': (245, 125, 185),
    'brown': (125, 75, 35),
    'white': (245, 245, 245),
}
# Background colours share no word with object colours, so a caption's colour words are unambiguous.
BACKGROUND_COLORS: Mapping[str, Rgb] = {
    'black': (20, 20, 20),
    'dark gray': (70, 70, 70),
    'gray': (125, 125, 125),
    'light gray': (185, 185, 185),
    'navy': (25, 35, 80),
    'beige': (215, 200, 165),
}
TEXTURES = ('flat', 'gradient', 'stripes', 'dots', 'noise')
# The colour of `DemoWorldConfig.plain_background_prob`'s flat backgrounds.
PLAIN_BACKGROUND = 'gray'
STYLES = ('filled', 'outline')
# Radius ranges (fraction of the image side) per size class; labels come from the radius.
# Sizes and textures are made to be seen at the demo's 32 px: a small object is 8 px wide, a stripe
# 2.5 px or more, a dot 3 px.
SIZE_RADII: Mapping[str, tuple[float, float]] = {
    'small': (0.12, 0.145), 'medium': (0.17, 0.2), 'large': (0.23, 0.27)}
POSITION_ANCHORS: Mapping[str, tuple[float, float]] = {
    'left': (0.2, 0.5), 'right': (0.8, 0.5), 'top': (0.5, 0.2), 'bottom': (0.5, 0.8),
    'centre': (0.5, 0.5)}

DEFAULT_HELDOUT_PAIRS = (
    ('circle', 'green'), ('square', 'purple'), ('triangle', 'blue'), ('star', 'red'),
    ('cross', 'yellow'), ('diamond', 'orange'), ('hexagon', 'pink'), ('heart', 'cyan'))

# Independent random streams of one sample (`rng`).
SCENE_STREAM, CAPTION_STREAM = 0, 1
_SPLIT_STREAMS = {split: i for i, split in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class DemoWorldConfig:
  """Every knob of the demo world; `to_dict`/`from_dict` round-trip through JSON.

  Attributes:
    shapes, colors, background_colors, textures: the vocabularies in use (subsets of SHAPES,
      OBJECT_COLORS, BACKGROUND_COLORS, TEXTURES).
    heldout_pairs: (shape, colour) pairs that only the 'heldout' split shows.
    count_probs: probability of 1, 2, ... objects per scene.
    outline_prob: probability that an object is drawn as an outline instead of filled.
    color_jitter: uniform per-channel jitter of object and background colours, in uint8 units.
    position_jitter: uniform jitter of object centres around their anchor, in image fractions.
    rotation_jitter_deg: uniform rotation of object polygons (small, so a square stays a square).
    caption_noise: multiplies every ground-truth caption noise rate (0 gives clean captions).
    omit_rate, filler_rate, wrong_rate, uninformative_rate: ground-truth noise rates (module doc).
    supersample: object mask supersampling factor; 0 picks one giving a >= 256 px mask canvas.
    plain_background_prob: probability that a scene's background is flat PLAIN_BACKGROUND, like
      a product photo: the object is all that tells such scenes apart (a teacher-data knob).
  """
  shapes: tuple[str, ...] = SHAPES
  colors: tuple[str, ...] = tuple(OBJECT_COLORS)
  background_colors: tuple[str, ...] = tuple(BACKGROUND_COLORS)
  textures: tuple[str, ...] = TEXTURES
  heldout_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT_PAIRS
  count_probs: tuple[float, ...] = (0.5, 0.3, 0.2)
  outline_prob: float = 0.3
  color_jitter: float = 12.0
  position_jitter: float = 0.04
  rotation_jitter_deg: float = 12.0
  caption_noise: float = 1.0
  omit_rate: float = 0.5
  filler_rate: float = 0.3
  wrong_rate: float = 0.1
  uninformative_rate: float = 0.1
  supersample: int = 0
  plain_background_prob: float = 0.0

  def __post_init__(self):
    for name, chosen, known in (('shapes', self.shapes, SHAPES),
                                ('colors', self.colors, tuple(OBJECT_COLORS)),
                                ('background_colors', self.background_colors,
                                 tuple(BACKGROUND_COLORS)),
                                ('textures', self.textures, TEXTURES)):
      unknown = [v for v in chosen if v not in known]
      if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ValueError(f'DemoWorldConfig.{name}={chosen!r} must be a non-empty tuple of distinct '
                         f'values from {known}; unknown: {unknown}.')
    for shape, color in self.heldout_pairs:
      if shape not in self.shapes or color not in self.colors:
        raise ValueError(f'DemoWorldConfig.heldout_pairs has ({shape!r}, {color!r}), which is not '
                         f'in shapes={self.shapes} x colors={self.colors}.')
    bare = [s for s in self.shapes if not self.train_colors[s]]
    if bare:
      raise ValueError(f'DemoWorldConfig.heldout_pairs holds out every colour of {bare}; leave at '
                       'least one colour per shape for the train split.')
    if not 1 <= len(self.count_probs) <= len(POSITION_ANCHORS) or not math.isclose(
        sum(self.count_probs), 1.0, abs_tol=1e-6) or min(self.count_probs) < 0:
      raise ValueError(f'DemoWorldConfig.count_probs={self.count_probs} must be 1 to '
                       f'{len(POSITION_ANCHORS)} non-negative probabilities summing to 1.')
    if self.plain_background_prob and (PLAIN_BACKGROUND not in self.background_colors or
                                       'flat' not in self.textures):
      raise ValueError(f'DemoWorldConfig.plain_background_prob needs {PLAIN_BACKGROUND!r} in '
                       "background_colors and 'flat' in textures.")
    rates = ('outline_prob', 'omit_rate', 'filler_rate', 'wrong_rate', 'uninformative_rate',
             'plain_background_prob')
    for name in rates:
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'DemoWorldConfig.{name}={getattr(self, name)} must be in [0, 1].')
    if self.caption_noise < 0 or self.supersample < 0:
      raise ValueError('DemoWorldConfig.caption_noise and .supersample must be >= 0, got '
                       f'{self.caption_noise} and {self.supersample}.')

  @functools.cached_property
  def train_colors(self) -> Mapping[str, tuple[str, ...]]:
    """Per shape, the colours it may have outside the 'heldout' split."""
    held = set(self.heldout_pairs)
    return {s: tuple(c for c in self.colors if (s, c) not in held) for s in self.shapes}

  @functools.cached_property
  def train_pairs(self) -> tuple[tuple[str, str], ...]:
    """All (shape, colour) pairs that are not held out."""
    return tuple((s, c) for s in self.shapes for c in self.train_colors[s])

  def caption_rates(self) -> dict[str, float]:
    """Effective ground-truth noise probabilities: rate * caption_noise, clipped to 1."""
    return {name: min(1.0, getattr(self, f'{name}_rate') * self.caption_noise)
            for name in ('omit', 'filler', 'wrong', 'uninformative')}

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'DemoWorldConfig':
    """Inverse of `to_dict`; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'Unknown DemoWorldConfig keys {unknown}; known keys: {sorted(fields)}.')
    def as_tuple(v):
      return tuple(as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v
    return cls(**{k: as_tuple(v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object: labels and the geometry `render` needs (normalized image coordinates)."""
  shape: str
  color: str
  size: str
  position: str
  style: str
  rgb: Rgb
  center: tuple[float, float]  # (x, y), y down
  radius: float
  angle: float  # radians

  def labels(self) -> Labels:
    return {'shape': self.shape, 'color': self.color, 'size': self.size,
            'position': self.position, 'style': self.style}


@dataclasses.dataclass(frozen=True)
class Background:
  """A texture in two tones; `params` are in normalized image units (see `_background_image`)."""
  texture: str
  color: str
  rgb: Rgb
  rgb2: Rgb
  params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Scene:
  """A sampled scene; objects[0] is the main object (drawn last)."""
  objects: tuple[SceneObject, ...]
  background: Background

  def labels(self) -> Labels:
    """JSON-able labels: the main object's fields, count, background, and every object."""
    return {**self.objects[0].labels(), 'count': len(self.objects),
            'texture': self.background.texture, 'background_color': self.background.color,
            'objects': [o.labels() for o in self.objects]}


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown demo-world split {split!r}; splits are {SPLITS}.')


def sample_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  if seed < 0 or index < 0:
    raise ValueError(f'Demo-world seed and index must be >= 0, got seed={seed}, index={index}.')
  return np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAMS[split], index, stream]))


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.random() * len(options))]


def pick_weighted(rng: np.random.Generator, options: Sequence[Any], probs: Sequence[float]) -> Any:
  u, acc = rng.random(), 0.0
  for option, p in zip(options, probs):
    acc += p
    if u < acc:
      return option
  return options[-1]


def _clamp(value: float, low: float, high: float) -> float:
  return low if value < low else high if value > high else value


def _jitter_rgb(rng: np.random.Generator, rgb: Rgb, amount: float) -> Rgb:
  noise = (rng.random(3) * 2 - 1) * amount
  return tuple(int(_clamp(c + n, 0, 255)) for c, n in zip(rgb, noise.tolist()))


def _size_of_radius(radius: float) -> str:
  if radius < (SIZE_RADII['small'][1] + SIZE_RADII['medium'][0]) / 2:
    return 'small'
  return 'medium' if radius < (SIZE_RADII['medium'][1] + SIZE_RADII['large'][0]) / 2 else 'large'


def _sample_background(config: DemoWorldConfig, rng: np.random.Generator) -> Background:
  if config.plain_background_prob and rng.random() < config.plain_background_prob:
    texture, color = 'flat', PLAIN_BACKGROUND
  else:
    texture = pick(rng, config.textures)
    color = pick(rng, config.background_colors)
  rgb = _jitter_rgb(rng, BACKGROUND_COLORS[color], config.color_jitter)
  # The second tone is lighter on dark colours and darker on light ones, by a fixed step.
  step = 45 if sum(rgb) < 3 * 128 else -45
  rgb2 = tuple(int(_clamp(c + step, 0, 255)) for c in rgb)
  params: dict[str, Any] = {}
  if texture == 'gradient':
    params = {'angle': rng.random() * 2 * np.pi}
  elif texture == 'stripes':
    params = {'angle': pick(rng, (0.0, 0.25, 0.5, 0.75)) * np.pi,
              'period': 0.16 + 0.1 * rng.random(), 'phase': rng.random()}
  elif texture == 'dots':
    spacing = 0.2 + 0.1 * rng.random()
    params = {'spacing': spacing, 'radius': spacing * (0.22 + 0.08 * rng.random()),
              'offset': (rng.random(), rng.random())}
  elif texture == 'noise':
    params = {'grid': rng.random((8, 8)).astype(np.float32)}
  return Background(texture, color, rgb, rgb2, params)


def sample_scene(config: DemoWorldConfig, split: str, index: int, seed: int) -> Scene:
  """Samples scene `index` of `split`; a pure function of its arguments (not of resolution)."""
  check_split(split)
  rng = sample_rng(seed, split, index, SCENE_STREAM)
  if split == 'heldout':
    if not config.heldout_pairs:
      raise ValueError("The 'heldout' split needs DemoWorldConfig.heldout_pairs; it is empty.")
    main_shape, main_color = pick(rng, config.heldout_pairs)
  else:
    main_shape = pick(rng, config.shapes)
    main_color = pick(rng, config.train_colors[main_shape])
  count = pick_weighted(rng, range(1, len(config.count_probs) + 1), config.count_probs)
  anchors = [tuple(POSITION_ANCHORS)[i] for i in rng.permutation(len(POSITION_ANCHORS))[:count]]
  low, high = SIZE_RADII[pick(rng, tuple(SIZE_RADII))]
  main_radius = low + (high - low) * rng.random()
  objects = []
  for i, position in enumerate(anchors):
    if i == 0:
      shape, color, radius = main_shape, main_color, main_radius
    else:  # Other objects are smaller than the main one and never show a held-out pair.
      shape, color = pick(rng, config.train_pairs)
      radius = main_radius * (0.5 + 0.25 * rng.random())
    ax, ay = POSITION_ANCHORS[position]
    jx, jy = ((rng.random(2) * 2 - 1) * config.position_jitter).tolist()
    center = (_clamp(ax + jx, radius + 0.01, 0.99 - radius),
              _clamp(ay + jy, radius + 0.01, 0.99 - radius))
    style = 'outline' if rng.random() < config.outline_prob else 'filled'
    angle = math.radians((rng.random() * 2 - 1) * config.rotation_jitter_deg)
    rgb = _jitter_rgb(rng, OBJECT_COLORS[color], config.color_jitter)
    objects.append(SceneObject(shape, color, _size_of_radius(radius), position, style, rgb,
                               center, radius, angle))
  return Scene(tuple(objects), _sample_background(config, rng))

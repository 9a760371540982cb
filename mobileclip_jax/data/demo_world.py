"""The demo world: a procedural, seeded image-caption dataset that needs no download.

It lets the whole MobileCLIP recipe (teachers, reinforcement, CLIP vs DR students, zero-shot and
retrieval evaluation) run on a laptop CPU in minutes, with the same reason for DR to win as on
web data: ground-truth captions are noisy and partial, synthetic captions are accurate.

A scene is a textured background and 1-3 objects. The first object is the *main* object: it is
drawn last (on top), is the largest, and is what the per-image labels describe.

  objects     shape (SHAPES), colour (OBJECT_COLORS), size (small/medium/large, from the radius),
              position (anchor left/right/top/bottom/centre, jittered), style (filled/outline)
  background  texture (TEXTURES) in a colour (BACKGROUND_COLORS), two tones of it

Geometry lives in normalized [0, 1] image coordinates, so `render` draws the same layout at any
resolution: objects are polygons drawn on a supersampled mask and box-filtered (anti-aliased),
background textures are evaluated analytically per pixel centre (anti-aliased stripes and dots).

Splits are independent index streams of one seed: sample `i` of split `s` is a pure function of
(config, seed, s, i). Held-out (shape, colour) pairs (`DemoWorldConfig.heldout_pairs`) never
appear, on any object, in 'train' or 'val'; every 'heldout' scene's main object is one of them
(its other objects are not), for a compositional generalization test.

Ground-truth captions imitate web alt-text. With effective rates r = min(1, rate * caption_noise):
  - uninformative (r_uninformative): the caption is junk with no content ('IMG_4821.jpg').
  - otherwise the main shape is always named, and each of colour, size, style, position, the
    other objects and the background is omitted independently with probability r_omit;
  - wrong (r_wrong): the main shape or (if mentioned) colour is replaced by a value that no
    object in the scene has;
  - filler (r_filler): an irrelevant phrase ('check out my new wallpaper') is added.
`DemoCaptioner` plays the captioner of the real recipe: its captions name every object's size,
colour and shape, often positions and background, and are never wrong.
"""
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

from mobileclip_jax.data import wds

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
STYLES = ('filled', 'outline')
# Radius ranges (fraction of the image side) per size class; labels come from the radius.
SIZE_RADII: Mapping[str, tuple[float, float]] = {
    'small': (0.09, 0.11), 'medium': (0.13, 0.155), 'large': (0.18, 0.21)}
POSITION_ANCHORS: Mapping[str, tuple[float, float]] = {
    'left': (0.2, 0.5), 'right': (0.8, 0.5), 'top': (0.5, 0.2), 'bottom': (0.5, 0.8),
    'centre': (0.5, 0.5)}
COUNT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five')

DEFAULT_HELDOUT_PAIRS = (
    ('circle', 'green'), ('square', 'purple'), ('triangle', 'blue'), ('star', 'red'),
    ('cross', 'yellow'), ('diamond', 'orange'), ('hexagon', 'pink'), ('heart', 'cyan'))

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

_SPLIT_STREAMS = {split: i for i, split in enumerate(SPLITS)}
_SCENE_STREAM, _CAPTION_STREAM = 0, 1


def _unit_polygon(shape: str) -> np.ndarray:
  """Vertices [N, 2] of `shape` centred at 0 with bounding radius ~1 (y points down)."""

  def ring(n: int, radii: Sequence[float], start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg) + np.arange(n) * 2 * np.pi / n
    r = np.resize(np.asarray(radii, np.float64), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

  if shape == 'circle':
    return ring(64, [1.0], 0.0)
  if shape == 'square':
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.72
  if shape == 'triangle':
    return ring(3, [1.0], -90.0)
  if shape == 'star':
    return ring(10, [1.0, 0.42], -90.0)
  if shape == 'cross':
    a, w = 0.92, 0.3
    return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                     [-w, w], [-a, w], [-a, -w], [-w, -w]], np.float64)
  if shape == 'diamond':
    return np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], np.float64)
  if shape == 'hexagon':
    return ring(6, [1.0], 0.0)
  if shape == 'heart':
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    xy = np.stack([16 * np.sin(t) ** 3,
                   -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    xy -= (xy.max(0) + xy.min(0)) / 2
    return xy / np.abs(xy).max()
  raise ValueError(f'Unknown shape {shape!r}; known shapes: {SHAPES}.')


_UNIT_POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPES}


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
    rates = ('outline_prob', 'omit_rate', 'filler_rate', 'wrong_rate', 'uninformative_rate')
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


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown demo-world split {split!r}; splits are {SPLITS}.')


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
  if seed < 0 or index < 0:
    raise ValueError(f'Demo-world seed and index must be >= 0, got seed={seed}, index={index}.')
  return np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAMS[split], index, stream]))


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.random() * len(options))]


def _pick_weighted(rng: np.random.Generator, options: Sequence[Any], probs: Sequence[float]) -> Any:
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
  texture = _pick(rng, config.textures)
  color = _pick(rng, config.background_colors)
  rgb = _jitter_rgb(rng, BACKGROUND_COLORS[color], config.color_jitter)
  # The second tone is lighter on dark colours and darker on light ones, by a fixed step.
  step = 45 if sum(rgb) < 3 * 128 else -45
  rgb2 = tuple(int(_clamp(c + step, 0, 255)) for c in rgb)
  params: dict[str, Any] = {}
  if texture == 'gradient':
    params = {'angle': rng.random() * 2 * np.pi}
  elif texture == 'stripes':
    params = {'angle': _pick(rng, (0.0, 0.25, 0.5, 0.75)) * np.pi,
              'period': 0.08 + 0.08 * rng.random(), 'phase': rng.random()}
  elif texture == 'dots':
    spacing = 0.1 + 0.08 * rng.random()
    params = {'spacing': spacing, 'radius': spacing * (0.2 + 0.1 * rng.random()),
              'offset': (rng.random(), rng.random())}
  elif texture == 'noise':
    params = {'grid': rng.random((16, 16)).astype(np.float32)}
  return Background(texture, color, rgb, rgb2, params)


def sample_scene(config: DemoWorldConfig, split: str, index: int, seed: int) -> Scene:
  """Samples scene `index` of `split`; a pure function of its arguments (not of resolution)."""
  _check_split(split)
  rng = _rng(seed, split, index, _SCENE_STREAM)
  if split == 'heldout':
    if not config.heldout_pairs:
      raise ValueError("The 'heldout' split needs DemoWorldConfig.heldout_pairs; it is empty.")
    main_shape, main_color = _pick(rng, config.heldout_pairs)
  else:
    main_shape = _pick(rng, config.shapes)
    main_color = _pick(rng, config.train_colors[main_shape])
  count = _pick_weighted(rng, range(1, len(config.count_probs) + 1), config.count_probs)
  anchors = [tuple(POSITION_ANCHORS)[i] for i in rng.permutation(len(POSITION_ANCHORS))[:count]]
  low, high = SIZE_RADII[_pick(rng, tuple(SIZE_RADII))]
  main_radius = low + (high - low) * rng.random()
  objects = []
  for i, position in enumerate(anchors):
    if i == 0:
      shape, color, radius = main_shape, main_color, main_radius
    else:  # Other objects are smaller than the main one and never show a held-out pair.
      shape, color = _pick(rng, config.train_pairs)
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


def _background_image(background: Background, image_size: int) -> Image.Image:
  """The background as an RGB image; textures are anti-aliased analytically per pixel."""
  image = Image.new('RGB', (image_size, image_size), background.rgb)
  if background.texture == 'flat':
    return image
  p = background.params
  u = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # pixel centres
  x, y = u[None, :], u[:, None]
  if background.texture == 'gradient':
    proj = (x - 0.5) * math.cos(p['angle']) + (y - 0.5) * math.sin(p['angle'])
    mix = np.clip(proj * math.sqrt(0.5) + 0.5, 0, 1)
  elif background.texture == 'stripes':
    proj = (x * math.cos(p['angle']) + y * math.sin(p['angle'])) / p['period'] + p['phase']
    # Signed distance (in pixels) to the nearest stripe edge, stripes covering half a period.
    dist = (np.abs(proj - np.floor(proj) - 0.5) - 0.25) * p['period'] * image_size
    mix = np.clip(dist + 0.5, 0, 1)
  elif background.texture == 'dots':
    s, (ox, oy) = p['spacing'], p['offset']
    dx, dy = x / s + ox, y / s + oy
    dx, dy = (dx - np.floor(dx) - 0.5) * s, (dy - np.floor(dy) - 0.5) * s
    mix = np.clip((p['radius'] - np.sqrt(dx * dx + dy * dy)) * image_size + 0.5, 0, 1)
  elif background.texture == 'noise':
    grid = Image.fromarray(p['grid'], mode='F')
    mix = np.asarray(grid.resize((image_size, image_size), Image.BILINEAR))
  else:
    raise ValueError(f'Unknown texture {background.texture!r}; known textures: {TEXTURES}.')
  # The second tone is painted through the coverage `mix` in [0, 1] as an 8-bit mask.
  image.paste(background.rgb2, None, Image.fromarray((mix * 255 + 0.5).astype(np.uint8)))
  return image


def _draw_object(image: Image.Image, obj: SceneObject, supersample: int) -> None:
  """Paints `obj` onto `image` through an anti-aliased (supersampled, box-filtered) mask."""
  size = image.size[0]
  cx, cy = obj.center
  x0 = max(0, math.floor((cx - obj.radius) * size) - 1)
  y0 = max(0, math.floor((cy - obj.radius) * size) - 1)
  x1 = min(size, math.ceil((cx + obj.radius) * size) + 1)
  y1 = min(size, math.ceil((cy + obj.radius) * size) + 1)
  c, s = math.cos(obj.angle), math.sin(obj.angle)
  unit = _UNIT_POLYGONS[obj.shape] @ np.array([[c, s], [-s, c]])
  scale = obj.radius * size * supersample
  points = (unit * scale + [(cx * size - x0) * supersample, (cy * size - y0) * supersample])
  mask = Image.new('L', ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
  draw = ImageDraw.Draw(mask)
  if obj.style == 'filled':
    draw.polygon(points.ravel().tolist(), fill=255)
  else:  # Pillow draws wide polygon outlines inside the polygon.
    draw.polygon(points.ravel().tolist(), outline=255, width=max(1, round(0.2 * scale)))
  image.paste(obj.rgb, (x0, y0, x1, y1), mask.reduce(supersample))


def render(scene: Scene, image_size: int, supersample: int = 0) -> Image.Image:
  """Draws `scene` as an RGB PIL image of image_size x image_size pixels.

  Args:
    scene: from `sample_scene`.
    image_size: output side in pixels; the layout is the same at every size.
    supersample: object-mask supersampling factor; 0 picks one that gives a >= 256 px canvas.
  """
  if image_size < 8:
    raise ValueError(f'Demo-world image_size must be >= 8 pixels, got {image_size}.')
  supersample = supersample or min(8, max(2, -(-256 // image_size)))
  image = _background_image(scene.background, image_size)
  for obj in reversed(scene.objects):  # main object last, on top
    _draw_object(image, obj, supersample)
  return image


class _Phraser:
  """Picks among phrasings, canonical first, with p_i ~ exp(-i / temperature).

  temperature None (or inf) picks uniformly; 0 always picks the first (canonical) option.
  """

  def __init__(self, rng: np.random.Generator, temperature: float | None):
    self.rng = rng
    self.temperature = temperature

  def __call__(self, options: Sequence[Any]) -> Any:
    if self.temperature is None or math.isinf(self.temperature):
      return _pick(self.rng, options)
    if self.temperature <= 0:
      return options[0]
    return _pick_weighted(self.rng, options, _rank_probs(len(options), self.temperature))


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


def _count_phrase(count: int) -> str:
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
        objects=_join(objects), count=_count_phrase(labels['count']),
        bg=_with_article(_background_phrase(labels, say)))

  def __call__(self, labels_batch: Sequence[Labels], num_captions: int,
               rng: np.random.Generator) -> list[list[str]]:
    """`num_captions` captions for each labels dict: a list (batch) of lists of strings."""
    return [[self.caption(labels, rng) for _ in range(num_captions)] for labels in labels_batch]


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """A zero-shot classification task over demo-world labels.

  Attributes:
    name: task name.
    fields: label keys whose values identify the class.
    values: per class, the tuple of label values (same order as `fields`).
    classnames: per class, the text put into the templates.
    templates: prompt templates with one '{}'.
  """
  name: str
  fields: tuple[str, ...]
  values: tuple[tuple[Any, ...], ...]
  classnames: tuple[str, ...]
  templates: tuple[str, ...]

  @functools.cached_property
  def _class_of(self) -> dict[tuple[Any, ...], int]:
    return {v: i for i, v in enumerate(self.values)}

  def target(self, labels: Labels) -> int:
    """The class index of a sample's labels."""
    key = tuple(labels[f] for f in self.fields)
    if key not in self._class_of:
      raise ValueError(f'Labels {key} of fields {self.fields} are not a class of zero-shot task '
                       f'{self.name!r}; classes: {self.values}.')
    return self._class_of[key]


def zero_shot_tasks(config: DemoWorldConfig) -> dict[str, ZeroShotTask]:
  """The zero-shot tasks of a world; 'object' (colour + shape) is the compositional one."""

  def task(name, fields, values, classnames, templates):
    values = tuple(v if isinstance(v, tuple) else (v,) for v in values)
    return ZeroShotTask(name, fields, values, tuple(classnames), templates)

  counts = range(1, len(config.count_probs) + 1)
  pairs = [(c, s) for c in config.colors for s in config.shapes]
  tasks = [
      task('shape', ('shape',), config.shapes, config.shapes,
           ('a photo of a {}.', 'a drawing of a {}.', 'a {} shape.', 'an image of a {}.')),
      task('color', ('color',), config.colors, config.colors,
           ('a photo of a {} shape.', 'a drawing of a {} object.', 'something {}.')),
      task('object', ('color', 'shape'), pairs, [f'{c} {s}' for c, s in pairs],
           ('a photo of a {}.', 'a drawing of a {}.', 'an image of a {}.')),
      task('count', ('count',), counts, [_count_phrase(n) for n in counts],
           ('a photo of {}.', 'a picture with {}.', '{} on a background.')),
      task('size', ('size',), tuple(SIZE_RADII), [SIZE_WORDS[s][0] for s in SIZE_RADII],
           ('a {} shape.', 'a photo of a {} object.', 'a drawing of a {} thing.')),
      task('position', ('position',), tuple(POSITION_ANCHORS),
           [POSITION_PHRASES[p][0] for p in POSITION_ANCHORS],
           ('a shape {}.', 'a photo of an object {}.', 'a drawing with something {}.')),
      task('style', ('style',), STYLES, [STYLE_WORDS[s][0] for s in STYLES],
           ('a {} shape.', 'a drawing of a {} object.')),
      task('texture', ('texture',), config.textures, [TEXTURE_WORDS[t][0] for t in config.textures],
           ('a shape on a {} background.', 'a photo with a {} background.', 'a {} background.')),
      task('background_color', ('background_color',), config.background_colors,
           config.background_colors,
           ('a shape on a {} background.', 'a drawing on a {} background.')),
  ]
  return {t.name: t for t in tasks}


def sample_uid(split: str, index: int, seed: int) -> str:
  """The sample's uid, also its webdataset key (no dots)."""
  return f'demo-{split}-s{seed}-{index:08d}'


def make_sample(split: str, index: int, image_size: int, seed: int,
                config: DemoWorldConfig | None = None) -> dict[str, Any]:
  """One sample: {'uid': str, 'image': RGB PIL image, 'caption': str (noisy), 'labels': dict}."""
  config = config or DemoWorldConfig()
  scene = sample_scene(config, split, index, seed)
  labels = scene.labels()
  caption = gt_caption(labels, config, _rng(seed, split, index, _CAPTION_STREAM))
  return {'uid': sample_uid(split, index, seed), 'caption': caption, 'labels': labels,
          'image': render(scene, image_size, config.supersample)}


def iter_samples(split: str, num_samples: int, image_size: int, seed: int,
                 config: DemoWorldConfig | None = None, start: int = 0) -> Iterator[dict[str, Any]]:
  """Yields `make_sample` for indices start .. start + num_samples - 1 of `split`."""
  _check_split(split)
  config = config or DemoWorldConfig()
  for index in range(start, start + num_samples):
    yield make_sample(split, index, image_size, seed, config)


def encode_image(image: Image.Image, image_format: str = 'jpg', jpeg_quality: int = 90) -> bytes:
  """JPEG ('jpg') or PNG ('png') bytes of a PIL image."""
  buffer = io.BytesIO()
  if image_format == 'jpg':
    image.save(buffer, format='JPEG', quality=jpeg_quality)
  elif image_format == 'png':
    image.save(buffer, format='PNG')
  else:
    raise ValueError(f"Unknown image_format {image_format!r}; use 'jpg' or 'png'.")
  return buffer.getvalue()


def write_split(out_dir: str, split: str, num_samples: int, image_size: int, samples_per_shard: int,
                seed: int, config: DemoWorldConfig | None = None, image_format: str = 'jpg',
                jpeg_quality: int = 90, start: int = 0) -> list[str]:
  """Writes samples start .. start + num_samples - 1 of `split` as DataCompDR-style tars.

  Shards are `out_dir/<split>/00000000.tar, ...`, each holding `samples_per_shard` samples (the
  last fewer). Per sample key (`sample_uid`): `<image_format>` (the image), 'txt' (the noisy
  ground-truth caption) and 'json' ({"uid": ..., "sha256": <of the image bytes>, **labels}).

  Returns:
    The shard paths written, in order.
  """
  _check_split(split)
  if num_samples < 1 or samples_per_shard < 1:
    raise ValueError(f'write_split needs num_samples >= 1 and samples_per_shard >= 1, got '
                     f'{num_samples} and {samples_per_shard}.')
  pattern = os.path.join(out_dir, split, '{:08d}.tar')
  with wds.ShardWriter(pattern, samples_per_shard) as writer:
    for sample in iter_samples(split, num_samples, image_size, seed, config, start):
      image = encode_image(sample['image'], image_format, jpeg_quality)
      meta = {'uid': sample['uid'], 'sha256': hashlib.sha256(image).hexdigest(),
              **sample['labels']}
      writer.write(sample['uid'], {image_format: image, 'txt': sample['caption'].encode('utf-8'),
                                   'json': json.dumps(meta, sort_keys=True).encode('utf-8')})
  return list(writer.paths)

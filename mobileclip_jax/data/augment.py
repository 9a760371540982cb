"""Augmentation sampling and exact replay for reinforced datasets (DataCompDR's `paug.json`).

A reinforced dataset stores, per image, the k augmentations its teachers embedded; training
replays one of them so that the student sees the pixels behind the stored teacher embedding.
The stored form is Apple's (`ml-mobileclip` training/dr/transforms.py, `Compose.compress` over
RandomResizedCrop then RandAugment; `paug.json` = {"param_aug": [k entries]}), one JSON list per
augmentation:

    [[top, left, height, width], [[op_index, magnitude], [op_index, magnitude]]]
    e.g. [[3, 98, 296, 253], [[3, 30.45317268371582], [10, 7.0]]]  (a 400x500 image)

- item 0, the crop box: ints, in pixels of the decoded RGB image (torchvision's `get_params`).
- item 1, the RandAugment ops in the order applied, or null where RandAugment was skipped
  (probability 1 - p; never with DataCompDR's p = 1). `op_index` indexes `OP_NAMES`; the
  magnitude is the signed float torchvision's RandAugment took from its table for the
  generation crop (224), float32 values widened to float: ShearX 0.09000000357627869,
  TranslateX 30.45317268371582 (pixels), Rotate 9.0 (degrees), Brightness 0.26999998092651367,
  Posterize 7.0 (bits), Solarize 178.5 (threshold); 0.0 for Identity/AutoContrast/Equalize.

Replay crops the box, resizes it to the student's side (bicubic), then applies the ops with
torchvision's `_apply_op` semantics on PIL images (nearest resampling, fill 0, shear about the
top-left corner, translate and rotate about the image centre). As in Apple's replay, stored
magnitudes are applied as they are at every student size: a TranslateX stored as 30.45 moves
int(30.45) = 30 pixels whether the student sees 224 or 256 pixels (it is not rescaled); angles,
shears and colour factors do not depend on size.
"""
import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# One stored augmentation: [[top, left, height, width], [[op_index, magnitude], ...] or None].
AugParams = list

# PIL filters by torchvision InterpolationMode name.
_RESAMPLING = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
    'lanczos': Image.Resampling.LANCZOS,
}
# torchvision's fill=None on an RGB PIL image.
_FILL = (0, 0, 0)
# torchvision tries this many random boxes before falling back to a centre crop.
_CROP_ATTEMPTS = 10
_BOX_FIELDS = ('top', 'left', 'height', 'width')


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """How augmentations are sampled and replayed; the defaults are DataCompDR's.

  DataCompDR (training/configs/datacompdr{12m,1b}.json) sets RandomResizedCrop(224, bicubic) and
  RandAugment(p=1) and leaves everything else at torchvision's defaults, which are these.

  Attributes:
    image_size: side of the generation crop (the teachers' input); pixel magnitudes (translate)
      are computed for it.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    interpolation: resampling of the crop resize, a torchvision InterpolationMode name.
    num_ops: RandAugment ops per augmentation.
    magnitude: RandAugment magnitude bin, in [0, num_magnitude_bins).
    num_magnitude_bins: number of RandAugment magnitude bins.
    op_interpolation: resampling of the geometric RandAugment ops (torchvision: 'nearest').
    p: probability that RandAugment is applied at all; skipped ops are stored as null.
  """
  image_size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  interpolation: str = 'bicubic'
  num_ops: int = 2
  magnitude: int = 9
  num_magnitude_bins: int = 31
  op_interpolation: str = 'nearest'
  p: float = 1.0

  def __post_init__(self):
    for name in ('scale', 'ratio'):
      value = getattr(self, name)
      if (not isinstance(value, (list, tuple)) or len(value) != 2 or
          not all(_is_finite_real(v) for v in value) or not 0 < value[0] <= value[1]):
        raise ValueError(f'AugmentConfig.{name} must be two numbers 0 < low <= high; got {value!r}')
      object.__setattr__(self, name, (float(value[0]), float(value[1])))
    _check_int_field('image_size', self.image_size, 1)
    _check_int_field('num_ops', self.num_ops, 0)
    _check_int_field('num_magnitude_bins', self.num_magnitude_bins, 2)
    _check_int_field('magnitude', self.magnitude, 0)
    if self.magnitude >= self.num_magnitude_bins:
      raise ValueError(f'AugmentConfig.magnitude must be a bin in [0, num_magnitude_bins = '
                       f'{self.num_magnitude_bins}); got {self.magnitude}')
    for name in ('interpolation', 'op_interpolation'):
      if getattr(self, name) not in _RESAMPLING:
        raise ValueError(f'AugmentConfig.{name} must be one of {sorted(_RESAMPLING)}; '
                         f'got {getattr(self, name)!r}')
    if not _is_finite_real(self.p) or not 0.0 <= self.p <= 1.0:
      raise ValueError(f'AugmentConfig.p must be a probability in [0, 1]; got {self.p!r}')

  def to_dict(self) -> dict[str, Any]:
    """Returns the config as JSON-ready builtins (tuples become lists), for dataset metadata."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'AugmentConfig':
    """Inverse of `to_dict`; missing keys take the defaults, unknown keys are an error."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f'AugmentConfig has no field(s) {unknown}; the fields are {names}')
    return cls(**values)

  def op_magnitudes(self) -> tuple[tuple[float, bool], ...]:
    """(magnitude, signed) per op index, as RandAugment takes them for the generation crop."""
    return _op_magnitudes(self.image_size, self.num_magnitude_bins, self.magnitude)


def _is_finite_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int_field(name: str, value: Any, minimum: int):
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'AugmentConfig.{name} must be an integer >= {minimum}; got {value!r}')


_DATACOMPDR = AugmentConfig()


def _torch_linspace_item(start: float, end: float, steps: int, index: int) -> float:
  """Element `index` of float32 `torch.linspace(start, end, steps)`, as PyTorch's CPU kernel has it.

  The kernel rounds the step to float32 and then takes one fused multiply-add from the nearer
  end; the float64 product below is exact, so rounding the sum once to float32 matches it.
  """
  start32, end32 = np.float32(start), np.float32(end)
  step = float((end32 - start32) / np.float32(steps - 1))
  if index < steps // 2:
    return float(np.float32(float(start32) + step * index))
  return float(np.float32(float(end32) - step * (steps - index - 1)))


@functools.cache
def _op_magnitudes(image_size: int, num_bins: int, magnitude: int
                   ) -> tuple[tuple[float, bool], ...]:
  """torchvision's RandAugment table (`_augmentation_space`) at one bin, for a square image."""
  def bin_of(start: float, end: float) -> float:
    return _torch_linspace_item(start, end, num_bins, magnitude)
  # float32 `8 - round(arange / ((num_bins - 1) / 4))`, rounding half to even like torch.round.
  posterize_bits = 8 - int(np.round(np.float32(magnitude) / np.float32((num_bins - 1) / 4)))
  translate = bin_of(0.0, 150.0 / 331.0 * image_size)
  by_name = {
      'Identity': (0.0, False),
      'ShearX': (bin_of(0.0, 0.3), True),
      'ShearY': (bin_of(0.0, 0.3), True),
      'TranslateX': (translate, True),
      'TranslateY': (translate, True),
      'Rotate': (bin_of(0.0, 30.0), True),
      'Brightness': (bin_of(0.0, 0.9), True),
      'Color': (bin_of(0.0, 0.9), True),
      'Contrast': (bin_of(0.0, 0.9), True),
      'Sharpness': (bin_of(0.0, 0.9), True),
      'Posterize': (float(posterize_bits), False),
      'Solarize': (bin_of(255.0, 0.0), False),
      'AutoContrast': (0.0, False),
      'Equalize': (0.0, False),
  }
  return tuple(by_name[name] for name in OP_NAMES)


def _inverse_affine(shear_deg: tuple[float, float], translate: tuple[int, int],
                    center: tuple[float, float]) -> tuple[float, ...]:
  """PIL's (output -> input) affine coefficients for a shear about `center`, then a translation.

  This is torchvision's `_get_inverse_affine_matrix` at angle 0 and scale 1, written with the
  same float operations so that nearest-neighbour sampling picks the same source pixels.
  """
  sx, sy = math.radians(shear_deg[0]), math.radians(shear_deg[1])
  (cx, cy), (tx, ty) = center, translate
  a = math.cos(-sy) / math.cos(sy)
  b = -math.cos(-sy) * math.tan(sx) / math.cos(sy)
  c = math.sin(-sy) / math.cos(sy)
  d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + 1.0
  return (d, -b, d * (-cx - tx) + -b * (-cy - ty) + cx,
          -c, a, -c * (-cx - tx) + a * (-cy - ty) + cy)


def _affine(img: Image.Image, shear_deg: tuple[float, float], translate: tuple[int, int],
            center: tuple[float, float], resample: Image.Resampling) -> Image.Image:
  matrix = _inverse_affine(shear_deg, translate, center)
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=_FILL)


def _shear(img: Image.Image, magnitude: float, axis: int, resample: Image.Resampling
           ) -> Image.Image:
  # torchvision shears by atan(magnitude) degrees about the top-left corner.
  shear_deg = [0.0, 0.0]
  shear_deg[axis] = math.degrees(math.atan(magnitude))
  return _affine(img, tuple(shear_deg), (0, 0), (0, 0), resample)


def _translate(img: Image.Image, magnitude: float, axis: int, resample: Image.Resampling
               ) -> Image.Image:
  # torchvision truncates the pixel shift to int and centres the transform on the image.
  shift = [0, 0]
  shift[axis] = int(magnitude)
  return _affine(img, (0.0, 0.0), tuple(shift), (img.width * 0.5, img.height * 0.5), resample)


# (name, apply(img, magnitude, resample)) in stored index order; the magnitude is the signed one.
_OPS: tuple[tuple[str, Callable[[Image.Image, float, Image.Resampling], Image.Image]], ...] = (
    ('Identity', lambda img, m, r: img),
    ('ShearX', lambda img, m, r: _shear(img, m, 0, r)),
    ('ShearY', lambda img, m, r: _shear(img, m, 1, r)),
    ('TranslateX', lambda img, m, r: _translate(img, m, 0, r)),
    ('TranslateY', lambda img, m, r: _translate(img, m, 1, r)),
    ('Rotate', lambda img, m, r: img.rotate(m, r, fillcolor=_FILL)),
    ('Brightness', lambda img, m, r: ImageEnhance.Brightness(img).enhance(1.0 + m)),
    ('Color', lambda img, m, r: ImageEnhance.Color(img).enhance(1.0 + m)),
    ('Contrast', lambda img, m, r: ImageEnhance.Contrast(img).enhance(1.0 + m)),
    ('Sharpness', lambda img, m, r: ImageEnhance.Sharpness(img).enhance(1.0 + m)),
    ('Posterize', lambda img, m, r: ImageOps.posterize(img, int(m))),
    ('Solarize', lambda img, m, r: ImageOps.solarize(img, m)),
    ('AutoContrast', lambda img, m, r: ImageOps.autocontrast(img)),
    ('Equalize', lambda img, m, r: ImageOps.equalize(img)),
)
# The stored op index table (Apple's `RandAugment.op_names`, torchvision's table order).
OP_NAMES: tuple[str, ...] = tuple(name for name, _ in _OPS)
_POSTERIZE = OP_NAMES.index('Posterize')


def _sample_crop_box(rng: np.random.Generator, height: int, width: int,
                     scale: tuple[float, float], ratio: tuple[float, float]
                     ) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`, with the same draws in the same order."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_ATTEMPTS):
    target_area = area * float(rng.uniform(scale[0], scale[1]))
    aspect_ratio = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centred crop whose aspect ratio is within range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _sample_ops(rng: np.random.Generator, config: AugmentConfig) -> list[list] | None:
  """Apple's RandAugment draws: one uniform against p, then per op an index and maybe a sign."""
  if float(rng.random()) > config.p:
    return None
  table = config.op_magnitudes()
  ops = []
  for _ in range(config.num_ops):
    index = int(rng.integers(0, len(OP_NAMES)))
    magnitude, signed = table[index]
    if signed and int(rng.integers(0, 2)):
      magnitude = -magnitude
    ops.append([index, magnitude])
  return ops


def sample_params(rng: np.random.Generator, height: int, width: int,
                  config: AugmentConfig | None = None) -> AugParams:
  """Samples one augmentation for a `height` x `width` image, in the stored (paug.json) form.

  The draws follow Apple's generator (torchvision's RandomResizedCrop.get_params, then one
  uniform against `p`, then per op an index and, for signed ops, a sign), taken from `rng`.

  Args:
    rng: source of randomness.
    height: height of the decoded image in pixels.
    width: width of the decoded image in pixels.
    config: sampling config; DataCompDR's when None.

  Returns:
    [[top, left, height, width], [[op_index, magnitude], ...] or None]: builtin ints and floats,
    JSON-serialisable.
  """
  config = _DATACOMPDR if config is None else config
  for name, value in (('height', height), ('width', width)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f'sample_params: image {name} must be a positive integer; got {value!r}')
  box = _sample_crop_box(rng, int(height), int(width), config.scale, config.ratio)
  return [list(box), _sample_ops(rng, config)]


def _box_value(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'augmentation params crop box {field} must be an integer number of pixels; '
                     f'got {value!r}')
  if not math.isfinite(value) or value != int(value):
    raise ValueError(f'augmentation params crop box {field} must be a whole number of pixels; '
                     f'got {value!r}')
  return int(value)


def validate_params(params: Any, height: int | None = None, width: int | None = None
                    ) -> tuple[tuple[int, int, int, int], tuple[tuple[int, float], ...]]:
  """Checks one stored augmentation and returns it as ((top, left, height, width), ops).

  Args:
    params: one entry of paug.json's "param_aug" list.
    height: image height; with `width`, the box must lie inside the image.
    width: image width.

  Returns:
    The crop box as ints and the ops as (op_index, magnitude) pairs (empty where skipped).

  Raises:
    ValueError: naming the malformed field (length, type, unknown op index, non-finite number,
      out-of-range Posterize bits, a box that is empty or leaves the image).
  """
  if not isinstance(params, (list, tuple)) or len(params) != 2:
    raise ValueError('augmentation params must be [crop_box, rand_augment_ops] (2 items, the '
                     f'DataCompDR paug.json form); got {params!r:.200}')
  raw_box, raw_ops = params
  if not isinstance(raw_box, (list, tuple)) or len(raw_box) != 4:
    raise ValueError('augmentation params crop box (item 0) must be 4 integers [top, left, height, '
                     f'width]; got {raw_box!r:.200}')
  box = tuple(_box_value(v, f) for v, f in zip(raw_box, _BOX_FIELDS))
  top, left, box_h, box_w = box
  if top < 0 or left < 0 or box_h < 1 or box_w < 1:
    raise ValueError(f'augmentation params crop box [top, left, height, width] = {list(box)} must '
                     'have top, left >= 0 and height, width >= 1')
  if height is not None and width is not None and (top + box_h > height or left + box_w > width):
    raise ValueError(f'augmentation params crop box [top, left, height, width] = {list(box)} does '
                     f'not fit the {height}x{width} (height x width) image: top + height = '
                     f'{top + box_h}, left + width = {left + box_w}; were the params stored for a '
                     'different image or resolution?')
  if raw_ops is None:
    return box, ()
  if not isinstance(raw_ops, (list, tuple)):
    raise ValueError('augmentation params RandAugment ops (item 1) must be a list of [op_index, '
                     f'magnitude] pairs or null; got {raw_ops!r:.200}')
  ops = []
  for n, op in enumerate(raw_ops):
    where = f'augmentation params RandAugment op {n} (item 1[{n}])'
    if not isinstance(op, (list, tuple)) or len(op) != 2:
      raise ValueError(f'{where} must be [op_index, magnitude]; got {op!r:.200}')
    index, magnitude = op
    if (isinstance(index, bool) or not isinstance(index, numbers.Integral) or
        not 0 <= index < len(OP_NAMES)):
      raise ValueError(f'{where} has op_index {index!r}; valid indices are the integers 0..'
                       f'{len(OP_NAMES) - 1} ({", ".join(OP_NAMES)})')
    if not _is_finite_real(magnitude):
      raise ValueError(f'{where} ({OP_NAMES[index]}) has magnitude {magnitude!r}; expected a '
                       'finite number')
    if index == _POSTERIZE and not 0 <= int(magnitude) <= 8:
      raise ValueError(f'{where} (Posterize) keeps int(magnitude) = {int(magnitude)} bits; '
                       'expected 0..8')
    ops.append((int(index), float(magnitude)))
  return box, tuple(ops)


def replay(image: Image.Image, params: Any, size: int,
           config: AugmentConfig | None = None) -> np.ndarray:
  """Replays one stored augmentation at the student's resolution.

  Crops the stored box, resizes it to `size` x `size` with `config.interpolation`, then applies
  the stored ops in order with their stored magnitudes (see the module docstring on sizes).

  Args:
    image: the decoded image; other modes than RGB are converted to RGB first (the same pixels
      as the RGBA-then-RGB route of Apple's loaders).
    params: one stored augmentation, see `validate_params`.
    size: output side in pixels (the student's input resolution).
    config: supplies the resampling filters; DataCompDR's when None.

  Returns:
    uint8 array [size, size, 3].

  Raises:
    ValueError: if `params` is malformed or does not fit the image, or `size` is not positive.
  """
  config = _DATACOMPDR if config is None else config
  if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(f'replay: size must be a positive integer; got {size!r}')
  if image.mode != 'RGB':
    image = image.convert('RGB')
  (top, left, box_h, box_w), ops = validate_params(params, image.height, image.width)
  out = image.crop((left, top, left + box_w, top + box_h)).resize(
      (int(size), int(size)), _RESAMPLING[config.interpolation])
  resample = _RESAMPLING[config.op_interpolation]
  for index, magnitude in ops:
    out = _OPS[index][1](out, magnitude, resample)
  return np.array(out)


# Apple's generation configs (ml-mobileclip training/configs/*.json, `image_augmentation`).
_TORCHVISION_OP_INTERPOLATION = 'nearest'


def to_generation_config(config: AugmentConfig) -> dict[str, Any]:
  """`config` as Apple's `image_augmentation` section, every field explicit.

  Keys are torchvision's keyword arguments, so Apple's `compose_from_config` builds the same
  RandomResizedCrop and RandAugment from it, and `from_generation_config` reads it back.
  RandAugment's resampling is written only when it is not torchvision's default ('nearest'):
  Apple's RandAugment passes it on as a string, which torchvision refuses.
  """
  rand_augment = {'enable': True, 'p': config.p, 'num_ops': config.num_ops,
                  'magnitude': config.magnitude, 'num_magnitude_bins': config.num_magnitude_bins}
  if config.op_interpolation != _TORCHVISION_OP_INTERPOLATION:
    rand_augment['interpolation'] = config.op_interpolation
  return {
      'random_resized_crop': {'size': config.image_size, 'scale': list(config.scale),
                              'ratio': list(config.ratio), 'interpolation': config.interpolation},
      'rand_augment': rand_augment,
      'to_rgb': {'enable': True},
      'to_tensor': {'enable': True},
  }


def from_generation_config(augmentation: dict[str, Any] | None) -> AugmentConfig:
  """The AugmentConfig of a dataset's metadata, in `AugmentConfig.to_dict` or Apple's form.

  Apple's form is the 'image_augmentation' section of ml-mobileclip's generation configs
  (training/configs/datacompdr12m.json): {'random_resized_crop': {size, scale, ratio,
  interpolation}, 'rand_augment': {enable, p, num_ops, magnitude, num_magnitude_bins,
  interpolation}, ...}; keys it leaves out take torchvision's defaults, which are
  AugmentConfig's. Other transforms in it (normalize, to_rgb, to_tensor) do not affect replay.
  """
  if augmentation is None:
    raise ValueError('The dataset metadata has no augmentation config, so its stored '
                     'augmentations cannot be replayed; rebuild it with --reinforce_config.')
  if 'random_resized_crop' not in augmentation:
    return AugmentConfig.from_dict(augmentation)
  crop = dict(augmentation['random_resized_crop'])
  rand_augment = dict(augmentation.get('rand_augment') or {'enable': False})
  size = crop.pop('size', AugmentConfig.image_size)
  values = {'image_size': size[0] if isinstance(size, (list, tuple)) else size}
  values.update({k: crop.pop(k) for k in ('scale', 'ratio', 'interpolation') if k in crop})
  if not rand_augment.pop('enable', True):
    rand_augment = {'p': 0.0}
  if 'interpolation' in rand_augment:
    values['op_interpolation'] = rand_augment.pop('interpolation')
  if rand_augment.get('fill', None) is None:
    rand_augment.pop('fill', None)  # None is torchvision's default, black.
  values.update({k: rand_augment.pop(k) for k in ('p', 'num_ops', 'magnitude',
                                                  'num_magnitude_bins') if k in rand_augment})
  unknown = sorted(crop) + sorted(rand_augment)
  if unknown:
    raise ValueError(f'Unsupported options {unknown} in the dataset\'s augmentation config '
                     f'{augmentation}: replay cannot reproduce them.')
  return AugmentConfig.from_dict(values)

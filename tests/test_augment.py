"""Augmentation sampling and replay, checked against torchvision on real photographs.

Apple's reinforcement code (ml-mobileclip training/dr/transforms.py) samples with torchvision's
`RandomResizedCrop.get_params` and `RandAugment`, stores [box, [[op_index, magnitude], ...]], and
replays with `functional.resized_crop` and `autoaugment._apply_op` on PIL images. The references
below call exactly those torchvision functions; the op index table is torchvision's own table
order (Apple samples `list(op_meta.keys())[op_index]`).
"""
import json
import math

import numpy as np
import pytest
from PIL import Image

from mobileclip_jax import torch_compat
from mobileclip_jax.data import augment

skimage_data = pytest.importorskip('skimage.data')
torch = pytest.importorskip('torch')
torchvision = torch_compat.import_torchvision()
T = torchvision.transforms
TF = torchvision.transforms.functional
autoaugment = torchvision.transforms.autoaugment

# torchvision's private pieces that Apple's pipeline calls directly.
_augmentation_space = T.RandAugment()._augmentation_space  # pylint: disable=protected-access
_apply_op = autoaugment._apply_op  # pylint: disable=protected-access

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')
TV_OP_NAMES = tuple(_augmentation_space(31, (224, 224)))


@pytest.fixture(scope='module')
def photos() -> dict[str, Image.Image]:
  return {name: Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS}


def torchvision_table(size: int, num_bins: int, magnitude: int) -> list[tuple[float, bool]]:
  """(magnitude, signed) per op as torchvision's RandAugment (and Apple's sampler) takes them."""
  space = _augmentation_space(num_bins, (size, size))
  return [(float(m[magnitude].item()) if m.ndim > 0 else 0.0, signed)
          for m, signed in space.values()]


def torchvision_replay(image: Image.Image, params, size: int,
                       config: augment.AugmentConfig = augment.AugmentConfig()) -> np.ndarray:
  """Apple's `Compose.reapply` on a PIL image: resized_crop then `_apply_op` per stored op."""
  out = TF.resized_crop(image.convert('RGBA').convert('RGB'), *params[0], [size, size],
                        T.InterpolationMode(config.interpolation))
  for index, magnitude in params[1] or []:
    out = _apply_op(out, TV_OP_NAMES[index], magnitude,
                    interpolation=T.InterpolationMode(config.op_interpolation), fill=None)
  return np.asarray(out)


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray, what: str):
  assert actual.dtype == np.uint8 and actual.shape == expected.shape, what
  diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
  assert diff.max() == 0, f'{what}: max |diff| {diff.max()} at {np.argwhere(diff > 0)[:3].tolist()}'


def test_op_names_are_torchvision_table_order():
  assert augment.OP_NAMES == TV_OP_NAMES
  assert len(augment.OP_NAMES) == 14


@pytest.mark.parametrize('size', [224, 256, 97])
@pytest.mark.parametrize('num_bins', [31, 10, 50])
def test_magnitude_table_matches_torchvision(size, num_bins):
  for magnitude in range(num_bins):
    config = augment.AugmentConfig(image_size=size, num_magnitude_bins=num_bins,
                                   magnitude=magnitude)
    expected = torchvision_table(size, num_bins, magnitude)
    assert list(config.op_magnitudes()) == expected, (size, num_bins, magnitude)


@pytest.mark.parametrize('op_index', range(len(TV_OP_NAMES)))
def test_each_op_matches_torchvision(photos, op_index):
  # Magnitudes from torchvision's own table at several bins, both signs, at the generation size
  # and at a student size where the stored (224-pixel) translate is applied unscaled.
  magnitudes = set()
  for magnitude_bin in (0, 5, 9, 30):
    value, signed = torchvision_table(224, 31, magnitude_bin)[op_index]
    magnitudes |= {value, -value} if signed else {value}
  for size in (224, 256):
    for name, photo in photos.items():
      box = [7, 13, photo.height - 20, photo.width - 30]
      for magnitude in sorted(magnitudes):
        params = [box, [[op_index, magnitude]]]
        assert_same_pixels(augment.replay(photo, params, size),
                           torchvision_replay(photo, params, size),
                           f'{TV_OP_NAMES[op_index]}({magnitude}) on {name} at {size}')


@pytest.mark.parametrize('size', [224, 256])
def test_crop_alone_matches_torchvision(photos, size):
  rng = np.random.default_rng(1)
  for name, photo in photos.items():
    h, w = photo.height, photo.width
    boxes = [[0, 0, h, w], [h - 1, w - 1, 1, 1], [0, 5, h, 17], [3, 0, size, size]]
    boxes += [augment.sample_params(rng, h, w)[0] for _ in range(10)]
    for box in boxes:
      for ops in (None, []):
        assert_same_pixels(augment.replay(photo, [box, ops], size),
                           torchvision_replay(photo, [box, ops], size), f'crop {box} of {name}')


@pytest.mark.parametrize('config', [
    augment.AugmentConfig(),
    augment.AugmentConfig(image_size=256, num_ops=3, magnitude=20, p=0.5,
                          interpolation='bilinear', op_interpolation='bilinear'),
], ids=['datacompdr', 'custom'])
def test_random_chains_match_torchvision(photos, config):
  rng = np.random.default_rng(2)
  for n in range(120):
    name = PHOTOS[n % len(PHOTOS)]
    photo = photos[name]
    params = augment.sample_params(rng, photo.height, photo.width, config)
    size = (224, 256)[n % 2]
    assert_same_pixels(augment.replay(photo, params, size, config),
                       torchvision_replay(photo, params, size, config), f'{params} on {name}')


def test_replay_converts_other_modes_like_apples_loader():
  # Apple decodes to RGBA and converts to RGB; the reference does that, replay converts directly.
  gray = Image.fromarray(skimage_data.camera())
  rgba = Image.fromarray(skimage_data.logo())
  rng = np.random.default_rng(3)
  for image in (gray, rgba, gray.convert('P'), rgba.convert('LA')):
    params = augment.sample_params(rng, image.height, image.width)
    out = augment.replay(image, params, 64)
    assert out.shape == (64, 64, 3)
    assert_same_pixels(out, torchvision_replay(image, params, 64), f'mode {image.mode}')


class TorchDraws:
  """The three np.random.Generator calls sample_params makes, served by torch's global RNG the
  way torchvision draws them, so Apple's sampler and ours consume the same random numbers."""

  def uniform(self, low, high):
    return torch.empty(1).uniform_(low, high).item()

  def integers(self, low, high):
    return torch.randint(low, high, size=(1,)).item()

  def random(self):
    return torch.rand(1).item()


def apple_sample(height: int, width: int, monkeypatch) -> list:
  """Apple's generator (Compose over RandomResizedCrop, RandAugment(p=1)) and `compress`, in order:
  get_params, `torch.rand(1) > p`, then RandAugment's draws, recorded where it applies each op."""
  image = Image.new('RGB', (width, height))
  box = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
  assert not torch.rand(1) > 1.0
  ops = []
  monkeypatch.setattr(autoaugment, '_apply_op', lambda img, op_name, magnitude, **_: (
      ops.append([TV_OP_NAMES.index(op_name), magnitude]), img)[1])
  T.RandAugment()(Image.new('RGB', (224, 224)))
  return [list(box), ops]


@pytest.mark.parametrize('height,width', [(300, 451), (512, 512), (37, 23), (1000, 62), (47, 1000)])
def test_same_draws_give_apples_stored_entries(height, width, monkeypatch):
  boxes = set()
  for seed in range(200):
    torch.manual_seed(seed)
    expected = apple_sample(height, width, monkeypatch)
    torch.manual_seed(seed)
    actual = augment.sample_params(TorchDraws(), height, width)
    assert actual == expected, (seed, height, width)
    assert json.loads(json.dumps(actual)) == actual
    boxes.add(tuple(actual[0]))
  # Beyond 4:1 no random box fits and every draw takes the same centre-crop fallback.
  extreme = max(height, width) > 4 * min(height, width)
  assert (len(boxes) == 1) == extreme, len(boxes)


def test_sample_statistics_and_stored_form():
  config = augment.AugmentConfig()
  table = torchvision_table(224, 31, 9)
  rng = np.random.default_rng(4)
  height, width = 300, 451
  op_counts = np.zeros(len(TV_OP_NAMES), int)
  signs = []
  for _ in range(2000):
    params = augment.sample_params(rng, height, width, config)
    assert json.loads(json.dumps(params)) == params
    (top, left, h, w), ops = params
    assert all(type(v) is int for v in params[0])  # pylint: disable=unidiomatic-typecheck
    assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
    # Scale and ratio bounds, allowing for the rounding of h and w to whole pixels.
    assert (h + 0.5) * (w + 0.5) >= config.scale[0] * height * width
    assert (h - 0.5) * (w - 0.5) <= config.scale[1] * height * width
    assert (w + 0.5) / (h - 0.5) >= config.ratio[0] and (w - 0.5) / (h + 0.5) <= config.ratio[1]
    assert len(ops) == config.num_ops
    for index, magnitude in ops:
      # pylint: disable-next=unidiomatic-typecheck
      assert type(index) is int and type(magnitude) is float
      value, signed = table[index]
      assert magnitude in ({value, -value} if signed else {value})
      op_counts[index] += 1
      if signed and value:
        signs.append(magnitude > 0)
  # 4000 uniform draws over 14 ops: expected 286 each, standard deviation ~16.
  assert op_counts.min() > 200 and op_counts.max() < 380, op_counts
  assert 0.45 < np.mean(signs) < 0.55


def test_skipped_rand_augment_is_stored_as_null():
  rng = np.random.default_rng(5)
  never = augment.AugmentConfig(p=0.0)
  assert all(augment.sample_params(rng, 50, 60, never)[1] is None for _ in range(20))
  image = Image.fromarray(skimage_data.chelsea())
  params = [[10, 20, 100, 150], None]
  assert_same_pixels(augment.replay(image, params, 32), torchvision_replay(image, params, 32),
                     'no ops')
  half = [augment.sample_params(rng, 50, 60, augment.AugmentConfig(p=0.5))[1] for _ in range(400)]
  assert 150 < sum(ops is None for ops in half) < 250


def test_config_defaults_are_datacompdr():
  config = augment.AugmentConfig()
  crop = T.RandomResizedCrop(224)
  rand_augment = T.RandAugment()
  # training/configs/datacompdr{12m,1b}.json: random_resized_crop size 224, bicubic; rand_augment
  # p 1.0; everything else is torchvision's default.
  assert (config.image_size, config.interpolation, config.p) == (224, 'bicubic', 1.0)
  assert config.scale == tuple(crop.scale) and config.ratio == tuple(crop.ratio)
  assert (config.num_ops, config.magnitude, config.num_magnitude_bins) == (
      rand_augment.num_ops, rand_augment.magnitude, rand_augment.num_magnitude_bins)
  assert config.op_interpolation == rand_augment.interpolation.value


def test_config_round_trips_through_json():
  config = augment.AugmentConfig(image_size=256, scale=(0.2, 0.9), num_ops=3, p=0.5)
  restored = augment.AugmentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
  assert restored == config
  assert augment.AugmentConfig.from_dict({}) == augment.AugmentConfig()


@pytest.mark.parametrize('values,message', [
    ({'magnitude': 31}, 'magnitude'),
    ({'scale': (1.0, 0.08)}, 'scale'),
    ({'ratio': (0.75,)}, 'ratio'),
    ({'interpolation': 'cubic'}, 'interpolation'),
    ({'num_ops': -1}, 'num_ops'),
    ({'p': 1.5}, 'p must be'),
    ({'image_sise': 224}, 'image_sise'),
])
def test_config_rejects_bad_values(values, message):
  with pytest.raises(ValueError, match=message):
    augment.AugmentConfig.from_dict(values)


GOOD_BOX = [1, 2, 30, 40]


@pytest.mark.parametrize('params,message', [
    ([GOOD_BOX], r'must be \[crop_box, rand_augment_ops\]'),
    ([GOOD_BOX, [], None], r'must be \[crop_box, rand_augment_ops\]'),
    ('[[1, 2, 30, 40], null]', r'must be \[crop_box, rand_augment_ops\]'),
    ([[1, 2, 30], None], r'crop box \(item 0\) must be 4 integers'),
    ([[1, 2.5, 30, 40], None], 'crop box left must be a whole number'),
    ([[float('nan'), 2, 30, 40], None], 'crop box top must be a whole number'),
    ([[1, 2, True, 40], None], 'crop box height must be an integer'),
    ([[1, 2, 0, 40], None], 'height, width >= 1'),
    ([[-1, 2, 30, 40], None], 'top, left >= 0'),
    ([[20, 2, 30, 40], None], r'does not fit the 48x64 .* top \+ height = 50'),
    ([[1, 30, 30, 40], None], r'does not fit the 48x64 .* left \+ width = 70'),
    ([GOOD_BOX, [3, 10.0]], r'op 0 \(item 1\[0\]\) must be \[op_index, magnitude\]'),
    ([GOOD_BOX, {'op': 3}], r'RandAugment ops \(item 1\) must be a list'),
    ([GOOD_BOX, [[3, 10.0], [14, 0.0]]], r'op 1 .* op_index 14; valid indices are .*0\.\.13'),
    ([GOOD_BOX, [[-1, 0.0]]], 'op_index -1'),
    ([GOOD_BOX, [[2.0, 0.0]]], 'op_index 2.0'),
    ([GOOD_BOX, [[5, float('nan')]]], r'op 0 .*\(Rotate\) has magnitude nan'),
    ([GOOD_BOX, [[6, float('inf')]]], r'\(Brightness\) has magnitude inf'),
    ([GOOD_BOX, [[6, '0.3']]], r'\(Brightness\) has magnitude .0\.3.'),
    ([GOOD_BOX, [[10, 9.0]]], r'Posterize.* = 9 bits; expected 0\.\.8'),
])
def test_malformed_params_raise(params, message):
  image = Image.new('RGB', (64, 48))
  with pytest.raises(ValueError, match=message):
    augment.replay(image, params, 16)


def test_bad_sizes_raise():
  image = Image.new('RGB', (64, 48))
  with pytest.raises(ValueError, match='size must be a positive integer'):
    augment.replay(image, [GOOD_BOX, None], 0)
  with pytest.raises(ValueError, match='image width must be a positive integer'):
    augment.sample_params(np.random.default_rng(0), 48, 0)


def test_validate_params_normalises_types():
  box, ops = augment.validate_params([[1.0, np.int64(2), 30, 40], [(3, np.float32(-30.5))]],
                                     48, 64)
  # pylint: disable-next=unidiomatic-typecheck
  assert box == (1, 2, 30, 40) and all(type(v) is int for v in box)
  assert ops == ((3, -30.5),) and math.copysign(1.0, ops[0][1]) == -1.0

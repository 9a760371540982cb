"""The demo's inspection statistics against hand-computed cases (the outputs of a whole demo
workdir are checked in test_demo.py)."""
import numpy as np
import pytest

from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.demo import inspection
from mobileclip_jax.demo import world as world_lib


def _object(center=(0.5, 0.5), radius=0.1):
  return world_lib.SceneObject('circle', 'red', 'small', 'centre', 'filled', (200, 0, 0), center,
                               radius, 0.0)


def test_object_in_crop_fraction_and_size():
  obj = _object()
  # The whole 64 px image resized to 32: all of it, diameter 0.2 * 32 px.
  assert inspection._object_in_crop(obj, (0, 0, 64, 64), 64, 32) == pytest.approx((1.0, 6.4))
  # A crop of the left half, up to the object's centre line: about half of the disc.
  fraction, diameter = inspection._object_in_crop(obj, (0, 0, 64, 32), 64, 32)
  assert fraction == pytest.approx(0.5, abs=0.05)
  assert diameter == pytest.approx(0.2 * 64 * 32 / np.sqrt(64 * 32))
  # A corner crop that misses it.
  assert inspection._object_in_crop(obj, (0, 0, 16, 16), 64, 32)[0] == 0.0


def test_caption_stats_count_what_the_text_tower_reads():
  labels = world_lib.sample_scene(world_lib.DemoWorldConfig(), 'train', 0, 0).labels()
  color, shape = labels['color'], labels['shape']
  background = f"{labels['background_color']} background"
  texts = [f'a {color} {shape}', f'a {shape} on a {background}',
           'IMG_1234.jpg', f'{"very " * 40}{color} {shape}']
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  stats = inspection.caption_stats(texts, [labels] * 4, tokenizer, context_length=32)
  tasks = stats['tasks']
  assert tasks['color']['named'] == 0.25 and tasks['color']['named_full'] == 0.5  # cut off
  assert tasks['shape']['named'] == 0.5 and tasks['shape']['named_full'] == 0.75
  assert tasks['object']['named'] == 0.25
  assert tasks['background_color']['named'] == 0.25
  assert stats['truncated'] == 0.25


def test_ridge_probe_separates_separable_classes_and_not_noise():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3
  y = rng.integers(0, 4, 400)
  x = centers[y] + rng.normal(size=(400, 16))
  predicted = inspection._ridge_probe(x[:300], y[:300], x[300:], 4)
  assert np.mean(predicted == y[300:]) > 0.95
  noise = inspection._ridge_probe(x[:300], rng.integers(0, 4, 300), x[300:], 4)
  assert np.mean(noise == y[300:]) < 0.45


def test_scene_of_a_uid_is_the_sample_scene():
  config = world_lib.DemoWorldConfig()
  assert inspection.scene_of('demo-val-s3-00000012', config) == world_lib.sample_scene(
      config, 'val', 12, 3)
  with pytest.raises(ValueError, match='not a demo-world uid'):
    inspection.scene_of('laion-123', config)

"""Demo-world samples (image, noisy caption, labels) and their DataCompDR-style tar shards."""
import hashlib
import json
import os
from typing import Any, Iterator

from mobileclip_jax.data import wds
from mobileclip_jax.demo import captions
from mobileclip_jax.demo import render
from mobileclip_jax.demo import world
from mobileclip_jax.demo.world import DemoWorldConfig


def sample_uid(split: str, index: int, seed: int) -> str:
  """The sample's uid, also its webdataset key (no dots)."""
  return f'demo-{split}-s{seed}-{index:08d}'


def make_sample(split: str, index: int, image_size: int, seed: int,
                config: DemoWorldConfig | None = None) -> dict[str, Any]:
  """One sample: {'uid': str, 'image': RGB PIL image, 'caption': str (noisy), 'labels': dict}."""
  config = config or DemoWorldConfig()
  scene = world.sample_scene(config, split, index, seed)
  labels = scene.labels()
  rng = world.sample_rng(seed, split, index, world.CAPTION_STREAM)
  caption = captions.gt_caption(labels, config, rng)
  return {'uid': sample_uid(split, index, seed), 'caption': caption, 'labels': labels,
          'image': render.render(scene, image_size, config.supersample)}


def iter_samples(split: str, num_samples: int, image_size: int, seed: int,
                 config: DemoWorldConfig | None = None, start: int = 0) -> Iterator[dict[str, Any]]:
  """Yields `make_sample` for indices start .. start + num_samples - 1 of `split`."""
  world.check_split(split)
  config = config or DemoWorldConfig()
  for index in range(start, start + num_samples):
    yield make_sample(split, index, image_size, seed, config)


def tar_members(sample: dict[str, Any], image_format: str = 'jpg',
                jpeg_quality: int = 90) -> dict[str, bytes]:
  """A sample's DataCompDR-style tar members: `<image_format>` (the image), 'txt' (the noisy
  ground-truth caption) and 'json' ({"uid": ..., "sha256": <of the image bytes>, **labels})."""
  image = render.encode_image(sample['image'], image_format, jpeg_quality)
  meta = {'uid': sample['uid'], 'sha256': hashlib.sha256(image).hexdigest(), **sample['labels']}
  return {image_format: image, 'txt': sample['caption'].encode('utf-8'),
          'json': json.dumps(meta, sort_keys=True).encode('utf-8')}


def write_split(out_dir: str, split: str, num_samples: int, image_size: int, samples_per_shard: int,
                seed: int, config: DemoWorldConfig | None = None, image_format: str = 'jpg',
                jpeg_quality: int = 90, start: int = 0) -> list[str]:
  """Writes samples start .. start + num_samples - 1 of `split` as DataCompDR-style tars.

  Shards are `out_dir/<split>/00000000.tar, ...`, each holding `samples_per_shard` samples (the
  last fewer), under their `sample_uid` keys with their `tar_members`.

  Returns:
    The shard paths written, in order.
  """
  world.check_split(split)
  if num_samples < 1 or samples_per_shard < 1:
    raise ValueError(f'write_split needs num_samples >= 1 and samples_per_shard >= 1, got '
                     f'{num_samples} and {samples_per_shard}.')
  pattern = os.path.join(out_dir, split, '{:08d}.tar')
  with wds.ShardWriter(pattern, samples_per_shard) as writer:
    for sample in iter_samples(split, num_samples, image_size, seed, config, start):
      writer.write(sample['uid'], tar_members(sample, image_format, jpeg_quality))
  return list(writer.paths)

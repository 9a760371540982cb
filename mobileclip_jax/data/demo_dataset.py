"""The demo world as a training dataset: demo tars -> the plain TFDS image-caption dataset.

`ensure_plain_dataset` makes `demo_world` in a data directory if it is not there yet (a few
seconds), through the same DataCompDR-tar -> TFDS path as real data. The reinforced version,
`demo_world_reinforced`, needs trained teachers and is made by `launch/demo.py`.
"""
import logging
import os

from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import demo_world
from mobileclip_jax.data import reinforced_tfds

log = logging.getLogger('mobileclip_jax')
PLAIN_NAME = 'demo_world'
REINFORCED_NAME = 'demo_world_reinforced'
DEMO_NAMES = (PLAIN_NAME, REINFORCED_NAME)


def exists(name: str, data_dir: str) -> bool:
  try:
    reinforced_tfds.open_reinforced(name, data_dir)
  except FileNotFoundError:
    return False
  return True


def ensure_plain_dataset(data_dir: str, num_samples: int = 4096, image_size: int = 64,
                         seed: int = 0, samples_per_shard: int = 1024) -> str:
  """Builds the plain `demo_world` TFDS dataset under `data_dir` unless it exists; returns its name."""
  data_dir = os.path.expanduser(data_dir)
  if exists(PLAIN_NAME, data_dir):
    return PLAIN_NAME
  log.info('Building the demo world dataset (%d samples at %d px) in %s.', num_samples,
           image_size, data_dir)
  tars = os.path.join(data_dir, f'{PLAIN_NAME}.tars')
  shards = demo_world.write_split(tars, 'train', num_samples, image_size, samples_per_shard, seed)
  dataset_build.build_dataset(shards, PLAIN_NAME, data_dir, kind='plain', progress=False)
  return PLAIN_NAME

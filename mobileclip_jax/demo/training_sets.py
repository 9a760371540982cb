"""The demo world as training datasets: demo tars -> plain TFDS image-caption datasets.

The students' `demo_world` and the teachers' `demo_world_teachers` go through the same
DataCompDR-tar -> TFDS path as real data (`dataset_build.build_dataset`); the reinforced
`demo_world_reinforced` needs trained teachers and is made by recipe.py.
"""
import logging
import os

from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.demo import samples
from mobileclip_jax.demo import hparams as settings_lib
from mobileclip_jax.demo.world import DemoWorldConfig

log = logging.getLogger('mobileclip_jax')


def exists(name: str, data_dir: str) -> bool:
  try:
    reinforced_tfds.open_reinforced(name, data_dir)
  except FileNotFoundError:
    return False
  return True


def check_size(name: str, data_dir: str, expected: int) -> None:
  """Refuses a dataset built with another number of examples than this run wants."""
  source, _ = reinforced_tfds.open_reinforced(name, data_dir)
  if len(source) != expected:
    raise ValueError(f'{reinforced_tfds.dataset_dir(name, data_dir)} holds {len(source)} '
                     f'examples, but this demo run wants {expected}: it was built with other '
                     'settings. Use another --workdir, or delete that dataset.')


def build_plain(name: str, data_dir: str, num_samples: int, image_size: int, seed: int,
                samples_per_shard: int, world: DemoWorldConfig) -> None:
  """Builds `name` from the 'train' split of `world` under `data_dir` unless it exists."""
  data_dir = os.path.expanduser(data_dir)
  if not exists(name, data_dir):
    log.info('Building %s (%d samples at %d px, caption noise x%.2f) in %s.', name, num_samples,
             image_size, world.caption_noise, data_dir)
    shards = samples.write_split(os.path.join(data_dir, f'{name}.tars'), 'train', num_samples,
                                 image_size, samples_per_shard, seed, world)
    dataset_build.build_dataset(shards, name, data_dir, kind='plain', overwrite=True,
                                progress=False)


def build_data(settings: settings_lib.DemoSettings, data_dir: str) -> None:
  """The students' `demo_world` and the teachers' `demo_world_teachers` (if not built yet)."""
  for name, num_samples, world in (
      (settings_lib.PLAIN_NAME, settings.num_samples, DemoWorldConfig()),
      (settings_lib.TEACHERS_NAME, settings.teacher_samples,
       DemoWorldConfig(caption_noise=settings.teacher_caption_noise))):
    build_plain(name, data_dir, num_samples, settings.render_size, settings.seed,
                settings.samples_per_shard, world)
    check_size(name, data_dir, num_samples)

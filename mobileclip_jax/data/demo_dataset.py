"""Transitional: train/data.py's fallback to the demo world (issue 9 removes it, then this file).

The demo's datasets are built by mobileclip_jax/demo/datasets.py.
"""
from mobileclip_jax.demo import datasets
from mobileclip_jax.demo import settings
from mobileclip_jax.demo.world import DemoWorldConfig

PLAIN_NAME = settings.PLAIN_NAME
REINFORCED_NAME = settings.REINFORCED_NAME
DEMO_NAMES = (PLAIN_NAME, REINFORCED_NAME)
exists = datasets.exists


def ensure_plain_dataset(data_dir: str, num_samples: int = 4096, image_size: int = 64,
                         seed: int = 0, samples_per_shard: int = 1024) -> str:
  """Builds the plain `demo_world` under `data_dir` unless it exists; returns its name."""
  datasets.build_plain(PLAIN_NAME, data_dir, num_samples, image_size, seed, samples_per_shard,
                       DemoWorldConfig())
  return PLAIN_NAME

"""Input shards of a generation: DataCompDR-style tars, or demo-world samples made in memory.

Each input shard becomes one output shard under the same name: a tar's path relative to the
common folder of all input tars ('00000000.tar', or '03/00000000.tar' for DataCompDR-1B's
layout), or '%08d.tar' for the demo world. `src='demo:SPLIT:N'` makes samples 0..N-1 of a
demo-world split, with the members `demo.write_split` would write to disk.
"""
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Union

from mobileclip_jax import demo as demo_world
from mobileclip_jax.data import wds

DEMO_PREFIX = 'demo:'


@dataclasses.dataclass(frozen=True)
class TarShard:
  """An input tar shard; `index` is its position in the input list (process assignment)."""
  index: int
  name: str
  path: str

  def read(self, on_error: Optional[wds.ErrorHandler]) -> Iterator[wds.RawSample]:
    return wds.iter_samples(self.path, on_error)

  def fingerprint(self) -> Dict[str, Any]:
    """Identifies the input's content: a changed file is generated again on resume."""
    stat = os.stat(self.path)
    return {'path': self.path, 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


@dataclasses.dataclass(frozen=True)
class DemoShard:
  """Samples start .. start + count - 1 of a demo-world split, encoded as tar members."""
  index: int
  name: str
  split: str
  start: int
  count: int
  image_size: int
  seed: int

  def read(self, on_error: Optional[wds.ErrorHandler]) -> Iterator[wds.RawSample]:
    del on_error  # Made in memory: nothing can be corrupt.
    for sample in demo_world.iter_samples(self.split, self.count, self.image_size, self.seed,
                                          start=self.start):
      image = demo_world.encode_image(sample['image'])
      meta = {'uid': sample['uid'], 'sha256': hashlib.sha256(image).hexdigest(),
              **sample['labels']}
      yield wds.RawSample(self.name, sample['uid'], {
          'jpg': image, 'txt': sample['caption'].encode('utf-8'),
          'json': json.dumps(meta, sort_keys=True).encode('utf-8')})

  def fingerprint(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


InputShard = Union[TarShard, DemoShard]


def resolve(src: str, demo_samples_per_shard: int = 1000, demo_image_size: int = 64,
            demo_seed: int = 0) -> List[InputShard]:
  """The input shards of `src`: tar patterns (see `wds.expand_shards`) or 'demo:SPLIT:N'."""
  if src.startswith(DEMO_PREFIX):
    match = re.fullmatch(r'demo:(\w+):(\d+)', src)
    if not match or match.group(1) not in demo_world.SPLITS or int(match.group(2)) < 1:
      raise ValueError(f'--src={src!r}: the demo world is demo:SPLIT:N with SPLIT one of '
                       f'{demo_world.SPLITS} and N >= 1 samples, e.g. demo:train:1000.')
    if demo_samples_per_shard < 1:
      raise ValueError(f'demo_samples_per_shard must be >= 1, got {demo_samples_per_shard}.')
    split, total = match.group(1), int(match.group(2))
    starts = range(0, total, demo_samples_per_shard)
    return [DemoShard(i, f'{i:08d}.tar', split, start,
                      min(demo_samples_per_shard, total - start), demo_image_size, demo_seed)
            for i, start in enumerate(starts)]
  paths = [os.path.abspath(p) for p in wds.expand_shards(src)]
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [TarShard(i, os.path.relpath(p, root), p) for i, p in enumerate(paths)]

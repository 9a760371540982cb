"""Input shards of a generation: DataCompDR-style tars, or shards a plugin makes.

Each input shard becomes one output shard under the same name: a tar's path relative to the
common folder of all input tars ('00000000.tar', or '03/00000000.tar' for DataCompDR-1B's
layout). A `src` of the form 'SCHEME:...' with a registered scheme (`register_scheme`) is
resolved by that plugin instead, e.g. the demo world's 'demo:SPLIT:N' (samples made in memory,
mobileclip_jax/demo/sources.py). An input shard has `index`, `name`, `read(on_error)` (raw samples)
and `fingerprint()` (what identifies its content, for resume).
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

from mobileclip_jax import plugins
from mobileclip_jax.data import wds


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


InputShard = Any  # TarShard or a plugin's shard (same attributes and methods).
_SCHEMES: Dict[str, Callable[[str], List[InputShard]]] = {}


def register_scheme(scheme: str, resolve_fn: Callable[[str], List[InputShard]]) -> None:
  """Adds a `src` scheme: `resolve_fn(src)` gives the input shards of 'SCHEME:...'."""
  if scheme in _SCHEMES:
    raise ValueError(f'Input scheme {scheme!r} is registered already.')
  _SCHEMES[scheme] = resolve_fn


def resolve(src: str) -> List[InputShard]:
  """The input shards of `src`: tar patterns (see `wds.expand_shards`) or a registered scheme."""
  plugins.load()
  scheme = src.split(':', 1)[0]
  if ':' in src and scheme in _SCHEMES:
    return _SCHEMES[scheme](src)
  paths = [os.path.abspath(p) for p in wds.expand_shards(src)]
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [TarShard(i, os.path.relpath(p, root), p) for i, p in enumerate(paths)]

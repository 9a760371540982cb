"""Caption streams from the project's data sources, e.g. to train a tokenizer vocabulary.

A source is one of
  - a plain-text file (one caption per line) or a .jsonl file (`field` of each object),
  - 'tars:PATTERN': webdataset shards (DataCompDR layout): each sample's `txt` and the
    captions of its syn.json,
  - 'tfds:NAME' (or 'tfds:NAME@DATA_DIR'): a dataset built by launch/build_dataset.py: its
    ground-truth and synthetic captions.
"""
import json
import os
from typing import Iterator, Sequence

from etils import epath

from mobileclip_jax.data import wds


def _text_file(path: str, field: str) -> Iterator[str]:
  is_jsonl = path.endswith('.jsonl')
  with epath.Path(path).open('r', encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if not is_jsonl:
        yield line.rstrip('\r\n')
        continue
      try:
        caption = json.loads(line)[field]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path}:{line_number}: expected a JSON object with a string field '
                         f'{field!r} ({e!r}); set the field name with --field.') from e
      if not isinstance(caption, str):
        raise ValueError(f'{path}:{line_number}: field {field!r} is a {type(caption).__name__}, '
                         'not a string.')
      yield caption


def _tars(pattern: str) -> Iterator[str]:
  for shard in wds.expand_shards(pattern):
    for raw in wds.iter_samples(shard):
      members = raw.members
      if 'txt' in members:
        yield wds.decode_text(members['txt'], raw.shard, raw.key)
      if 'syn.json' in members:
        syn = wds.decode_json(members['syn.json'], raw.shard, raw.key, 'syn.json')
        for captions in syn.values():
          yield from (c for c in captions if isinstance(c, str))


def _tfds(spec: str) -> Iterator[str]:
  from mobileclip_jax.data import reinforced_tfds  # pylint: disable=g-import-not-at-top
  name, _, data_dir = spec.partition('@')
  source, meta = reinforced_tfds.open_reinforced(name, data_dir or None)
  for i in range(len(source)):
    record = source[i]
    for field in ('captions', 'syn_captions') if meta.kind == 'reinforced' else ('captions',):
      yield from (c.decode('utf-8') for c in record[field])


def iter_captions(sources: Sequence[str], field: str = 'caption') -> Iterator[str]:
  """Streams the captions of every source in order (see the module docstring); blank ones are
  skipped. Raises ValueError naming the file and line of a malformed JSONL record."""
  for source in sources:
    source = os.fspath(source)
    if source.startswith('tars:'):
      stream = _tars(source[len('tars:'):])
    elif source.startswith('tfds:'):
      stream = _tfds(source[len('tfds:'):])
    else:
      stream = _text_file(source, field)
    yield from (c for c in stream if c.strip())

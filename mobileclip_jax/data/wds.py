"""Webdataset tar shards: shard lists, manifests, the writer, and a reader that survives damage.

A shard is a plain tar. Members are grouped into samples the webdataset way: the key is the
member path up to the first '.' of its basename, the extension is the rest ('jpg', 'txt', 'json',
'syn.json', 'paug.json', 'npz', 'pth.gz'), and a sample is a run of consecutive members with the
same key (see sample_codec.py for what the members of a DataCompDR sample hold).

A folder of shards may have a `manifest.jsonl` (DataCompDR's and RayGen's; `ShardWriter` and
launch/reinforce.py write one): a line {"shard": "<name without .tar>", "num_samples": N} per
shard (RayGen spells the count "num_uids"). The reader uses it to count exactly what a cut or
damaged tar lost.

The reader walks the tar block by block (tar_blocks.py) so that a damaged stretch does not end
the shard: it resyncs at the next valid header, reports the samples next to the damage (their
members may be incomplete) by key, and the samples inside it, whose keys are unreadable, by the
range of keys around it with their number: exact from the manifest, else estimated from the
stretch's size (see `iter_samples`).
"""
import collections
import dataclasses
import functools
import glob
import io
import json
import os
import re
import tarfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from etils import epath

from mobileclip_jax import utils
from mobileclip_jax.data import errors
from mobileclip_jax.data import tar_blocks
from mobileclip_jax.data.errors import CorruptSampleError

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
EMB_EXTS = ('npz', 'pth.gz')  # npz (float32) is preferred when a sample has both.
MANIFEST_FILE = 'manifest.jsonl'

ErrorHandler = Callable[[CorruptSampleError], None]

# Fixed member mtime (2000-01-01): the same samples give byte-identical shards.
_MTIME = 946684800


def _is_url(path: str) -> bool:
  return '://' in path


def open_file(path: str, mode: str = 'rb'):
  """A local path with `open`, a URL (gs://, s3://, ...) through etils.epath."""
  return epath.Path(path).open(mode) if _is_url(path) else open(path, mode)


# ----------------------------------------------------------------------------------------------
# Shard lists.


def expand_braces(pattern: str) -> list[str]:
  """Expands '{a,b}' lists and '{000..063}' ranges (zero-padded as written), left to right."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if match is None:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  span = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if span:
    first, last = span.groups()
    width = max(len(first), len(last)) if first.startswith('0') or last.startswith('0') else 0
    step = 1 if int(last) >= int(first) else -1
    options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
  else:
    options = body.split(',')
  return [p for option in options for p in expand_braces(head + option + tail)]


def _find(path: str) -> list[str]:
  """Files matching one brace-free pattern: a glob, a folder (its '*.tar', recursively), a file."""
  if _is_url(path):
    if glob.has_magic(path):
      parts = path.split('/')
      first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
      root = epath.Path('/'.join(parts[:first]))
      return sorted(os.fspath(p) for p in root.glob('/'.join(parts[first:])))
    url = epath.Path(path)
    if url.is_dir():
      return sorted(os.fspath(p) for p in url.rglob('*.tar'))
    return [path] if url.exists() else []
  if glob.has_magic(path):
    return sorted(glob.glob(path))
  if os.path.isdir(path):
    return sorted(glob.glob(os.path.join(path, '**', '*.tar'), recursive=True))
  return [path] if os.path.isfile(path) else []


def expand_shards(spec: str | Sequence[str]) -> list[str]:
  """Shard paths from patterns; '::' separates several patterns in one string.

  Each pattern may use braces ('shards/{00000000..00000063}.tar'), globs ('shards/*.tar') or
  name a directory (all '*.tar' under it, recursively, sorted); URLs (gs://...) work the same.
  Raises FileNotFoundError for a pattern that matches nothing and ValueError if a shard is
  listed twice.
  """
  patterns = spec.split('::') if isinstance(spec, str) else list(spec)
  paths = []
  for pattern in patterns:
    for path in expand_braces(pattern if _is_url(pattern) else os.path.expanduser(pattern)):
      found = _find(path)
      if not found:
        raise FileNotFoundError(f'No shard found for {path!r} (from pattern {pattern!r}): check '
                                'the path, or quote the pattern so the shell does not expand it.')
      paths.extend(found)
  repeated = [p for p, n in collections.Counter(paths).items() if n > 1]
  if repeated:
    raise ValueError(f'Shards listed more than once: {repeated[:5]}; fix the shard patterns.')
  return paths


# ----------------------------------------------------------------------------------------------
# Manifests.


def _shard_name(path: str) -> str:
  base = os.path.basename(path)
  return base[:-len('.tar')] if base.endswith('.tar') else base


@functools.lru_cache(maxsize=256)
def _read_manifest(folder: str) -> dict[str, int]:
  path = os.path.join(folder, MANIFEST_FILE)
  try:
    with open_file(path, 'r') as f:
      lines = f.read().splitlines()
  except (FileNotFoundError, NotADirectoryError):
    return {}
  counts = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
      count = entry['num_samples'] if 'num_samples' in entry else entry['num_uids']
      counts[str(entry['shard'])] = int(count)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} line {number} is not {{"shard": NAME, "num_samples": N}} '
                       f'({type(e).__name__}: {e}); fix or remove the manifest.') from None
  return counts


def manifest_count(path: str) -> int | None:
  """The sample count of shard `path` in its folder's manifest.jsonl, or None."""
  return _read_manifest(os.path.dirname(path)).get(_shard_name(path))


def write_manifest(counts: Mapping[str, int]) -> None:
  """Records {shard path: samples} in the manifest.jsonl of each shard's folder.

  Lines of other shards are kept; the file is replaced atomically. One writer per folder at a
  time (the read-modify-write is not locked).
  """
  by_folder = collections.defaultdict(dict)
  for path, count in counts.items():
    by_folder[os.path.dirname(os.path.abspath(path))][_shard_name(path)] = int(count)
  for folder, entries in by_folder.items():
    _read_manifest.cache_clear()
    merged = {**_read_manifest(folder), **entries}
    with utils.atomic_write(os.path.join(folder, MANIFEST_FILE), encoding='utf-8') as f:
      f.writelines(json.dumps({'shard': name, 'num_samples': merged[name]}) + '\n'
                   for name in sorted(merged))
  _read_manifest.cache_clear()


# ----------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
  """Writes samples into tar shards of at most `max_samples` samples each.

  `pattern` names shard i with `pattern.format(i)`, e.g. '/out/{:08d}.tar'. A shard is written
  under a temporary name and renamed when it is complete, so a crash never leaves a partial
  shard under a final name; with `manifest`, the finished shards' sample counts go into their
  folder's manifest.jsonl, so a reader can count what a later cut loses. Use as a context
  manager or call `close()`; leaving the context with an exception drops the unfinished shard.
  """

  def __init__(self, pattern: str, max_samples: int, manifest: bool = True):
    if max_samples < 1:
      raise ValueError(f'max_samples must be >= 1, got {max_samples}.')
    if pattern.format(0) == pattern.format(1):
      raise ValueError(f'Shard pattern {pattern!r} needs a field for the shard index, '
                       "e.g. '/out/{:08d}.tar'.")
    self.pattern, self.max_samples, self.manifest = pattern, max_samples, manifest
    self.paths: list[str] = []
    self._counts: dict[str, int] = {}
    self._tar: tarfile.TarFile | None = None
    self._keys: set[str] = set()

  def write(self, key: str, members: Mapping[str, bytes]) -> None:
    """Adds one sample: `members` maps an extension ('jpg', 'syn.json', ...) to its bytes."""
    if not key or '.' in os.path.basename(key):
      raise ValueError(f'Invalid sample key {key!r}: it must be non-empty and have no "." in '
                       'its last path component (the extension starts at the first ".").')
    if not members:
      raise ValueError(f'Sample {key!r} has no members.')
    for ext, data in members.items():  # Checked first: a sample is written whole or not at all.
      if not isinstance(data, bytes):
        raise TypeError(f'Member {key}.{ext} must be bytes, got {type(data).__name__}; '
                        "encode text with .encode('utf-8').")
      if not ext or ext.startswith('.') or '/' in ext:
        raise ValueError(f'Invalid member extension {ext!r} for sample {key!r}.')
    if self._tar is None or len(self._keys) >= self.max_samples:
      self._finish_shard()
      self._start_shard()
    if key in self._keys:
      raise ValueError(f'Sample key {key!r} written twice into {self.paths[-1]}.')
    self._keys.add(key)
    for ext, data in members.items():
      info = tarfile.TarInfo(f'{key}.{ext}')
      info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
      self._tar.addfile(info, io.BytesIO(data))

  def close(self) -> list[str]:
    """Finishes the last shard; returns the paths of all shards written."""
    self._finish_shard()
    if self.manifest and self._counts:
      write_manifest(self._counts)
    return list(self.paths)

  def __enter__(self) -> 'ShardWriter':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None and self._tar is not None:
      self._tar.close()
      os.remove(self._tar.name)
      self.paths.pop()
      self._tar = None
    self.close()

  def _start_shard(self) -> None:
    path = self.pattern.format(len(self.paths))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.paths.append(path)
    self._tar = tarfile.open(f'{path}.{os.getpid()}.tmp', mode='w', format=tarfile.PAX_FORMAT)
    self._keys = set()

  def _finish_shard(self) -> None:
    if self._tar is not None:
      tmp = self._tar.name
      self._tar.close()
      os.replace(tmp, self.paths[-1])
      self._counts[self.paths[-1]] = len(self._keys)
      self._tar = None


# ----------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class RawSample:
  """A sample as stored: its shard, key and members (extension -> bytes)."""
  shard: str
  key: str
  members: dict[str, bytes]

  def member(self, *names: str) -> tuple[str, bytes]:
    """(extension, bytes) of the first of `names` present; else 'missing_member'."""
    for name in names:
      if name in self.members:
        return name, self.members[name]
    raise CorruptSampleError(self.shard, self.key, errors.MISSING_MEMBER,
                             f'no {" or ".join(names)} member (has {sorted(self.members)})')


@dataclasses.dataclass
class ShardStats:
  """What reading one shard found; `iter_samples` fills it in.

  Attributes:
    samples: samples read, good or reported (the keys the reader saw).
    expected: the shard's sample count in its manifest, if any.
    damaged: stretches of the tar that could not be read (a cut counts as one).
    unknown_loss: damaged with no manifest and nothing to measure the loss by (a cut; a
      stretch in a shard with no intact sample): not counted here (`estimate_cut_loss` counts
      it from the other shards).
    loss_key: the key range reported for that loss, e.g. '(000123, end)'.
    lost: samples the reports of damaged stretches counted (beyond `samples`).
  """
  path: str
  samples: int = 0
  expected: int | None = None
  damaged: int = 0
  unknown_loss: bool = False
  loss_key: str | None = None
  lost: int = 0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def split_member_name(name: str) -> tuple[str, str] | None:
  """(key, lower-case extension) as webdataset splits it, or None for names without one."""
  head, base = os.path.split(name)
  if '.' not in base or base.startswith('__'):
    return None
  stem, ext = base.split('.', 1)
  return (os.path.join(head, stem) if head else stem), ext.lower()


def report(on_error: ErrorHandler | None, error: CorruptSampleError) -> None:
  """Hands `error` to `on_error`, or raises it when there is no handler."""
  if on_error is None:
    raise error
  on_error(error)


@dataclasses.dataclass
class _Region:
  """An unreadable stretch of a shard: bytes [start, end) (end None: cut), between keys."""
  start: int
  end: int | None
  after: str | None
  before: str | None = None

  @property
  def key(self) -> str:
    return f'({self.after or "start"}, {self.before or "end"})'


def _share(total: int, weights: list[float]) -> list[int]:
  """`total` split in proportion to `weights` (largest remainders); equal if all are 0."""
  if not weights:
    return []
  if sum(weights) <= 0:
    weights = [1.0] * len(weights)
  exact = [total * w / sum(weights) for w in weights]
  shares = [int(x) for x in exact]
  for i in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[:total - sum(shares)]:
    shares[i] += 1
  return shares


def iter_samples(path: str, on_error: ErrorHandler | None = None,
                 stats: ShardStats | None = None) -> Iterator[RawSample]:
  """Yields the samples of one tar shard in order; every sample it cannot yield is reported.

  Problems go to `on_error` (raised if it is None) and the reading goes on:
  - a sample with a repeated member, or a key seen before in the shard: 'duplicate';
  - an unreadable stretch (a damaged header; the reader resyncs at the next valid one): the
    samples on either side of it are reported by key ('tar_damaged': their members may be
    incomplete), and the samples inside it, whose keys are lost, as one report keyed by the
    range of keys around it, e.g. '(000004, 000009)', with their number in `count`;
  - a cut (no end-of-archive marker; a tar cut at a member boundary too): the sample being
    read is reported by key and the rest as '(<last key>, end)' ('tar_truncated').
  How many samples a stretch or a cut held: with a manifest.jsonl entry for the shard, exactly
  what the manifest has and the tar lacks (shared among several stretches by their size);
  otherwise a stretch's size over the shard's mean sample size, and a cut's loss is unknown
  (count 0 and `stats.unknown_loss`). Reports of stretches come when the shard is read to its
  end, since their counts need the whole shard. Samples the manifest lists and an intact tar
  lacks are one 'missing_samples' report keyed '*'.

  Args:
    path: the shard (a local path or a URL).
    on_error: receives every `CorruptSampleError`; None raises the first.
    stats: filled in with what the reading found (see `ShardStats`).
  """
  stats = ShardStats(path) if stats is None else stats
  stats.expected = manifest_count(path)
  regions: list[_Region] = []
  done_keys: set[str] = set()
  current: dict[str, Any] | None = None  # key, members, duplicate, suspect, start, end
  suspect_next = False  # The sample after a damaged stretch may have lost its first members.
  last_key: str | None = None
  whole_bytes, whole = 0, 0  # Bytes and number of the samples read without problems.

  def finish(cut: bool = False) -> RawSample | None:
    nonlocal whole_bytes, whole
    key = current['key']
    stats.samples += 1
    problem = current['duplicate'] or ('key also used by an earlier sample in the shard'
                                       if key in done_keys else None)
    done_keys.add(key)
    if cut:
      report(on_error, CorruptSampleError(
          path, key, errors.TAR_TRUNCATED, f'the tar is cut at byte {current["end"]} inside or '
          'after this sample, so some of its members may be missing'))
    elif current['suspect']:
      report(on_error, CorruptSampleError(
          path, key, errors.TAR_DAMAGED, 'next to an unreadable stretch of the tar (bytes '
          f'{current["suspect"]}), so some of its members may be missing'))
    elif problem:
      report(on_error, CorruptSampleError(path, key, errors.DUPLICATE, problem))
    else:
      whole_bytes += current['end'] - current['start']
      whole += 1
      return RawSample(path, key, current['members'])
    return None

  with open_file(path) as f:
    for event in tar_blocks.scan(f):
      if event[0] == 'member':
        _, name, data, start, end = event
        split = split_member_name(name)
        if split is None:
          continue
        if regions and regions[-1].before is None and regions[-1].end is not None:
          regions[-1].before = split[0]
        if current is None or split[0] != current['key']:
          if current is not None:
            sample = finish()
            if sample is not None:
              yield sample
          current = {'key': split[0], 'members': {}, 'duplicate': None, 'start': start,
                     'suspect': suspect_next}
        suspect_next = False  # Set again only by the next stretch.
        if split[1] in current['members']:
          current['duplicate'] = f'member {split[1]!r} appears twice'
        current['members'][split[1]] = data
        current['end'], last_key = end, split[0]
      elif event[0] == 'gap':
        _, start, end = event
        regions.append(_Region(start, end, last_key))
        if current is not None:
          current['suspect'] = current['suspect'] or f'{start}-{end}'
        suspect_next = f'{start}-{end}'
      else:  # cut
        _, start, name = event
        split = split_member_name(name) if name else None
        if split and current is not None and split[0] != current['key']:
          sample = finish()  # Complete: the cut member starts the next sample.
          if sample is not None:
            yield sample
          current = {'key': split[0], 'members': {}, 'duplicate': None, 'start': start,
                     'end': start, 'suspect': suspect_next}
        regions.append(_Region(start, None, current['key'] if current else last_key))
  if current is not None:
    cut = bool(regions) and regions[-1].end is None
    sample = finish(cut=cut)
    if sample is not None:
      yield sample
  stats.damaged = len(regions)
  for error in _region_errors(path, regions, stats, whole_bytes / whole if whole else None):
    stats.lost += error.count
    report(on_error, error)


def _region_errors(path: str, regions: list[_Region], stats: ShardStats,
                   mean: float | None) -> list[CorruptSampleError]:
  """The reports of the unreadable stretches, with the samples each held (see iter_samples).

  `mean` is the mean size in bytes of the shard's intact samples (None if there is none).
  """
  sizes = [(r.end - r.start) / mean if r.end is not None and mean else 0.0 for r in regions]
  if stats.expected is not None:
    lost = max(0, stats.expected - stats.samples)
    if not regions:
      return [CorruptSampleError(
          path, '*', errors.MISSING_SAMPLES, f'the tar holds {stats.samples} samples but '
          f'{MANIFEST_FILE} lists {stats.expected}', count=lost)] if lost else []
    if regions[-1].end is None:  # Stretches by their size, the cut the rest.
      counts = []
      for size in sizes[:-1]:
        counts.append(min(int(size), lost - sum(counts)))
      counts.append(lost - sum(counts))
    else:
      counts = _share(lost, sizes)
    how = (f'{MANIFEST_FILE} lists {stats.expected} samples, the tar holds {stats.samples}'
           + ('; shared among the damaged stretches by size' if len(regions) > 1 else ''))
  else:
    counts = [int(s) for s in sizes]  # A stretch also holds parts of its neighbours.
    how = ('estimated from the stretch\'s size over the mean sample size (no '
           f'{MANIFEST_FILE} entry gives the shard\'s count)')
  out = []
  for region, count in zip(regions, counts):
    unknown = stats.expected is None and (region.end is None or mean is None)
    if unknown:
      stats.unknown_loss, stats.loss_key = True, region.key
    if region.end is None:
      if unknown:
        out.append(CorruptSampleError(
            path, region.key, errors.TAR_TRUNCATED, f'the tar is cut at byte {region.start}; '
            f'how many samples followed is unknown without a {MANIFEST_FILE} entry for the '
            'shard (not counted here)', count=0))
      else:
        out.append(CorruptSampleError(path, region.key, errors.TAR_TRUNCATED,
                                      f'the tar is cut at byte {region.start}: {count} samples '
                                      f'lost after it ({how})', count=count))
    elif unknown:
      out.append(CorruptSampleError(
          path, region.key, errors.TAR_DAMAGED, f'bytes {region.start}-{region.end} are '
          'unreadable; how many samples they held is unknown: no intact sample to measure by '
          f'and no {MANIFEST_FILE} entry (not counted here)', count=0))
    else:
      out.append(CorruptSampleError(
          path, region.key, errors.TAR_DAMAGED, f'bytes {region.start}-{region.end} are '
          f'unreadable: {count} whole samples lost in them ({how})', count=count))
  return out


def estimate_cut_loss(stats: Sequence[ShardStats]) -> list[CorruptSampleError]:
  """Counts, for damaged shards with no manifest (`ShardStats.unknown_loss`), the samples lost
  from the other shards.

  The estimate is the median sample count of the shards read without damage, less what the
  damaged shard held (webdataset shard sets are written with one count per shard; the last
  shard may be shorter, which this overestimates). Returns one report per such shard, keyed as
  the loss it completes (nothing if no shard was read whole).
  """
  whole = sorted(s.samples for s in stats if not s.damaged)
  if not whole:
    return []
  median = whole[len(whole) // 2]
  return [CorruptSampleError(
      s.path, s.loss_key, errors.TAR_TRUNCATED if s.loss_key.endswith('end)') else
      errors.TAR_DAMAGED, f'estimated: shards read whole hold a median of {median} samples, '
      f'this one {s.samples} read and {s.lost} counted lost',
      count=max(0, median - s.samples - s.lost)) for s in stats if s.unknown_loss]


# ----------------------------------------------------------------------------------------------
# Member values.


def decode_text(data: bytes, shard: str = '', key: str = '', what: str = 'txt') -> str:
  """UTF-8 text; invalid UTF-8 raises CorruptSampleError('bad_utf8')."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorruptSampleError(shard, key, errors.BAD_UTF8,
                             f'{what} is not valid UTF-8 ({e})') from None


def decode_json(data: bytes, shard: str = '', key: str = '', what: str = 'json') -> Any:
  """JSON value; a JSON string holding JSON (as HF datasets store it) is decoded once more."""
  try:
    value = json.loads(decode_text(data, shard, key, what))
    if isinstance(value, str):
      value = json.loads(value)
  except json.JSONDecodeError as e:
    raise CorruptSampleError(shard, key, errors.BAD_JSON,
                             f'{what} is not valid JSON ({e})') from None
  return value

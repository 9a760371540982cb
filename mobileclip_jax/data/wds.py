"""DataCompDR-style webdataset tar shards: write, read, decode members, normalize embeddings.

A shard is a plain tar. Members are grouped into samples the webdataset way: the key is the
member path up to the first '.' of its basename, the extension is the rest ('jpg', 'txt', 'json',
'syn.json', 'paug.json', 'npz', 'pth.gz'), and a sample is a run of consecutive members with the
same key. Reinforced members (spec section 5):

  jpg|jpeg|png|webp  encoded image (kept encoded; `check_image` decodes it once on demand)
  txt                ground-truth caption, UTF-8
  json               {"uid": ..., "sha256": ...}
  syn.json           {"syn_text": [S strings]} or several keys "syn_text_<captioner>"
  paug.json          {"param_aug": [k entries]} (the list may itself be a JSON string)
  npz | pth.gz       "image_emb" [k, D], "text_emb" [C+S, D] (v1, rows: C ground-truth captions
                     then the synthetic ones in key order) or "text_emb" [C, D] plus one
                     "<syn key>_emb" [S_key, D] per synthetic key (DFNDR); pth.gz is a gzip'd
                     `torch.save` dict, read here without torch.

`decode_sample` turns a raw sample into a `Sample` with one layout for all of these variants.
DataCompDR-12M ships no images and no captions: `join_by_uid` joins its shards with the
DataComp-12M image shards, shard by shard, on the uid.
"""
import collections
import dataclasses
import glob
import gzip
import io
import json
import os
import pickle
import re
import sys
import tarfile
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mobileclip_jax.data.errors import CorruptSampleError

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
EMB_EXTS = ('npz', 'pth.gz')  # npz (float32) is preferred when a sample has both.
DEFAULT_SYN_KEY_REGEX = r'^syn_text.*$'

# Reasons for CorruptSampleError raised here (counters aggregate by them).
MISSING_MEMBER = 'missing_member'
BAD_UTF8 = 'bad_utf8'
BAD_JSON = 'bad_json'
BAD_EMBEDDINGS = 'bad_embeddings'
EMB_ROWS = 'emb_rows'
BAD_IMAGE = 'bad_image'
DUPLICATE = 'duplicate'
CORRUPT_SHARD = 'corrupt_shard'
NO_IMAGE_FOR_UID = 'no_image_for_uid'
IMAGE_WITHOUT_SAMPLE = 'image_without_sample'
SHA256_MISMATCH = 'sha256_mismatch'

ErrorHandler = Callable[[CorruptSampleError], None]

# Fixed member mtime (2000-01-01): the same samples give byte-identical shards.
_MTIME = 946684800


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


def expand_shards(spec: str | Sequence[str]) -> list[str]:
  """Shard paths from patterns; '::' separates several patterns in one string.

  Each pattern may use braces ('shards/{00000000..00000063}.tar'), globs ('shards/*.tar') or
  name a directory (all '*.tar' under it, recursively, sorted). Raises FileNotFoundError for a
  pattern that matches nothing and ValueError if a shard is listed twice.
  """
  patterns = spec.split('::') if isinstance(spec, str) else list(spec)
  paths = []
  for pattern in patterns:
    for path in expand_braces(os.path.expanduser(pattern)):
      if glob.has_magic(path):
        found = sorted(glob.glob(path))
      elif os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, '**', '*.tar'), recursive=True))
      else:
        found = [path] if os.path.isfile(path) else []
      if not found:
        raise FileNotFoundError(f'No shard found for {path!r} (from pattern {pattern!r}): check '
                                'the path, or quote the pattern so the shell does not expand it.')
      paths.extend(found)
  repeated = [p for p, n in collections.Counter(paths).items() if n > 1]
  if repeated:
    raise ValueError(f'Shards listed more than once: {repeated[:5]}; fix the shard patterns.')
  return paths


# ----------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
  """Writes samples into tar shards of at most `max_samples` samples each.

  `pattern` names shard i with `pattern.format(i)`, e.g. '/out/{:08d}.tar'. A shard is written
  under a temporary name and renamed when it is complete, so a crash never leaves a partial
  shard under a final name. Use as a context manager or call `close()`; leaving the context
  with an exception drops the unfinished shard.
  """

  def __init__(self, pattern: str, max_samples: int):
    if max_samples < 1:
      raise ValueError(f'max_samples must be >= 1, got {max_samples}.')
    if pattern.format(0) == pattern.format(1):
      raise ValueError(f'Shard pattern {pattern!r} needs a field for the shard index, '
                       "e.g. '/out/{:08d}.tar'.")
    self.pattern, self.max_samples = pattern, max_samples
    self.paths: list[str] = []
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
    return list(self.paths)

  def __enter__(self) -> 'ShardWriter':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    elif self._tar is not None:
      self._tar.close()
      os.remove(self._tar.name)
      self.paths.pop()
      self._tar = None

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
      self._tar = None


# ----------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class RawSample:
  """A sample as stored: its shard, key and members (extension -> bytes)."""
  shard: str
  key: str
  members: dict[str, bytes]


def _report(on_error: ErrorHandler | None, error: CorruptSampleError) -> None:
  if on_error is None:
    raise error
  on_error(error)


def split_member_name(name: str) -> tuple[str, str] | None:
  """(key, lower-case extension) as webdataset splits it, or None for names without one."""
  head, base = os.path.split(name)
  if '.' not in base or base.startswith('__'):
    return None
  stem, ext = base.split('.', 1)
  return (os.path.join(head, stem) if head else stem), ext.lower()


def iter_samples(path: str, on_error: ErrorHandler | None = None) -> Iterator[RawSample]:
  """Yields the samples of one tar shard in order.

  Problems are passed to `on_error` (raised if it is None) and the iteration goes on:
  a sample with a repeated member or a key seen before in the shard is reported as
  'duplicate'; a tar that is cut short or unreadable yields every sample before the damage and
  then reports one 'corrupt_shard' event (key '*') for the rest. The end-of-archive marker is
  checked, so a tar cut exactly at a member boundary is caught too.
  """
  done_keys: set[str] = set()
  key, members, duplicate = None, {}, None
  last_good = None

  def finished() -> RawSample | None:
    nonlocal last_good
    if key is None:
      return None
    problem = duplicate or ('key also used by an earlier sample in the shard'
                            if key in done_keys else None)
    done_keys.add(key)
    if problem:
      _report(on_error, CorruptSampleError(path, key, DUPLICATE, problem))
      return None
    last_good = key
    return RawSample(path, key, members)

  with open(path, 'rb') as f:
    try:
      with tarfile.open(fileobj=f, mode='r|') as tar:
        for info in tar:
          split = split_member_name(info.name) if info.isreg() else None
          if split is None:
            continue
          if split[0] != key:  # A new key ends the previous sample, even if this member is cut.
            sample = finished()
            if sample is not None:
              yield sample
            key, members, duplicate = split[0], {}, None
          if split[1] in members:
            duplicate = f'member {split[1]!r} appears twice'
          members[split[1]] = tar.extractfile(info).read()
        end = tar.offset
      f.seek(end)
      if f.read(512) != bytes(512):
        raise tarfile.ReadError('no end-of-archive marker (the file was cut at a member '
                                'boundary)')
    except (tarfile.TarError, EOFError, OSError) as e:
      after = f'after sample {last_good!r}' if last_good is not None else 'before any sample'
      _report(on_error, CorruptSampleError(
          path, '*', CORRUPT_SHARD, f'unreadable {after}; the rest of the shard is skipped '
          f'({e})'))
      return
  sample = finished()
  if sample is not None:
    yield sample


# ----------------------------------------------------------------------------------------------
# Members.


def decode_text(data: bytes, shard: str = '', key: str = '', what: str = 'txt') -> str:
  """UTF-8 text; invalid UTF-8 raises CorruptSampleError('bad_utf8')."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorruptSampleError(shard, key, BAD_UTF8, f'{what} is not valid UTF-8 ({e})') from None


def decode_json(data: bytes, shard: str = '', key: str = '', what: str = 'json') -> Any:
  """JSON value; a JSON string holding JSON (as HF datasets store it) is decoded once more."""
  try:
    value = json.loads(decode_text(data, shard, key, what))
    if isinstance(value, str):
      value = json.loads(value)
  except json.JSONDecodeError as e:
    raise CorruptSampleError(shard, key, BAD_JSON, f'{what} is not valid JSON ({e})') from None
  return value


def check_image(data: bytes, shard: str = '', key: str = '') -> tuple[int, int]:
  """Decodes an encoded image once; returns (width, height) or raises 'bad_image'."""
  truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False  # A truncated image must fail, not be padded.
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return image.size
  except UnidentifiedImageError:
    raise CorruptSampleError(shard, key, BAD_IMAGE, 'not an image format PIL can read') from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on damaged input.
    raise CorruptSampleError(shard, key, BAD_IMAGE, f'{type(e).__name__}: {e}') from None
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def load_npz(data: bytes) -> dict[str, np.ndarray]:
  """All arrays of an .npz file (no pickled objects)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


_TORCH_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128, 'UntypedStorage': np.uint8,
}
_TORCH_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'uint16': np.uint16, 'uint32': np.uint32,
    'uint64': np.uint64, 'bool': np.bool_, 'complex64': np.complex64,
    'complex128': np.complex128, 'float8_e4m3fn': ml_dtypes.float8_e4m3fn,
    'float8_e5m2': ml_dtypes.float8_e5m2, 'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz,
    'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}
_NUMPY_GLOBALS = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray',
                  '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
                  ('numpy._core.multiarray', 'scalar'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
                  # Pickle protocol 2 (torch.save's) spells a bytes object as _codecs.encode.
                  ('_codecs', 'encode')}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


def _strided(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int],
             metadata: Any = None) -> np.ndarray:
  """A torch tensor (storage, offset, size, stride in elements) as an owned numpy array."""
  if metadata:
    raise pickle.UnpicklingError(f'tensors with conj/neg bits are not supported ({metadata})')
  size, stride = tuple(size), tuple(stride)
  if 0 in size:
    return np.zeros(size, storage.dtype)
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if offset < 0 or min(stride, default=0) < 0 or extent > storage.size:
    raise pickle.UnpicklingError(f'tensor view (offset {offset}, size {size}, stride {stride}) '
                                 f'lies outside its storage of {storage.size} elements')
  item = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride]).copy()


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks
  return _strided(storage, offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  # v3 (dtypes without a legacy storage class) stores an untyped byte storage plus the dtype.
  del requires_grad, hooks
  return _strided(storage.view(dtype), offset, size, stride, metadata)


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds torch.save'd tensors as numpy arrays; any other global is refused."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor_v3'):
      return {'_rebuild_tensor_v2': _rebuild_tensor_v2,
              '_rebuild_tensor_v3': _rebuild_tensor_v3}[name]
    if module in ('torch', 'torch.storage') and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(np.dtype(_TORCH_STORAGE_DTYPES[name]))
    if module == 'torch' and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if (module, name) in _NUMPY_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in an embedding file')

  def persistent_load(self, pid: Any) -> np.ndarray:
    kind, storage_type, key, _, numel = pid
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    if key not in self._storages:
      dtype = storage_type.dtype
      raw = self._archive.read(f'{self._prefix}data/{key}')
      if len(raw) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'storage {key} has {len(raw)} bytes, expected '
                                     f'{numel} x {dtype.itemsize}')
      storage = np.frombuffer(raw, dtype).copy()
      self._storages[key] = storage if self._byteorder == sys.byteorder else storage.byteswap()
    return self._storages[key]


def load_torch(data: bytes) -> Any:
  """Loads a `torch.save` file (zip format, torch >= 1.6) without torch; tensors -> numpy.

  bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays. Only containers, tensors and
  numpy arrays are accepted: the restricted unpickler refuses every other global.
  """
  if not zipfile.is_zipfile(io.BytesIO(data)):
    raise ValueError('not a zip-format torch.save file (files from torch < 1.6 are not '
                     'supported: re-save them with a recent torch)')
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'expected one data.pkl in the torch file, found {pickles}')
    prefix = pickles[0][:-len('data.pkl')]
    names = set(archive.namelist())
    byteorder = (archive.read(f'{prefix}byteorder').decode()
                 if f'{prefix}byteorder' in names else sys.byteorder)
    with archive.open(pickles[0]) as f:
      return _TorchUnpickler(f, archive, prefix, byteorder).load()


def load_pth_gz(data: bytes) -> Any:
  """Loads a gzip'd `torch.save` file (the 'pth.gz' member) without torch."""
  return load_torch(gzip.decompress(data))


def load_embeddings(data: bytes, ext: str, shard: str = '', key: str = '') -> dict[str, Any]:
  """The dict stored in an 'npz' or 'pth.gz' member; unreadable data raises 'bad_embeddings'."""
  try:
    value = load_npz(data) if ext == 'npz' else load_pth_gz(data)
  except Exception as e:  # pylint: disable=broad-except
    # zip/gzip/pickle/numpy each raise their own error types on damaged bytes.
    raise CorruptSampleError(shard, key, BAD_EMBEDDINGS,
                             f'cannot read {ext}: {type(e).__name__}: {e}') from None
  if not isinstance(value, dict):
    raise CorruptSampleError(shard, key, BAD_EMBEDDINGS,
                             f'{ext} holds a {type(value).__name__}, expected a dict')
  return value


# ----------------------------------------------------------------------------------------------
# Samples in one layout.


@dataclasses.dataclass
class Sample:
  """A decoded sample. Reinforced fields are None for a plain image-caption sample.

  Attributes:
    shard, key: where it came from.
    uid: the 'uid' of the json member, else the key.
    image: encoded image bytes (not decoded); image_format: its member extension.
    captions: the C ground-truth captions.
    sha256: the 'sha256' of the json member, if any.
    syn_keys: the synthetic-caption keys of this sample, in syn.json order.
    syn_captions: the S synthetic captions, all keys flattened in key order.
    syn_key_index: int32 [S], index into `syn_keys` of each synthetic caption.
    paug: the k stored augmentation entries (JSON values).
    image_emb: [k, D] teacher image embeddings, one row per augmentation, stored dtype.
    text_emb: [C+S, D] teacher text embeddings: ground-truth rows, then synthetic rows.
  """
  shard: str
  key: str
  uid: str
  image: bytes
  image_format: str
  captions: list[str]
  sha256: str | None = None
  syn_keys: tuple[str, ...] | None = None
  syn_captions: list[str] | None = None
  syn_key_index: np.ndarray | None = None
  paug: list[Any] | None = None
  image_emb: np.ndarray | None = None
  text_emb: np.ndarray | None = None


def sample_ids(raw: RawSample) -> tuple[str, str | None]:
  """(uid, sha256) of a raw sample from its json member; the key when it has none."""
  if 'json' not in raw.members:
    return raw.key, None
  meta = decode_json(raw.members['json'], raw.shard, raw.key, 'json')
  if not isinstance(meta, dict):
    return raw.key, None
  uid = meta.get('uid')
  return (raw.key if uid is None else str(uid)), meta.get('sha256')


def _member(raw: RawSample, *names: str) -> tuple[str, bytes]:
  for name in names:
    if name in raw.members:
      return name, raw.members[name]
  raise CorruptSampleError(raw.shard, raw.key, MISSING_MEMBER,
                           f'no {" or ".join(names)} member (has {sorted(raw.members)})')


def _as_matrix(value: Any, name: str, raw: RawSample) -> np.ndarray:
  if not isinstance(value, np.ndarray) or value.ndim != 2:
    shape = getattr(value, 'shape', type(value).__name__)
    raise CorruptSampleError(raw.shard, raw.key, BAD_EMBEDDINGS,
                             f'{name} must be a 2-D array, got {shape}')
  return value


def decode_sample(raw: RawSample, reinforced: bool,
                  syn_key_regex: str = DEFAULT_SYN_KEY_REGEX) -> Sample:
  """Decodes and normalizes one sample; raises CorruptSampleError naming shard and key.

  Args:
    raw: the stored sample.
    reinforced: also decode synthetic captions, augmentation parameters and embeddings.
    syn_key_regex: which syn.json keys are synthetic captions (as open_clip's
      --dataset-reinforcement-syn-text-key-regex).

  Returns:
    A `Sample` whose `text_emb` rows are the C ground-truth captions then the S synthetic
    captions of `syn_keys` in order, from either the v1 combined 'text_emb' or the DFNDR
    per-key '<key>_emb' arrays.
  """
  shard, key = raw.shard, raw.key
  image_format, image = _member(raw, *IMAGE_EXTS)
  captions = [decode_text(_member(raw, 'txt')[1], shard, key, 'txt')]
  uid, sha256 = sample_ids(raw)
  sample = Sample(shard, key, uid, image, image_format, captions, sha256)
  if not reinforced:
    return sample

  syn = decode_json(_member(raw, 'syn.json')[1], shard, key, 'syn.json')
  if not isinstance(syn, dict):
    raise CorruptSampleError(shard, key, BAD_JSON, 'syn.json is not a JSON object')
  sample.syn_keys = tuple(k for k in syn if re.match(syn_key_regex, k))
  sample.syn_captions, index = [], []
  for i, syn_key in enumerate(sample.syn_keys):
    texts = syn[syn_key]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
      raise CorruptSampleError(shard, key, BAD_JSON,
                               f'syn.json[{syn_key!r}] is not a list of strings')
    sample.syn_captions.extend(texts)
    index.extend([i] * len(texts))
  sample.syn_key_index = np.asarray(index, np.int32)

  paug = decode_json(_member(raw, 'paug.json')[1], shard, key, 'paug.json')
  paug = paug.get('param_aug') if isinstance(paug, dict) else None
  try:
    sample.paug = json.loads(paug) if isinstance(paug, str) else paug
  except json.JSONDecodeError as e:
    raise CorruptSampleError(shard, key, BAD_JSON, f'paug.json param_aug: {e}') from None
  if not isinstance(sample.paug, list):
    raise CorruptSampleError(shard, key, BAD_JSON, 'paug.json has no "param_aug" list')

  ext, data = _member(raw, *EMB_EXTS)
  emb = load_embeddings(data, ext, shard, key)
  for name in ('image_emb', 'text_emb'):
    if name not in emb:
      raise CorruptSampleError(shard, key, BAD_EMBEDDINGS,
                               f'{ext} has no {name!r} (has {sorted(emb)})')
  sample.image_emb = _as_matrix(emb['image_emb'], 'image_emb', raw)
  text_emb = _as_matrix(emb['text_emb'], 'text_emb', raw)
  num_gt, num_syn = len(captions), len(sample.syn_captions)
  if len(text_emb) > num_gt:  # v1: one array for ground-truth and synthetic captions.
    parts = [('text_emb', text_emb, num_gt + num_syn)]
  else:  # DFNDR: ground truth in text_emb, each synthetic key in '<key>_emb'.
    parts = [('text_emb', text_emb, num_gt)]
    for i, syn_key in enumerate(sample.syn_keys):
      if f'{syn_key}_emb' not in emb:
        raise CorruptSampleError(shard, key, BAD_EMBEDDINGS, f'{ext} has no {syn_key}_emb for '
                                 f'the captions of syn.json[{syn_key!r}]')
      parts.append((f'{syn_key}_emb', _as_matrix(emb[f'{syn_key}_emb'], syn_key, raw),
                    int(np.sum(sample.syn_key_index == i))))
  for name, array, rows in parts:
    if len(array) != rows or array.shape[1] != sample.image_emb.shape[1]:
      raise CorruptSampleError(shard, key, EMB_ROWS, f'{name} has shape {array.shape}, expected '
                               f'({rows}, {sample.image_emb.shape[1]}) for {num_gt} ground-truth '
                               f'and {num_syn} synthetic captions')
  sample.text_emb = np.concatenate([array for _, array, _ in parts]) if len(parts) > 1 else (
      text_emb)
  return sample


def encode_sample(sample: Sample, per_key_emb: bool = False) -> dict[str, bytes]:
  """Members of a sample in the DataCompDR format, the inverse of `decode_sample`.

  Embeddings go to 'npz' (in their dtype), either as v1 (one 'text_emb' for ground-truth and
  synthetic captions) or, with `per_key_emb`, as DFNDR ('text_emb' for the ground truth and
  '<key>_emb' per synthetic key).
  """
  if len(sample.captions) != 1:
    raise ValueError(f'Sample {sample.key!r} has {len(sample.captions)} captions; the tar '
                     'format stores exactly one (txt).')
  members = {sample.image_format: sample.image, 'txt': sample.captions[0].encode('utf-8')}
  meta = {'uid': sample.uid} if sample.sha256 is None else {'uid': sample.uid,
                                                           'sha256': sample.sha256}
  members['json'] = json.dumps(meta).encode('utf-8')
  if sample.syn_keys is None:
    return members
  index = np.asarray(sample.syn_key_index)
  members['syn.json'] = json.dumps({
      key: [c for c, j in zip(sample.syn_captions, index) if j == i]
      for i, key in enumerate(sample.syn_keys)}).encode('utf-8')
  members['paug.json'] = json.dumps({'param_aug': sample.paug}).encode('utf-8')
  arrays = {'image_emb': sample.image_emb}
  if per_key_emb:
    num_gt = len(sample.captions)
    arrays['text_emb'] = sample.text_emb[:num_gt]
    for i, key in enumerate(sample.syn_keys):
      arrays[f'{key}_emb'] = sample.text_emb[num_gt:][index == i]
  else:
    arrays['text_emb'] = sample.text_emb
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  members['npz'] = buffer.getvalue()
  return members


def join_by_uid(samples: Iterable[RawSample], images: Iterable[RawSample],
                on_error: ErrorHandler | None = None) -> Iterator[RawSample]:
  """Adds image and caption members from `images` to `samples` with the same uid.

  This is the DataCompDR-12M layout: its shards hold only the reinforcement, and shard i joins
  with shard i of DataComp-12M on the json uid. Both are read in one pass; image samples that
  come before the one needed are held in memory (at most one image shard). A sample whose uid
  has no image is reported as 'no_image_for_uid', an unused image as 'image_without_sample',
  and differing sha256 in the two json members as 'sha256_mismatch'. A caption in the sample
  itself wins over the one of the image shard.
  """
  pending: dict[str, tuple[RawSample, str | None]] = {}
  image_iter = iter(images)

  def ids_or_report(raw: RawSample) -> tuple[str, str | None] | None:
    try:
      return sample_ids(raw)
    except CorruptSampleError as e:
      _report(on_error, e)
      return None

  for sample in samples:
    ids = ids_or_report(sample)
    if ids is None:
      continue
    uid, sha256 = ids
    while uid not in pending:
      image = next(image_iter, None)
      if image is None:
        break
      image_ids = ids_or_report(image)
      if image_ids is not None:
        pending[image_ids[0]] = (image, image_ids[1])
    if uid not in pending:
      _report(on_error, CorruptSampleError(sample.shard, sample.key, NO_IMAGE_FOR_UID,
                                           f'uid {uid} is not in the image shards'))
      continue
    image, image_sha256 = pending.pop(uid)
    if sha256 and image_sha256 and sha256 != image_sha256:
      _report(on_error, CorruptSampleError(
          sample.shard, sample.key, SHA256_MISMATCH, f'uid {uid}: sha256 {sha256} but the image '
          f'in {image.shard}:{image.key} has {image_sha256}; the image changed since the '
          'embeddings were computed'))
      continue
    members = {e: d for e, d in image.members.items() if e in IMAGE_EXTS or e == 'txt'}
    members.update(sample.members)
    yield RawSample(sample.shard, sample.key, members)
  for image in [raw for raw, _ in pending.values()] + list(image_iter):
    _report(on_error, CorruptSampleError(image.shard, image.key, IMAGE_WITHOUT_SAMPLE,
                                         'no reinforced sample has its uid'))

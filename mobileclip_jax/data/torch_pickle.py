"""`torch.save` files read without torch: the 'pth.gz' embedding members of DataCompDR-12M-bf16.

A restricted unpickler rebuilds tensors as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`) and
refuses every global that is not a container, a tensor, a storage or a numpy array.
"""
import collections
import dataclasses
import gzip
import io
import pickle
import sys
import zipfile
from typing import Any, Sequence

import ml_dtypes
import numpy as np

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


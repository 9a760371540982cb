"""The package's shared helpers: atomic writes, "did you mean" hints, relative L2, heap release."""
import os
import stat
import sys

import numpy as np
import pytest

from mobileclip_jax import utils


def test_json_is_written_whole_or_not_at_all_with_umask_permissions(tmp_path):
  path = tmp_path / 'sub' / 'out.json'
  utils.write_json_atomic(str(path), {'b': 1.0, 'a': [1, 2]})
  assert path.read_text() == '{\n "b": 1.0,\n "a": [\n  1,\n  2\n ]\n}\n'
  old = os.umask(0o022)
  try:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644 == utils.FILE_MODE  # Not mkstemp's 0600.
  finally:
    os.umask(old)
  with pytest.raises(TypeError):
    utils.write_json_atomic(str(path), {'a': object()})
  assert path.read_text().startswith('{\n "b"')  # The old file is untouched ...
  assert sorted(p.name for p in path.parent.iterdir()) == ['out.json']  # ... and no temp left.


def test_atomic_path_renames_only_on_success(tmp_path):
  target = tmp_path / 'weights.bin'
  with utils.atomic_path(str(target)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and not target.exists()
    with open(tmp, 'wb') as f:
      f.write(b'data')
  assert target.read_bytes() == b'data'
  with pytest.raises(RuntimeError):
    with utils.atomic_path(str(target)) as tmp:
      with open(tmp, 'wb') as f:
        f.write(b'half')
      raise RuntimeError('writer failed')
  assert target.read_bytes() == b'data' and sorted(os.listdir(tmp_path)) == ['weights.bin']


def test_did_you_mean_names_the_closest_or_lists_the_valid_ones():
  assert utils.did_you_mean('lrr', ['lr', 'b1', 'b2']) == ' Did you mean lr?'
  assert utils.did_you_mean('zzz', ['lr', 'b1']) == ' Valid: b1, lr.'
  assert utils.did_you_mean('zzz', [f'k{i}' for i in range(40)]) == ''


def test_rel_l2():
  assert utils.rel_l2([3.0, 4.0], [3.0, 4.0]) == 0.0
  assert utils.rel_l2([3.0, 4.0], [0.0, 5.0]) == pytest.approx(np.sqrt(9 + 1) / 5)
  assert utils.rel_l2([1e-3], [0.0]) == pytest.approx(1e-3)


def _resident_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc: Linux only')
def test_freed_heap_pages_go_back_to_the_os():
  # 400 MB in heap-sized blocks (below malloc's mmap threshold), then a block above them that
  # stays, so that freeing the rest cannot shrink the heap from its top on its own.
  blocks = [bytearray(64 * 1024) for _ in range(6400)]
  for b in blocks:
    b[::4096] = b'\1' * len(b[::4096])  # Touch every page: resident.
  pin = bytearray(64 * 1024)
  del blocks
  before = _resident_mb()
  assert utils.release_freed_host_memory()
  assert before - _resident_mb() > 300, (before, _resident_mb())
  del pin

"""Helpers the whole package shares: atomic file writes, "did you mean" hints, relative L2,
returning freed heap memory to the OS.

Atomic writes go to a temporary file in the destination's folder and are renamed over it only
when complete, so a reader (or a resumed run) never sees half a file. The result gets the
permissions a plain `open()` would give under the user's umask (mkstemp's own are 0600).
"""
import contextlib
import ctypes
import difflib
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, IO

import numpy as np


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


FILE_MODE = 0o666 & ~_umask()  # What open(path, 'w') creates.
DIR_MODE = 0o777 & ~_umask()   # What os.mkdir creates.


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` for a writer that wants a file name (savefig, a
  safetensors save, ...); it is renamed over `path` only if the block succeeds."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs) -> Iterator[IO]:
  """Yields an open file; `path` appears (whole, replaced) only if the block succeeds.

  A URL (gs://, s3://: a Beam build's staging folder) goes through etils.epath: there the
  rename is a copy, which still never shows a partial file under the final name.
  """
  if '://' not in path:
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
      yield f
    return
  from etils import epath  # pylint: disable=g-import-not-at-top
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.{os.getpid()}.tmp'
  try:
    with tmp.open(mode, **open_kwargs) as f:
      yield f
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_json_atomic(path: str, value: Any) -> None:
  """JSON (indented, keys in insertion order) written atomically."""
  with atomic_write(path, encoding='utf-8') as f:
    json.dump(value, f, indent=1)
    f.write('\n')


def did_you_mean(key: str, valid: Iterable[str], cutoff: float = 0.5) -> str:
  """' Did you mean a, b?' with the closest valid names, else ' Valid: ...' (a short list)."""
  valid = list(valid)
  close = difflib.get_close_matches(key, valid, n=3, cutoff=cutoff)
  if close:
    return f' Did you mean {", ".join(close)}?'
  return f' Valid: {", ".join(sorted(valid))}.' if len(valid) <= 30 else ''


def rel_l2(got: Any, want: Any) -> float:
  """||got - want|| / ||want|| in float64 (0 when both are zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  norm = np.linalg.norm(want)
  diff = np.linalg.norm(got - want)
  return float(diff / norm) if norm else float(diff)


def release_freed_host_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc's malloc_trim); False where unavailable.

  Compiling a large step frees most of what it allocated, but glibc keeps the pages (1.35 of
  3.5 GB resident after compiling MobileCLIP2-S0's step on CPU), and the step's buffers then come
  on top of them: the process's peak memory was 7.1 instead of 5.8 GB.
  """
  try:
    # The process's own symbols: libc is loaded (find_library would run ldconfig for its name).
    return bool(ctypes.CDLL(None).malloc_trim(0))
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to trim.
    return False

"""Helpers the whole package shares: atomic file writes, "did you mean" hints, relative L2,
the C heap's handling of freed memory (returned to the OS, or kept for the next step).

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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults.


def _glibc():
  """The process's C library if it is glibc (it has malloc_trim and mallopt), else None."""
  try:
    # The process's own symbols: libc is loaded (find_library would run ldconfig for its name).
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, 'malloc_trim') and hasattr(libc, 'mallopt') else None
  except OSError:
    return None


def release_freed_host_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc's malloc_trim); False where unavailable.

  Compiling a large step frees most of what it allocated, but glibc keeps the pages (1.35 of
  3.5 GB resident after compiling MobileCLIP2-S0's step on CPU), and the step's buffers then come
  on top of them: the process's peak memory was 7.1 instead of 5.8 GB.
  """
  libc = _glibc()
  return bool(libc and libc.malloc_trim(0))


def cost_analysis(compiled: Any) -> dict[str, Any]:
  """XLA's cost estimates of a compiled program as a dict ('flops', ...; a one-item list in older
  jax releases)."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


_CPU_ASYNC_DISPATCH = 'jax_cpu_enable_async_dispatch'
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # A compile or a cache read.
_inline = False


def run_cpu_programs_inline() -> None:
  """Makes XLA:CPU run single-device programs on the thread that calls them (no async dispatch),
  and has the C heap keep a program's temporaries for its next run.

  For a process that trains on CPU; call it before JAX starts its backends (the CPU client reads
  the setting when it is made). XLA:CPU allocates a program's temporaries as one block per
  execution, on the thread that runs it, and glibc gives a block that large its own mapping,
  unmapped when freed: every S0 step at batch 8 faulted in all of its 3.6 GB again (0.9 M page
  faults, a fifth of the step's CPU time). Only the main thread's heap can keep such a block for
  the next run (`keep_freed_host_memory`; other threads' arenas hold at most 64 MB), and jax's
  async dispatch runs programs on a thread of its own. Every other thread gets an arena of its
  own (glibc's default, 8 per core, has XLA's threads share the main one, and their small requests
  split the freed block: a program's 160-MB block was taken anew in 3 of 8 processes, up to 4
  times in 4 runs, against 1 of 16 with this; S0's step kept its peak RSS over 40 steps).
  Compiles (and reads from the persistent cache) run with glibc's limits; after each one on CPU,
  what it freed goes back to the OS and the heap keeps what is freed from then on (S0's trainer
  compiling an evaluator's encoder after its step: peak RSS 5.6 GB instead of 5.8-6.6 GB). A
  JAX_CPU_ENABLE_ASYNC_DISPATCH set in the environment wins (jax's own switch; `=1` keeps jax's
  dispatch and glibc's defaults).
  """
  global _inline
  if _CPU_ASYNC_DISPATCH.upper() not in os.environ and not _inline:
    _inline = True
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update(_CPU_ASYNC_DISPATCH, False)
    libc = _glibc()
    if libc:
      libc.mallopt(_M_ARENA_MAX, 1024)  # Before the backend's threads start.
      jax.monitoring.register_scalar_listener(_before_compile)
      jax.monitoring.register_event_duration_secs_listener(_after_compile)


def _before_compile(event: str, value: float, **kwargs) -> None:
  del value, kwargs
  if event == _COMPILE_EVENT:  # Recorded as the compile starts.
    _default_heap()


def _after_compile(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  import jax  # pylint: disable=g-import-not-at-top
  if event == _COMPILE_EVENT and jax.default_backend() == 'cpu':
    release_freed_host_memory()
    keep_freed_host_memory()


def _default_heap() -> None:
  """glibc's limits back for a compile: separate mappings for large blocks, the top trimmed."""
  libc = _glibc()
  if libc:
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def keep_freed_host_memory() -> bool:
  """From now on glibc keeps what is freed for reuse: large blocks come from the heap instead of
  their own mappings (M_MMAP_MAX 0), and the heap's top is never returned (M_TRIM_THRESHOLD -1,
  read as the largest size).

  For a process that runs compiled programs over and over (`run_cpu_programs_inline` sets it
  after each compile): a program's block is reused at the same size. False where unavailable.
  """
  libc = _glibc()
  return bool(libc and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))

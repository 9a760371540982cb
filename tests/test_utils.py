"""The package's shared helpers: atomic writes, "did you mean" hints, relative L2, the C heap's
freed memory (returned to the OS, or kept for the next step)."""
import json
import os
import stat
import subprocess
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


# Runs a program whose temporaries are one block far above glibc's mmap threshold, as a training
# process does (`inline`: launch/train.py's setting, which keeps freed memory from the compile on)
# or with jax's async dispatch (keeping freed memory too); prints the block's size and the page
# faults of 24 runs.
_STEP_FAULTS = """
import json, os, resource, sys
os.environ.pop('JAX_CPU_ENABLE_ASYNC_DISPATCH', None)
from mobileclip_jax import utils
if sys.argv[1] == 'inline':
  utils.run_cpu_programs_inline()
import jax, jax.numpy as jnp
x, w = jnp.ones((4096, 2048), jnp.float32), jnp.ones((2048, 4), jnp.float32)
parts = lambda x: [jnp.exp(x), jnp.sin(x), x * 2, x + 1, jnp.cos(x)]  # 160 MB, a dot's operand.
step = jax.jit(lambda x, w: (jnp.concatenate(parts(x)) @ w).sum()).lower(x, w).compile()
if sys.argv[1] == 'async':
  assert utils.keep_freed_host_memory()
step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(24):
  step(x, w).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'temp': step.memory_analysis().temp_size_in_bytes, 'faults': faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc: Linux only')
def test_a_cpu_step_reuses_its_temporaries_when_run_inline():
  def run(mode):
    out = subprocess.run([sys.executable, '-c', _STEP_FAULTS, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])
  inline, dispatched = run('inline'), run('async')
  pages = inline['temp'] / os.sysconf('SC_PAGE_SIZE')
  assert inline['temp'] > 128 << 20, inline  # Larger than any thread's arena (64 MB).
  # On jax's dispatch thread the block is mapped afresh and every page faults again at every run.
  assert dispatched['faults'] > 0.8 * 24 * pages, (dispatched, pages)
  # Inline, it comes back from the main thread's heap. glibc may still split the freed block for a
  # small request and take a new one a few times before it settles (5 new blocks at most, in 1 of
  # 16 processes of this program; none in S0's 40-step run).
  assert inline['faults'] < 12 * pages, (inline, pages)


# A process that runs programs inline keeps freed heap memory from its first compile on, each
# later compile returns what is free, and compiles run with glibc's limits: prints the resident
# MB at each point.
_COMPILE_RELEASES = """
import json, os
os.environ.pop('JAX_CPU_ENABLE_ASYNC_DISPATCH', None)
from mobileclip_jax import utils
utils.run_cpu_programs_inline()
import jax, jax.numpy as jnp, numpy as np
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20
jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
before = rss()
block = np.ones(100 << 20, np.float32)  # 400 MB from the heap (no mapping of its own any more).
del block
kept = rss()
jax.jit(lambda x: x * 2)(jnp.ones(4)).block_until_ready()
after = rss()
jax.monitoring.record_scalar(utils._COMPILE_EVENT, 0.0)  # As jax does when a compile starts.
block = np.ones(100 << 20, np.float32)  # During a compile: a mapping of its own, unmapped.
del block
print(json.dumps({'before': before, 'kept': kept, 'after': after, 'compiling': rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc: Linux only')
def test_each_compile_returns_the_freed_heap_when_run_inline():
  out = subprocess.run([sys.executable, '-c', _COMPILE_RELEASES], check=True, capture_output=True,
                       text=True).stdout
  mb = json.loads(out.splitlines()[-1])
  assert mb['kept'] - mb['before'] > 300, mb  # Kept after the first compile (not unmapped).
  assert mb['kept'] - mb['after'] > 300, mb   # Returned by the second compile.
  assert mb['compiling'] - mb['after'] < 100, mb  # Not kept while compiling.

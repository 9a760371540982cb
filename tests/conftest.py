"""Test setup: 8 fake CPU devices, a persistent compilation cache, the slow and exhaustive marks.

`python -m pytest` runs the fast suite; `python -m pytest -m slow` runs the full-size parity
tests (CI runs both, the latter as `-m 'slow and not exhaustive'`). Multi-device tests build
meshes from the 8 fake devices configured here, before anything imports JAX.

The fast suite's programs are tiny and each runs a few times, so compiling them is most of their
cost: it asks for XLA:CPU's cheapest code generation (`FAST_SUITE_XLA_FLAGS`). XLA's HLO passes
(fusion, layout, SPMD partitioning) are unchanged; the kernels' code and float rounding differ.
The full-size tests (`-m ...`) and launchers run outside the tests keep XLA's default.
"""
import gc
import os
import re

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
from mobileclip_jax import compilation_cache  # noqa: E402  (does not import JAX)

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', compilation_cache.DEFAULT_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                      str(compilation_cache.MIN_COMPILE_SECS))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402

# Measured on the 2-core VM, two workers, from an empty cache: -O0 took the fast suite from 19.0
# to 14.5 min (in-process compiles 1,018 -> 559 s; warm, 9.3 -> 10.8 min, as runtime-bound tests
# run slower code); XLA:CPU's older elemental fusion emitters instead of its MLIR ones, each
# module compiled in one piece, 15.1 -> 12.3 min (compiles 595 -> 312 s). CI starts empty.
FAST_SUITE_XLA_FLAGS = ('--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false '
                        '--xla_cpu_parallel_codegen_split_count=1')


def xla_flags(devices: int) -> str:
  """This suite's XLA flags with `devices` fake CPU devices: for the processes a test launches."""
  return re.sub(r'--xla_force_host_platform_device_count=\d+',
                f'--xla_force_host_platform_device_count={devices}', os.environ['XLA_FLAGS'])


def pytest_configure(config):
  # Tracing makes millions of short-lived Python objects; with the default thresholds (700, 10,
  # 10) the collector runs every 700 allocations (test_models.py warm: 73.5 / 74.9 -> 66.5 / 64.1
  # s with these, peak RSS unchanged at 3.6 GB).
  gc.set_threshold(100_000, 50, 100)
  # Before any test module initializes a backend; the processes tests launch inherit it (with one
  # device: `launched_processes_get_one_device`).
  if not config.option.markexpr and 'xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += ' ' + FAST_SUITE_XLA_FLAGS
  config.addinivalue_line('markers', 'slow: full-size models; run with `-m slow` (CI does)')
  config.addinivalue_line('markers', 'exhaustive: slow tests repeated for every released variant '
                          '(exports); run with `-m exhaustive` (CI does not: hours on 2 cores)')


@pytest.fixture(scope='session', autouse=True)
def launched_processes_get_one_device():
  """The processes tests launch run on one CPU device, as a user's CPU run does (8 fake devices
  make a tiny step several times slower); this process keeps its 8, and a test that needs more in
  a launched process asks for them (`xla_flags`)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # Initializes this process's backend with the 8 devices.
  os.environ['XLA_FLAGS'] = xla_flags(1)


def pytest_collection_modifyitems(config, items):
  if config.option.markexpr:
    return
  skip = pytest.mark.skip(reason='slow: run with `python -m pytest -m slow`')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)

"""Test setup: 8 fake CPU devices, a persistent compilation cache, the slow and exhaustive marks.

`python -m pytest` runs the fast suite; `python -m pytest -m slow` runs the full-size parity
tests (CI runs both, the latter as `-m 'slow and not exhaustive'`). Multi-device tests build
meshes from the 8 fake devices configured here, before anything imports JAX.

The fast suite's programs are tiny and each runs a few times, so compiling them is most of their
cost: it asks LLVM for its cheapest code (`FAST_SUITE_XLA_FLAGS`). XLA's own passes (fusion,
layout, SPMD partitioning) are unchanged; only the machine code and its float rounding differ.
The full-size tests (`-m ...`) and launchers run outside the tests keep XLA's default.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
from mobileclip_jax import compilation_cache  # noqa: E402  (does not import JAX)

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', compilation_cache.DEFAULT_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                      str(compilation_cache.MIN_COMPILE_SECS))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402

# Measured on the 2-core VM, two workers: from an empty cache the fast suite in 14.5 instead of
# 19.0 min (in-process compiles 559 instead of 1,018 s); warm, 10.8 instead of 9.3 min, as the
# runtime-bound tests run slower code. CI starts from an empty cache.
FAST_SUITE_XLA_FLAGS = '--xla_backend_optimization_level=0'


def pytest_configure(config):
  # Before any test module initializes a backend; the processes tests launch with this environment
  # inherit it (the two-process tests set their own device counts, and keep the default).
  if not config.option.markexpr and 'xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
    os.environ['XLA_FLAGS'] += ' ' + FAST_SUITE_XLA_FLAGS
  config.addinivalue_line('markers', 'slow: full-size models; run with `-m slow` (CI does)')
  config.addinivalue_line('markers', 'exhaustive: slow tests repeated for every released variant '
                          '(exports); run with `-m exhaustive` (CI does not: hours on 2 cores)')


def pytest_collection_modifyitems(config, items):
  if config.option.markexpr:
    return
  skip = pytest.mark.skip(reason='slow: run with `python -m pytest -m slow`')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)

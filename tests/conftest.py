"""Test setup: 8 fake CPU devices, a persistent compilation cache, the slow and exhaustive marks.

`python -m pytest` runs the fast suite; `python -m pytest -m slow` runs the full-size parity
tests (CI runs both, the latter as `-m 'slow and not exhaustive'`). Multi-device tests build
meshes from the 8 fake devices configured here, before anything imports JAX.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
from mobileclip_jax import compilation_cache  # noqa: E402  (does not import JAX)

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', compilation_cache.DEFAULT_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
                      str(compilation_cache.MIN_COMPILE_SECS))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402


def pytest_configure(config):
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

"""The persistent XLA compilation cache shared by the launch scripts and the tests.

Compiling a train step takes minutes on a CPU and tens of seconds on accelerators; with the cache
a rerun (a resume, an evaluation of the same model, the next test run) loads it instead.
"""
import os

DEFAULT_DIR = os.path.expanduser('~/.cache/mobileclip_jax/jax_cache')


def enable() -> str:
  """Turns the cache on in $JAX_COMPILATION_CACHE_DIR or DEFAULT_DIR; returns the directory.

  A directory already configured (flag or environment) is kept.
  """
  import jax  # pylint: disable=g-import-not-at-top
  directory = (jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')
               or DEFAULT_DIR)
  jax.config.update('jax_compilation_cache_dir', directory)
  # Small programs too: the demo and the tests compile hundreds of sub-second ones.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return directory

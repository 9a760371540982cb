"""Modules that add data sources, standard evaluations, captioners and reinforcement inputs.

A plugin module registers its parts when imported, through the registries' `register_*`
functions (evaluation/datasets.py, evaluation/registry.py, reinforce/captioners.py,
reinforce/inputs.py); the registries call `load()` before they look a name up, so a config or a
command line can name a plugin's parts without importing it. The built-in plugin is the demo
world (mobileclip_jax/demo/sources.py).
"""
import importlib

PLUGINS = ('mobileclip_jax.demo.sources',)
_loaded = False


def load() -> None:
  """Imports every module of PLUGINS, once (they register themselves)."""
  global _loaded
  if not _loaded:
    _loaded = True
    for name in PLUGINS:
      importlib.import_module(name)

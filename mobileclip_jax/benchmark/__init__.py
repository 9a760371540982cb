"""Benchmarks run by `python launch/benchmark.py NAME`: one JSON line per result.

Each benchmark is a module `mobileclip_jax.benchmark.<NAME>` with
`run(options: dict) -> Iterator[dict]`; rows that have a PyTorch reference carry both numbers
and their ratio, measured in the same run.
"""
import importlib
from typing import Any, Dict, Iterator

BENCHMARKS = ('models', 'data', 'train', 'compile', 'loss', 'export', 'efficiency', 'caption')


def run(name: str, options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  if name not in BENCHMARKS:
    raise ValueError(f'Unknown benchmark {name!r}; choose one of {", ".join(BENCHMARKS)}.')
  return importlib.import_module(f'mobileclip_jax.benchmark.{name}').run(options)

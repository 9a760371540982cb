"""Whole-file writes that a crash never leaves half done: a temporary name, then a rename.

Local paths and URLs (gs://, through etils.epath; there the rename is a copy, still never a
partial file under the final name). `write_json_atomic` has the signature of the package-wide
helper planned for mobileclip_jax/utils.py, into which this module folds.
"""
import json
import os
from typing import Any, Iterable

from etils import epath


def write_text_atomic(path: str, text: str | Iterable[str]) -> None:
  """Writes `text` (a string, or lines already ending in '\\n') to `path` atomically."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'{target.name}.{os.getpid()}.tmp'
  with tmp.open('w') as f:
    if isinstance(text, str):
      f.write(text)
    else:
      f.writelines(text)
  tmp.replace(target)


def write_json_atomic(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically."""
  write_text_atomic(path, json.dumps(value))

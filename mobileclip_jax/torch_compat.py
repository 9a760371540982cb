"""Imports of the PyTorch reference stack (open_clip, timm, torchvision) that work on CPU torch.

The torchvision wheels on PyPI are CUDA builds. Beside the CPU build of torch their compiled
extension cannot load, and torchvision's import then dies with
`RuntimeError: operator torchvision::nms does not exist`. open_clip and timm import torchvision
at import time but only use its pure-Python parts, so on that specific failure we declare the two
missing operator schemas and import again. A working torchvision is left untouched.
"""
import importlib
import sys


def import_torchvision():
  """Returns the torchvision module, shimming its compiled ops when they cannot load."""
  try:
    return importlib.import_module('torchvision')
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  import torch  # pylint: disable=g-import-not-at-top
  for name in [k for k in sys.modules if k == 'torchvision' or k.startswith('torchvision.')]:
    del sys.modules[name]
  for op in ('nms', 'qnms'):
    try:
      torch.library.define(f'torchvision::{op}',
                           '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    except RuntimeError:
      pass  # Already defined by an earlier shim.
  return importlib.import_module('torchvision')


def import_open_clip():
  """Returns the open_clip module (raises ImportError when the torch extra is not installed)."""
  import_torchvision()
  return importlib.import_module('open_clip')


def import_timm():
  """Returns the timm module (raises ImportError when the torch extra is not installed)."""
  import_torchvision()
  return importlib.import_module('timm')

"""Inference preprocessing (open_clip's image_transform at eval) and pixel normalization.

Eval images are resized so the shorter side equals `size` (the variant's interpolation:
bilinear for most MobileCLIP tags, bicubic for L-14 and the CLIP teachers), centre-cropped to
size x size and scaled to [0, 1], then normalized with the variant's mean/std. The geometry and
rounding follow torchvision's Resize + CenterCrop on PIL images exactly.
"""
from typing import Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
                  'nearest': Image.Resampling.NEAREST}


def resize_center_crop(image: Image.Image, size: int, interpolation: str = 'bilinear') -> np.ndarray:
  """PIL image -> uint8 [size, size, 3]: shorter side to `size`, then a centre crop."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}.')
  image = image.convert('RGB')
  w, h = image.size
  if min(w, h) != size:  # torchvision Resize(int): the longer side is truncated, not rounded.
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), INTERPOLATIONS[interpolation])
  w, h = image.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
  """uint8 [..., H, W, 3] -> float32 (x / 255 - mean) / std.

  numpy arrays are normalized in place after one cast; jax arrays (the train step normalizes
  on device, so the host sends uint8) with jnp ops.
  """
  scale = np.float32(1 / 255) / np.asarray(std, np.float32)
  offset = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  if isinstance(images, np.ndarray):
    out = images.astype(np.float32)
    out *= scale
    out += offset
    return out
  return images.astype(np.float32) * scale + offset

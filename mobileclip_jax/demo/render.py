"""Drawing demo-world scenes at any resolution (world.py samples them).

Objects are polygons drawn on a supersampled mask and box-filtered (anti-aliased); background
textures are evaluated analytically per pixel centre (anti-aliased stripes and dots), so a scene
looks the same at every size.
"""
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

from mobileclip_jax.demo.world import Background, Scene, SceneObject, SHAPES, TEXTURES


def _unit_polygon(shape: str) -> np.ndarray:
  """Vertices [N, 2] of `shape` centred at 0 with bounding radius ~1 (y points down)."""

  def ring(n: int, radii: Sequence[float], start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg) + np.arange(n) * 2 * np.pi / n
    r = np.resize(np.asarray(radii, np.float64), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

  if shape == 'circle':
    return ring(64, [1.0], 0.0)
  if shape == 'square':
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.72
  if shape == 'triangle':
    return ring(3, [1.0], -90.0)
  if shape == 'star':
    return ring(10, [1.0, 0.42], -90.0)
  if shape == 'cross':
    a, w = 0.92, 0.3
    return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                     [-w, w], [-a, w], [-a, -w], [-w, -w]], np.float64)
  if shape == 'diamond':
    return np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], np.float64)
  if shape == 'hexagon':
    return ring(6, [1.0], 0.0)
  if shape == 'heart':
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    xy = np.stack([16 * np.sin(t) ** 3,
                   -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    xy -= (xy.max(0) + xy.min(0)) / 2
    return xy / np.abs(xy).max()
  raise ValueError(f'Unknown shape {shape!r}; known shapes: {SHAPES}.')


_UNIT_POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPES}


def _background_image(background: Background, image_size: int) -> Image.Image:
  """The background as an RGB image; textures are anti-aliased analytically per pixel."""
  image = Image.new('RGB', (image_size, image_size), background.rgb)
  if background.texture == 'flat':
    return image
  p = background.params
  u = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size  # pixel centres
  x, y = u[None, :], u[:, None]
  if background.texture == 'gradient':
    proj = (x - 0.5) * math.cos(p['angle']) + (y - 0.5) * math.sin(p['angle'])
    mix = np.clip(proj * math.sqrt(0.5) + 0.5, 0, 1)
  elif background.texture == 'stripes':
    proj = (x * math.cos(p['angle']) + y * math.sin(p['angle'])) / p['period'] + p['phase']
    # Signed distance (in pixels) to the nearest stripe edge, stripes covering half a period.
    dist = (np.abs(proj - np.floor(proj) - 0.5) - 0.25) * p['period'] * image_size
    mix = np.clip(dist + 0.5, 0, 1)
  elif background.texture == 'dots':
    s, (ox, oy) = p['spacing'], p['offset']
    dx, dy = x / s + ox, y / s + oy
    dx, dy = (dx - np.floor(dx) - 0.5) * s, (dy - np.floor(dy) - 0.5) * s
    mix = np.clip((p['radius'] - np.sqrt(dx * dx + dy * dy)) * image_size + 0.5, 0, 1)
  elif background.texture == 'noise':
    grid = Image.fromarray(p['grid'], mode='F')
    mix = np.asarray(grid.resize((image_size, image_size), Image.BILINEAR))
  else:
    raise ValueError(f'Unknown texture {background.texture!r}; known textures: {TEXTURES}.')
  # The second tone is painted through the coverage `mix` in [0, 1] as an 8-bit mask.
  image.paste(background.rgb2, None, Image.fromarray((mix * 255 + 0.5).astype(np.uint8)))
  return image


def _draw_object(image: Image.Image, obj: SceneObject, supersample: int) -> None:
  """Paints `obj` onto `image` through an anti-aliased (supersampled, box-filtered) mask."""
  size = image.size[0]
  cx, cy = obj.center
  x0 = max(0, math.floor((cx - obj.radius) * size) - 1)
  y0 = max(0, math.floor((cy - obj.radius) * size) - 1)
  x1 = min(size, math.ceil((cx + obj.radius) * size) + 1)
  y1 = min(size, math.ceil((cy + obj.radius) * size) + 1)
  c, s = math.cos(obj.angle), math.sin(obj.angle)
  unit = _UNIT_POLYGONS[obj.shape] @ np.array([[c, s], [-s, c]])
  scale = obj.radius * size * supersample
  points = (unit * scale + [(cx * size - x0) * supersample, (cy * size - y0) * supersample])
  mask = Image.new('L', ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
  draw = ImageDraw.Draw(mask)
  if obj.style == 'filled':
    draw.polygon(points.ravel().tolist(), fill=255)
  else:  # Pillow draws wide polygon outlines inside the polygon.
    draw.polygon(points.ravel().tolist(), outline=255, width=max(1, round(0.2 * scale)))
  image.paste(obj.rgb, (x0, y0, x1, y1), mask.reduce(supersample))


def render(scene: Scene, image_size: int, supersample: int = 0) -> Image.Image:
  """Draws `scene` as an RGB PIL image of image_size x image_size pixels.

  Args:
    scene: from `sample_scene`.
    image_size: output side in pixels; the layout is the same at every size.
    supersample: object-mask supersampling factor; 0 picks one that gives a >= 256 px canvas.
  """
  if image_size < 8:
    raise ValueError(f'Demo-world image_size must be >= 8 pixels, got {image_size}.')
  supersample = supersample or min(8, max(2, -(-256 // image_size)))
  image = _background_image(scene.background, image_size)
  for obj in reversed(scene.objects):  # main object last, on top
    _draw_object(image, obj, supersample)
  return image


def encode_image(image: Image.Image, image_format: str = 'jpg', jpeg_quality: int = 90) -> bytes:
  """JPEG ('jpg') or PNG ('png') bytes of a PIL image."""
  buffer = io.BytesIO()
  if image_format == 'jpg':
    image.save(buffer, format='JPEG', quality=jpeg_quality)
  elif image_format == 'png':
    image.save(buffer, format='PNG')
  else:
    raise ValueError(f"Unknown image_format {image_format!r}; use 'jpg' or 'png'.")
  return buffer.getvalue()

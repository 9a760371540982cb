"""Tests for decoding only a JPEG's top rows (mobileclip_jax.data.jpeg_rows).

The reference is PIL's whole decode of the same bytes: every shortened decode must give the same
top rows, for every row count, in every chroma subsampling and colour mode PIL writes.
"""
import io

import numpy as np
from PIL import Image
import pytest

from mobileclip_jax.benchmark.data import photo
from mobileclip_jax.data import jpeg_rows

HEIGHT, WIDTH = 77, 53  # Not a multiple of any MCU.


def _encode(mode: str, fmt: str = 'JPEG', **kwargs) -> bytes:
  pixels = photo(np.random.default_rng(0), HEIGHT, WIDTH)
  image = Image.fromarray(pixels).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _decode(data: bytes, rows: int) -> Image.Image:
  return jpeg_rows.decode_top_rows(Image.open(io.BytesIO(data)), data, rows)


@pytest.mark.parametrize('mode, kwargs, mcu_rows', [
    ('RGB', dict(subsampling=0), 8),  # 4:4:4
    ('RGB', dict(subsampling=1), 8),  # 4:2:2
    ('RGB', dict(subsampling=2), 16),  # 4:2:0: the chroma row below matters
    ('RGB', dict(subsampling=2, restart_marker_blocks=3), 16),
    ('RGB', dict(subsampling=2, optimize=True, comment=b'c' * 300,
                 icc_profile=b'\0' * 700), 16),  # Segments to skip before the frame.
    ('L', {}, 8),
    ('CMYK', dict(subsampling=2), 16),
])
def test_top_rows_equal_the_whole_decode_for_every_row_count(mode, kwargs, mcu_rows):
  data = _encode(mode, quality=90, **kwargs)
  whole = np.asarray(Image.open(io.BytesIO(data)))
  assert jpeg_rows.sequential_frame(data)[1:] == (HEIGHT, mcu_rows)
  for rows in range(1, HEIGHT + 1):
    image = _decode(data, rows)
    # Shorter wherever one MCU row below the crop is still inside the image.
    assert image.size == (WIDTH, min(rows + mcu_rows, HEIGHT)), rows
    np.testing.assert_array_equal(np.asarray(image)[:rows], whole[:rows], err_msg=f'{rows}')


@pytest.mark.parametrize('fmt, kwargs', [('JPEG', dict(progressive=True)), ('PNG', {})])
def test_other_encodings_are_decoded_whole(fmt, kwargs):
  data = _encode('RGB', fmt, **kwargs)
  assert jpeg_rows.sequential_frame(data) is None
  image = _decode(data, 10)
  assert image.size == (WIDTH, HEIGHT)
  np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


def test_a_cut_file_fails_even_where_the_rows_needed_are_intact():
  data = _encode('RGB', quality=90)
  cut = data[:len(data) * 3 // 4]
  assert np.array_equal(np.asarray(_decode(data, 8))[:8], np.asarray(_decode(data, 60))[:8])
  with pytest.raises(OSError, match='truncated'):
    _decode(cut, 8)

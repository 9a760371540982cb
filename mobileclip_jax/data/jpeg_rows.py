"""Decoding only the top rows of a JPEG that a crop needs, pixel for pixel as the whole decode.

A stored augmentation's crop ends above the image's bottom edge (at 0.82 of its height on average
for DataCompDR's crops on the data benchmark's photos), and a sequential JPEG decodes from the
top down, so the rows below the crop need not be decoded. `decode_top_rows` rewrites the frame
height in the SOF marker to `rows` plus one MCU row and lets PIL decode that shorter image: libjpeg
decodes the first MCU rows of the scan and skips the rest of it to the EOI marker as extraneous
data (a warning, which PIL ignores). PIL accepts a decode that stops early once it has all its
rows, so a file that does not end with the EOI marker is decoded whole: a file cut short still
fails as it did.

The extra MCU row is what keeps the last rows equal: with 4:2:0 chroma, fancy upsampling of a row
reads the chroma row below it, which libjpeg replaces by a copy of its own row at the frame's
bottom edge (frame height `rows`: the last row differs for every even `rows`; rounded up to an MCU
boundary: at every boundary). Progressive, arithmetic-coded and lossless JPEGs, and every other
format, are decoded whole.
"""
import io

from PIL import Image

# Baseline and extended sequential DCT with Huffman coding: the scan holds MCU rows in order.
_SEQUENTIAL_FRAMES = (0xC0, 0xC1)
# C4 (DHT), C8 (reserved) and CC (DAC) share the SOF markers' range but are not frames.
_OTHER_FRAMES = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}
_START_OF_SCAN = 0xDA
_END_OF_IMAGE = b'\xff\xd9'


def sequential_frame(data: bytes) -> tuple[int, int, int] | None:
  """(byte offset of the frame's height field, frame height, MCU height in rows) of a sequential
  Huffman JPEG; None for anything else (another frame type, a height set by a DNL marker, bytes
  that are not a JPEG's markers)."""
  if not data.startswith(b'\xff\xd8'):
    return None
  i = 2
  while i + 4 <= len(data):
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # A fill byte before the marker.
      i += 1
      continue
    if marker in _SEQUENTIAL_FRAMES:
      height = int.from_bytes(data[i + 5:i + 7], 'big')
      count = data[i + 9] if i + 9 < len(data) else 0
      # Each component: id, sampling factors (horizontal << 4 | vertical), quantization table.
      factors = data[i + 11:i + 10 + 3 * count:3]
      if height == 0 or count == 0 or len(factors) != count:
        return None
      return i + 5, height, 8 * max(f & 15 for f in factors)
    if marker in _OTHER_FRAMES or marker == _START_OF_SCAN:
      return None
    i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
  return None


def decode_top_rows(image: Image.Image, data: bytes, rows: int) -> Image.Image:
  """`image` (opened from `data` by `Image.open`, not yet loaded), decoded at least down to row
  `rows`: its rows [0, rows) equal those of `image.load()`.

  A sequential JPEG that ends with its EOI marker comes back shorter than `image` where the crop
  allows; anything else is `image`, loaded. If the shortened decode fails, the whole image is
  decoded instead, so that a damaged file fails with PIL's own error and a sound one never fails
  here.
  """
  whole = image.format != 'JPEG' or not data.endswith(_END_OF_IMAGE)
  frame = None if whole else sequential_frame(data)
  if frame is not None:
    offset, height, mcu_rows = frame
    short = int(rows) + mcu_rows
    if short < height:
      try:
        top = Image.open(io.BytesIO(
            b''.join((data[:offset], short.to_bytes(2, 'big'), data[offset + 2:]))))
        top.load()
        return top
      except Exception:  # pylint: disable=broad-except
        pass  # The whole decode below raises the file's own error, if it has one.
  image.load()
  return image

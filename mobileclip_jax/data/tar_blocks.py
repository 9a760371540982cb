"""Tar archives read block by block, so that a damaged stretch does not end the reading.

A tar is a sequence of 512-byte blocks: each member is a header block (name, size, type, and a
checksum over the header) and its data padded to whole blocks; two zero blocks end the archive.
`scan` walks the headers itself (ustar and GNU numbers, PAX 'path'/'size' records, GNU long
names) instead of through `tarfile`, which stops at the first bad header: after a header that
fails its checksum it tries every following block until one is a valid header (checksum and
ustar magic) and reports the stretch it skipped. What the members mean is wds.py's business.
"""
import dataclasses
import re
from typing import Iterator

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b'0', b'\0', b'7')
_PAX, _GNU_LONGNAME = b'x', b'L'  # Extended headers for the next member.


def _tar_number(field: bytes) -> int | None:
  """An octal (NUL/space padded) or GNU base-256 header number; None if malformed."""
  if field[:1] == b'\x80':
    return int.from_bytes(field[1:], 'big')
  if field[:1] == b'\xff':
    return None  # Negative: never a valid size or checksum.
  text = field.split(b'\0', 1)[0].strip()
  if not text:
    return 0
  try:
    return int(text, 8)
  except ValueError:
    return None


@dataclasses.dataclass(frozen=True)
class _Header:
  name: str
  size: int
  kind: bytes


def _parse_header(block: bytes, need_magic: bool) -> _Header | None:
  """The header in one 512-byte block, or None if it is not a valid one (checksum, numbers)."""
  stored = _tar_number(block[148:156])
  if stored is None:
    return None
  # The checksum field counts as 8 spaces; old writers summed signed bytes.
  unsigned = sum(block[:148]) + 256 + sum(block[156:])
  signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 128)
  if stored not in (unsigned, signed):
    return None
  magic = block[257:263]
  if need_magic and not magic.startswith(b'ustar'):
    return None
  size = _tar_number(block[124:136])
  if size is None:
    return None
  name = block[:100].split(b'\0', 1)[0]
  if magic == b'ustar\0':  # POSIX: a prefix field holds the start of long names.
    prefix = block[345:500].split(b'\0', 1)[0]
    if prefix:
      name = prefix + b'/' + name
  return _Header(name.decode('utf-8', 'surrogateescape'), size, block[156:157])


def _pax_records(data: bytes) -> dict[str, str]:
  """The 'path' and 'size' of a PAX extended header ('<len> <key>=<value>\\n' records)."""
  records, pos = {}, 0
  while pos < len(data) and data[pos:pos + 1] != b'\0':
    match = re.match(rb'(\d+) ', data[pos:pos + 24])
    if match is None:
      raise ValueError('malformed PAX record length')
    length = int(match.group(1))
    record = data[pos + match.end():pos + length]
    if length <= match.end() or not record.endswith(b'\n') or b'=' not in record:
      raise ValueError('malformed PAX record')
    key, value = record[:-1].split(b'=', 1)
    records[key.decode('utf-8', 'surrogateescape')] = value.decode('utf-8', 'surrogateescape')
    pos += length
  out = {}
  if 'path' in records:
    out['path'] = records['path']
  if 'size' in records:
    out['size'] = int(records['size'])
  return out


def scan(f) -> Iterator[tuple]:
  """Walks a tar block by block; yields ('member', name, data, start, end) per regular file,
  ('gap', start, end) per unreadable stretch between members (resynced at the next valid
  header), and a final ('cut', offset, name) if the file ends before its end-of-archive marker
  (name: of the member whose data is cut, None if the cut is not inside a member's data)."""
  offset, gap_start, zeros_start = 0, None, None
  override, override_start = {}, None  # From a PAX or GNU long-name header, for the next one.
  while True:
    f.seek(offset)
    block = f.read(_BLOCK)
    if len(block) < _BLOCK:  # The end of the file: fine only after an end-of-archive marker
      # (two zero blocks, as POSIX and every tar writer have it; one may be a cut).
      if gap_start is not None or zeros_start is None or offset - zeros_start < 2 * _BLOCK:
        yield ('cut', offset if gap_start is None and zeros_start is None else
               zeros_start if gap_start is None else gap_start, None)
      return
    if block == _ZERO_BLOCK:
      if gap_start is None and zeros_start is None:
        zeros_start = offset  # The end-of-archive marker, unless a header follows.
      offset += _BLOCK
      continue
    header = _parse_header(block, need_magic=gap_start is not None or zeros_start is not None)
    if header is None:
      if gap_start is None:
        gap_start = offset if zeros_start is None else zeros_start
        override = {}
      offset += _BLOCK
      continue
    if gap_start is not None or zeros_start is not None:
      yield ('gap', gap_start if gap_start is not None else zeros_start, offset)
      gap_start = zeros_start = None
    start = offset if override_start is None else override_start
    size = override.get('size', header.size)
    padded_end = offset + _BLOCK + -(-size // _BLOCK) * _BLOCK
    if header.kind in _REGULAR + (_PAX, _GNU_LONGNAME):
      data = f.read(size)
      if len(data) < size:
        yield ('cut', start, override.get('path', header.name))
        return
      if header.kind in _REGULAR:
        yield ('member', override.get('path', header.name), data, start, padded_end)
        override, override_start = {}, None
      else:
        try:
          override = (_pax_records(data) if header.kind == _PAX else
                      {'path': data.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')})
        except ValueError:  # Damaged extended header: what follows is unreadable until resync.
          gap_start, override, override_start = offset, {}, None
          offset += _BLOCK
          continue
        override_start = start
    else:  # Directories, links, PAX global headers: nothing to read.
      override, override_start = {}, None
    offset = padded_end



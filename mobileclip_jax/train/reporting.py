"""What a training run reports: TensorBoard events, metrics.jsonl and a progress line (process 0)."""
import json
import logging
import os
import socket
import struct
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

log = logging.getLogger('mobileclip_jax')


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return f'{d}d{h:02d}h' if d else (f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s')


# ----------------------------------------------------------------------------------------------
# TensorBoard event files, written here: tensorboardX imports torch when it is installed (1.4 s
# and 180 MB of every training process, for a few scalars). The format: TFRecord framing of
# tensorflow.Event protos (tensorboard/compat/proto/event.proto, summary.proto).


def _crc32c_table():
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # Castagnoli, reflected.
    table.append(n)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (strings, sub-messages)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalar: Optional[Tuple[str, float]] = None,
                 file_version: Optional[str] = None, session_start: bool = False) -> bytes:
  """One serialized Event: 1 wall_time (double), 2 step (int64; proto3 leaves out a zero),
  3 file_version, 5 summary (Summary: 1 value {1 tag, 2 simple_value (float)}), 7 session_log
  (SessionLog: 1 status, START = 1)."""
  out = b'\x09' + struct.pack('<d', wall_time)
  if step:
    out += b'\x10' + _varint(step)
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalar is not None:
    tag, value = scalar
    out += _field(5, _field(1, _field(1, tag.encode()) + b'\x15' +
                            np.array(value, '<f4').tobytes()))
  if session_start:
    out += _field(7, b'\x08\x01')
  return out


class EventFile:
  """An append-only TensorBoard event file in `logdir`; every `add_scalars` reaches the disk."""

  def __init__(self, logdir: str, purge_step: Optional[int] = None):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}'
    path, n = os.path.join(logdir, name), 0
    while os.path.exists(path):  # Two writers in one second in one process (resumes in tests).
      n += 1
      path = os.path.join(logdir, f'{name}.{n}')
    self.path = path
    self._file = open(path, 'xb')
    self._write(encode_event(now, 0, file_version='brain.Event:2'))
    if purge_step is not None:  # TensorBoard hides earlier events at steps >= purge_step.
      self._write(encode_event(now, purge_step, file_version='brain.Event:2'))
      self._write(encode_event(now, purge_step, session_start=True))
    self._file.flush()

  def _write(self, event: bytes) -> None:
    header = struct.pack('<Q', len(event))
    self._file.write(header + _masked_crc(header) + event + _masked_crc(event))

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    wall_time = time.time()
    for tag, value in values.items():
      self._write(encode_event(wall_time, step, scalar=(tag, value)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`, from process 0 only."""

  def __init__(self, workdir: str, purge_step: Optional[int] = None):
    """`purge_step`: on resume, TensorBoard drops the earlier run's events from this step on."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = EventFile(os.path.join(workdir, 'tb'), purge_step=purge_step)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._tb.add_scalars(step, values)
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Throughput and ETA over the steps since the last report, pausing during evals and saves."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total, self.batch = total_steps, batch_size
    self._mark_step, self._mark_time = start_step, time.perf_counter()
    self._paused = 0.0

  def pause(self):
    return _Pause(self)

  def report(self, step: int, loss: float, lr: float) -> Dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._mark_time - self._paused, 1e-9)
    steps = step - self._mark_step
    rate = steps / elapsed
    stats = {'examples_per_s': rate * self.batch, 'step_time_s': elapsed / max(steps, 1),
             'eta_s': (self.total - step) / rate if rate > 0 else float('inf')}
    log.info('step %d/%d | %.1f ex/s | %.3f s/step | loss %.4f | lr %.3g | ETA %s', step,
             self.total, stats['examples_per_s'], stats['step_time_s'], loss, lr,
             _format_duration(stats['eta_s']))
    self._mark_step, self._mark_time, self._paused = step, now, 0.0
    return stats


class _Pause:

  def __init__(self, progress: Progress):
    self._progress = progress

  def __enter__(self):
    self._start = time.perf_counter()

  def __exit__(self, *exc):
    self._progress._paused += time.perf_counter() - self._start  # pylint: disable=protected-access


def non_finite(metrics: Mapping[str, Any]) -> Dict[str, float]:
  """The metrics that are NaN or Inf."""
  out = {}
  for k, v in metrics.items():
    v = float(np.asarray(v))
    if not np.isfinite(v):
      out[k] = v
  return out


def human_count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}K'


def memory_summary(compiled: Any) -> Optional[str]:
  """Per-device memory estimate of a compiled step (arguments, outputs, temporaries)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  gib = lambda b: b / 2 ** 30
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - \
      m.alias_size_in_bytes
  return (f'{gib(total):.2f} GiB per device (arguments {gib(m.argument_size_in_bytes):.2f}, '
          f'outputs {gib(m.output_size_in_bytes):.2f}, temporaries {gib(m.temp_size_in_bytes):.2f}, '
          f'donated/aliased {gib(m.alias_size_in_bytes):.2f})')

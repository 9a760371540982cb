"""TensorBoard event files (train/reporting.py) against tensorboardX's writer and protobuf."""
import os
import struct
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from mobileclip_jax.train import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Steps 0 (left out of the proto) to multi-byte varints; tags with slashes; float32 rounding.
ROWS = [(0, {'eval/demo/top1': 0.25}),
        (1, {'loss': 6.5089, 'lr': 2e-3, 'ex_per_s': 55.3}),
        (300_000, {'loss': -1.0e-7, 'data/skipped': 3.0})]


def read_events(path):
  """The Event protos of a file, checking each record's framing and both CRCs with
  tensorboardX's crc32c (written independently of reporting.py's)."""
  from tensorboardX import record_writer as tbx_crc  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, events, at = open(path, 'rb').read(), [], 0
  while at < len(data):
    header = data[at:at + 8]
    (length,) = struct.unpack('<Q', header)
    assert data[at + 8:at + 12] == struct.pack('<I', tbx_crc.masked_crc32c(header))
    payload = data[at + 12:at + 12 + length]
    assert data[at + 12 + length:at + 16 + length] == struct.pack(
        '<I', tbx_crc.masked_crc32c(payload))
    events.append(event_pb2.Event.FromString(payload))
    at += 16 + length
  return events


def test_crc32c_gives_the_castagnoli_check_value():
  assert reporting.crc32c(b'123456789') == 0xE3069283  # The CRC catalogue's CRC-32/ISCSI check.
  assert reporting.crc32c(b'') == 0


@pytest.mark.parametrize('purge_step', [None, 5])
def test_event_file_equals_tensorboardx_byte_for_byte(tmp_path, purge_step):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  with mock.patch('time.time', return_value=1_765_000_000.25):
    ours = reporting.EventFile(str(tmp_path / 'ours'), purge_step=purge_step)
    theirs = SummaryWriter(str(tmp_path / 'theirs'), purge_step=purge_step)
    for step, values in ROWS:
      ours.add_scalars(step, values)
      for tag, value in values.items():
        theirs.add_scalar(tag, value, step)
    ours.close()
    theirs.close()
  [theirs_file] = os.listdir(tmp_path / 'theirs')
  want = open(tmp_path / 'theirs' / theirs_file, 'rb').read()
  assert open(ours.path, 'rb').read() == want
  events = read_events(ours.path)
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars == [(step, tag, np.float32(value)) for step, values in ROWS
                     for tag, value in values.items()]
  purges = [e.step for e in events if e.session_log.status == e.session_log.START]
  assert purges == ([] if purge_step is None else [purge_step])


def test_metric_writer_appends_and_every_write_reaches_the_disk(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(1, {'loss': np.float32(2.5)})
  # Not closed: a run killed now keeps what it logged.
  [name] = os.listdir(tmp_path / 'tb')
  assert [(e.step, e.summary.value[0].simple_value)
          for e in read_events(tmp_path / 'tb' / name) if e.summary.value] == [(1, 2.5)]
  writer.close()
  second = reporting.MetricWriter(str(tmp_path), purge_step=2)  # A resume in the same second.
  second.write(2, {'loss': 1.5})
  second.close()
  assert len(os.listdir(tmp_path / 'tb')) == 2
  assert open(tmp_path / 'metrics.jsonl').read().splitlines() == [
      '{"step": 1, "loss": 2.5}', '{"step": 2, "loss": 1.5}']


def test_a_training_process_does_not_import_torch(tmp_path):
  """torch is for the reference tests; a run that imports it (tensorboardX did) starts 1.4 s
  later and holds 180 MB more."""
  code = ('import sys; from mobileclip_jax.train import loop, reporting; '
          f'w = reporting.MetricWriter({str(tmp_path)!r}); w.write(1, {{"loss": 1.0}}); '
          'w.close(); print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == '[]'

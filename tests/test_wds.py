"""Tests for the tar layer: wds (shards, manifests, the damage-tolerant reader), sample_codec,
torch_pickle, uid_join, and errors (policy, counters, the skipped-samples list).

The torch file reader is checked against torch.save/torch.load themselves; shard reading is
checked against what Python's tarfile wrote, and a fuzz test damages tars at random and checks
that every sample of the intact tar is accounted for. The sample helpers here are also used by
test_build_dataset.py.
"""
import collections
import gzip
import io
import json
import os
import pickle
import tarfile

import ml_dtypes
import numpy as np
from PIL import Image
import pytest

from mobileclip_jax.data import augment
from mobileclip_jax.data import errors
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import torch_pickle
from mobileclip_jax.data import uid_join
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import (BudgetExceededError, CorruptSampleError, ErrorPolicy,
                                        SkipCounter, SkipLog)


# ----------------------------------------------------------------------------------------------
# Sample helpers.


def jpeg_bytes(rng: np.random.Generator, size=(24, 20)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
      buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def unit_rows(rng: np.random.Generator, rows: int, dims) -> np.ndarray:
  """[rows, sum(dims)] float32, each per-teacher slice unit-norm (as DataCompDR stores them)."""
  parts = [rng.normal(size=(rows, d)) for d in dims]
  return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts],
                        axis=1).astype(np.float32)


def make_sample(rng: np.random.Generator, i: int, k: int = 3, dims=(8, 8),
                syn_counts=(('syn_text', 2),), uid_prefix: str = 'uid'
                ) -> sample_codec.Sample:
  """A random reinforced sample with key f'{i:06d}' and uid f'{uid_prefix}{i}'."""
  syn_keys = tuple(key for key, _ in syn_counts)
  index = np.concatenate([[j] * n for j, (_, n) in enumerate(syn_counts)]).astype(np.int32)
  # Stored augmentations as Apple's generator draws them, for the 24 x 20 image.
  paug = [augment.sample_params(rng, 20, 24) for _ in range(k)]
  return sample_codec.Sample(
      shard='', key=f'{i:06d}', uid=f'{uid_prefix}{i}', image=jpeg_bytes(rng), image_format='jpg',
      captions=[f'a photo number {i} ü'], syn_keys=syn_keys,
      syn_captions=[f'synthetic {i}.{j} {syn_keys[c]}' for j, c in enumerate(index)],
      syn_key_index=index, paug=paug, image_emb=unit_rows(rng, k, dims),
      text_emb=unit_rows(rng, 1 + len(index), dims))


def to_pth_gz(members: dict[str, bytes]) -> dict[str, bytes]:
  """Replaces the 'npz' member by a gzip'd torch.save of bfloat16 tensors (DataCompDR-12M-bf16)."""
  import torch  # pylint: disable=g-import-not-at-top
  arrays = sample_codec.load_npz(members.pop('npz'))
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
              for k, v in arrays.items()}, buffer)
  members['pth.gz'] = gzip.compress(buffer.getvalue())
  return members


def tar_bytes(entries) -> bytes:
  """A tar of (name, bytes) entries, written by tarfile directly (not by ShardWriter)."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in entries:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def collect(path):
  """(samples, reports) of a shard read with a recording error handler."""
  reports = []
  return list(wds.iter_samples(path, reports.append)), reports


# ----------------------------------------------------------------------------------------------
# Shard lists and writing.


def test_expand_shards(tmp_path):
  for i in range(12):
    (tmp_path / f'{i:04d}.tar').write_bytes(b'')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'x.tar').write_bytes(b'')
  assert wds.expand_braces('a{00..03}b{x,y}') == [
      f'a{i:02d}b{c}' for i in range(4) for c in 'xy']
  assert wds.expand_braces('{9..11}') == ['9', '10', '11']
  assert wds.expand_braces('{3..1}') == ['3', '2', '1']
  base = str(tmp_path)
  assert wds.expand_shards(f'{base}/{{0002..0004}}.tar') == [
      f'{base}/{i:04d}.tar' for i in range(2, 5)]
  assert wds.expand_shards(f'{base}/000[01].tar::{base}/sub') == [
      f'{base}/0000.tar', f'{base}/0001.tar', f'{base}/sub/x.tar']
  assert len(wds.expand_shards(base)) == 13
  with pytest.raises(FileNotFoundError, match='0012.tar'):
    wds.expand_shards(f'{base}/{{0010..0012}}.tar')
  with pytest.raises(ValueError, match='more than once'):
    wds.expand_shards([f'{base}/0001.tar', f'{base}/000*.tar'])


def test_shard_writer_round_trip_and_layout(tmp_path):
  pattern = str(tmp_path / 'out' / '{:05d}.tar')
  samples = [(f'k{i}', {'jpg': bytes([i]) * 700, 'txt': f'caption {i}'.encode(),
                        'syn.json': b'{}'}) for i in range(7)]
  with wds.ShardWriter(pattern, max_samples=3) as writer:
    for key, members in samples:
      writer.write(key, members)
  assert writer.paths == [pattern.format(i) for i in range(3)]
  assert sorted(os.listdir(tmp_path / 'out')) == ['00000.tar', '00001.tar', '00002.tar',
                                                  wds.MANIFEST_FILE]
  assert [wds.manifest_count(p) for p in writer.paths] == [3, 3, 1]
  read = [(s.key, s.members) for p in writer.paths for s in wds.iter_samples(p)]
  assert read == samples
  # Standard tar members named '<key>.<ext>', as webdataset writes them.
  with tarfile.open(writer.paths[0]) as tar:
    assert tar.getnames()[:3] == ['k0.jpg', 'k0.txt', 'k0.syn.json']
  # Same input, same bytes.
  with wds.ShardWriter(str(tmp_path / 'again' / '{:05d}.tar'), 3) as again:
    for key, members in samples:
      again.write(key, members)
  assert [open(p, 'rb').read() for p in again.paths] == [open(p, 'rb').read()
                                                          for p in writer.paths]


@pytest.mark.parametrize('key, members, error', [
    ('a.b', {'txt': b'x'}, 'no "."'),
    ('', {'txt': b'x'}, 'non-empty'),
    ('k', {}, 'no members'),
    ('k', {'jpg': b'a good member', 'txt': 'text'}, 'must be bytes'),
    ('k', {'jpg': b'a good member', '.txt': b'x'}, 'extension'),
])
def test_shard_writer_rejects_bad_samples(tmp_path, key, members, error):
  writer = wds.ShardWriter(str(tmp_path / '{:03d}.tar'), 10)
  writer.write('good', {'txt': b'x'})
  with pytest.raises((ValueError, TypeError), match=error):
    writer.write(key, members)
  # A rejected sample leaves nothing in the shard.
  assert [(s.key, s.members) for s in wds.iter_samples(writer.close()[0])] == [
      ('good', {'txt': b'x'})]


def test_shard_writer_rejects_repeated_key_and_bad_pattern(tmp_path):
  writer = wds.ShardWriter(str(tmp_path / '{:03d}.tar'), 10)
  writer.write('k', {'txt': b'x'})
  with pytest.raises(ValueError, match='twice'):
    writer.write('k', {'txt': b'y'})
  with pytest.raises(ValueError, match='shard index'):
    wds.ShardWriter(str(tmp_path / 'fixed.tar'), 10)


def test_shard_writer_is_atomic(tmp_path):
  pattern = str(tmp_path / '{:03d}.tar')
  with pytest.raises(RuntimeError, match='crash'):
    with wds.ShardWriter(pattern, max_samples=2) as writer:
      for i in range(3):
        writer.write(f'k{i}', {'txt': b'x'})
        # While a shard is open it exists only under a temporary name that no '*.tar' matches.
        assert not os.path.exists(pattern.format(len(writer.paths) - 1))
        assert len([n for n in os.listdir(tmp_path) if n.endswith('.tmp')]) == 1
      raise RuntimeError('crash')
  # The finished shard is complete and in the manifest; the unfinished one left nothing behind.
  assert sorted(os.listdir(tmp_path)) == ['000.tar', wds.MANIFEST_FILE]
  assert [s.key for s in wds.iter_samples(pattern.format(0))] == ['k0', 'k1']
  assert writer.paths == [pattern.format(0)] and wds.manifest_count(pattern.format(0)) == 2


def test_manifest_merges_and_reads_datacompdr_and_raygen_forms(tmp_path):
  with wds.ShardWriter(str(tmp_path / '{:05d}.tar'), 2) as writer:
    for i in range(3):
      writer.write(f'k{i}', {'txt': b'x'})
  lines = (tmp_path / wds.MANIFEST_FILE).read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{'shard': '00000', 'num_samples': 2},
                                                  {'shard': '00001', 'num_samples': 1}]
  wds.write_manifest({str(tmp_path / '00001.tar'): 5, str(tmp_path / 'x.tar'): 1})
  assert [wds.manifest_count(str(tmp_path / f'{n}.tar')) for n in ('00000', '00001', 'x', 'y')
          ] == [2, 5, 1, None]
  # RayGen's manifest spells the count num_uids.
  (tmp_path / 'raygen').mkdir()
  (tmp_path / 'raygen' / wds.MANIFEST_FILE).write_text('{"shard": "00000007", "num_uids": 9}\n')
  assert wds.manifest_count(str(tmp_path / 'raygen' / '00000007.tar')) == 9
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / wds.MANIFEST_FILE).write_text('{"shard": "a"}\n')
  with pytest.raises(ValueError, match=r'manifest.jsonl line 1 is not'):
    wds.manifest_count(str(tmp_path / 'bad' / 'a.tar'))


# ----------------------------------------------------------------------------------------------
# Reading.


def test_iter_samples_groups_members_like_webdataset(tmp_path):
  path = tmp_path / 'a.tar'
  long_key = 'deep/' * 30 + 's3'  # Past ustar's 100 + 155 name bytes: a PAX header holds it.
  path.write_bytes(tar_bytes([
      ('dir/s1.jpg', b'1'), ('dir/s1.TXT', b't1'), ('dir/s1.syn.json', b'{}'),
      ('README', b'no extension: ignored'), ('__meta__.json', b'{}'),
      ('s2.pth.gz', b'2' * 1000), ('s2.json', b'{}'), (f'{long_key}.txt', b'3'),
  ]))
  samples, reports = collect(str(path))
  assert reports == []
  assert [(s.key, sorted(s.members)) for s in samples] == [
      ('dir/s1', ['jpg', 'syn.json', 'txt']), ('s2', ['json', 'pth.gz']), (long_key, ['txt'])]
  assert samples[1].members['pth.gz'] == b'2' * 1000
  # The same as Python's tarfile reads, member by member.
  with tarfile.open(path) as tar:
    names = [m.name for m in tar.getmembers()]
  assert names[-1] == f'{long_key}.txt'


def test_iter_samples_reports_duplicates(tmp_path):
  path = tmp_path / 'a.tar'
  path.write_bytes(tar_bytes([
      ('a.txt', b'1'), ('a.txt', b'2'),  # the same member twice
      ('b.txt', b'3'), ('c.txt', b'4'), ('b.jpg', b'5'),  # key b split in two runs
  ]))
  samples, reports = collect(str(path))
  assert [s.key for s in samples] == ['b', 'c']
  assert [(e.key, e.reason) for e in reports] == [('a', errors.DUPLICATE),
                                                  ('b', errors.DUPLICATE)]
  with pytest.raises(CorruptSampleError, match="sample 'a': duplicate"):
    list(wds.iter_samples(str(path)))


def _six_samples(tmp_path, manifest=True):
  """A tar of s0..s5 (jpg and txt of 700 bytes: each member is 3 blocks of 512); its bytes."""
  entries = [(f's{i}.{e}', bytes(700)) for i in range(6) for e in ('jpg', 'txt')]
  data = tar_bytes(entries)
  if manifest:
    wds.write_manifest({str(tmp_path / 'x.tar'): 6})
  return data


def _read_damaged(tmp_path, data):
  path = tmp_path / 'x.tar'
  path.write_bytes(data)
  stats = wds.ShardStats(str(path))
  reports = []
  samples = list(wds.iter_samples(str(path), reports.append, stats))
  return [s.key for s in samples], [(e.key, e.reason, e.count) for e in reports], stats


MEMBER = 3 * 512  # One 700-byte member: its header and two data blocks.
SAMPLE = 2 * MEMBER


@pytest.mark.parametrize('cut_at, kept, cut_sample', [
    (4 * SAMPLE + 700, ['s0', 's1', 's2', 's3'], 's4'),  # inside s4.jpg's data
    (4 * SAMPLE + MEMBER, ['s0', 's1', 's2', 's3'], 's4'),  # between s4's two members
    # Inside s4's first header: s3 may have had more members, so it is reported too.
    (4 * SAMPLE + 100, ['s0', 's1', 's2'], 's3'),
    (6 * SAMPLE, ['s0', 's1', 's2', 's3', 's4'], 's5'),  # before the end-of-archive marker
    (6 * SAMPLE + 512, ['s0', 's1', 's2', 's3', 's4'], 's5'),  # inside it (2 zero blocks)
])
def test_cut_tar_counts_every_lost_sample(tmp_path, cut_at, kept, cut_sample):
  data = _six_samples(tmp_path)
  keys, reports, stats = _read_damaged(tmp_path, data[:cut_at])
  assert keys == kept
  lost = 6 - len(kept) - 1
  assert reports == [(cut_sample, errors.TAR_TRUNCATED, 1),
                     (f'({cut_sample}, end)', errors.TAR_TRUNCATED, lost)]
  assert len(keys) + sum(r[2] for r in reports) == 6  # Every sample of the intact tar.
  assert (stats.samples, stats.expected, stats.damaged, stats.unknown_loss) == (
      len(kept) + 1, 6, 1, False)
  with pytest.raises(CorruptSampleError, match='tar_truncated'):
    list(wds.iter_samples(str(tmp_path / 'x.tar')))


def test_cut_tar_without_manifest_is_counted_from_the_other_shards(tmp_path):
  data = _six_samples(tmp_path, manifest=False)
  keys, reports, stats = _read_damaged(tmp_path, data[:2 * SAMPLE + 700])
  assert keys == ['s0', 's1'] and stats.unknown_loss
  assert reports == [('s2', errors.TAR_TRUNCATED, 1), ('(s2, end)', errors.TAR_TRUNCATED, 0)]
  whole = [wds.ShardStats('a.tar', samples=6), wds.ShardStats('b.tar', samples=6),
           wds.ShardStats('c.tar', samples=3, damaged=1)]  # c was damaged: not a reference.
  estimate = wds.estimate_cut_loss(whole + [stats])
  assert [(e.shard, e.key, e.reason, e.count) for e in estimate] == [
      (str(tmp_path / 'x.tar'), '(s2, end)', errors.TAR_TRUNCATED, 3)]
  assert wds.estimate_cut_loss([stats]) == []  # No shard read whole: nothing to go by.


def _flip(data: bytes, position: int) -> bytes:
  return data[:position] + bytes([data[position] ^ 0x40]) + data[position + 1:]


@pytest.mark.parametrize('manifest', [True, False])
def test_damaged_header_resyncs_at_the_next_one(tmp_path, manifest):
  data = _six_samples(tmp_path, manifest)
  # One flipped bit in the name of s2.txt's header: that header fails its checksum, its data
  # blocks are no headers, and reading resumes at s3.jpg. s2 lacks a member and s3 may lack
  # some: both are reported by key; no whole sample was inside the stretch.
  keys, reports, stats = _read_damaged(tmp_path, _flip(data, 2 * SAMPLE + MEMBER + 1))
  assert keys == ['s0', 's1', 's4', 's5']
  assert reports == [('s2', errors.TAR_DAMAGED, 1), ('s3', errors.TAR_DAMAGED, 1),
                     ('(s2, s3)', errors.TAR_DAMAGED, 0)]
  assert stats.damaged == 1 and not stats.unknown_loss


@pytest.mark.parametrize('manifest', [True, False])
def test_destroyed_stretch_counts_the_samples_inside(tmp_path, manifest):
  data = _six_samples(tmp_path, manifest)
  junk = np.random.default_rng(0).bytes(2 * SAMPLE)  # s2 and s3, headers and all.
  keys, reports, _ = _read_damaged(tmp_path, data[:2 * SAMPLE] + junk + data[4 * SAMPLE:])
  assert keys == ['s0', 's5']
  # s1 and s4 border the stretch; s2 and s3 are lost in it, keys unreadable. Without a manifest
  # the count is the stretch's size over the mean sample size, exact here.
  assert reports == [('s1', errors.TAR_DAMAGED, 1), ('s4', errors.TAR_DAMAGED, 1),
                     ('(s1, s4)', errors.TAR_DAMAGED, 2)]


def test_damage_with_nothing_to_measure_by_is_left_to_the_other_shards(tmp_path):
  """No manifest and no intact sample: the stretch's loss is unknown, not guessed as 0."""
  data = _six_samples(tmp_path, manifest=False)
  junk = np.random.default_rng(1).bytes(4 * SAMPLE)
  keys, reports, stats = _read_damaged(tmp_path, data[:SAMPLE] + junk + data[5 * SAMPLE:])
  assert keys == [] and stats.unknown_loss and stats.loss_key == '(s0, s5)'
  assert reports == [('s0', errors.TAR_DAMAGED, 1), ('s5', errors.TAR_DAMAGED, 1),
                     ('(s0, s5)', errors.TAR_DAMAGED, 0)]
  estimate = wds.estimate_cut_loss([wds.ShardStats('a.tar', samples=6), stats])
  assert [(e.key, e.reason, e.count) for e in estimate] == [
      ('(s0, s5)', errors.TAR_DAMAGED, 4)]


def test_unreadable_file_loses_what_the_manifest_lists(tmp_path):
  wds.write_manifest({str(tmp_path / 'x.tar'): 7})
  keys, reports, stats = _read_damaged(tmp_path, b'this is not a tar file' * 40)
  assert keys == [] and reports == [('(start, end)', errors.TAR_TRUNCATED, 7)]
  (tmp_path / wds.MANIFEST_FILE).unlink()
  wds.write_manifest({})  # Clears the manifest cache.
  _, reports, stats = _read_damaged(tmp_path, b'this is not a tar file' * 40)
  assert reports == [('(start, end)', errors.TAR_TRUNCATED, 0)] and stats.unknown_loss


def test_intact_tar_shorter_than_its_manifest(tmp_path):
  data = _six_samples(tmp_path)
  wds.write_manifest({str(tmp_path / 'x.tar'): 8})
  keys, reports, _ = _read_damaged(tmp_path, data)
  assert len(keys) == 6 and reports == [('*', errors.MISSING_SAMPLES, 2)]


def test_fuzzed_tars_never_crash_and_lose_nothing_uncounted(tmp_path):
  """Random bit flips, overwritten stretches, zeroed blocks and cuts: every sample of the intact
  tar is yielded or counted in a report, and every yielded sample decodes or raises a
  CorruptSampleError."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / 'src' / '00000.tar')
  samples = [make_sample(rng, i) for i in range(16)]
  with wds.ShardWriter(path.replace('00000', '{:05d}'), 100) as writer:
    for sample in samples:
      writer.write(sample.key, sample_codec.encode_sample(sample))
  intact = open(path, 'rb').read()
  outcomes = collections.Counter()
  for trial in range(300):
    r = np.random.default_rng([1, trial])
    data = bytearray(intact)
    for _ in range(int(r.integers(1, 4))):
      kind, position = int(r.integers(4)), int(r.integers(len(data)))
      if kind == 0:
        data[position] ^= int(r.integers(1, 256))
      elif kind == 1:
        length = min(int(r.integers(1, 3000)), len(data) - position)
        data[position:position + length] = r.bytes(length)
      elif kind == 2:
        block = position // 512 * 512
        data[block:block + 512 * int(r.integers(1, 4))] = bytes(512 * int(r.integers(1, 4)))
      else:
        data = data[:position]
    with open(path, 'wb') as f:
      f.write(bytes(data))
    reports, decoded = [], 0
    for raw in wds.iter_samples(path, reports.append):
      try:
        sample_codec.decode_sample(raw, reinforced=True)
        decoded += 1
      except CorruptSampleError as e:
        reports.append(e)
    assert decoded + sum(e.count for e in reports) == len(samples), (trial, reports)
    outcomes[min(decoded, 1)] += 1
  # Both kinds of outcome were exercised: some damage left samples decodable, some killed all.
  assert outcomes[0] and outcomes[1]


# ----------------------------------------------------------------------------------------------
# Members.


def test_load_pth_gz_equals_torch_load():
  torch = pytest.importorskip('torch')
  x = torch.randn(6, 10)
  value = {
      'image_emb': torch.randn(4, 8).to(torch.bfloat16), 'text_emb': x,
      'view': x[1:, ::3],  # offset and strides into a storage shared with text_emb
      'transposed': x.t(), 'half': torch.randn(5).half(), 'long': torch.arange(5),
      'uint16': torch.arange(7).to(torch.uint16),  # a dtype torch writes with _rebuild_tensor_v3
      'flags': collections.OrderedDict(a=torch.tensor([True, False])),
      'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3), 'numpy': np.arange(3.0),
      'plain': [1, 'two', 3.0],
  }
  buffer = io.BytesIO()
  torch.save(value, buffer)
  raw = buffer.getvalue()
  got = torch_pickle.load_pth_gz(gzip.compress(raw))
  expected = torch.load(io.BytesIO(raw), weights_only=False)

  def same(a, b):
    if isinstance(b, torch.Tensor):
      assert isinstance(a, np.ndarray) and a.shape == tuple(b.shape)
      if b.dtype == torch.bfloat16:
        assert a.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a.view(np.int16), b.view(torch.int16).numpy())
      else:
        assert a.dtype == b.numpy().dtype
        np.testing.assert_array_equal(a, b.numpy())
    elif isinstance(b, dict):
      assert type(a) is type(b) and a.keys() == b.keys()
      for key in b:
        same(a[key], b[key])
    elif isinstance(b, np.ndarray):
      np.testing.assert_array_equal(a, b)
    else:
      assert a == b

  same(got, expected)


def test_load_pth_gz_refuses_other_objects():
  torch = pytest.importorskip('torch')
  buffer = io.BytesIO()
  torch.save({'counts': collections.Counter('abc')}, buffer)
  with pytest.raises(pickle.UnpicklingError, match='collections.Counter is not allowed'):
    torch_pickle.load_torch(buffer.getvalue())
  with pytest.raises(ValueError, match='zip-format'):
    torch_pickle.load_torch(b'not a zip')


def test_decode_json_accepts_json_in_a_string():
  inner = {'param_aug': [[[1, 2, 3, 4], None]]}
  assert wds.decode_json(json.dumps(json.dumps(inner)).encode()) == inner
  with pytest.raises(CorruptSampleError, match='bad_json'):
    wds.decode_json(b'{"a": ', 'shard.tar', 'key')
  with pytest.raises(CorruptSampleError, match="shard.tar: sample 'key': bad_utf8"):
    wds.decode_text(b'caf\xe9', 'shard.tar', 'key')


def test_check_image():
  rng = np.random.default_rng(0)
  data = jpeg_bytes(rng, (40, 30))
  assert sample_codec.check_image(data) == (40, 30)
  for bad in (data[:len(data) // 2], b'GIF89a garbage', b''):
    with pytest.raises(CorruptSampleError, match='bad_image'):
      sample_codec.check_image(bad, 's.tar', 'k')


# ----------------------------------------------------------------------------------------------
# Samples in one layout.


def _raw(members: dict[str, bytes], key='000001') -> wds.RawSample:
  return wds.RawSample('s.tar', key, dict(members))


def _assert_same_sample(got: sample_codec.Sample, want: sample_codec.Sample,
                        exact_emb: bool = True):
  for field in ('uid', 'image', 'image_format', 'captions', 'syn_keys', 'syn_captions', 'paug'):
    assert getattr(got, field) == getattr(want, field), field
  np.testing.assert_array_equal(got.syn_key_index, want.syn_key_index)
  for field in ('image_emb', 'text_emb'):
    a, b = np.asarray(getattr(got, field), np.float32), getattr(want, field)
    if exact_emb:
      np.testing.assert_array_equal(a, b)
    else:  # bfloat16 storage: 8 significant bits.
      np.testing.assert_allclose(a, b, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize('per_key_emb', [False, True], ids=['v1_combined', 'dfndr_per_key'])
def test_encode_decode_round_trip(per_key_emb):
  rng = np.random.default_rng(1)
  sample = make_sample(rng, 1, syn_counts=(('syn_text_coca', 2), ('syn_text_dfn', 3)))
  members = sample_codec.encode_sample(sample, per_key_emb=per_key_emb)
  arrays = sample_codec.load_npz(members['npz'])
  if per_key_emb:
    assert arrays['text_emb'].shape == (1, 16) and arrays['syn_text_dfn_emb'].shape == (3, 16)
  else:
    assert arrays['text_emb'].shape == (6, 16) and len(arrays) == 2
  _assert_same_sample(sample_codec.decode_sample(_raw(members), reinforced=True), sample)


def test_decode_pth_gz_bfloat16_and_selects_syn_keys_by_regex():
  pytest.importorskip('torch')
  rng = np.random.default_rng(2)
  sample = make_sample(rng, 2, syn_counts=(('syn_text_a', 2), ('syn_text_b', 1)))
  members = to_pth_gz(sample_codec.encode_sample(sample, per_key_emb=True))
  _assert_same_sample(sample_codec.decode_sample(_raw(members), True), sample, exact_emb=False)
  only_b = sample_codec.decode_sample(_raw(members), True, syn_key_regex=r'^syn_text_b$')
  assert only_b.syn_keys == ('syn_text_b',) and only_b.syn_captions == sample.syn_captions[2:]
  np.testing.assert_allclose(np.asarray(only_b.text_emb, np.float32),
                             sample.text_emb[[0, 3]], rtol=2**-8, atol=1e-6)
  # With both, npz (float32) is preferred, as in open_clip's DataCompDR loader.
  members['npz'] = sample_codec.encode_sample(sample)['npz']
  _assert_same_sample(sample_codec.decode_sample(_raw(members), True), sample)


def test_paug_param_aug_may_be_a_json_string():
  rng = np.random.default_rng(3)
  sample = make_sample(rng, 3)
  members = sample_codec.encode_sample(sample)
  members['paug.json'] = json.dumps({'param_aug': json.dumps(sample.paug)}).encode()
  assert sample_codec.decode_sample(_raw(members), True).paug == sample.paug


def _without(members, name):
  return {k: v for k, v in members.items() if k != name}


def _npz(**arrays) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@pytest.mark.parametrize('edit, reason', [
    (lambda m, s: _without(m, 'jpg'), errors.MISSING_MEMBER),
    (lambda m, s: _without(m, 'txt'), errors.MISSING_MEMBER),
    (lambda m, s: _without(m, 'paug.json'), errors.MISSING_MEMBER),
    (lambda m, s: _without(m, 'npz'), errors.MISSING_MEMBER),
    (lambda m, s: {**m, 'txt': b'\xff\xfe caption'}, errors.BAD_UTF8),
    (lambda m, s: {**m, 'syn.json': b'{"syn_text": "not a list"}'}, errors.BAD_JSON),
    (lambda m, s: {**m, 'paug.json': b'{"other": []}'}, errors.BAD_JSON),
    (lambda m, s: {**m, 'npz': m['npz'][:100]}, errors.BAD_EMBEDDINGS),
    (lambda m, s: {**m, 'npz': _npz(image_emb=s.image_emb)}, errors.BAD_EMBEDDINGS),
    (lambda m, s: {**m, 'npz': _npz(image_emb=s.image_emb, text_emb=s.text_emb[:2])},
     errors.EMB_ROWS),
    (lambda m, s: {**m, 'npz': _npz(image_emb=s.image_emb, text_emb=s.text_emb[:, :5])},
     errors.EMB_ROWS),
])
def test_decode_errors_name_shard_key_and_reason(edit, reason):
  rng = np.random.default_rng(4)
  sample = make_sample(rng, 4)
  members = edit(sample_codec.encode_sample(sample), sample)
  with pytest.raises(CorruptSampleError) as info:
    sample_codec.decode_sample(_raw(members, key='000004'), reinforced=True)
  assert (info.value.shard, info.value.key, info.value.reason) == ('s.tar', '000004', reason)


def _shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
  with wds.ShardWriter(str(path) + '{:0d}', len(samples) + 1) as writer:
    for key, members in samples:
      writer.write(key, members)
  return writer.paths[0]


def test_join_by_uid(tmp_path):
  """DataCompDR-12M layout: reinforcement-only shard + image shard, different keys and order."""
  rng = np.random.default_rng(5)
  samples = [make_sample(rng, i) for i in range(6)]
  for s in samples:
    s.sha256 = f'sha{s.uid}'
  full = {s.uid: sample_codec.encode_sample(s) for s in samples}
  reinforced = [(s.key, _without(_without(full[s.uid], 'jpg'), 'txt')) for s in samples]
  # Images: in another order, under other keys, without uid4, plus one unknown uid; the image of
  # uid5 changed since the embeddings were computed (sha256 differs).
  images = []
  for n, s in enumerate([samples[i] for i in (3, 0, 5, 2, 1)]):
    meta = {'uid': s.uid, 'sha256': 'changed' if s.uid == 'uid5' else s.sha256}
    images.append((f'img{n}', {'jpg': full[s.uid]['jpg'], 'txt': full[s.uid]['txt'],
                               'json': json.dumps(meta).encode()}))
  images.append(('img9', {'jpg': b'x', 'txt': b'y', 'json': b'{"uid": "unknown"}'}))
  reports = []
  joined = list(uid_join.join_by_uid(wds.iter_samples(_shard(tmp_path / 'dr', reinforced)),
                                     wds.iter_samples(_shard(tmp_path / 'img', images)),
                                     reports.append))
  decoded = [sample_codec.decode_sample(raw, True) for raw in joined]
  assert [d.uid for d in decoded] == ['uid0', 'uid1', 'uid2', 'uid3']
  for d in decoded:
    _assert_same_sample(d, samples[int(d.uid[3:])])
  assert sorted((e.reason, e.key) for e in reports) == [
      (errors.IMAGE_WITHOUT_SAMPLE, 'img9'), (errors.NO_IMAGE_FOR_UID, '000004'),
      (errors.SHA256_MISMATCH, '000005')]


# ----------------------------------------------------------------------------------------------
# errors.py


def _error(reason, key='k'):
  return CorruptSampleError('shard.tar', key, reason, 'why')


def test_skip_counter_counts_merges_and_round_trips():
  a, b = SkipCounter(), SkipCounter()
  a.ok(10)
  for i in range(7):
    a.record(_error('bad_image', f'k{i}'))
  b.ok(5)
  b.record(_error('emb_width'))
  a.merge(pickle.loads(pickle.dumps(b)))  # as from a worker process
  assert (a.accepted, a.seen, dict(a.skipped)) == (15, 23, {'bad_image': 7, 'emb_width': 1})
  assert len(a.examples['bad_image']) == 5 and a.examples['bad_image'][0] == 'shard.tar:k0: why'
  assert SkipCounter.from_json(json.loads(json.dumps(a.to_json()))) == a
  assert 'bad_image: 7' in a.summary() and a.num_skipped(exempt={'bad_image'}) == 1
  # A report standing for several samples counts them all.
  a.record(CorruptSampleError('s.tar', '(k1, k9)', 'tar_damaged', 'why', count=6))
  assert a.skipped['tar_damaged'] == 6 and a.seen == 29
  assert 'every skipped sample (shard, key, reason): L.jsonl' in a.summary('L.jsonl')


def test_skip_log_lists_every_skip_and_survives_pickling(tmp_path):
  error = CorruptSampleError('s.tar', '(k1, end)', errors.TAR_TRUNCATED, 'cut', count=4)
  assert pickle.loads(pickle.dumps(error)).to_json() == error.to_json()
  policy, counter = ErrorPolicy('skip'), SkipCounter()
  with SkipLog(str(tmp_path / 'list.jsonl'), extra={'process': 0}) as log:
    for i in range(7):  # More than the 5 examples a counter keeps per reason.
      policy.handle(_error('bad_image', f'k{i}'), counter, log, batch=i)
    policy.handle(error, counter, log, batch=7)
  # A line cut by a crash is dropped.
  with open(tmp_path / 'list.jsonl', 'a') as f:
    f.write('{"shard": "s.tar", "key"')
  rows = list(errors.read_skip_log(str(tmp_path / 'list.jsonl')))
  assert [(r['key'], r['reason'], r['count'], r['batch'], r['process']) for r in rows] == [
      (f'k{i}', 'bad_image', 1, i, 0) for i in range(7)] + [('(k1, end)', 'tar_truncated', 4, 7, 0)]
  assert sum(r['count'] for r in rows) == sum(counter.skipped.values()) == 11


def test_policy_fail_and_skip():
  counter = SkipCounter()
  with pytest.raises(CorruptSampleError, match="shard.tar: sample 'k': bad_image: why"):
    ErrorPolicy('fail').handle(_error('bad_image'), counter)
  ErrorPolicy('fail', exempt=frozenset({'no_image_for_uid'})).handle(
      _error('no_image_for_uid'), counter)
  assert dict(counter.skipped) == {'no_image_for_uid': 1}
  policy = ErrorPolicy('skip', max_count=2)
  counter = SkipCounter()
  for _ in range(2):
    policy.handle(_error('bad_image'), counter)
  with pytest.raises(BudgetExceededError, match=r'3 skipped of 3 seen[\s\S]*bad_image: 3'):
    policy.handle(_error('bad_image'), counter)


def test_policy_fraction_budget_waits_for_min_seen_or_the_end():
  policy = ErrorPolicy('skip', max_fraction=0.1, min_seen=100)
  counter = SkipCounter()
  counter.ok(8)
  policy.handle(_error('bad_image'), counter)
  policy.handle(_error('bad_image'), counter)  # 20% of 10 seen, but fewer than min_seen
  with pytest.raises(BudgetExceededError):
    policy.check(counter, final=True)
  counter.ok(90)
  policy.check(counter, final=True)  # 2 of 100


@pytest.mark.parametrize('budget, count, fraction', [
    ('100', 100, None), ('0.01', None, 0.01), ('1%', None, 0.01), ('0', None, 0.0),
    (5, 5, None), ('1.0', None, 1.0)])
def test_policy_parse(budget, count, fraction):
  policy = ErrorPolicy.parse('skip', budget)
  assert (policy.max_count, policy.max_fraction) == (count, fraction)


def test_policy_parse_errors():
  with pytest.raises(ValueError, match='budget'):
    ErrorPolicy.parse('skip', 'lots')
  with pytest.raises(ValueError, match="'fail' or 'skip'"):
    ErrorPolicy.parse('ignore')
  with pytest.raises(ValueError, match="needs mode 'skip'"):
    ErrorPolicy.parse('fail', '0.01')

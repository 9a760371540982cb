"""Tests for building TFDS datasets from DataCompDR-style tars and reading them back.

Every round trip goes tars -> build_dataset -> tfds.data_source (no TensorFlow) and checks
that each sample's image bytes, captions, synthetic captions, augmentation entries and
embeddings arrive intact and attached to the right uid.
"""
import collections
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mobileclip_jax.data import reinforced_tfds as rt
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import BudgetExceededError, CorruptSampleError, ErrorPolicy

import test_wds  # pylint: disable=g-bad-import-order  (sample helpers shared with test_wds.py)

AUGMENTATION = {'random_resized_crop': {'size': 224, 'interpolation': 'bicubic'},
                'rand_augment': {'enable': True, 'p': 1.0}}
SKIP_ALL = ErrorPolicy('skip')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(directory, samples, per_shard=4, encode=wds.encode_sample):
  """Shards of `samples` (encoded by `encode`); returns the brace pattern that names them."""
  with wds.ShardWriter(os.path.join(directory, '{:05d}.tar'), per_shard) as writer:
    for sample in samples:
      writer.write(sample.key, encode(sample))
  return os.path.join(directory, f'{{00000..{len(writer.paths) - 1:05d}}}.tar')


def _build(src, data_dir, name='ds', **kwargs):
  kwargs.setdefault('augmentation', AUGMENTATION)
  kwargs.setdefault('progress', False)
  return rt.build_dataset(src, name, str(data_dir), **kwargs)


def _read_all(name, data_dir):
  source, meta = rt.open_reinforced(name, str(data_dir))
  return {source[i]['uid'].decode(): source[i] for i in range(len(source))}, meta


def _assert_round_trip(records, samples, emb_dtype=np.float16, tol=2**-11):
  """Every sample arrives intact under its uid; embeddings within `tol` (storage rounding)."""
  assert sorted(records) == sorted(s.uid for s in samples)
  for sample in samples:
    record = records[sample.uid]
    assert record['image'] == sample.image
    assert [c.decode() for c in record['captions']] == sample.captions
    assert [c.decode() for c in record['syn_captions']] == sample.syn_captions
    np.testing.assert_array_equal(record['syn_key_index'], sample.syn_key_index)
    assert json.loads(record['paug']) == sample.paug
    for field in ('image_emb', 'text_emb'):
      got, want = record[field], getattr(sample, field)
      assert got.dtype == emb_dtype and got.shape == want.shape
      np.testing.assert_allclose(got.astype(np.float32), np.asarray(want, np.float32), rtol=tol,
                                 atol=1e-6 if tol else 0)


def test_round_trip_npz_v1_parallel(tmp_path):
  rng = np.random.default_rng(0)
  samples = [test_wds.make_sample(rng, i, k=3, dims=(8, 8)) for i in range(10)]
  src = _write(tmp_path / 'src', samples)
  report = _build(src, tmp_path / 'data', workers=2, teachers=['a', 'b'])
  assert (report.num_examples, report.num_shards, report.shards_reused) == (10, 3, 0)
  assert report.samples_read == 10
  records, meta = _read_all('ds', tmp_path / 'data')
  _assert_round_trip(records, samples)
  assert (meta.kind, meta.teachers, meta.teacher_dims, meta.k) == ('reinforced', ('a', 'b'),
                                                                    (8, 8), 3)
  assert (meta.syn_keys, meta.syn_counts, meta.num_captions) == (('syn_text',), (2,), 1)
  assert meta.augmentation == AUGMENTATION and meta.tokenizer == 'clip'
  assert meta.source_shards == tuple(wds.expand_shards(src))
  assert records['uid7']['key'] == b'00001.tar/000007'
  # The metadata is plain JSON next to the data, readable without this code.
  with open(os.path.join(report.path, 'metadata.json')) as f:
    assert json.load(f)['teacher_dims'] == [8, 8]
  assert not os.path.exists(tmp_path / 'data' / 'ds.staging')


def test_round_trip_pth_gz_bf16_dfndr_per_key(tmp_path):
  pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  syn = (('syn_text_coca', 2), ('syn_text_dfn_mscoco38k', 3))
  samples = [test_wds.make_sample(rng, i, k=4, dims=(6, 10), syn_counts=syn) for i in range(5)]
  src = _write(tmp_path / 'src', samples,
               encode=lambda s: test_wds.to_pth_gz(wds.encode_sample(s, per_key_emb=True)))
  _build(src, tmp_path / 'data', teacher_dims=[6, 10], k=2, emb_dtype='bfloat16')
  records, meta = _read_all('ds', tmp_path / 'data')
  # k=2 keeps the first two augmentations of four, with their embeddings; bfloat16 storage
  # keeps the bfloat16 source bit for bit.
  for s in samples:
    s.paug = s.paug[:2]
    s.image_emb = s.image_emb[:2].astype(ml_dtypes.bfloat16)
    s.text_emb = s.text_emb.astype(ml_dtypes.bfloat16)
  _assert_round_trip(records, samples, emb_dtype=ml_dtypes.bfloat16, tol=0)
  assert meta.syn_keys == ('syn_text_coca', 'syn_text_dfn_mscoco38k')
  assert (meta.syn_counts, meta.k, meta.emb_dtype) == ((2, 3), 2, 'bfloat16')


def test_round_trip_datacompdr12m_join(tmp_path):
  """Reinforcement-only shards joined shard by shard with image shards, on the uid."""
  rng = np.random.default_rng(2)
  samples = [test_wds.make_sample(rng, i) for i in range(8)]
  for s in samples:
    s.sha256 = f'sha-{s.uid}'
  reinforced = _write(tmp_path / 'dr', samples, encode=lambda s: {
      k: v for k, v in wds.encode_sample(s).items() if k not in ('jpg', 'txt')})
  # Image shards: same shard split, other keys, reversed order within the shard, and the image
  # of uid5 failed to download.
  with wds.ShardWriter(str(tmp_path / 'img' / '{:05d}.tar'), 4) as writer:
    for shard in range(2):
      for s in reversed(samples[4 * shard:4 * shard + 4]):
        if s.uid != 'uid5':
          members = wds.encode_sample(s)
          writer.write(f'img{s.uid}', {k: members[k] for k in ('jpg', 'txt', 'json')})
  with pytest.raises(ValueError, match='--images_src'):
    _build(reinforced, tmp_path / 'data')
  report = _build(reinforced, tmp_path / 'data', images_src=str(tmp_path / 'img' / '*.tar'),
                  emb_dtype='float32')
  records, _ = _read_all('ds', tmp_path / 'data')
  _assert_round_trip(records, [s for s in samples if s.uid != 'uid5'], np.float32, tol=0)
  # The missing image is counted and reported, but is not a corrupt sample (no budget used).
  assert dict(report.counter.skipped) == {wds.NO_IMAGE_FOR_UID: 1}
  assert 'no_image_for_uid: 1' in report.summary()


def test_plain_build(tmp_path):
  rng = np.random.default_rng(3)
  samples = [test_wds.make_sample(rng, i) for i in range(6)]
  plain_src = _write(tmp_path / 'plain', samples, encode=lambda s: {
      k: v for k, v in wds.encode_sample(s).items() if k in ('jpg', 'txt', 'json')})
  _build(plain_src, tmp_path / 'data', name='plain', augmentation=None)
  # A plain dataset can also be made from reinforced shards (e.g. for the baseline).
  _build(_write(tmp_path / 'dr', samples), tmp_path / 'data', name='from_dr', kind='plain')
  for name in ('plain', 'from_dr'):
    records, meta = _read_all(name, tmp_path / 'data')
    assert meta.kind == 'plain' and meta.teacher_dims == () and meta.augmentation is None
    assert set(records['uid0']) == {'uid', 'key', 'image', 'captions'}
    for s in samples:
      assert records[s.uid]['image'] == s.image
      assert [c.decode() for c in records[s.uid]['captions']] == s.captions


# ----------------------------------------------------------------------------------------------
# Bad inputs: shard a/00000.tar is good; in b/00000.tar, sample i carries the i-th defect and
# the last sample is good.


def _npz_with(sample, **arrays):
  return test_wds._npz(**{'image_emb': sample.image_emb, 'text_emb': sample.text_emb, **arrays})


def _nan_emb(sample):
  image_emb = sample.image_emb.copy()
  image_emb[1, 3] = np.nan
  return _npz_with(sample, image_emb=image_emb)


DEFECTS = {
    'bad_image': lambda s, m: {**m, 'jpg': b'\xff\xd8 not a jpeg'},
    'truncated_image': lambda s, m: {**m, 'jpg': m['jpg'][:len(m['jpg']) // 2]},
    'missing_member': lambda s, m: {k: v for k, v in m.items() if k != 'paug.json'},
    'emb_width': lambda s, m: {**m, 'npz': _npz_with(s, image_emb=s.image_emb[:, :12],
                                                    text_emb=s.text_emb[:, :12])},
    'emb_nonfinite': lambda s, m: {**m, 'npz': _nan_emb(s)},
    'too_few_augmentations': lambda s, m: {**m, 'npz': _npz_with(s, image_emb=s.image_emb[:2])},
    'empty_caption': lambda s, m: {**m, 'txt': b'  '},
    'bad_utf8': lambda s, m: {**m, 'txt': b'caf\xe9'},
}
REASONS = {'truncated_image': wds.BAD_IMAGE}


def _bad_dataset(tmp_path, defects, truncate_tar=False):
  """One shard of good samples and one with a defective sample per entry of `defects`."""
  rng = np.random.default_rng(4)
  good = [test_wds.make_sample(rng, i, uid_prefix='good') for i in range(3)]
  bad = [test_wds.make_sample(rng, i, uid_prefix='bad') for i in range(len(defects) + 1)]
  _write(tmp_path / 'src' / 'a', good, per_shard=10)
  path = os.path.join(tmp_path, 'src', 'b', '00000.tar')
  with wds.ShardWriter(path.replace('00000', '{:05d}'), 100) as writer:
    for sample, defect in zip(bad, list(defects) + [None]):
      members = wds.encode_sample(sample)
      writer.write(sample.key, DEFECTS[defect](sample, members) if defect else members)
  if truncate_tar:  # cut inside the last sample's embeddings: every sample before is kept
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:data.rindex(f'{len(defects):06d}.npz'.encode()) + 600])
  return str(tmp_path / 'src' / '*' / '*.tar'), good, bad


def test_bad_inputs_skip_counts_each_exactly(tmp_path):
  src, good, bad = _bad_dataset(tmp_path, DEFECTS, truncate_tar=True)
  report = _build(src, tmp_path / 'data', policy=SKIP_ALL)
  expected = collections.Counter(REASONS.get(defect, defect) for defect in DEFECTS)
  expected[wds.CORRUPT_SHARD] = 1  # the cut tar: one event for the last (cut) sample
  assert report.counter.skipped == expected
  records, meta = _read_all('ds', tmp_path / 'data')
  assert sorted(records) == sorted(s.uid for s in good)
  assert meta.skipped['skipped'] == expected and report.counter.accepted == len(good)
  for defect, sample in zip(DEFECTS, bad):
    where = f'b/00000.tar:{sample.key}'
    assert any(where in e for e in report.counter.examples[REASONS.get(defect, defect)]), defect


@pytest.mark.parametrize('defect', sorted(DEFECTS) + ['truncated_tar'])
def test_bad_inputs_fail_names_shard_and_key(tmp_path, defect):
  if defect == 'truncated_tar':
    src, _, _ = _bad_dataset(tmp_path, [], truncate_tar=True)
    shard, key, reason = 'b/00000.tar', '*', wds.CORRUPT_SHARD
  else:
    src, _, bad = _bad_dataset(tmp_path, [defect])
    shard, key, reason = 'b/00000.tar', bad[0].key, REASONS.get(defect, defect)
  with pytest.raises(CorruptSampleError) as info:
    _build(src, tmp_path / 'data', policy=ErrorPolicy('fail'))
  assert info.value.shard.endswith(shard) and (info.value.key, info.value.reason) == (key, reason)
  assert not os.path.exists(rt.dataset_dir('ds', str(tmp_path / 'data')))


@pytest.mark.parametrize('policy', [ErrorPolicy('skip', max_count=2),
                                    ErrorPolicy('skip', max_fraction=0.2)])
def test_budget_exceeded(tmp_path, policy):
  src, _, _ = _bad_dataset(tmp_path, ['bad_image', 'empty_caption', 'bad_utf8'])
  # 3 of 7 samples are corrupt: more than 2, and more than 20%.
  with pytest.raises(BudgetExceededError, match=r'3 skipped of 7 seen[\s\S]*bad_utf8: 1'):
    _build(src, tmp_path / 'data', policy=policy)
  report = _build(src, tmp_path / 'data', policy=ErrorPolicy('skip', max_count=3))
  assert report.num_examples == 4 and report.shards_reused == 2  # validated shards are kept


def test_layout_errors(tmp_path):
  rng = np.random.default_rng(5)
  src = _write(tmp_path / 'src', [test_wds.make_sample(rng, i, dims=(8, 8)) for i in range(2)])
  with pytest.raises(ValueError, match=r'teacher dims \[10, 6\] have per-teacher norms'):
    _build(src, tmp_path / 'data', teacher_dims=[10, 6])
  with pytest.raises(ValueError, match='sum to 12'):
    _build(src, tmp_path / 'data', teacher_dims=[6, 6])
  with pytest.raises(ValueError, match='augmentation config'):
    _build(src, tmp_path / 'data', augmentation=None)
  with pytest.raises(ValueError, match="emb_dtype 'int8'"):
    _build(src, tmp_path / 'data', emb_dtype='int8')
  with pytest.raises(ValueError, match='k=5 but .* stores 3 augmentations'):
    _build(src, tmp_path / 'data', k=5)
  with pytest.raises(ValueError, match='lower_snake_case'):
    _build(src, tmp_path / 'data', name='My-Data')
  _build(src, tmp_path / 'data')
  with pytest.raises(FileExistsError, match='--overwrite'):
    _build(src, tmp_path / 'data')
  assert _build(src, tmp_path / 'data', overwrite=True).num_examples == 2


# ----------------------------------------------------------------------------------------------
# Resume and determinism.


def test_resume_after_crash_gives_the_same_dataset(tmp_path, monkeypatch):
  rng = np.random.default_rng(6)
  samples = [test_wds.make_sample(rng, i) for i in range(12)]
  src = _write(tmp_path / 'src', samples, per_shard=3)  # 4 shards
  reference = _build(src, tmp_path / 'ref', keep_staging=True)
  assert sorted(os.listdir(tmp_path / 'ref' / 'ds.staging')) == [
      f'{i:08d}.{ext}' for i in range(4) for ext in ('examples', 'json')]

  # Crash while staging shard 2: shards 0 and 1 are done, shard 2 leaves no partial file.
  make_example = rt.make_example

  def crashing(sample, record_key, meta):
    if record_key.startswith('00002.tar'):
      raise RuntimeError('simulated crash')
    return make_example(sample, record_key, meta)

  monkeypatch.setattr(rt, 'make_example', crashing)
  with pytest.raises(RuntimeError, match='simulated crash'):
    _build(src, tmp_path / 'data')
  staging = tmp_path / 'data' / 'ds.staging'
  assert sorted(os.listdir(staging)) == [f'{i:08d}.{ext}' for i in range(2)
                                         for ext in ('examples', 'json')]
  monkeypatch.undo()

  # Crash while writing the TFDS files: every shard is staged.
  read_staged = rt._read_staged

  def crash_in_tfds(path):
    yield from read_staged(path)
    raise RuntimeError('simulated crash in tfds')

  monkeypatch.setattr(rt, '_read_staged', crash_in_tfds)
  with pytest.raises(RuntimeError, match='in tfds'):
    _build(src, tmp_path / 'data')
  monkeypatch.undo()
  assert len(os.listdir(staging)) == 8

  report = _build(src, tmp_path / 'data')
  assert (report.num_examples, report.shards_reused, report.samples_read) == (12, 4, 0)
  # Same records in the same order as the uninterrupted build.
  ref, _ = rt.open_reinforced(reference.path)
  got, _ = rt.open_reinforced('ds', str(tmp_path / 'data'))
  assert len(got) == len(ref) == 12
  for i in range(12):
    a, b = got[i], ref[i]
    assert a.keys() == b.keys()
    for field in a:
      np.testing.assert_array_equal(np.asarray(a[field], dtype=object),
                                    np.asarray(b[field], dtype=object))


def test_changed_input_is_restaged(tmp_path):
  rng = np.random.default_rng(7)
  samples = [test_wds.make_sample(rng, i) for i in range(4)]
  src = _write(tmp_path / 'src', samples, per_shard=2)
  _build(src, tmp_path / 'data', keep_staging=True)
  first = os.stat(tmp_path / 'src' / '00000.tar')
  samples[3].captions = ['a new caption']
  src = _write(tmp_path / 'src', samples, per_shard=2)
  # Shard 0 is rewritten with the same bytes; give it back its time so it counts as unchanged.
  os.utime(tmp_path / 'src' / '00000.tar', ns=(first.st_atime_ns, first.st_mtime_ns))
  report = _build(src, tmp_path / 'data', overwrite=True)
  assert report.shards_reused == 1
  records, _ = _read_all('ds', tmp_path / 'data')
  assert records['uid3']['captions'] == [b'a new caption']


# ----------------------------------------------------------------------------------------------
# Reading errors and the command line.


def test_open_missing_dataset_says_where_and_how(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    rt.open_reinforced('nothing_here', str(tmp_path))
  message = str(info.value)
  assert str(tmp_path / 'nothing_here') in message
  assert 'python launch/build_dataset.py' in message and '--name=nothing_here' in message
  assert f'--data_dir={tmp_path}' in message


def test_command_line(tmp_path):
  rng = np.random.default_rng(8)
  src = _write(tmp_path / 'src', [test_wds.make_sample(rng, i) for i in range(6)], per_shard=3)
  with open(tmp_path / 'datacompdr.json', 'w') as f:
    json.dump({'model_name': 'ViT-L-14,ViT-L-14', 'pretrained': 'openai,datacomp_xl_s13b_b90k',
               'num_samples': 2, 'reinforce': {'image_augmentation': AUGMENTATION}}, f)
  (tmp_path / 'src' / '00001.tar').write_bytes(b'broken')

  def run(*flags):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, 'launch', 'build_dataset.py'), f'--src={src}',
         '--name=cli', f'--data_dir={tmp_path / "data"}', '--workers=1',
         f'--reinforce_config={tmp_path / "datacompdr.json"}', *flags],
        capture_output=True, text=True, check=False)

  failed = run()
  assert failed.returncode == 1 and 'corrupt_shard' in failed.stderr
  assert '--policy=skip' in failed.stderr
  result = run('--policy=skip', '--max_corrupt=1')
  assert result.returncode == 0, result.stderr
  assert 'Wrote 3 reinforced examples' in result.stdout and 'corrupt_shard: 1' in result.stdout
  _, meta = rt.open_reinforced('cli', str(tmp_path / 'data'))
  assert meta.teachers == ('ViT-L-14:openai', 'ViT-L-14:datacomp_xl_s13b_b90k') and meta.k == 2
  assert meta.augmentation == AUGMENTATION

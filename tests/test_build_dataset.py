"""Tests for building TFDS datasets from DataCompDR-style tars and reading them back.

Every round trip goes tars -> build_dataset -> tfds.data_source (no TensorFlow) and checks
that each sample's image bytes, captions, synthetic captions, augmentation entries and
embeddings arrive intact and attached to the right uid. Bad inputs are checked for the exact
counts by reason and the list of every skipped sample; the Beam runner is checked against the
local one record by record.
"""
import collections
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import errors
from mobileclip_jax.data import reinforced_tfds as rt
from mobileclip_jax.data import sample_checks
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import shard_staging
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import BudgetExceededError, CorruptSampleError, ErrorPolicy

import test_wds  # pylint: disable=g-bad-import-order  (sample helpers shared with test_wds.py)

AUGMENTATION = {'random_resized_crop': {'size': 224, 'interpolation': 'bicubic'},
                'rand_augment': {'enable': True, 'p': 1.0}}
SKIP_ALL = ErrorPolicy('skip')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(directory, samples, per_shard=4, encode=sample_codec.encode_sample):
  """Shards of `samples` (encoded by `encode`); returns the brace pattern that names them."""
  with wds.ShardWriter(os.path.join(directory, '{:05d}.tar'), per_shard) as writer:
    for sample in samples:
      writer.write(sample.key, encode(sample))
  return os.path.join(directory, f'{{00000..{len(writer.paths) - 1:05d}}}.tar')


def _build(src, data_dir, name='ds', **kwargs):
  kwargs.setdefault('augmentation', AUGMENTATION)
  kwargs.setdefault('progress', False)
  return dataset_build.build_dataset(src, name, str(data_dir), **kwargs)


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
               encode=lambda s: test_wds.to_pth_gz(sample_codec.encode_sample(s, per_key_emb=True)))
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
      k: v for k, v in sample_codec.encode_sample(s).items() if k not in ('jpg', 'txt')})
  # Image shards: same shard split, other keys, reversed order within the shard, and the image
  # of uid5 failed to download.
  with wds.ShardWriter(str(tmp_path / 'img' / '{:05d}.tar'), 4) as writer:
    for shard in range(2):
      for s in reversed(samples[4 * shard:4 * shard + 4]):
        if s.uid != 'uid5':
          members = sample_codec.encode_sample(s)
          writer.write(f'img{s.uid}', {k: members[k] for k in ('jpg', 'txt', 'json')})
  with pytest.raises(ValueError, match='--images_src'):
    _build(reinforced, tmp_path / 'data')
  report = _build(reinforced, tmp_path / 'data', images_src=str(tmp_path / 'img' / '*.tar'),
                  emb_dtype='float32')
  records, _ = _read_all('ds', tmp_path / 'data')
  _assert_round_trip(records, [s for s in samples if s.uid != 'uid5'], np.float32, tol=0)
  # The missing image is counted and reported, but is not a corrupt sample (no budget used).
  assert dict(report.counter.skipped) == {errors.NO_IMAGE_FOR_UID: 1}
  assert 'no_image_for_uid: 1' in report.summary()


def test_plain_build(tmp_path, capsys):
  rng = np.random.default_rng(3)
  samples = [test_wds.make_sample(rng, i) for i in range(6)]
  plain_src = _write(tmp_path / 'plain', samples, encode=lambda s: {
      k: v for k, v in sample_codec.encode_sample(s).items() if k in ('jpg', 'txt', 'json')})
  _build(plain_src, tmp_path / 'data', name='plain', augmentation=None)
  printed = capsys.readouterr().out
  assert 'Writing the plain dataset (ArrayRecord files) to ' in printed
  assert 'ownload' not in printed  # TFDS's "Downloading and preparing": nothing is downloaded.
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


def _edit_row(sample, name, row, fn):
  array = getattr(sample, name).copy()
  array[row] = fn(array[row])
  return _npz_with(sample, **{name: array})


def _paug(sample, fn):
  return json.dumps({'param_aug': fn(sample.paug)}).encode()


DEFECTS = {
    'bad_image': lambda s, m: {**m, 'jpg': b'\xff\xd8 not a jpeg'},
    'truncated_image': lambda s, m: {**m, 'jpg': m['jpg'][:len(m['jpg']) // 2]},
    'missing_member': lambda s, m: {k: v for k, v in m.items() if k != 'paug.json'},
    'emb_width': lambda s, m: {**m, 'npz': _npz_with(s, image_emb=s.image_emb[:, :12],
                                                    text_emb=s.text_emb[:, :12])},
    'emb_nonfinite': lambda s, m: {**m, 'npz': _edit_row(s, 'image_emb', 1,
                                                         lambda r: np.where(r > 0, np.nan, r))},
    'zero_row': lambda s, m: {**m, 'npz': _edit_row(s, 'text_emb', 2, np.zeros_like)},
    'scaled_row': lambda s, m: {**m, 'npz': _edit_row(s, 'image_emb', 0, lambda r: 50 * r)},
    'too_few_augmentations': lambda s, m: {**m, 'npz': _npz_with(s, image_emb=s.image_emb[:2])},
    # An op of None: the trainer's validator refuses it, so the builder does too.
    'null_op': lambda s, m: {**m, 'paug.json': _paug(s, lambda p: [
        [p[0][0], [None, [3, 1.0]]]] + p[1:])},
    'box_outside_image': lambda s, m: {**m, 'paug.json': _paug(s, lambda p: p[:2] + [
        [[0, 0, 25, 12], p[2][1]]])},  # The image is 24 x 20 (width x height).
    'empty_caption': lambda s, m: {**m, 'txt': b'  '},
    'bad_utf8': lambda s, m: {**m, 'txt': b'caf\xe9'},
}
REASONS = {'truncated_image': errors.BAD_IMAGE, 'zero_row': errors.EMB_NORM,
           'scaled_row': errors.EMB_NORM, 'null_op': errors.BAD_PAUG,
           'box_outside_image': errors.BAD_PAUG}


def _bad_dataset(tmp_path, defects, truncate_tar=False):
  """One shard of good samples and one with a defective sample per entry of `defects`."""
  rng = np.random.default_rng(4)
  good = [test_wds.make_sample(rng, i, uid_prefix='good') for i in range(3)]
  bad = [test_wds.make_sample(rng, i, uid_prefix='bad') for i in range(len(defects) + 1)]
  _write(tmp_path / 'src' / 'a', good, per_shard=10)
  path = os.path.join(tmp_path, 'src', 'b', '00000.tar')
  with wds.ShardWriter(path.replace('00000', '{:05d}'), 100) as writer:
    for sample, defect in zip(bad, list(defects) + [None]):
      members = sample_codec.encode_sample(sample)
      writer.write(sample.key, DEFECTS[defect](sample, members) if defect else members)
  if truncate_tar:  # cut inside the last sample's embeddings: every sample before is kept
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:data.rindex(f'{len(defects):06d}.npz'.encode()) + 600])
  return str(tmp_path / 'src' / '*' / '*.tar'), good, bad


def test_bad_inputs_skip_counts_and_lists_each_exactly(tmp_path):
  src, good, bad = _bad_dataset(tmp_path, DEFECTS, truncate_tar=True)
  report = _build(src, tmp_path / 'data', policy=SKIP_ALL)
  expected = collections.Counter(REASONS.get(defect, defect) for defect in DEFECTS)
  expected[errors.TAR_TRUNCATED] = 1  # the cut tar: its last sample, nothing after it
  assert report.counter.skipped == expected
  records, meta = _read_all('ds', tmp_path / 'data')
  assert sorted(records) == sorted(s.uid for s in good)
  assert meta.skipped['skipped'] == expected and report.counter.accepted == len(good)
  assert report.counter.seen == len(good) + len(bad)  # Every sample the shards held.
  # The full list beside the dataset: one line per skip, named by shard and key.
  rows = list(errors.read_skip_log(report.skipped_list))
  named = {(r['shard'].split('/src/')[1], r['key'], r['reason']) for r in rows if r['count']}
  assert named == {('b/00000.tar', sample.key, REASONS.get(defect, defect))
                   for defect, sample in zip(list(DEFECTS) + ['cut'], bad)
                   if defect != 'cut'} | {('b/00000.tar', bad[-1].key, errors.TAR_TRUNCATED)}
  assert sum(r['count'] for r in rows) == sum(expected.values())
  assert report.skipped_list in report.summary() and 'emb_norm: 2' in report.summary()


@pytest.mark.parametrize('defect', sorted(DEFECTS) + ['truncated_tar'])
def test_bad_inputs_fail_names_shard_and_key(tmp_path, defect):
  if defect == 'truncated_tar':
    src, _, bad = _bad_dataset(tmp_path, [], truncate_tar=True)
    key, reason = bad[0].key, errors.TAR_TRUNCATED
  else:
    src, _, bad = _bad_dataset(tmp_path, [defect])
    key, reason = bad[0].key, REASONS.get(defect, defect)
  with pytest.raises(CorruptSampleError) as info:
    _build(src, tmp_path / 'data', policy=ErrorPolicy('fail'))
  assert info.value.shard.endswith('b/00000.tar')
  assert (info.value.key, info.value.reason) == (key, reason)
  assert not os.path.exists(rt.dataset_dir('ds', str(tmp_path / 'data')))


def test_trainer_accepts_every_paug_the_builder_accepts(tmp_path):
  """The builder runs the trainer's validator: each stored entry it keeps replays."""
  src, good, _ = _bad_dataset(tmp_path, ['null_op', 'box_outside_image'])
  _build(src, tmp_path / 'data', policy=SKIP_ALL)
  records, meta = _read_all('ds', tmp_path / 'data')
  config = augment.from_generation_config(meta.augmentation)
  for record in records.values():
    image = test_wds.Image.open(test_wds.io.BytesIO(record['image']))
    for entry in json.loads(record['paug']):
      assert augment.replay(image, entry, 16, config).shape == (16, 16, 3)


@pytest.mark.parametrize('policy', [ErrorPolicy('skip', max_count=2),
                                    ErrorPolicy('skip', max_fraction=0.2)])
def test_budget_exceeded(tmp_path, policy):
  src, _, _ = _bad_dataset(tmp_path, ['bad_image', 'empty_caption', 'bad_utf8'])
  # 3 of 7 samples are corrupt: more than 2, and more than 20%.
  with pytest.raises(BudgetExceededError, match=r'3 skipped of 7 seen[\s\S]*bad_utf8: 1'
                     r'[\s\S]*skipped_samples.jsonl') as info:
    _build(src, tmp_path / 'data', policy=policy)
  # The list stays in the staging folder for the user to read.
  listed = str(tmp_path / 'data' / 'ds.staging' / rt.SKIPPED_FILE)
  assert listed in str(info.value)
  assert sorted(r['reason'] for r in errors.read_skip_log(listed)) == [
      'bad_image', 'bad_utf8', 'empty_caption']
  report = _build(src, tmp_path / 'data', policy=ErrorPolicy('skip', max_count=3))
  assert report.num_examples == 4 and report.shards_reused == 2  # validated shards are kept


def _cut_shard_set(tmp_path, manifest=True):
  """3 shards of 20 samples; shard 1 cut in the middle. Returns its pattern."""
  rng = np.random.default_rng(9)
  samples = [test_wds.make_sample(rng, i) for i in range(60)]
  src = _write(tmp_path / 'src', samples, per_shard=20)
  path = tmp_path / 'src' / '00001.tar'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  if not manifest:
    (tmp_path / 'src' / wds.MANIFEST_FILE).unlink()
    wds.write_manifest({})  # Clears the manifest cache of this process.
  return src


@pytest.mark.parametrize('manifest', [True, False])
def test_cut_tar_loss_is_fully_counted_and_fails_a_1_percent_budget(tmp_path, manifest):
  """The issue's case: a shard set cut in the middle once counted the loss as one sample."""
  src = _cut_shard_set(tmp_path, manifest)
  with pytest.raises(BudgetExceededError, match=r'of 60 seen exceeds the budget'):
    _build(src, tmp_path / 'data', policy=ErrorPolicy.parse('skip', '1%'))
  report = _build(src, tmp_path / 'data', policy=ErrorPolicy.parse('skip', '50%'))
  # Every sample of the intact set is accepted or counted: from the manifest, or, without one,
  # from the median sample count of the shards read whole.
  assert report.counter.seen == 60 and report.num_examples == report.counter.accepted
  assert set(report.counter.skipped) == {errors.TAR_TRUNCATED}
  rows = list(errors.read_skip_log(report.skipped_list))
  assert sum(r['count'] for r in rows) == 60 - report.num_examples
  assert all(r['shard'].endswith('00001.tar') for r in rows)


def test_fuzzed_shards_build_and_account_for_every_sample(tmp_path):
  """Random damage through the whole build: never a crash, every sample accepted or counted."""
  rng = np.random.default_rng(10)
  samples = [test_wds.make_sample(rng, i) for i in range(24)]
  intact = _write(tmp_path / 'intact', samples, per_shard=8)
  for trial in range(3):
    r = np.random.default_rng([2, trial])
    src = tmp_path / f'fuzz{trial}'
    src.mkdir()
    for name in sorted(os.listdir(tmp_path / 'intact')):
      data = bytearray((tmp_path / 'intact' / name).read_bytes())
      if name.endswith('.tar'):
        for _ in range(3):
          position = int(r.integers(len(data)))
          data[position:position + 700] = r.bytes(len(data[position:position + 700]))
      (src / name).write_bytes(bytes(data))
    report = _build(str(src / '*.tar'), tmp_path / 'data', name=f'fuzz{trial}',
                    policy=SKIP_ALL)
    assert report.counter.seen == len(samples) and report.num_examples == report.counter.accepted
  del intact


def test_layout_comes_from_the_consensus_not_the_first_sample(tmp_path):
  """A first sample with 2 augmentations, or a NaN or wrong-width embedding, is one vote: it is
  skipped and counted like any other, and the layout is what most samples have."""
  rng = np.random.default_rng(11)
  samples = [test_wds.make_sample(rng, i, k=3) for i in range(9)]
  firsts = {'too_few_augmentations': DEFECTS['too_few_augmentations'],
            'emb_nonfinite': DEFECTS['emb_nonfinite'], 'emb_width': DEFECTS['emb_width']}
  for reason, defect in firsts.items():
    src = tmp_path / reason
    with wds.ShardWriter(str(src / '{:05d}.tar'), 100) as writer:
      for i, sample in enumerate(samples):
        members = sample_codec.encode_sample(sample)
        writer.write(sample.key, defect(sample, members) if i == 0 else members)
    report = _build(str(src / '*.tar'), tmp_path / 'data', name=reason, policy=SKIP_ALL)
    assert dict(report.counter.skipped) == {reason: 1} and report.num_examples == 8
    assert (report.metadata.k, report.metadata.teacher_dims) == (3, (8, 8))


def test_layout_errors(tmp_path):
  rng = np.random.default_rng(5)
  src = _write(tmp_path / 'src', [test_wds.make_sample(rng, i, dims=(8, 8)) for i in range(2)])
  with pytest.raises(ValueError, match=r'teacher dims \[10, 6\], the embeddings of 2 of the '
                     r'first 2 samples are not unit-norm'):
    _build(src, tmp_path / 'data', teacher_dims=[10, 6])
  with pytest.raises(ValueError, match='sum to 12'):
    _build(src, tmp_path / 'data', teacher_dims=[6, 6])
  with pytest.raises(ValueError, match='augmentation config'):
    _build(src, tmp_path / 'data', augmentation=None)
  with pytest.raises(ValueError, match="emb_dtype 'int8'"):
    _build(src, tmp_path / 'data', emb_dtype='int8')
  with pytest.raises(ValueError, match='k=5, but most of the first 2 samples store fewer'):
    _build(src, tmp_path / 'data', k=5)
  with pytest.raises(ValueError, match='lower_snake_case'):
    _build(src, tmp_path / 'data', name='My-Data')
  with pytest.raises(ValueError, match="Unknown runner 'spark'"):
    _build(src, tmp_path / 'data', runner='spark')
  _build(src, tmp_path / 'data')
  with pytest.raises(FileExistsError, match='--overwrite'):
    _build(src, tmp_path / 'data')
  assert _build(src, tmp_path / 'data', overwrite=True).num_examples == 2
  # Widths that cannot be inferred: the embeddings are not unit-norm slices.
  scaled = [test_wds.make_sample(rng, i) for i in range(3)]
  for sample in scaled:
    sample.image_emb, sample.text_emb = 3 * sample.image_emb, 3 * sample.text_emb
  with pytest.raises(ValueError, match='teacher widths cannot be inferred.*--teacher_dims'):
    _build(_write(tmp_path / 'scaled', scaled), tmp_path / 'data', name='scaled')
  # No majority: the samples disagree on k and none is given.
  mixed = [test_wds.make_sample(rng, i, k=2 + i % 2) for i in range(4)]
  with pytest.raises(ValueError, match=r'do not agree on the number of stored augmentations '
                     r'\((3: 2, 2: 2|2: 2, 3: 2)\); pass --k'):
    _build(_write(tmp_path / 'mixed', mixed), tmp_path / 'data', name='mixed')


# ----------------------------------------------------------------------------------------------
# Apache Beam.


def _records(path):
  source, meta = rt.open_reinforced(path)
  return [source[i] for i in range(len(source))], meta


def test_beam_runner_writes_the_local_build(tmp_path):
  """The DirectRunner build equals the local one: records in order, metadata, counts, list."""
  pytest.importorskip('apache_beam')
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  direct = pipeline_options.PipelineOptions(['--runner=DirectRunner'])
  src, good, _ = _bad_dataset(tmp_path, ['bad_image', 'zero_row', 'null_op', 'bad_utf8'],
                              truncate_tar=True)
  local = _build(src, tmp_path / 'local', policy=SKIP_ALL)
  beam = _build(src, tmp_path / 'beam', policy=SKIP_ALL, runner='beam', beam_options=direct)
  assert beam.counter == local.counter and beam.num_examples == len(good)
  assert beam.metadata == local.metadata
  (got, got_meta), (want, want_meta) = _records(beam.path), _records(local.path)
  assert got_meta == want_meta and len(got) == len(want) == len(good)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for field in a:
      np.testing.assert_array_equal(np.asarray(a[field], dtype=object),
                                    np.asarray(b[field], dtype=object), err_msg=field)
  rows = lambda report: sorted(map(json.dumps, errors.read_skip_log(report.skipped_list)))
  assert rows(beam) == rows(local) and len(rows(beam)) == 6  # 5 samples, and the cut itself.
  assert not os.path.exists(tmp_path / 'beam' / 'ds.staging')
  # The command line: --runner=beam with Beam's own options.
  with open(tmp_path / 'augmentation.json', 'w') as f:
    json.dump(AUGMENTATION, f)
  cli = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch', 'build_dataset.py'), f'--src={src}',
       '--name=ds', f'--data_dir={tmp_path / "cli"}', '--runner=beam', '--policy=skip',
       '--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2',
       f'--reinforce_config={tmp_path / "augmentation.json"}'],
      capture_output=True, text=True, check=False)
  assert cli.returncode == 0, cli.stderr
  assert f'Wrote {len(good)} reinforced examples' in cli.stdout and 'emb_norm: 1' in cli.stdout
  assert [r['uid'] for r in _records(str(tmp_path / 'cli' / 'ds'))[0]] == [
      r['uid'] for r in want]

  # The same policy: a budget fails after the pipeline, before the dataset is moved into place;
  # 'fail' stops at the first corrupt sample, named.
  with pytest.raises(BudgetExceededError, match=r'5 skipped of 8 seen[\s\S]*skipped_samples'):
    _build(src, tmp_path / 'over', policy=ErrorPolicy('skip', max_count=4), runner='beam',
           beam_options=direct)
  assert not os.path.exists(rt.dataset_dir('ds', str(tmp_path / 'over')))
  with pytest.raises(CorruptSampleError, match=r"b/00000.tar: sample '000000': bad_image"):
    _build(src, tmp_path / 'fail', runner='beam', beam_options=direct)
  assert not os.path.exists(rt.dataset_dir('ds', str(tmp_path / 'fail')))


# ----------------------------------------------------------------------------------------------
# Resume and determinism.


def test_resume_after_crash_gives_the_same_dataset(tmp_path, monkeypatch):
  rng = np.random.default_rng(6)
  samples = [test_wds.make_sample(rng, i) for i in range(12)]
  src = _write(tmp_path / 'src', samples, per_shard=3)  # 4 shards
  reference = _build(src, tmp_path / 'ref', keep_staging=True)
  per_shard = ('examples', 'json', 'skipped.jsonl')
  assert sorted(os.listdir(tmp_path / 'ref' / 'ds.staging')) == [
      f'{i:08d}.{ext}' for i in range(4) for ext in per_shard] + [rt.SKIPPED_FILE]

  # Crash while staging shard 2: shards 0 and 1 are done, shard 2 leaves no partial file.
  make_example = sample_checks.make_example

  def crashing(sample, record_key, meta):
    if record_key.startswith('00002.tar'):
      raise RuntimeError('simulated crash')
    return make_example(sample, record_key, meta)

  monkeypatch.setattr(sample_checks, 'make_example', crashing)
  with pytest.raises(RuntimeError, match='simulated crash'):
    _build(src, tmp_path / 'data')
  staging = tmp_path / 'data' / 'ds.staging'
  assert sorted(os.listdir(staging)) == [f'{i:08d}.{ext}' for i in range(2)
                                         for ext in per_shard]
  monkeypatch.undo()

  # Crash while writing the TFDS files: every shard is staged.
  read_staged = shard_staging.read_staged

  def crash_in_tfds(path):
    yield from read_staged(path)
    raise RuntimeError('simulated crash in tfds')

  monkeypatch.setattr(shard_staging, 'read_staged', crash_in_tfds)
  with pytest.raises(RuntimeError, match='in tfds'):
    _build(src, tmp_path / 'data')
  monkeypatch.undo()
  assert len(os.listdir(staging)) == 13  # 4 shards x 3 files, and the list.

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
  assert failed.returncode == 1 and 'tar_truncated' in failed.stderr
  assert '--policy=skip' in failed.stderr
  # The broken shard held 3 samples (its manifest says): all 3 count against the budget.
  over = run('--policy=skip', '--max_corrupt=1')
  assert over.returncode == 1 and '3 skipped of 6 seen exceeds the budget' in over.stderr
  result = run('--policy=skip', '--max_corrupt=3')
  assert result.returncode == 0, result.stderr
  assert 'Wrote 3 reinforced examples' in result.stdout and 'tar_truncated: 3' in result.stdout
  assert f'{tmp_path / "data" / "cli" / rt.VERSION / rt.SKIPPED_FILE}' in result.stdout
  _, meta = rt.open_reinforced('cli', str(tmp_path / 'data'))
  assert meta.teachers == ('ViT-L-14:openai', 'ViT-L-14:datacomp_xl_s13b_b90k') and meta.k == 2
  assert meta.augmentation == AUGMENTATION

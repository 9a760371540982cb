"""Tests for making reinforced datasets (mobileclip_jax.reinforce, launch/reinforce.py).

Two tiny CLIP teachers (the open_clip ViT-B-16 layout at 32 and 24 px, 16- and 24-wide
embeddings) reinforce demo-world tars of 48 px images. Every stored number is recomputed by
hand: the augmentation replayed with `augment.replay`, resized with PIL, normalized, run
through each teacher with `model.apply` and L2-normalized; the teacher ensemble itself is
checked against open_clip's own model on the same pixels and tokens.
"""
import dataclasses
import functools
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
from PIL import Image
import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax.data import augment
from mobileclip_jax import demo as demo_world
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError, ErrorPolicy
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.reinforce import captioners
from mobileclip_jax.reinforce import settings as settings_lib
from mobileclip_jax.reinforce import generate
from mobileclip_jax.reinforce import inputs
from mobileclip_jax.reinforce import teachers as teachers_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=16, image=dict(width=32, depth=1, heads=2, patch_size=8),
            text=dict(layers=1, width=32, heads=2), image_size=32)
TEACHERS = {'teacher_a': dict(TINY, seed=0),
            'teacher_b': dict(TINY, embed_dim=24, image_size=24, seed=1)}
AUG = augment.AugmentConfig(image_size=32)
# Low captioner temperature: duplicates are common, so regeneration has work to do.
GEN = settings_lib.GenerationConfig(k=2, num_syn=3, augmentation=AUG, emb_dtype='float32',
                                  chunk_size=2, max_regenerate=3)
DEMO_TEMPERATURE = 0.3
NUM_SAMPLES, PER_SHARD = 7, 3


def _save_teacher(directory, seed, **overrides):
  """A model checkpoint of random weights: N(0, 0.1), LayerNorm scales N(1, 0.1)."""
  model = clip_lib.create_model('ViT-B-16', **overrides)
  shapes = clip_lib.abstract_variables(model.config)
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == 'scale') + 0.1 * rng.normal(size=s.shape)).astype(
          s.dtype), shapes)
  checkpoint.save_variables(str(directory), variables, model.config)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Demo-world tars (3 shards), two teacher checkpoints and their ensemble on 8 devices."""
  root = tmp_path_factory.mktemp('reinforce')
  shards = demo_world.write_split(str(root / 'src'), 'train', NUM_SAMPLES, 48, PER_SHARD, seed=0)
  for name, spec in TEACHERS.items():
    spec = dict(spec)
    _save_teacher(root / name, spec.pop('seed'), **spec)
  teachers = [teachers_lib.load_teacher(str(root / name)) for name in TEACHERS]
  ensemble = teachers_lib.TeacherEnsemble(teachers, images_per_device=2, texts_per_device=4)
  src = os.path.join(str(root / 'src'), 'train', '{00000000..00000002}.tar')
  assert len(shards) == 3 and len(jax.local_devices()) == 8
  return dict(root=root, src=src, teachers=teachers, ensemble=ensemble)


def _run(world, out, config=GEN, captioner=None, **kwargs):
  kwargs.setdefault('progress', False)
  captioner = captioner or captioners.make_captioner(f'demo:temperature={DEMO_TEMPERATURE}')
  return generate.reinforce(inputs.resolve(world['src']), str(out), world['ensemble'],
                            [captioner], config, workers=2, **kwargs)


@pytest.fixture(scope='module')
def generated(world):
  out = world['root'] / 'out'
  report = _run(world, out)
  return dict(out=out, report=report)


def _read_shards(out, names=('00000000.tar', '00000001.tar', '00000002.tar')):
  samples = []
  for name in names:
    for raw in wds.iter_samples(os.path.join(str(out), name)):
      samples.append((raw, sample_codec.decode_sample(raw, reinforced=True)))
  return samples


def _by_hand(teacher_dirs, crops, texts):
  """Each teacher on its own: resize (PIL bicubic), normalize, apply, L2-normalize, concat."""
  image_rows, text_rows = [], []
  for directory in teacher_dirs:
    variables, config = checkpoint.load_variables(str(directory))
    model = clip_lib.CLIP(config)
    size = config.image_size
    pixels = np.stack([crop if size == crop.shape[0] else np.asarray(
        Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)) for crop in crops])
    image = np.asarray(jax.jit(functools.partial(model.apply, method=model.encode_image))(
        variables, preprocess.normalize(pixels, config.mean, config.std)))
    tokens = tokenizer_lib.get_tokenizer(config.tokenizer)(texts, config.text.context_length)
    text = np.asarray(jax.jit(functools.partial(model.apply, method=model.encode_text))(
        variables, tokens))
    image_rows.append(image / np.linalg.norm(image, axis=1, keepdims=True))
    text_rows.append(text / np.linalg.norm(text, axis=1, keepdims=True))
  return np.concatenate(image_rows, axis=1), np.concatenate(text_rows, axis=1)


# ----------------------------------------------------------------------------------------------
# Stored embeddings equal the teachers run by hand.


def test_stored_embeddings_equal_teachers_run_by_hand(world, generated):
  samples = _read_shards(generated['out'])
  assert [s.uid for _, s in samples] == [demo_world.sample_uid('train', i, 0)
                                         for i in range(NUM_SAMPLES)]
  source = {raw.key: raw for shard in inputs.resolve(world['src']) for raw in shard.read(None)}
  crops, texts = [], []
  for raw, sample in samples:
    # The source members are kept as they were: image bytes, caption, json with the labels.
    for ext in ('jpg', 'txt', 'json'):
      assert raw.members[ext] == source[raw.key].members[ext]
    assert list(json.loads(raw.members['syn.json'])) == ['syn_text']
    assert len(sample.paug) == GEN.k and sample.image_emb.shape == (GEN.k, 16 + 24)
    assert sample.text_emb.shape == (1 + GEN.num_syn, 40) and sample.image_emb.dtype == np.float32
    image = Image.open(io.BytesIO(sample.image))
    crops += [augment.replay(image, params, AUG.image_size, AUG) for params in sample.paug]
    texts += sample.captions + sample.syn_captions
  image_emb, text_emb = _by_hand([world['root'] / name for name in TEACHERS], crops, texts)
  stored_image = np.concatenate([s.image_emb for _, s in samples])
  stored_text = np.concatenate([s.text_emb for _, s in samples])
  np.testing.assert_allclose(stored_image, image_emb, atol=2e-5)
  np.testing.assert_allclose(stored_text, text_emb, atol=2e-5)
  for emb in (stored_image, stored_text):  # Each teacher's slice is unit-norm.
    np.testing.assert_allclose(np.linalg.norm(emb[:, :16], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb[:, 16:], axis=1), 1, atol=1e-5)


def test_augmentations_are_sampled_as_augment_samples_them(generated):
  """paug entries come from augment.sample_params with the generation config: in the image, of
  the generation crop's op table, and different from each other."""
  table = AUG.op_magnitudes()
  for _, sample in _read_shards(generated['out']):
    width, height = Image.open(io.BytesIO(sample.image)).size
    boxes = set()
    for params in sample.paug:
      box, ops = augment.validate_params(params, height, width)
      boxes.add(box)
      assert len(ops) == AUG.num_ops
      for index, magnitude in ops:
        assert abs(magnitude) == table[index][0]
    assert len(boxes) == GEN.k


def test_ensemble_equals_open_clip(tmp_path):
  """The ensemble's image and text embeddings equal open_clip's model with the same weights,
  loaded from a torch.save'd state_dict (read without torch)."""
  torch = pytest.importorskip('torch')
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  torch.manual_seed(0)
  reference = open_clip.CLIP(
      embed_dim=16, vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16,
                                                       patch_size=8, image_size=32),
      text_cfg=open_clip.CLIPTextCfg(layers=1, width=32, heads=2)).eval()
  path = str(tmp_path / 'tiny_open_clip.pt')
  torch.save(reference.state_dict(), path)
  teacher = teachers_lib.load_open_clip_teacher(path, 'ViT-B-16', **TINY)
  ensemble = teachers_lib.TeacherEnsemble([teacher], images_per_device=2, texts_per_device=4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  texts = ['a red circle on a navy background', 'two small squares', 'untitled']
  pixels = preprocess.normalize(images, clip_lib.OPENAI_MEAN, clip_lib.OPENAI_STD)
  with torch.no_grad():
    want_image = reference.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                        normalize=True).numpy()
    want_text = reference.encode_text(open_clip.get_tokenizer('ViT-B-16')(texts),
                                      normalize=True).numpy()
  np.testing.assert_allclose(ensemble.embed_images({32: images}), want_image, atol=2e-5)
  np.testing.assert_allclose(ensemble.embed_texts(texts), want_text, atol=2e-5)


def test_sharded_embedding_equals_single_device(world):
  sharded = world['ensemble']
  # The second teacher alone, on one device, with the same global batch.
  single = teachers_lib.TeacherEnsemble(world['teachers'][1:], devices=jax.local_devices()[:1],
                                        images_per_device=16, texts_per_device=32)
  assert (sharded.image_batch, sharded.text_batch) == (single.image_batch, single.text_batch)
  assert sharded.mesh.devices.size == 8 and sharded.dims == (16, 24)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)  # Not a batch multiple.
  views = {32: images, 24: images[:, 4:28, 4:28]}
  texts = [f'caption number {i}' + ' word' * (i % 9) for i in range(37)]
  np.testing.assert_allclose(sharded.embed_images(views)[:, 16:], single.embed_images(views),
                             atol=1e-5)
  np.testing.assert_allclose(sharded.embed_texts(texts)[:, 16:], single.embed_texts(texts),
                             atol=1e-5)
  # A batch alone and inside a bigger padded batch give the same rows.
  np.testing.assert_allclose(sharded.embed_texts(texts[:3]), sharded.embed_texts(texts)[:3],
                             atol=1e-5)
  assert sharded.embed_texts([]).shape == (0, 40)


# ----------------------------------------------------------------------------------------------
# The dataset: TFDS build, config, resume, processes.


def test_output_builds_into_tfds_with_its_metadata(world, generated, tmp_path):
  out = str(generated['out'])
  report = generated['report']
  assert report.complete and report.counter.accepted == NUM_SAMPLES
  assert (report.shards, report.shards_generated, report.shards_reused) == (3, 3, 0)
  with open(os.path.join(out, generate.MANIFEST_FILE)) as f:
    assert [json.loads(line) for line in f] == [
        {'shard': '00000000', 'num_samples': 3}, {'shard': '00000001', 'num_samples': 3},
        {'shard': '00000002', 'num_samples': 1}]
  # The config reads back as ml-mobileclip's generation config plus this project's fields
  # (unequal widths 16 + 24 cannot be inferred from the embeddings), and launch/build_dataset.py's
  # way of using it builds the dataset ...
  read = reinforced_tfds.read_reinforce_config(os.path.join(out, settings_lib.CONFIG_FILE))
  assert read['teachers'] == ['ViT-B-16:teacher_a', 'ViT-B-16:teacher_b']
  assert (read['k'], read['teacher_dims']) == (GEN.k, [16, 24])
  assert augment.from_generation_config(read['augmentation']) == AUG
  dataset_build.build_dataset(out, 'via_config', str(tmp_path / 'tfds'),
                                teacher_dims=read['teacher_dims'], teachers=read['teachers'],
                                k=read['k'], augmentation=read['augmentation'], progress=False)
  # ... and so does build_tfds, with every setting from the config.
  build = generate.build_tfds(out, 'demo_dr', str(tmp_path / 'tfds'), progress=False)
  assert build.num_examples == NUM_SAMPLES
  for name in ('via_config', 'demo_dr'):
    _, meta = reinforced_tfds.open_reinforced(name, str(tmp_path / 'tfds'))
    assert meta.teachers == ('ViT-B-16:teacher_a', 'ViT-B-16:teacher_b')
    assert (meta.teacher_dims, meta.k) == ((16, 24), GEN.k)
    assert (meta.syn_keys, meta.syn_counts, meta.num_captions) == (('syn_text',), (3,), 1)
  source, meta = reinforced_tfds.open_reinforced('demo_dr', str(tmp_path / 'tfds'))
  assert meta.emb_dtype == 'float32' and meta.syn_key_regex == '^syn_text$'
  records = {source[i]['uid'].decode(): source[i] for i in range(len(source))}
  for raw, sample in _read_shards(out):
    record = records[sample.uid]
    assert record['image'] == sample.image
    assert [c.decode() for c in record['syn_captions']] == sample.syn_captions
    assert json.loads(record['paug']) == sample.paug
    np.testing.assert_array_equal(record['image_emb'], sample.image_emb)
    np.testing.assert_array_equal(record['text_emb'], sample.text_emb)


def test_resume_skips_finished_shards_and_redoes_a_truncated_one(world, generated, tmp_path):
  out = tmp_path / 'out'
  shutil.copytree(generated['out'], out)
  report = _run(world, out)
  assert (report.shards_generated, report.shards_reused) == (0, 3)
  assert report.counter.accepted == NUM_SAMPLES  # Reused shards still count in the report.
  path = out / '00000001.tar'
  original = path.read_bytes()
  path.write_bytes(original[:len(original) // 2])
  report = _run(world, out)
  assert (report.shards_generated, report.shards_reused, report.samples_generated) == (1, 2, 3)
  # Draws depend on the seed and the shard's name only: the redone shard is the same, byte
  # for byte, and so are the others.
  assert path.read_bytes() == original
  for name in ('00000000.tar', '00000002.tar'):
    assert (out / name).read_bytes() == (generated['out'] / name).read_bytes()
  # Other settings in the same folder are refused, naming what changed.
  with pytest.raises(ValueError, match=r'num_samples: 2 -> 3'):
    _run(world, out, dataclasses.replace(GEN, k=3))


def test_two_processes_take_alternate_shards(world, generated, tmp_path):
  out = tmp_path / 'out'
  first = _run(world, out, process_index=0, process_count=2)
  assert (first.shards, first.samples_generated, first.complete) == (2, 4, False)
  assert sorted(p for p in os.listdir(out) if p.endswith('.tar')) == ['00000000.tar',
                                                                       '00000002.tar']
  assert not os.path.exists(out / generate.MANIFEST_FILE)
  second = _run(world, out, process_index=1, process_count=2)
  assert (second.shards, second.samples_generated, second.complete) == (1, 3, True)
  for name in ('00000000.tar', '00000001.tar', '00000002.tar'):
    assert (out / name).read_bytes() == (generated['out'] / name).read_bytes()
  with open(out / generate.SUMMARY_FILE) as f:
    summary = json.load(f)
  assert summary['complete'] and summary['samples'] == NUM_SAMPLES


def test_bfloat16_embeddings_are_stored_as_pth_gz(world, generated, tmp_path):
  pytest.importorskip('torch')
  last = inputs.resolve(world['src'])[2:]
  generate.reinforce(last, str(tmp_path), world['ensemble'],
                     [captioners.make_captioner(f'demo:temperature={DEMO_TEMPERATURE}')],
                     dataclasses.replace(GEN, emb_dtype='bfloat16'), workers=1, progress=False)
  (raw, sample), = _read_shards(tmp_path, ['00000002.tar'])
  (_, want), = _read_shards(generated['out'], ['00000002.tar'])
  assert 'pth.gz' in raw.members and 'npz' not in raw.members
  assert sample.image_emb.dtype == ml_dtypes.bfloat16
  for field in ('image_emb', 'text_emb'):
    np.testing.assert_array_equal(getattr(sample, field),
                                  getattr(want, field).astype(ml_dtypes.bfloat16))


def test_augmentation_config_reads_back_in_the_training_pipeline():
  """The recorded augmentation (Apple's form) is what the training pipeline replays with."""
  custom = augment.AugmentConfig(image_size=256, scale=(0.3, 0.9), magnitude=5, num_ops=3,
                                 p=0.5, op_interpolation='bilinear')
  for config in (AUG, custom):
    assert augment.from_generation_config(augment.to_generation_config(config)) == config
  # torchvision's default resampling is left out: Apple's loader would pass it as a string.
  assert 'interpolation' not in augment.to_generation_config(AUG)['rand_augment']


# ----------------------------------------------------------------------------------------------
# Captions.


def test_find_offenders_uses_normalized_text_and_teacher_averaged_cosine():
  def rows(*per_teacher):  # Each argument: one teacher's unit vectors [S, 2].
    return np.concatenate([np.asarray(t, np.float32) for t in per_teacher], axis=1)

  c = np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))  # cos 10 deg = 0.985
  texts = ['A red circle.', 'a  red circle', 'a blue square', 'a blue square, again', '...']
  first = [[1, 0], [1, 0], [0, 1], c, [1, 0]]
  # Caption 3 vs 0: cosine 0.985 with both teachers -> 0.985 > 0.95: near duplicate.
  emb = rows(first, first)
  assert captioners.find_offenders(texts, emb, 2, 0.95) == [1, 3, 4]  # 4 is empty when normalized.
  # The same for the first teacher, orthogonal for the second: averaged 0.49, no duplicate.
  emb = rows(first, [[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]])
  assert captioners.find_offenders(texts, emb, 2, 0.95) == [1, 4]
  assert captioners.normalize_caption(' Über-Cool,  “shape”! ') == 'übercool shape'


def test_regeneration_removes_duplicates_and_reports_the_rates(world, generated, tmp_path):
  report = generated['report'].captions['syn_text']
  before, after = report.before.rates(), report.after.rates()
  assert report.before.captions == report.after.captions == NUM_SAMPLES * GEN.num_syn
  assert report.before.exact_duplicates > 0 and report.regenerated > 0
  assert after['exact_duplicate_rate'] < before['exact_duplicate_rate']
  assert after['near_duplicate_rate'] < before['near_duplicate_rate']
  assert after['mean_pairwise_cosine'] < before['mean_pairwise_cosine']
  assert after['distinct_2'] > before['distinct_2']
  # Stored captions keep no exact duplicate unless the report says some were left.
  stored = [[captioners.normalize_caption(c) for c in s.syn_captions]
            for _, s in _read_shards(generated['out'])]
  exact_left = sum(len(c) - len(set(c)) for c in stored)
  assert exact_left == report.after.exact_duplicates <= report.unresolved
  with open(os.path.join(str(generated['out']), generate.SUMMARY_FILE)) as f:
    summary = json.load(f)['captions']['syn_text']
  assert summary['before']['rates'] == pytest.approx(before)
  assert summary['after']['rates'] == pytest.approx(after)
  # Without regeneration the captions are only measured: the same draws, nothing changes.
  measured = _run(world, tmp_path / 'measured', dataclasses.replace(GEN, max_regenerate=0))
  measured = measured.captions['syn_text']
  assert measured.regenerated == 0
  assert measured.before.rates() == measured.after.rates() == pytest.approx(
      before)


def test_existing_captioner_keeps_the_source_captions(world, generated, tmp_path):
  """Reinforcing a reinforced dataset with its own captions: captions and text embeddings
  stay, nothing is regenerated, duplicates are only reported."""
  shards = [inputs.TarShard(i, name, os.path.join(str(generated['out']), name))
            for i, name in enumerate(['00000000.tar', '00000001.tar', '00000002.tar'])]
  report = generate.reinforce(shards, str(tmp_path / 'again'), world['ensemble'],
                              [captioners.make_captioner('existing')], GEN, workers=2,
                              progress=False)
  old, new = _read_shards(generated['out']), _read_shards(tmp_path / 'again')
  for (_, a), (_, b) in zip(old, new):
    assert a.syn_captions == b.syn_captions and a.captions == b.captions
    np.testing.assert_allclose(a.text_emb, b.text_emb, atol=1e-6)
  offenders = sum(len(captioners.find_offenders(s.syn_captions, s.text_emb[1:], 2,
                                              GEN.dedup_threshold)) for _, s in old)
  quality = report.captions['syn_text']
  assert quality.regenerated == 0 and quality.unresolved == offenders > 0
  assert quality.before.rates() == quality.after.rates()


def test_corrupt_and_uncaptionable_samples_follow_the_policy(world, tmp_path):
  existing = captioners.make_captioner('existing')
  with pytest.raises(CorruptSampleError, match=r"no syn.json\['syn_text'\]"):
    _run(world, tmp_path / 'fail', captioner=existing)
  report = _run(world, tmp_path / 'skip', captioner=existing, policy=ErrorPolicy('skip'))
  assert report.counter.skipped == {'missing_member': NUM_SAMPLES} and report.complete
  assert not [p for p in os.listdir(tmp_path / 'skip') if p.endswith('.tar')]
  too_small = settings_lib.GenerationConfig(k=1, num_syn=1, augmentation=augment.AugmentConfig(
      image_size=28))
  with pytest.raises(ValueError, match=r'teacher_a \(32 px\).*at least 32'):
    _run(world, tmp_path / 'small', too_small)


def test_command_line_on_the_demo_world_builds_tfds(world, tmp_path):
  teachers = ','.join(str(world['root'] / name) for name in TEACHERS)
  cmd = [sys.executable, os.path.join(REPO, 'launch', 'reinforce.py'),
         '--src=demo:train:4:samples_per_shard=2,image_size=48', f'--out={tmp_path / "out"}',
         f'--teachers={teachers}', '--k=2', '--num_syn=2', '--captioners=demo', '--gen_size=32',
         '--images_per_device=2', '--texts_per_device=4', '--workers=2', '--build_tfds',
         '--name=demo_cli', f'--data_dir={tmp_path / "tfds"}']
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'images/s' in result.stdout and 'exact_duplicate_rate' in result.stdout
  source, meta = reinforced_tfds.open_reinforced('demo_cli', str(tmp_path / 'tfds'))
  assert len(source) == 4 and meta.teacher_dims == (16, 24) and meta.emb_dtype == 'float16'
  assert sorted(source[i]['uid'].decode() for i in range(4)) == [
      demo_world.sample_uid('train', i, 0) for i in range(4)]

"""Tests for the demo world: determinism, layout, splits, caption noise, captioner, shards, and
that the pixels carry the labels (a linear probe on simple features beats chance by far)."""
import hashlib
import io
import json
import pathlib
import re
import tarfile

import numpy as np
from PIL import Image
import pytest

from mobileclip_jax.data import sample_codec
from mobileclip_jax.demo import captions as captions_lib
from mobileclip_jax.demo import render as render_lib
from mobileclip_jax.demo import samples as samples_lib
from mobileclip_jax.demo import tasks as tasks_lib
from mobileclip_jax.demo import world as world_lib
from mobileclip_jax.data import wds

_WORD = re.compile(r"[a-z][a-z\-]*")


def _words(text):
  return set(_WORD.findall(text.lower()))


def _png(image):
  return render_lib.encode_image(image, 'png')


def _scene_labels(config, split, n, seed=0):
  return [world_lib.sample_scene(config, split, i, seed).labels() for i in range(n)]


@pytest.mark.parametrize('split', world_lib.SPLITS)
def test_same_seed_same_bytes_other_seed_or_split_differs(split):
  config = world_lib.DemoWorldConfig()

  def samples(split, seed):
    return [samples_lib.make_sample(split, i, 48, seed, config) for i in range(8)]

  first, second = samples(split, 3), samples(split, 3)
  for a, b in zip(first, second):
    assert _png(a['image']) == _png(b['image'])
    assert (a['caption'], a['labels'], a['uid']) == (b['caption'], b['labels'], b['uid'])
  images = [_png(s['image']) for s in first]
  assert len(set(images)) == len(images)
  for other in (samples(split, 4), samples('val' if split != 'val' else 'train', 3)):
    assert all(x != _png(y['image']) for x, y in zip(images, other))


def test_layout_is_the_same_at_every_resolution():
  config = world_lib.DemoWorldConfig()
  same, different = [], []
  for i in range(24):
    scene = world_lib.sample_scene(config, 'train', i, seed=0)
    small = np.asarray(render_lib.render(scene, 32), np.float32)
    for size in (64, 224):
      image = render_lib.render(scene, size)
      assert image.size == (size, size) and image.mode == 'RGB'
      same.append(np.abs(np.asarray(image.resize((32, 32), Image.BOX), np.float32) - small).mean())
    other = render_lib.render(world_lib.sample_scene(config, 'train', i + 1000, seed=0), 32)
    different.append(np.abs(np.asarray(other, np.float32) - small).mean())
  # Box-downsampled high-resolution renders match the 32 px render to about one grey level.
  assert max(same) < 3.0, max(same)
  assert min(different) > 10.0, min(different)


def test_heldout_pairs_only_in_heldout_split():
  config = world_lib.DemoWorldConfig()
  held = set(config.heldout_pairs)
  seen_main = set()
  for split, n in (('train', 3000), ('val', 1000)):
    for labels in _scene_labels(config, split, n):
      pairs = {(o['shape'], o['color']) for o in labels['objects']}
      assert not pairs & held, (split, labels)
      seen_main.add((labels['shape'], labels['color']))
  assert seen_main == set(config.train_pairs)  # every allowed pair does occur
  heldout_main = set()
  for labels in _scene_labels(config, 'heldout', 500):
    heldout_main.add((labels['shape'], labels['color']))
    assert not {(o['shape'], o['color']) for o in labels['objects'][1:]} & held
  assert heldout_main == held


def test_scene_labels_are_consistent():
  config = world_lib.DemoWorldConfig()
  counts = np.zeros(len(config.count_probs) + 1)
  for labels in _scene_labels(config, 'train', 1500):
    main = labels['objects'][0]
    assert {k: labels[k] for k in main} == main
    assert labels['count'] == len(labels['objects'])
    assert len({o['position'] for o in labels['objects']}) == labels['count']
    counts[labels['count']] += 1
  np.testing.assert_allclose(counts[1:] / counts.sum(), config.count_probs, atol=0.04)


def test_config_round_trips_and_rejects_bad_values():
  config = world_lib.DemoWorldConfig(colors=('red', 'blue', 'green'),
                                     heldout_pairs=(('star', 'red'),), caption_noise=0.5)
  d = config.to_dict()
  assert json.loads(json.dumps(d)) == d
  assert world_lib.DemoWorldConfig.from_dict(d) == config
  with pytest.raises(ValueError, match='Unknown DemoWorldConfig keys'):
    world_lib.DemoWorldConfig.from_dict({**d, 'colour': 'red'})
  with pytest.raises(ValueError, match='colors'):
    world_lib.DemoWorldConfig(colors=('red', 'mauve'))
  with pytest.raises(ValueError, match='every colour'):
    world_lib.DemoWorldConfig(colors=('red',), heldout_pairs=(('star', 'red'),))
  with pytest.raises(ValueError, match='count_probs'):
    world_lib.DemoWorldConfig(count_probs=(0.5, 0.2))
  with pytest.raises(ValueError, match='split'):
    samples_lib.make_sample('test', 0, 32, seed=0)


def _parse_gt(caption, labels, config):
  words = _words(caption)
  size_words = {w for ws in captions_lib.SIZE_WORDS.values() for w in ws}
  return {
      'informative': bool(words & set(config.shapes)),
      'color': bool(words & set(config.colors)),
      'size': bool(words & size_words),
      'position': any(p in caption for ps in captions_lib.POSITION_PHRASES.values() for p in ps),
      'background': 'background' in words,
      'filler': any(f in caption for f in captions_lib.FILLER_PHRASES),
      'wrong': bool((words & set(config.shapes)) - {labels['shape']}
                    or (words & set(config.colors)) - {labels['color']}),
  }


def test_gt_caption_noise_matches_configured_rates():
  # One object per scene, so every attribute word in a caption is about the main object.
  config = world_lib.DemoWorldConfig(count_probs=(1.0,), caption_noise=1.5, omit_rate=0.4,
                              filler_rate=0.2, wrong_rate=0.1, uninformative_rate=0.1)
  rates = config.caption_rates()
  assert rates == pytest.approx({'omit': 0.6, 'filler': 0.3, 'wrong': 0.15, 'uninformative': 0.15})
  rng = np.random.default_rng(0)
  parsed = [_parse_gt(captions_lib.gt_caption(labels, config, rng), labels, config)
            for labels in _scene_labels(config, 'train', 4000)]
  informative = [p for p in parsed if p['informative']]
  assert 1 - len(informative) / len(parsed) == pytest.approx(rates['uninformative'], abs=0.025)
  for part in ('color', 'size', 'position', 'background'):
    mentioned = np.mean([p[part] for p in informative])
    assert mentioned == pytest.approx(1 - rates['omit'], abs=0.035), part
  assert np.mean([p['wrong'] for p in informative]) == pytest.approx(rates['wrong'], abs=0.025)
  assert np.mean([p['filler'] for p in informative]) == pytest.approx(rates['filler'], abs=0.03)


def test_gt_caption_without_noise_is_complete_and_right():
  config = world_lib.DemoWorldConfig(caption_noise=0.0)
  rng = np.random.default_rng(1)
  for labels in _scene_labels(config, 'train', 300):
    caption = captions_lib.gt_caption(labels, config, rng)
    parsed = _parse_gt(caption, labels, config)
    assert parsed['informative'] and not parsed['filler'], caption
    assert all(parsed[p] for p in ('color', 'size', 'position', 'background')), caption
    assert _words(caption) & set(config.colors) == {o['color'] for o in labels['objects']}
    assert _words(caption) & set(config.shapes) == {o['shape'] for o in labels['objects']}


def test_gt_caption_wrong_values_are_absent_from_the_scene():
  config = world_lib.DemoWorldConfig(wrong_rate=0.0)
  rng = np.random.default_rng(2)
  for labels in _scene_labels(config, 'train', 500):
    words = _words(captions_lib.gt_caption(labels, config, rng))
    assert words & set(config.colors) <= {o['color'] for o in labels['objects']}
    assert words & set(config.shapes) <= {o['shape'] for o in labels['objects']}


def test_captioner_is_accurate_descriptive_and_diverse():
  config = world_lib.DemoWorldConfig()
  labels_batch = _scene_labels(config, 'train', 300)
  captions = captions_lib.DemoCaptioner(temperature=0.7)(labels_batch, 5, np.random.default_rng(0))
  assert len(captions) == len(labels_batch) and all(len(c) == 5 for c in captions)
  for labels, texts in zip(labels_batch, captions):
    for text in texts:
      words = _words(text)
      assert words & set(config.colors) == {o['color'] for o in labels['objects']}, text
      assert words & set(config.shapes) == {o['shape'] for o in labels['objects']}, text
      assert words & set(captions_lib.SIZE_WORDS[labels['size']]), text
      assert (words & set(captions_lib.TEXTURE_WORDS[labels['texture']])
              or 'background' not in words), text
      count = re.search(r'(\w+) shapes?\b', text)
      assert count is None or count.group(1) == captions_lib.COUNT_WORDS[labels['count']], text
  unique = np.array([len(set(texts)) for texts in captions])
  assert 3.5 < unique.mean() < 5.0  # varied, with duplicates for de-duplication to remove
  canonical = captions_lib.DemoCaptioner(temperature=0.0)(labels_batch[:20], 4,
                                                         np.random.default_rng(0))
  assert all(len(set(texts)) == 1 for texts in canonical)
  again = captions_lib.DemoCaptioner(temperature=0.7)(labels_batch, 5, np.random.default_rng(0))
  assert again == captions


def test_zero_shot_tasks_cover_all_labels():
  config = world_lib.DemoWorldConfig()
  tasks = tasks_lib.zero_shot_tasks(config)
  assert tasks['shape'].values == tuple((s,) for s in config.shapes)
  assert tasks['color'].values == tuple((c,) for c in config.colors)
  assert len(tasks['object'].values) == len(config.shapes) * len(config.colors)
  labels_batch = _scene_labels(config, 'train', 600) + _scene_labels(config, 'heldout', 100)
  canonical = captions_lib.DemoCaptioner(temperature=0.0)(labels_batch, 1, np.random.default_rng(0))
  for task in tasks.values():
    assert len(task.values) == len(task.classnames) == len(set(task.classnames))
    assert task.templates and all(t.count('{}') == 1 for t in task.templates)
    targets = {task.target(labels) for labels in labels_batch}
    assert targets == set(range(len(task.values))) or task.name == 'object', task.name
    if task.name in ('shape', 'color', 'size', 'position', 'texture', 'background_color'):
      # Class names are the caption vocabulary, so prompts speak the language of the captions.
      for labels, (text,) in zip(labels_batch, canonical):
        assert task.classnames[task.target(labels)] in text, (task.name, text)
  with pytest.raises(ValueError, match='not a class'):
    tasks['shape'].target({'shape': 'blob'})


def test_write_split_makes_readable_datacompdr_style_tars(tmp_path):
  config = world_lib.DemoWorldConfig()
  paths = samples_lib.write_split(str(tmp_path), 'val', num_samples=25, image_size=32,
                         samples_per_shard=10, seed=5, config=config)
  assert [p.rsplit('/', 2)[1:] for p in paths] == [['val', f'0000000{i}.tar'] for i in range(3)]
  expected = list(samples_lib.iter_samples('val', 25, 32, seed=5, config=config))
  names = []
  for path in paths:
    with tarfile.open(path) as tar:
      names += tar.getnames()
      members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in members:
      assert re.fullmatch(r'demo-val-s5-\d{8}\.(jpg|txt|json)', name), name
    for key in {n.split('.')[0] for n in members}:
      sample = next(s for s in expected if s['uid'] == key)
      meta = json.loads(members[f'{key}.json'])
      assert meta == {'uid': key, 'sha256': hashlib.sha256(members[f'{key}.jpg']).hexdigest(),
                      **sample['labels']}
      assert members[f'{key}.txt'].decode('utf-8') == sample['caption']
      with Image.open(io.BytesIO(members[f'{key}.jpg'])) as image:
        assert image.format == 'JPEG' and image.size == (32, 32)
        # JPEG is lossy: the decoded image is close to the rendered one.
        assert np.abs(np.asarray(image, np.float32) - np.asarray(sample['image'])).mean() < 6
  assert names == [f"{s['uid']}.{ext}" for s in expected for ext in ('jpg', 'txt', 'json')]
  # The project's reader decodes them.
  decoded = [sample_codec.decode_sample(raw, reinforced=False)
             for path in paths for raw in wds.iter_samples(path)]
  assert [(d.uid, d.captions) for d in decoded] == [(s['uid'], [s['caption']]) for s in expected]
  # Same arguments, same bytes.
  again = samples_lib.write_split(str(tmp_path / 'again'), 'val', 25, 32, 10, seed=5, config=config)
  assert [pathlib.Path(p).read_bytes() for p in again] == [
      pathlib.Path(p).read_bytes() for p in paths]


def _colour_histogram(images, levels=6):
  q = np.minimum((images * levels).astype(np.int64), levels - 1)
  bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
  h = np.stack([np.bincount(b.ravel(), minlength=levels ** 3) for b in bins]).astype(np.float32)
  return np.sqrt(h / h.sum(1, keepdims=True))


def _fourier_magnitude(images):
  """Translation-invariant shape feature: log |FFT| of the grey image (low frequencies)."""
  grey = images.mean(-1)
  grey = grey - grey.mean((1, 2), keepdims=True)
  return np.log1p(np.abs(np.fft.fft2(grey))[:, :16, :16]).reshape(len(images), -1)


def _pooled_pixels(images, cells=8):
  n, s = images.shape[:2]
  return images.reshape(n, cells, s // cells, cells, s // cells, 3).mean((2, 4)).reshape(n, -1)


def _ridge_accuracy(train_x, train_y, test_x, test_y, num_classes, l2=1e-2):
  """Least-squares linear classifier on standardized features (one-hot targets)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
  b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
  w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]),
                      a.T @ np.eye(num_classes)[train_y])
  return float(np.mean((b @ w).argmax(1) == test_y))


def test_pixels_carry_the_labels():
  config = world_lib.DemoWorldConfig()
  tasks = tasks_lib.zero_shot_tasks(config)

  def load(split, n):
    samples = list(samples_lib.iter_samples(split, n, 64, seed=0, config=config))
    images = np.stack([np.asarray(s['image'].reduce(2)) for s in samples]) / np.float32(255)
    return images, [s['labels'] for s in samples]

  train_images, train_labels = load('train', 2000)
  test_images, test_labels = load('val', 600)
  rng = np.random.default_rng(0)
  for task, feature, min_accuracy in (('color', _colour_histogram, 0.6),
                                      ('shape', _fourier_magnitude, 0.35),
                                      ('position', _pooled_pixels, 0.45),
                                      ('texture', _fourier_magnitude, 0.5)):
    train_y = np.array([tasks[task].target(l) for l in train_labels])
    test_y = np.array([tasks[task].target(l) for l in test_labels])
    k = len(tasks[task].values)
    train_x, test_x = feature(train_images), feature(test_images)
    chance = np.bincount(test_y, minlength=k).max() / len(test_y)
    accuracy = _ridge_accuracy(train_x, train_y, test_x, test_y, k)
    assert accuracy > min_accuracy > 2 * chance, (task, accuracy, chance)
    # Control: the same probe trained on shuffled labels learns nothing.
    shuffled = _ridge_accuracy(train_x, rng.permutation(train_y), test_x, test_y, k)
    assert shuffled < chance + 0.07, (task, shuffled, chance)

"""Tests for mobileclip_jax.evaluation.

The metric math is checked against brute-force numpy (explicit sorts, ties included) and against
clip_benchmark's torch formulas and open_clip's `build_zero_shot_classifier`. An "oracle" model
whose embeddings are the images' colours (and, for text, the colour words') must score 100% on
every source; padded rows would cost it accuracy, so 100% also shows they are masked. A random
tiny MobileCLIP scores near chance, and the 8-device sharded evaluation with ragged batches
equals the single-device one.
"""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import embedding
from mobileclip_jax import rules
from mobileclip_jax import convert
from mobileclip_jax import sharding
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import evaluator as evaluator_lib
from mobileclip_jax.evaluation import metrics
from mobileclip_jax.evaluation import base
from mobileclip_jax.evaluation import registry
from mobileclip_jax.evaluation import runner
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import templates
from mobileclip_jax.models import clip
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=32, image_size=32, image=dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
            text=dict(layers=1, width=32, heads=2))


# ----------------------------------------------------------------------------------------------
# Brute-force references.


def _order(scores_row):
  """Candidates by descending score, lower index first among equals (the documented rule)."""
  return sorted(range(len(scores_row)), key=lambda c: (-scores_row[c], c))


def brute_topk(scores, targets, k):
  return float(np.mean([t in _order(row)[:k] for row, t in zip(scores, targets)]))


def brute_retrieval(image, text, text_image, k):
  scores = text.astype(np.float64) @ image.astype(np.float64).T        # [T, N]
  t2i = np.mean([t in _order(row)[:k] for row, t in zip(scores, text_image)])
  i2t = np.mean([any(text_image[j] == i for j in _order(scores[:, i])[:k])
                 for i in range(len(image))])
  return float(i2t), float(t2i)


def _integer_embeddings(rng, rows, dims=6):
  # Small integers: every dot product is exact in float32, so ties are exact and shared.
  return rng.integers(-2, 3, (rows, dims)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Metric math.


def test_topk_accuracy_equals_brute_force_with_ties(monkeypatch):
  rng = np.random.default_rng(0)
  image, classifier = _integer_embeddings(rng, 300), _integer_embeddings(rng, 12)
  classifier[7] = classifier[2]  # Two identical classes: exact ties on every row.
  targets = rng.integers(0, 12, 300)
  scores = image.astype(np.float64) @ classifier.T.astype(np.float64)
  target_scores = scores[np.arange(300), targets][:, None]
  assert np.mean((scores == target_scores).sum(1) > 1) > 0.3  # Targets tied with another class.
  monkeypatch.setattr(metrics, '_CHUNK_ELEMENTS', 12 * 7)  # Several row chunks.
  got = metrics.topk_accuracy(image, classifier, targets, ks=(1, 2, 5, 12))
  assert got == {k: brute_topk(scores, targets, k) for k in (1, 2, 5, 12)}
  assert got[12] == 1.0 and got[1] < got[2] < got[5] < 1.0


def test_topk_accuracy_equals_clip_benchmark_without_ties():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  image = rng.normal(size=(200, 16)).astype(np.float32)
  classifier = rng.normal(size=(20, 16)).astype(np.float32)
  targets = rng.integers(0, 20, 200)
  # clip_benchmark metrics/zeroshot_classification.py `accuracy`.
  output, target = torch.from_numpy(image @ classifier.T), torch.from_numpy(targets)
  pred = output.topk(5, 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  want = {k: float(correct[:k].reshape(-1).float().sum()) / 200 for k in (1, 5)}
  got = metrics.topk_accuracy(image, classifier, targets, ks=(1, 5))
  assert got == pytest.approx(want, abs=1e-12)


def test_retrieval_recall_equals_brute_force_with_ties_and_five_captions(monkeypatch):
  rng = np.random.default_rng(2)
  num_images = 30
  image = _integer_embeddings(rng, num_images)
  image[11] = image[4]                                   # Tied images.
  text_image = np.repeat(np.arange(num_images), 5)
  rng.shuffle(text_image)                                # Captions in any order.
  text = _integer_embeddings(rng, len(text_image))
  text[3] = text[40]                                     # Tied captions.
  monkeypatch.setattr(metrics, '_CHUNK_ELEMENTS', 64)
  got = metrics.retrieval_recall(image, text, text_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i2t, t2i = brute_retrieval(image, text, text_image, k)
    assert got['image_to_text'][k] == i2t and got['text_to_image'][k] == t2i
  assert 0 < got['text_to_image'][1] < got['text_to_image'][10] < 1


def test_retrieval_recall_equals_clip_benchmark_without_ties():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(3)
  image = rng.normal(size=(40, 8)).astype(np.float32)
  text_image = np.repeat(np.arange(40), 5)
  text = (image[text_image] + rng.normal(size=(200, 8))).astype(np.float32)
  # clip_benchmark metrics/zeroshot_retrieval.py: recall_at_k(...) > 0, averaged.
  scores = torch.from_numpy(text) @ torch.from_numpy(image).T
  positive = torch.zeros_like(scores, dtype=torch.bool)
  positive[torch.arange(len(scores)), torch.from_numpy(text_image)] = True

  def recall_at_k(scores, positive, k):
    topk = torch.nn.functional.one_hot(torch.topk(scores, k, dim=1)[1], scores.shape[1])
    return (topk * positive.view(scores.shape[0], 1, -1)).sum(dim=(1, 2)) / positive.sum(1)

  got = metrics.retrieval_recall(image, text, text_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    assert got['text_to_image'][k] == pytest.approx(
        (recall_at_k(scores, positive, k) > 0).float().mean().item())
    assert got['image_to_text'][k] == pytest.approx(
        (recall_at_k(scores.T, positive.T, k) > 0).float().mean().item())


def test_metrics_are_nan_for_a_diverged_model_and_reject_captionless_images():
  image = np.ones((3, 4), np.float32)
  image[1, 2] = np.nan
  assert all(np.isnan(v) for v in metrics.topk_accuracy(image, np.eye(4, dtype=np.float32),
                                                         np.zeros(3, int)).values())
  assert np.isnan(metrics.retrieval_recall(image, image, np.arange(3))['text_to_image'][1])
  with pytest.raises(ValueError, match='at least one caption'):
    metrics.retrieval_recall(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2],
                             np.array([0, 2]))


def test_zero_shot_classifier_equals_open_clip():
  torch = pytest.importorskip('torch')
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  torch_compat.import_open_clip()
  from open_clip import zero_shot_classifier  # pylint: disable=g-import-not-at-top
  classnames, template_list = ['cat', 'dog', 'tree'], ['a {c}.', 'the {c} here', '{c}!']
  prompts = templates.prompts(classnames, template_list)
  table = np.random.default_rng(4).normal(size=(len(prompts), 8)).astype(np.float32)
  rows = {p: i for i, p in enumerate(prompts)}

  class Model:  # open_clip's interface: encode_text(tokens, normalize=True).
    def encode_text(self, ids, normalize):
      out = torch.from_numpy(table)[ids]
      return torch.nn.functional.normalize(out, dim=-1) if normalize else out

  want = zero_shot_classifier.build_zero_shot_classifier(
      Model(), lambda texts: torch.tensor([rows[t] for t in texts]), classnames,
      [t.replace('{c}', '{}') for t in template_list], num_classes_per_batch=2)
  unit = table / np.linalg.norm(table, axis=1, keepdims=True)
  np.testing.assert_allclose(metrics.zero_shot_classifier(unit, 3), want.numpy().T, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Templates.


def test_openai_imagenet_names_and_templates_come_from_open_clip_without_torch():
  code = ('import sys; from mobileclip_jax.evaluation import templates as t; '
          'n, p = t.imagenet_classnames(), t.resolve_templates("openai_imagenet"); '
          'print(len(n), len(p), n[0], p[0], "torch" in sys.modules, "jax" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ['1000', '80', 'tench', 'a', 'bad', 'photo', 'of', 'a', '{c}.',
                                'False', 'False']


def test_missing_open_clip_and_bad_templates_are_explained(monkeypatch, tmp_path):
  monkeypatch.setattr(templates.importlib.util, 'find_spec', lambda name: None)
  templates.open_clip_metadata.cache_clear()
  try:
    with pytest.raises(FileNotFoundError, match='open-clip-torch.*classnames=FILE'):
      templates.resolve_classnames('openai_imagenet')
  finally:
    templates.open_clip_metadata.cache_clear()
  with pytest.raises(ValueError, match='exactly one class-name placeholder'):
    templates.resolve_templates(['a photo.'])
  with pytest.raises(ValueError, match='ships no class names'):
    templates.resolve_classnames(None, None, 'webdataset /x')
  (tmp_path / 'names.txt').write_text('cat\n\ndog\n')
  with pytest.raises(ValueError, match=r'blank lines \(lines \[2\]\)'):
    templates.resolve_classnames(str(tmp_path / 'names.txt'))
  assert templates.prompts(['x y'], ['a {c}.', '{} b']) == ['a x y.', 'x y b']


# ----------------------------------------------------------------------------------------------
# The oracle: embeddings are colours, so every source must give 100%.

COLORS = {'red': (230, 20, 20), 'green': (20, 200, 40), 'blue': (30, 40, 230),
          'yellow': (240, 220, 20), 'magenta': (220, 30, 220), 'white': (250, 250, 250),
          'black': (5, 5, 5), 'orange': (250, 140, 10), 'purple': (120, 40, 170),
          'pink': (250, 130, 190), 'brown': (120, 70, 30), 'gray': (128, 128, 128)}
NAMES = list(COLORS)
# OpenAI normalization: every colour, black included, is a distinct direction.
ORACLE_CONFIG = clip.get_config('MobileCLIP2-S3', image_size=16)


class Oracle(nn.Module):
  """Image embedding: the mean normalized pixel; text embedding: the sum of token rows."""
  config: clip.ModelConfig

  def setup(self):
    self.table = self.param('table', nn.initializers.zeros, (self.config.text.vocab_size, 3))

  def encode_image(self, images, train=False):
    return images.mean(axis=(1, 2))

  def encode_text(self, tokens, train=False):
    return jnp.take(self.table, tokens, axis=0).sum(axis=1)


def _color_vector(rgb):
  return preprocess.normalize(np.asarray(rgb, np.uint8), ORACLE_CONFIG.mean, ORACLE_CONFIG.std)


@pytest.fixture(scope='module')
def oracle():
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  table = np.zeros((ORACLE_CONFIG.text.vocab_size, 3), np.float32)
  for name, rgb in COLORS.items():
    (token,) = tokenizer.encode(name)
    table[token] = _color_vector(rgb)
  unit = np.stack([v / np.linalg.norm(v) for v in map(_color_vector, COLORS.values())])
  assert (unit @ unit.T)[~np.eye(len(COLORS), dtype=bool)].max() < 0.999
  return Oracle(ORACLE_CONFIG), {'params': {'table': table}}


def _png(rgb, size=(20, 24), image_format='PNG'):
  buffer = io.BytesIO()  # Lossless: the decoded pixels are exactly `rgb`.
  Image.new('RGB', size, tuple(rgb)).save(buffer, format=image_format, lossless=True)
  return buffer.getvalue()


def _write_tar(path, samples):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, 'w') as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


# 27 images of 9 classes in mixed order: not a multiple of the batch sizes used below.
CLASS_LABELS = [int(c) for c in np.random.default_rng(5).permutation(np.arange(27) % 9)]
CAPTIONS = ['a {} square', '{}', 'the colour {}', 'something {} here', 'a photo of {} paint']


def _classification_wds(root):
  samples = [(f's{i:03d}', {'png': _png(COLORS[NAMES[c]], (20 + i % 5, 24)),
                            'cls': str(c).encode()}) for i, c in enumerate(CLASS_LABELS)]
  for shard in range(2):
    _write_tar(os.path.join(root, 'test', f'{shard}.tar'), samples[shard::2])
  (root / 'test' / 'nshards.txt').write_text('2\n')
  (root / 'classnames.txt').write_text('\n'.join(NAMES[:9]) + '\n')
  (root / 'zeroshot_classification_templates.txt').write_text('a photo of a {c}.\n{c} thing\n')
  return root


def _retrieval_wds(root):
  samples = []
  for i, name in enumerate(NAMES[:11]):
    image = {'webp': _png(COLORS[name], image_format='WEBP')} if i % 2 else {
        'png': _png(COLORS[name])}
    captions = '\n'.join(c.format(name) for c in CAPTIONS).encode()
    samples.append((f'im{i}', {**image, 'txt': captions}))
  _write_tar(os.path.join(root, 'test', '0.tar'), samples)
  (root / 'dataset_type.txt').write_text('retrieval\n')
  return root


def _run(name, eval_type, source, model_and_vars, mesh=None, **entry):
  model, variables = model_and_vars
  mesh = mesh or sharding.create_mesh()
  ev = evaluator_lib.build_evaluator(name, dict(type=eval_type, source=source, **entry),
                                     model.config, mesh)
  return ev.run(model, variables)


def test_oracle_scores_100_on_a_clip_benchmark_webdataset(oracle, tmp_path):
  root = _classification_wds(tmp_path / 'wds_colors')
  # 27 images in batches of 8: the 5 padding rows (zeros, embedded as black, label 0 = red)
  # would each be a miss if they counted.
  got = _run('colors', 'zeroshot', dict(kind='wds', path=str(root)), oracle, batch_size=8)
  assert got == {'zeroshot/colors/top1': 1.0, 'zeroshot/colors/top5': 1.0}
  # Against the wrong class names (shifted by one) the same model is always wrong.
  got = _run('shifted', 'zeroshot', dict(kind='wds', path=str(root),
                                         classnames=NAMES[1:10]), oracle, batch_size=8)
  assert got['zeroshot/shifted/top1'] == 0.0


def test_oracle_retrieval_is_perfect_on_webdataset_jsonl_and_caption_folder(oracle, tmp_path):
  want = {f'retrieval/r/{d}_R@{k}': 1.0 for d in ('i2t', 't2i') for k in (1, 5, 10)}
  want['retrieval/r/mean_R@1'] = 1.0
  wds_root = _retrieval_wds(tmp_path / 'wds_ret')
  with jax.transfer_guard('disallow'):  # Every host <-> device copy is explicit.
    assert _run('r', 'retrieval', dict(kind='wds', path=str(wds_root)), oracle,
                mesh=sharding.create_mesh(4, 2), batch_size=8, text_batch_size=16) == want

  # JSONL of image-caption pairs: one line per pair, captions of one image joined.
  folder = tmp_path / 'pairs'
  folder.mkdir()
  lines = []
  for i, name in enumerate(NAMES[:11]):
    (folder / f'{i}.png').write_bytes(_png(COLORS[name]))
    (folder / f'{i}.txt').write_text('\n'.join(c.format(name) for c in CAPTIONS))
    lines += [json.dumps({'image': f'{i}.png', 'caption': c.format(name)}) for c in CAPTIONS]
  (folder / 'pairs.jsonl').write_text('\n'.join(lines) + '\n')
  assert _run('r', 'retrieval', dict(kind='jsonl', path=str(folder / 'pairs.jsonl')), oracle,
              batch_size=8) == want
  assert _run('r', 'retrieval', dict(kind='caption_folder', path=str(folder)), oracle,
              batch_size=8) == want


def test_oracle_scores_100_on_a_class_folder(oracle, tmp_path):
  for i, c in enumerate(CLASS_LABELS):
    path = tmp_path / 'classes' / f'{c:02d}_{NAMES[c]}' / f'{i}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(COLORS[NAMES[c]]))
  (tmp_path / 'classes' / 'classnames.txt').write_text('\n'.join(NAMES[:9]))
  got = _run('f', 'zeroshot', dict(kind='class_folder', path=str(tmp_path / 'classes'),
                                   templates=['a {c} thing']), oracle, batch_size=8)
  assert got == {'zeroshot/f/top1': 1.0, 'zeroshot/f/top5': 1.0}


def _build_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyEvalColors(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(encoding_format='png'),
          'label': tfds.features.ClassLabel(names=NAMES[:9]),
          'captions': tfds.features.Sequence({'text': tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {'test': self._generate_examples()}

    def _generate_examples(self):
      for i, c in enumerate(CLASS_LABELS):
        yield str(i), {'image': _png(COLORS[NAMES[c]]), 'label': c,
                       'captions': [{'text': t.format(NAMES[c])} for t in CAPTIONS[:2]]}

  TinyEvalColors(data_dir=data_dir, file_format='array_record').download_and_prepare()


def test_tfds_array_record_source_without_tensorflow(oracle, tmp_path):
  _build_tfds(str(tmp_path))
  source = dict(kind='tfds', name='tiny_eval_colors', split='test', data_dir=str(tmp_path),
                templates=['{c}'])
  got = _run('t', 'zeroshot', source, oracle, batch_size=8)
  assert got == {'zeroshot/t/top1': 1.0, 'zeroshot/t/top5': 1.0}
  pairs = datasets.open_source(dict(source, templates=None, limit=4,
                                   caption_key='captions/text'), 'retrieval', 16).examples
  labelled = datasets.open_source(dict(source, limit=4), 'zeroshot', 16).examples
  assert len(pairs) == 4
  for i in range(4):  # TFDS shuffles the examples; captions and label stay together.
    name = NAMES[labelled[i].labels[0]]
    assert pairs[i].captions == (CAPTIONS[0].format(name), name)
  with pytest.raises(ValueError, match=r"no feature 'caption'.*\['captions', 'image', 'label'\]"):
    datasets.open_source(dict(source, caption_key='caption'), 'retrieval', 16)
  with pytest.raises(ValueError, match='ships no prompt templates'):
    datasets.open_source(dict(source, templates=None), 'zeroshot', 16)
  with pytest.raises(FileNotFoundError, match='not prepared'):
    datasets.open_source(dict(kind='tfds', name='cifar10', split='test',
                             data_dir=str(tmp_path / 'empty')), 'zeroshot', 16)
  # Reading needs no TensorFlow: in a fresh process (this worker may hold it from other tests).
  spec = dict(source, templates=None, limit=4, caption_key='captions/text')
  code = ('import sys\nfrom mobileclip_jax.evaluation import datasets\n'
          f'examples = datasets.open_source({spec!r}, "retrieval", 16).examples\n'
          'print(sum(len(examples[i].captions) for i in range(len(examples))), '
          '"tensorflow" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ['8', 'False']


def test_sharded_oracle_embeddings_equal_host_preprocessing(oracle, tmp_path):
  """8 devices, ragged last batch, under transfer_guard('disallow'): the gathered rows are the
  host-normalized images, in dataset order, and the labels come along."""
  root = _classification_wds(tmp_path / 'wds_colors')
  model, variables = oracle
  ev = evaluator_lib.build_evaluator('c', dict(type='zeroshot', source=dict(
      kind='wds', path=str(root)), batch_size=5), model.config, sharding.create_mesh(4, 2))
  assert ev.batch_size == 8
  variables = embedding.place_variables(variables, ev.mesh)
  with jax.transfer_guard('disallow'):
    got = ev.encode_images(model, variables, ev._labels, {'labels': (1,)})
  want = np.stack([_color_vector(COLORS[NAMES[c]]) for c in CLASS_LABELS[0::2] +
                   CLASS_LABELS[1::2]])  # Shard 0 holds the even samples, shard 1 the odd.
  # float32 rounding of the on-device preprocessing and normalization, which XLA's code generation
  # sets (1.8e-6 at the fast suite's -O0); a sample out of order or mislabelled is off by O(1).
  np.testing.assert_allclose(got['embeddings'], want / np.linalg.norm(want, axis=1,
                                                                      keepdims=True), atol=4e-6)
  np.testing.assert_array_equal(got['index'], np.arange(27))
  np.testing.assert_array_equal(got['labels'][:, 0], CLASS_LABELS[0::2] + CLASS_LABELS[1::2])
  with jax.transfer_guard('disallow'):
    assert ev.run(model, oracle[1])['zeroshot/c/top1'] == 1.0


def _oracle_results(model, variables, root):
  """Zero-shot (with shifted class names, so top-1 is 0 and top-5 partial) and retrieval."""
  mesh, out = sharding.create_mesh(4, 2), {}
  for name, eval_type, source in (
      ('c', 'zeroshot', dict(kind='wds', path=f'{root}/cls', classnames=NAMES[1:10])),
      ('r', 'retrieval', dict(kind='wds', path=f'{root}/ret'))):
    ev = evaluator_lib.build_evaluator(name, dict(type=eval_type, source=source, batch_size=8,
                                                  text_batch_size=16), model.config, mesh)
    out.update(ev.run(model, variables))
  return out


def _multiprocess_worker(process_id, num_processes, port, root):
  """Runs in a subprocess (`python tests/test_evaluation.py ...`): one of several JAX processes."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', int(num_processes), int(process_id))
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  table = np.zeros((ORACLE_CONFIG.text.vocab_size, 3), np.float32)
  for name, rgb in COLORS.items():
    table[tokenizer.encode(name)[0]] = _color_vector(rgb)
  results = _oracle_results(Oracle(ORACLE_CONFIG), {'params': {'table': table}}, root)
  print('RESULT ' + json.dumps(results, sort_keys=True), flush=True)


def test_two_processes_give_the_single_process_results(oracle, tmp_path):
  """2 JAX processes x 4 CPU devices (gloo): uneven shares of images and captions per process."""
  _classification_wds(tmp_path / 'cls')
  _retrieval_wds(tmp_path / 'ret')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(4))
  procs = [subprocess.Popen([sys.executable, __file__, str(i), '2', str(port), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
  results = [json.loads(line[len('RESULT '):]) for out, _ in outputs
             for line in out.splitlines() if line.startswith('RESULT ')]
  want = _oracle_results(*oracle, tmp_path)
  assert results == [want, want]
  assert want['retrieval/r/mean_R@1'] == 1.0 and 0 < want['zeroshot/c/top5'] < 1


# ----------------------------------------------------------------------------------------------
# Batch plans.


@pytest.mark.parametrize('num_items,global_batch,processes', [(27, 8, 1), (27, 8, 4), (5, 16, 2),
                                                              (32, 8, 2)])
def test_every_process_runs_the_same_batches_and_every_item_once(num_items, global_batch,
                                                                 processes):
  plans = [base.stream_slots(num_items, global_batch, p, processes) for p in range(processes)]
  assert len({len(plan) for plan in plans}) == 1
  assert len(plans[0]) == -(-num_items // global_batch)
  ids = np.concatenate([np.concatenate(plan) for plan in plans])
  assert ids.size == len(plans[0]) * global_batch
  np.testing.assert_array_equal(np.sort(ids[ids >= 0]), np.arange(num_items))
  slots = base.local_slots(5, 4, 3)
  np.testing.assert_array_equal(np.concatenate(slots), [0, 1, 2, 3, 4, -1, -1, -1, -1, -1, -1, -1])


def test_due_runs_first_last_and_every_n(oracle, tmp_path):
  root = _classification_wds(tmp_path / 'wds_colors')
  model, _ = oracle
  entry = dict(type='zeroshot', source=dict(kind='wds', path=str(root)))
  once = evaluator_lib.build_evaluator('c', entry, model.config, sharding.create_mesh())
  every = evaluator_lib.build_evaluator('c', dict(entry, every_steps=300), model.config,
                                        sharding.create_mesh())
  assert [s for s in range(1001) if once.due(s, 1000)] == [0, 1000]
  assert [s for s in range(1001) if every.due(s, 1000)] == [0, 300, 600, 900, 1000]


# ----------------------------------------------------------------------------------------------
# A tiny MobileCLIP: sharding, chance level, the demo world, the command line.


@pytest.fixture(scope='module')
def tiny():
  """Tiny MobileCLIP2-S0 with random variables (numpy; no init compile)."""
  model = clip.create_model('MobileCLIP2-S0', **TINY)
  shapes = clip.abstract_variables(model.config)
  rng = np.random.default_rng(6)

  def fill(path, shape):
    # Kernels scaled by their fan-in: with a flat N(0, 0.2) every image got the same embedding
    # (to 1e-8), and rankings then hung on rounding.
    path = rules.path_str(path)
    if path.endswith('var'):  # BatchNorm running variance.
      return np.ones(shape.shape, np.float32)
    if path.endswith('/scale'):
      return (1 + rng.normal(0, 0.1, shape.shape)).astype(np.float32)
    std = 1 / np.sqrt(np.prod(shape.shape[:-1])) if len(shape.shape) >= 2 else 0.1
    return rng.normal(0, std, shape.shape).astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


DEMO_TASKS = dict(kind='demo', split='val', num_samples=40, tasks='shape,color')
DEMO_PAIRS = dict(kind='demo', split='val', num_samples=40, num_captions=2)


def test_sharded_evaluation_equals_single_device(tiny):
  model, variables = tiny
  one_device = sharding.create_mesh(devices=jax.devices()[:1])
  eight = sharding.create_mesh(4, 2)
  for eval_type, source in (('zeroshot', DEMO_TASKS), ('retrieval', DEMO_PAIRS)):
    evs = [evaluator_lib.build_evaluator('d', dict(type=eval_type, source=source, **kw),
                                         model.config, mesh)
           for mesh, kw in ((one_device, dict(batch_size=40)),
                            (eight, dict(batch_size=16, text_batch_size=24)))]
    assert [len(base.stream_slots(40, ev.batch_size)) for ev in evs] == [1, 3]
    columns, shapes = (evs[0]._labels, {'labels': (2,)}) if eval_type == 'zeroshot' else (
        evs[0]._collect_captions, {})
    embeddings = [ev.encode_images(model, embedding.place_variables(variables, ev.mesh), columns,
                                   shapes)['embeddings'] for ev in evs]
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=2e-5)
    assert len(np.unique(np.round(embeddings[0], 4), axis=0)) == 40  # No ties to break by noise.
    results = [ev.run(model, variables) for ev in evs]
    assert results[0] == results[1]


def test_random_model_scores_near_chance(tiny):
  got = _run('d', 'zeroshot', DEMO_TASKS, tiny, batch_size=16)
  # 8 shapes and 10 colours over 40 images: chance is 0.125 and 0.1 (+3 sigma ~ 0.28).
  assert got['zeroshot/d_shape/top1'] < 0.3 and got['zeroshot/d_color/top1'] < 0.3
  assert got['zeroshot/d_shape/top1'] < got['zeroshot/d_shape/top5']
  ret = _run('d', 'retrieval', DEMO_PAIRS, tiny, batch_size=16, text_batch_size=24)
  assert ret['retrieval/d/i2t_R@1'] < 0.2 and ret['retrieval/d/t2i_R@1'] < 0.2  # Chance 0.025.


def test_demo_world_evaluations_end_to_end(tiny):
  model, variables = tiny
  evals = ml_collections.ConfigDict({
      'demo': dict(type='zeroshot', source=dict(kind='demo', split='val', num_samples=12),
                   batch_size=8, every_steps=100, cache=True),
      'demo_heldout': dict(type='zeroshot', source=dict(kind='demo', split='heldout',
                                                        num_samples=12, tasks=['object']),
                           batch_size=8),
      'demo_retrieval': dict(type='retrieval', source=dict(kind='demo', num_samples=12,
                                                           captions='gt'), batch_size=8)})
  evaluators = evaluator_lib.build_evaluators(evals, model.config, sharding.create_mesh())
  assert [e.name for e in evaluators] == list(evals)
  results = [e.run(model, variables) for e in evaluators]
  tasks = ('shape', 'color', 'object', 'count', 'size', 'position', 'style', 'texture',
           'background_color')
  few_classes = ('count', 'size', 'style', 'position', 'texture')  # <= 5 classes: no top-5.
  assert set(results[0]) == {f'zeroshot/demo_{t}/top{k}' for t in tasks for k in (1, 5)} - {
      f'zeroshot/demo_{t}/top5' for t in few_classes}
  assert set(results[1]) == {'zeroshot/demo_heldout_object/top1',
                             'zeroshot/demo_heldout_object/top5'}
  assert 'retrieval/demo_retrieval/mean_R@1' in results[2]
  assert all(0 <= v <= 1 for r in results for v in r.values())
  assert evaluators[0].run(model, variables) == results[0]  # Replayed from the image cache.


def test_launch_evaluate_on_a_saved_model_checkpoint(tiny, tmp_path):
  model, variables = tiny
  checkpoint.save_variables(str(tmp_path / 'ckpt'), variables, model.config)
  out = tmp_path / 'results.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch', 'evaluate.py'),
       f'--checkpoint={tmp_path / "ckpt"}', '--eval=demo_heldout,demo_retrieval', '--limit=8',
       '--batch_size=8', f'--out={out}'], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['model'] == 'MobileCLIP2-S0'
  assert results['evals']['demo_heldout']['num_images'] == 8
  assert 'zeroshot/demo_heldout_object/top1' in results['metrics']
  assert 'retrieval/demo_retrieval/mean_R@1' in proc.stdout
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'results.json']


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_checkpoint_of_another_variant_is_reported(tiny, tmp_path):
  model, variables = tiny
  checkpoint.save_variables(str(tmp_path / 'ckpt'), variables, model.config)
  with pytest.raises(ValueError, match='holds a MobileCLIP2-S0 model, not MobileCLIP2-S2'):
    runner.load_model('MobileCLIP2-S2', checkpoint_dir=str(tmp_path / 'ckpt'))
  # A PyTorch state_dict of the tiny variant read as the full-size one: convert's shape errors.
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import convert  # pylint: disable=g-import-not-at-top
  st_numpy.save_file(convert.to_open_clip(variables, 'MobileCLIP2-S0', **TINY),
                     str(tmp_path / 'tiny.safetensors'))
  with pytest.raises(ValueError, match=r'not a MobileCLIP2-S0 checkpoint(.|\n)*shape mismatch'):
    runner.load_model('MobileCLIP2-S0', torch_checkpoint=str(tmp_path / 'tiny.safetensors'))
  bad = dict(variables, params={**variables['params'], 'logit_scale': np.zeros((2,))})
  with pytest.raises(ValueError, match=r'params/logit_scale: expected shape \(\), got \(2,\)'):
    runner.check_variables(model, bad, 'test')


def test_bad_datasets_are_reported(oracle, tmp_path):
  model, variables = oracle
  root = _classification_wds(tmp_path / 'wds_colors')
  (root / 'classnames.txt').unlink()
  with pytest.raises(ValueError, match='ships no class names'):
    datasets.open_source(dict(kind='wds', path=str(root)), 'zeroshot', 16)
  _write_tar(str(tmp_path / 'nocls' / 'test' / '0.tar'), [('s000', {'png': _png((1, 2, 3))})])
  with pytest.raises(ValueError, match=r"sample 's000' has members \['png'\].*needs"):
    datasets.open_source(dict(kind='wds', path=str(tmp_path / 'nocls'), classnames=['a']),
                        'zeroshot', 16)
  with pytest.raises(ValueError, match='is a retrieval dataset'):
    datasets.open_source(dict(kind='wds', path=str(_retrieval_wds(tmp_path / 'ret'))),
                        'zeroshot', 16)
  (tmp_path / 'empty' / 'test').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='No tar shards'):
    datasets.open_source(dict(kind='wds', path=str(tmp_path / 'empty'), classnames=['a'],
                             templates=['{c}']), 'zeroshot', 16)
  (tmp_path / 'bad.jsonl').write_text('{"image": "a.png", "text": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1 needs a string 'image' and a 'caption'"):
    datasets.open_source(dict(kind='jsonl', path=str(tmp_path / 'bad.jsonl')), 'retrieval', 16)
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(ValueError, match='has no examples'):
    datasets.open_source(dict(kind='jsonl', path=str(tmp_path / 'empty.jsonl')), 'retrieval', 16)
  with pytest.raises(ValueError, match="Unknown field 'nmu_samples'.*num_samples"):
    datasets.open_source(dict(kind='demo', nmu_samples=3), 'zeroshot', 16)
  with pytest.raises(ValueError, match="Unknown key 'every_step'.*every_steps"):
    evaluator_lib.build_evaluator('x', dict(source='demo', every_step=3), model.config,
                                  sharding.create_mesh())
  with pytest.raises(FileNotFoundError, match=r"No data for the 'imagenet'(.|\n)*wds_imagenet1k"):
    registry.standard_eval('imagenet', str(tmp_path))
  # A class index beyond the class names is caught when the example is read.
  few = dict(kind='wds', path=str(_classification_wds(tmp_path / 'few')), classnames=NAMES[:3])
  with pytest.raises(ValueError, match=r's00\d.*do not fit the class counts \[3\]'):
    _run('few', 'zeroshot', few, oracle)


if __name__ == '__main__':
  _multiprocess_worker(*sys.argv[1:])


def test_launch_evaluate_with_a_training_config_and_an_open_clip_file(tiny, tmp_path):
  """--config gives the reduced model (an open_clip file cannot) and the evaluations; the
  numbers equal the in-process evaluation of the same variables."""
  model, variables = tiny
  weights = str(tmp_path / 'model.safetensors')
  convert_files.write_state_dict(convert.to_open_clip(variables, model.config), weights)
  evals = {'demo_heldout': dict(type='zeroshot', source=dict(kind='demo', split='heldout',
                                                             num_samples=8, tasks=['object']))}
  config_file = tmp_path / 'config.py'
  config_file.write_text(textwrap.dedent(f'''
      import ml_collections
      from mobileclip_jax import config as config_lib

      def get_config(arg=None):
        c = config_lib.base_config()
        c.model.embed_dim = {TINY['embed_dim']}
        c.model.image_size = {TINY['image_size']}
        c.model.image.depths = {TINY['image']['depths']}
        c.model.image.widths = {TINY['image']['widths']}
        c.model.text.layers, c.model.text.width, c.model.text.heads = 1, 32, 2
        c.evals = ml_collections.ConfigDict({evals!r})
        return c
      '''))
  out = tmp_path / 'results.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch', 'evaluate.py'), f'--config={config_file}',
       f'--torch_checkpoint={weights}', f'--out={out}'], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = runner.run_evaluators(model, variables, evaluator_lib.build_evaluators(
      evals, model.config, sharding.create_mesh()))['metrics']
  assert json.loads(out.read_text())['metrics'] == pytest.approx(want)

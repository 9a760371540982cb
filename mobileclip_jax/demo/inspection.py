"""What the demo's models see and what they learned (`python launch/demo.py --inspect`).

Written to <workdir>/inspect/ for a demo workdir (whatever stages are finished):

  crops_<role>.png       the first training batch exactly as the trainer builds it (the stored or
                         fresh augmentation at the training resolution), with each caption as
                         tokenized (truncated at the context length), synthetic ones for DR
  eval_vs_train.png      evaluation renders (the 'val' split at the model's size) beside training
                         crops of the same models
  data.json              per dataset: how much of the main object the training crops keep and
                         how large it looks, how often RandAugment changes colours, and per
                         zero-shot task the fraction of captions that name the main object's
                         value within the context length (`caption_stats`)
  models.json            per trained model and task: zero-shot top-1 on 'val' renders and on the
                         model's own training crops, and a linear probe of its frozen image
                         embeddings ('train' renders -> 'val' renders): the probe tells whether
                         the image tower holds the attribute at all
  confusion_<role>.png   zero-shot confusion matrices per task on 'val'
"""
import dataclasses
import io
import json
import logging
import os
import re
import textwrap
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mobileclip_jax.data import augment
from mobileclip_jax.data import loader
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.demo import captions as captions_lib
from mobileclip_jax.demo import samples
from mobileclip_jax.demo import hparams as settings_lib
from mobileclip_jax.demo import tasks as tasks_lib
from mobileclip_jax.demo import world as world_lib

log = logging.getLogger('mobileclip_jax')
INSPECT_DIR = 'inspect'
# RandAugment ops that change colours (the others move pixels or sharpen).
COLOR_OPS = ('Brightness', 'Color', 'Contrast', 'Posterize', 'Solarize', 'AutoContrast',
             'Equalize')
_UID = re.compile(r'^demo-(\w+)-s(\d+)-(\d+)$')


def scene_of(uid: str, world: world_lib.DemoWorldConfig) -> world_lib.Scene:
  """The scene behind a demo sample's uid (scenes do not depend on caption settings)."""
  match = _UID.match(uid)
  if not match:
    raise ValueError(f'{uid!r} is not a demo-world uid (demo-SPLIT-sSEED-INDEX).')
  split, seed, index = match.group(1), int(match.group(2)), int(match.group(3))
  return world_lib.sample_scene(world, split, index, seed)


# ----------------------------------------------------------------------------------------------
# Training crops, as the trainer builds them.


def training_batch(config, num: int) -> Dict[str, Any]:
  """The first `num` examples (at most a batch) of the trainer's first batch for `config`.

  Returns {'images': uint8 [num, S, S, 3], 'texts': [num] decoded caption tokens (what the text
  tower reads), 'syn_texts': the same for synthetic captions or None, 'uids': the records'}.
  """
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.data import tokenizer as tokenizer_lib
  from mobileclip_jax.train import setup
  # pylint: enable=g-import-not-at-top
  model_config = setup.model_config(config)
  data = setup.open_input(config, model_config, process_index=0, process_count=1)
  try:
    batch = next(data.iterator)
  finally:
    data.iterator.close()
  num = min(num, len(batch['image']))  # A batch smaller than `num` (the --quick sizes).
  tokenizer = tokenizer_lib.get_tokenizer(model_config.tokenizer)
  decode = lambda rows: [tokenizer.decode(r) for r in rows[:num]]
  # The records behind the batch: positions 0.. of epoch 0 (the loader's order; the demo
  # datasets have no corrupt records that would be replaced).
  source, _ = reinforced_tfds.open_reinforced(config.data.name, config.data.data_dir)
  uids = [source[loader.shuffled_index(config.seed, 0, p, len(source))]['uid'].decode()
          for p in range(num)]
  return {'images': batch['image'][:num], 'texts': decode(batch['text']),
          'syn_texts': decode(batch['syn_text']) if 'syn_text' in batch else None,
          'uids': uids}


def _grid(path: str, images: Sequence[np.ndarray], labels: Sequence[str], title: str,
          columns: int = 8) -> None:
  """A grid of images, each with its label wrapped below (PNG, written atomically)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = -(-len(images) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.9 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, image, label in zip(axes.ravel(), images, labels):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(textwrap.fill(label, 30), fontsize=6, loc='left', y=-0.02, va='top')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tmp = f'{path}.{os.getpid()}.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def crop_grid(config, path: str, title: str, num: int = 32) -> Dict[str, Any]:
  """`crops_<role>.png`: the first training examples with their captions; returns the batch."""
  batch = training_batch(config, num)
  labels = batch['texts']
  if batch['syn_texts'] is not None:
    labels = [f'GT: {t}\nSYN: {s}' for t, s in zip(batch['texts'], batch['syn_texts'])]
  _grid(path, batch['images'], labels, title)
  return batch


def eval_vs_train(path: str, batch: Mapping[str, Any], settings: settings_lib.DemoSettings,
                  num: int = 16) -> None:
  """`eval_vs_train.png`: 'val' renders as the evaluators feed them, above training crops."""
  val = [samples.make_sample('val', i, settings.image_size, settings.seed) for i in range(num)]
  images = [np.asarray(s['image']) for s in val] + list(batch['images'][:num])
  labels = ([f"eval: {s['labels']['color']} {s['labels']['shape']}" for s in val] +
            [f'train: {t}' for t in batch['texts'][:num]])
  _grid(path, images, labels, f'Top {num // 8} rows: evaluation renders ({settings.image_size} '
        'px); below: training crops', columns=8)


# ----------------------------------------------------------------------------------------------
# Data statistics.


def _object_in_crop(obj: world_lib.SceneObject, box: Sequence[int], side: int,
                    out_size: int) -> Tuple[float, float]:
  """(fraction of the object's disc inside the crop box, its diameter in output pixels)."""
  top, left, height, width = box
  grid = np.linspace(-1, 1, 33)
  x, y = np.meshgrid(grid, grid)
  disc = x ** 2 + y ** 2 <= 1
  px = (obj.center[0] + obj.radius * x[disc]) * side
  py = (obj.center[1] + obj.radius * y[disc]) * side
  inside = (px >= left) & (px < left + width) & (py >= top) & (py < top + height)
  return float(inside.mean()), 2 * obj.radius * side * out_size / np.sqrt(width * height)


def augmentation_stats(name: str, data_dir: str, image_size: int,
                       world: world_lib.DemoWorldConfig,
                       plain: Optional[augment.AugmentConfig] = None, num: int = 1000,
                       seed: int = 0) -> Dict[str, Any]:
  """What the training crops keep of the main object, and what RandAugment does to colours.

  For a plain dataset the parameters are sampled as the loader does (`augment.sample_params`
  with `plain`, default the loader's, at `image_size`); for a reinforced one they are the stored
  ones.
  """
  source, meta = reinforced_tfds.open_reinforced(name, data_dir)
  rng = np.random.default_rng(seed)
  plain = plain or loader.InputConfig(dataset=name).augmentation
  config = dataclasses.replace(plain, image_size=image_size)
  kept, diameters, ops = [], [], []
  for i in range(min(num, len(source))):
    record = source[i]
    scene = scene_of(record['uid'].decode(), world)
    side = Image.open(io.BytesIO(record['image'])).size[0]  # Demo images are square.
    if meta.kind == 'reinforced':
      entries = json.loads(record['paug'])
      params = entries[int(rng.integers(len(entries)))]
    else:
      params = augment.sample_params(rng, side, side, config)
    fraction, diameter = _object_in_crop(scene.objects[0], params[0], side, image_size)
    kept.append(fraction)
    diameters.append(diameter)
    ops.append([augment.OP_NAMES[j] for j, _ in (params[1] or [])])
  kept, diameters = np.asarray(kept), np.asarray(diameters)
  eval_diameters = [2 * world_lib.sample_scene(world, 'val', i, seed).objects[0].radius *
                    image_size for i in range(len(kept))]
  return {
      'examples': len(kept),
      'main_object_fully_in_crop': float(np.mean(kept > 0.99)),
      'main_object_half_in_crop': float(np.mean(kept >= 0.5)),
      'main_object_not_in_crop': float(np.mean(kept == 0)),
      'main_object_diameter_px_p5_p50_p95': np.percentile(diameters, [5, 50, 95]).round(1).tolist(),
      'eval_main_object_diameter_px_p5_p50_p95':
          np.percentile(eval_diameters, [5, 50, 95]).round(1).tolist(),
      'crops_with_a_colour_op': float(np.mean([any(o in COLOR_OPS for o in x) for x in ops])),
      'op_frequency': {name: float(np.mean([name in x for x in ops]))
                       for name in augment.OP_NAMES},
  }


def _phrases(task: str, labels: Mapping[str, Any]) -> Tuple[str, ...]:
  """The phrasings of the main object's value for `task` that a caption may use."""
  if task == 'shape':
    return (labels['shape'],)
  if task == 'color':
    return (labels['color'],)
  if task == 'object':
    return (f"{labels['color']} {labels['shape']}",)
  if task == 'count':
    return (captions_lib.count_phrase(labels['count']),)
  if task == 'size':
    return captions_lib.SIZE_WORDS[labels['size']]
  if task == 'position':
    return captions_lib.POSITION_PHRASES[labels['position']]
  if task == 'style':
    return captions_lib.STYLE_WORDS[labels['style']]
  if task == 'texture':
    return tuple(f'{w} {labels["background_color"]} background'
                 for w in captions_lib.TEXTURE_WORDS[labels['texture']])
  if task == 'background_color':
    return (f'{labels["background_color"]} background',)
  raise ValueError(f'No phrasing for task {task!r}.')


def _names(text: str, phrases: Sequence[str]) -> bool:
  return any(re.search(r'(^|[^a-z-])' + re.escape(p) + r'($|[^a-z-])', text) for p in phrases)


def caption_stats(texts: Sequence[str], labels: Sequence[Mapping[str, Any]],
                  tokenizer, context_length: int) -> Dict[str, Any]:
  """Per zero-shot task, the fraction of captions naming the main object's value.

  'named' looks at the caption as the text tower reads it (tokenized, cut at `context_length`,
  decoded); 'named_full' at the whole caption; 'truncated' is the fraction of captions longer
  than the context. (Colour and shape words may also come from another object of the scene.)
  """
  tokens = tokenizer(list(texts), context_length)
  # Decoding spaces out punctuation ('medium - sized'): join hyphens back for matching.
  seen = [tokenizer.decode(row).replace(' - ', '-') for row in tokens]
  lengths = [len(tokenizer.encode(t)) + 2 for t in texts]  # + start and end tokens
  stats = {'captions': len(texts),
           'truncated': float(np.mean([n > context_length for n in lengths])),
           'tokens_p50_p95': np.percentile(lengths, [50, 95]).tolist(), 'tasks': {}}
  for task in tasks_lib.zero_shot_tasks(world_lib.DemoWorldConfig()):
    phrases = [_phrases(task, l) for l in labels]
    stats['tasks'][task] = {
        'named': float(np.mean([_names(s, p) for s, p in zip(seen, phrases)])),
        'named_full': float(np.mean([_names(t.lower(), p) for t, p in zip(texts, phrases)]))}
  return stats


def dataset_caption_stats(name: str, data_dir: str, tokenizer, context_length: int,
                          world: world_lib.DemoWorldConfig, num: int = 1000) -> Dict[str, Any]:
  """`caption_stats` of a built dataset's ground-truth (and synthetic) captions."""
  source, meta = reinforced_tfds.open_reinforced(name, data_dir)
  records = [source[i] for i in range(min(num, len(source)))]
  labels = [scene_of(r['uid'].decode(), world).labels() for r in records]
  out = {'gt': caption_stats([r['captions'][0].decode() for r in records], labels, tokenizer,
                             context_length)}
  if meta.kind == 'reinforced':
    out['syn'] = caption_stats([r['syn_captions'][0].decode() for r in records], labels,
                               tokenizer, context_length)
  return out


# ----------------------------------------------------------------------------------------------
# What a trained model learned.


def _embed(model, variables, mesh, tower: str, inputs: np.ndarray) -> np.ndarray:
  """Unit embeddings [N, D] of images (uint8 [N, S, S, 3]) or tokens, by the evaluation engine."""
  from mobileclip_jax import embedding  # pylint: disable=g-import-not-at-top
  return embedding.embed_array(model, variables, mesh, tower, inputs, 256).result()


def _classifiers(model, variables, mesh, tasks: Sequence[tasks_lib.ZeroShotTask]
                 ) -> List[np.ndarray]:
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import embedding
  from mobileclip_jax.data import tokenizer as tokenizer_lib
  from mobileclip_jax.evaluation import metrics as metrics_lib
  from mobileclip_jax.evaluation import templates as templates_lib
  # pylint: enable=g-import-not-at-top
  tokenizer = tokenizer_lib.get_tokenizer(model.config.tokenizer)
  out = []
  for task in tasks:
    prompts = templates_lib.prompts(task.classnames, task.templates)
    tokens = tokenizer(prompts, model.config.text.context_length)
    text = _embed(model, variables, mesh, embedding.TEXT, tokens)
    out.append(metrics_lib.zero_shot_classifier(text, len(task.classnames)))
  return out


def _ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 num_classes: int, l2: float = 1e-2) -> np.ndarray:
  """Predictions of a ridge-regression classifier (one-hot targets) on frozen embeddings."""
  x = np.concatenate([train_x, np.ones((len(train_x), 1))], 1).astype(np.float64)
  y = np.eye(num_classes)[train_y]
  w = np.linalg.solve(x.T @ x + l2 * len(x) * np.eye(x.shape[1]), x.T @ y)
  return (np.concatenate([test_x, np.ones((len(test_x), 1))], 1) @ w).argmax(1)


def model_stats(checkpoint_dir: str, world: world_lib.DemoWorldConfig, seed: int,
                num_val: int = 500, num_train: int = 2000,
                train_batch: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Per task: zero-shot top-1 and confusion on 'val' renders, the linear probe, and (given the
  model's first training batch, `training_batch`) zero-shot top-1 on its training crops."""
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import embedding
  from mobileclip_jax import sharding
  from mobileclip_jax.evaluation import runner
  # pylint: enable=g-import-not-at-top
  model, variables = runner.load_model(checkpoint_dir=checkpoint_dir)
  mesh = sharding.create_mesh()
  variables = embedding.place_variables(variables, mesh)
  size = model.config.image_size
  tasks = list(tasks_lib.zero_shot_tasks(world).values())
  classifiers = _classifiers(model, variables, mesh, tasks)

  def rendered(split, n):
    items = [samples.make_sample(split, i, size, seed, world) for i in range(n)]
    return (_embed(model, variables, mesh, embedding.IMAGE, np.stack([np.asarray(s['image'])
                                                            for s in items])),
            [s['labels'] for s in items])

  val_x, val_labels = rendered('val', num_val)
  probe_x, probe_labels = rendered('train', num_train)
  crops_x = crop_labels = None
  if train_batch is not None:
    crops_x = _embed(model, variables, mesh, embedding.IMAGE, train_batch['images'])
    crop_labels = [scene_of(uid, world).labels() for uid in train_batch['uids']]
  out = {}
  for task, classifier in zip(tasks, classifiers):
    targets = np.array([task.target(l) for l in val_labels])
    predictions = (val_x @ classifier.T).argmax(1)
    confusion = np.zeros((len(task.classnames),) * 2, np.int64)
    np.add.at(confusion, (targets, predictions), 1)
    probe = _ridge_probe(probe_x, np.array([task.target(l) for l in probe_labels]), val_x,
                         len(task.classnames))
    entry = {'classes': list(task.classnames),
             'zero_shot_top1': float(np.mean(predictions == targets)),
             'linear_probe_top1': float(np.mean(probe == targets)),
             'chance': float(np.max(np.bincount(targets)) / len(targets)),
             'confusion': confusion.tolist()}
    if crops_x is not None:
      crop_targets = np.array([task.target(l) for l in crop_labels])
      entry['zero_shot_top1_on_training_crops'] = float(
          np.mean((crops_x @ classifier.T).argmax(1) == crop_targets))
    out[task.name] = entry
  return out


def plot_confusions(path: str, stats: Mapping[str, Mapping[str, Any]], title: str) -> None:
  """`confusion_<role>.png`: one row-normalized confusion matrix per task."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [n for n in stats if n != 'object']  # 80 x 80 classes: unreadable; in models.json.
  fig, axes = plt.subplots(2, -(-len(names) // 2), figsize=(4.2 * -(-len(names) // 2), 8.4))
  for ax in axes.ravel():
    ax.axis('off')
  for ax, name in zip(axes.ravel(), names):
    s = stats[name]
    m = np.asarray(s['confusion'], np.float64)
    ax.axis('on')
    ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap='Blues')
    ticks = range(len(s['classes']))
    ax.set_xticks(ticks, [c[:8] for c in s['classes']], rotation=90, fontsize=6)
    ax.set_yticks(ticks, [c[:8] for c in s['classes']], fontsize=6)
    ax.set_title(f"{name}: zero-shot {100 * s['zero_shot_top1']:.0f}%, probe "
                 f"{100 * s['linear_probe_top1']:.0f}%", fontsize=8)
    ax.set_xlabel('predicted', fontsize=7)
    ax.set_ylabel('true', fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


# ----------------------------------------------------------------------------------------------
# All of it, for a demo workdir.


def inspect(workdir: str, settings: settings_lib.DemoSettings,
            print_fn=print) -> Dict[str, Any]:
  """Writes the inspection outputs (module docstring) for what `workdir` holds; returns the
  statistics ({'data': ..., 'models': ...})."""
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import checkpoint
  from mobileclip_jax import utils
  from mobileclip_jax.data import tokenizer as tokenizer_lib
  from mobileclip_jax.demo import training_sets
  from mobileclip_jax.demo import recipe
  # pylint: enable=g-import-not-at-top
  workdir = os.path.abspath(os.path.expanduser(workdir))
  data_dir = os.path.join(workdir, 'tfds')
  out = os.path.join(workdir, INSPECT_DIR)
  os.makedirs(out, exist_ok=True)
  worlds = {settings_lib.PLAIN_NAME: world_lib.DemoWorldConfig(),
            settings_lib.REINFORCED_NAME: world_lib.DemoWorldConfig(),
            settings_lib.TEACHERS_NAME: world_lib.DemoWorldConfig(
                caption_noise=settings.teacher_caption_noise)}
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  data = {}
  for name, world in worlds.items():
    if training_sets.exists(name, data_dir):
      data[name] = {
          'augmentation': augmentation_stats(name, data_dir, settings.image_size, world,
                                             settings_lib.augmentation(settings),
                                             seed=settings.seed),
          'captions': dataset_caption_stats(name, data_dir, tokenizer, settings.context_length,
                                            world)}
  utils.write_json_atomic(os.path.join(out, 'data.json'), data)
  models, batches = {}, {}
  for role in settings_lib.ROLES:
    config = settings_lib.train_config(role, settings, data_dir)
    if not training_sets.exists(config.data.name, data_dir):
      continue
    batches[role] = crop_grid(config, os.path.join(out, f'crops_{role}.png'),
                              f'{settings_lib.LABELS[role]}: first training batch '
                              f'({config.data.name})')
    directory = recipe.run_dirs(workdir, role, settings)[0]
    if checkpoint.training_steps(os.path.join(directory, 'checkpoints')):
      world = worlds[config.data.name]
      models[role] = model_stats(directory, world, settings.seed, settings.eval_samples,
                                 train_batch=batches[role])
      plot_confusions(os.path.join(out, f'confusion_{role}.png'), models[role],
                      f'{settings_lib.LABELS[role]} ({directory})')
  if batches:
    eval_vs_train(os.path.join(out, 'eval_vs_train.png'), next(iter(batches.values())),
                  settings)
  utils.write_json_atomic(os.path.join(out, 'models.json'), models)
  print_fn(format_summary(data, models))
  print_fn(f'\nInspection written to {out}')
  return {'data': data, 'models': models}


def format_summary(data: Mapping[str, Any], models: Mapping[str, Any]) -> str:
  """A short text view of `inspect`'s statistics."""
  lines = []
  for name, d in data.items():
    a, c = d['augmentation'], d['captions']
    lines.append(f"{name}: main object fully in the crop "
                 f"{100 * a['main_object_fully_in_crop']:.0f}%,"
                 f" absent {100 * a['main_object_not_in_crop']:.0f}%, diameter (p50) "
                 f"{a['main_object_diameter_px_p5_p50_p95'][1]} px (eval "
                 f"{a['eval_main_object_diameter_px_p5_p50_p95'][1]}), colour op "
                 f"{100 * a['crops_with_a_colour_op']:.0f}%")
    for kind, s in c.items():
      lines.append(f'  {kind} captions naming the main value: ' + ', '.join(
          f"{t} {100 * v['named']:.0f}%" for t, v in s['tasks'].items()))
  for role, tasks in models.items():
    lines.append(f'{role}: zero-shot / probe / zero-shot on its training crops (%): ' + ', '.join(
        f"{t} {100 * s['zero_shot_top1']:.0f}/{100 * s['linear_probe_top1']:.0f}/"
        f"{100 * s.get('zero_shot_top1_on_training_crops', float('nan')):.0f}"
        for t, s in tasks.items()))
  return '\n'.join(lines)

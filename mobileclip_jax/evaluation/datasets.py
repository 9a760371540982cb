"""Evaluation datasets as random-access examples: webdataset folders, TFDS, local files, plugins.

`open_source(spec, eval_type, image_size)` returns an `EvalData`: `examples[i]` reads example i
on demand (each process reads only its own share), and for classification the zero-shot tasks
(class names and templates). Specs are dicts with a `kind` and the fields below; every kind also
takes `limit` (evaluate only the first N examples, 0 = all). Unknown fields are errors.

  wds             path, split='test', classnames=None, templates=None
      The clip_benchmark / DataComp layout (`wds_<task>` folders, e.g. Hugging Face
      `djghosh/wds_imagenet1k_test`): PATH/SPLIT/{0..n-1}.tar (n from PATH/SPLIT/nshards.txt,
      else every *.tar there), PATH/classnames.txt, PATH/zeroshot_classification_templates.txt,
      optional PATH/dataset_type.txt. Samples have an image (jpg|jpeg|png|webp) and `cls` (the
      class index as text) or `txt` (captions, one per line). The tar headers are scanned once;
      members are then read by offset, without reading other samples.
  tfds            name, split, data_dir=None, image_key='image', label_key='label',
                  caption_key='captions/text', classnames=None, templates=None
      A prepared TFDS dataset in the ArrayRecord format, read with `builder.as_data_source`:
      no TensorFlow needed. Images are read undecoded and decoded here with PIL (as open_clip).
      TFRecord builds need TensorFlow's tf.data and are refused with a message; rebuild with
      `file_format='array_record'`. Class names default to the ClassLabel's names. Nested
      fields use '/', e.g. coco_captions' 'captions/text'; `mobileclip_jax` plain builds
      (launch/build_dataset.py --kind=plain) use caption_key='captions'.
  jsonl           path, image_root=None, image_key='image', caption_key='caption'
      One JSON object per line: the image path (relative to image_root, default the file's
      folder) and a caption string or list; lines naming the same image are one image with all
      their captions (image-caption pair files work as they are). Retrieval only.
  caption_folder  path
      Images (jpg|jpeg|png|webp) with a sibling `<stem>.txt` of captions, one per (non-blank)
      line.
      Retrieval only.
  class_folder    path, classnames=None, templates=None
      PATH/<class>/<images>, classes in sorted folder order; class names from
      PATH/classnames.txt (one per class folder, same order) or the folder names ('_' -> ' '),
      templates from PATH/zeroshot_classification_templates.txt or `templates`.
      Classification only.

Other packages add kinds with `register_source` (mobileclip_jax/plugins.py loads them): the demo
world's 'demo' kind is mobileclip_jax/demo/sources.py.

Class names and templates take the specs of `templates.py` (None = what the dataset ships).
"""
import dataclasses
import glob
import json
import os
import re
import tarfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mobileclip_jax import plugins
from mobileclip_jax import utils
from mobileclip_jax.data import wds
from mobileclip_jax.evaluation import templates as templates_lib

CLASSIFICATION = 'zeroshot'
RETRIEVAL = 'retrieval'
EVAL_TYPES = (CLASSIFICATION, RETRIEVAL)
IMAGE_EXTS = wds.IMAGE_EXTS
CLASSNAMES_FILE = 'classnames.txt'
TEMPLATES_FILE = 'zeroshot_classification_templates.txt'
# The webdataset grouping rule (the key ends at the first '.' of the basename), shared with wds.py.
_member_key = wds.split_member_name

ImageLike = Union[bytes, np.ndarray, Image.Image]


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation example.

  Attributes:
    image: encoded bytes, a uint8 [H, W, 3] (or [H, W]) array, or a PIL image.
    labels: classification: the class index for each task of the dataset.
    captions: retrieval: the image's captions (at least one).
    where: where it came from, for error messages ('shard.tar:key', a file, 'demo:val:12').
  """
  image: ImageLike
  labels: Tuple[int, ...] = ()
  captions: Tuple[str, ...] = ()
  where: str = ''


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """A zero-shot task: class names and prompt templates. `name` is '' for single-task data."""
  name: str
  classnames: Tuple[str, ...]
  templates: Tuple[str, ...]


class Examples:
  """Random access to `length` examples through `read(i)`."""

  def __init__(self, length: int, read: Callable[[int], Example]):
    self._length, self._read = length, read

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Example:
    if not 0 <= index < self._length:
      raise IndexError(f'Example {index} out of range [0, {self._length}).')
    return self._read(index)


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A dataset to evaluate: its examples and, for classification, its tasks."""
  description: str
  examples: Examples
  tasks: Tuple[ClassificationTask, ...] = ()


# ----------------------------------------------------------------------------------------------
# Webdataset folders (clip_benchmark / DataComp layout).


def _natural_key(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', os.path.basename(path))]


def _wds_shards(path: str, split: str) -> list:
  split_dir = os.path.join(path, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f'{split_dir} does not exist: a clip_benchmark/DataComp webdataset '
                            f'folder has one folder per split holding the tars (e.g. '
                            f'{os.path.join(path, "test", "0.tar")}).')
  nshards_file = os.path.join(split_dir, 'nshards.txt')
  if os.path.exists(nshards_file):
    with open(nshards_file) as f:
      count = int(f.read().strip())
    shards = [os.path.join(split_dir, f'{i}.tar') for i in range(count)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
      raise FileNotFoundError(f'{nshards_file} lists {count} shards but {len(missing)} are '
                              f'missing (e.g. {missing[0]}); the download is incomplete.')
  else:
    shards = sorted(glob.glob(os.path.join(split_dir, '*.tar')), key=_natural_key)
  if not shards:
    raise FileNotFoundError(f'No tar shards in {split_dir}.')
  return shards


def _scan_tar(shard: str, needed: str) -> list:
  """[(key, {ext: (offset, size)})] for every sample of a shard, from its headers only."""
  samples: Dict[str, Dict[str, Tuple[int, int]]] = {}
  try:
    with tarfile.open(shard, mode='r:') as tar:  # Random-access mode: data blocks are skipped.
      for info in tar:
        split = _member_key(info.name) if info.isreg() else None
        if split is None:
          continue
        members = samples.setdefault(split[0], {})
        if split[1] in members:
          raise ValueError(f'{shard}: sample {split[0]!r} has member {split[1]!r} twice.')
        members[split[1]] = (info.offset_data, info.size)
  except (tarfile.TarError, EOFError) as e:
    raise ValueError(f'{shard} is not a readable tar ({e}); re-download it.') from None
  for key, members in samples.items():
    if not members.keys() & set(IMAGE_EXTS) or needed not in members:
      raise ValueError(f'{shard}: sample {key!r} has members {sorted(members)}; evaluation needs '
                       f'an image ({"|".join(IMAGE_EXTS)}) and {needed!r}.')
  return list(samples.items())


def _read_range(path: str, offset: int, size: int) -> bytes:
  with open(path, 'rb') as f:
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise ValueError(f'{path} is truncated at offset {offset}; re-download it.')
  return data


def _open_wds(spec: Mapping[str, Any], eval_type: str) -> EvalData:
  path = os.path.expanduser(spec['path'])
  dataset_type_file = os.path.join(path, 'dataset_type.txt')
  if os.path.exists(dataset_type_file):
    with open(dataset_type_file) as f:
      stored_type = f.read().strip().lower()
    if (stored_type == 'retrieval') != (eval_type == RETRIEVAL):
      raise ValueError(f'{path} is a {stored_type} dataset ({dataset_type_file}); it cannot be '
                       f'used for a {eval_type} evaluation.')
  needed = 'cls' if eval_type == CLASSIFICATION else 'txt'
  shards = _wds_shards(path, spec.get('split', 'test'))
  index = [(shard, key, members) for shard in shards for key, members in _scan_tar(shard, needed)]

  def read(i: int) -> Example:
    shard, key, members = index[i]
    where = f'{shard}:{key}'
    image_ext = next(e for e in IMAGE_EXTS if e in members)
    image = _read_range(shard, *members[image_ext])
    text = _read_range(shard, *members[needed]).decode('utf-8')
    if eval_type == CLASSIFICATION:
      try:
        return Example(image, labels=(int(text.strip()),), where=where)
      except ValueError:
        raise ValueError(f'{where}: cls member {text[:40]!r} is not a class index.') from None
    return Example(image, captions=tuple(text.splitlines()), where=where)

  tasks = ()
  if eval_type == CLASSIFICATION:
    tasks = (_task_from_files(path, spec, f'webdataset {path}'),)
  return EvalData(f'wds:{path}/{spec.get("split", "test")}', Examples(len(index), read), tasks)


def _task_from_files(folder: str, spec: Mapping[str, Any], where: str,
                     default_classnames: Optional[Sequence[str]] = None) -> ClassificationTask:
  """Class names / templates from the spec, else from the folder's clip_benchmark files."""
  def shipped(filename, what):
    path = os.path.join(folder, filename)
    return templates_lib.read_lines(path, what) if os.path.exists(path) else None

  classnames = templates_lib.resolve_classnames(
      spec.get('classnames'), shipped(CLASSNAMES_FILE, 'Class names') or default_classnames,
      where)
  templates = templates_lib.resolve_templates(
      spec.get('templates'), shipped(TEMPLATES_FILE, 'Prompt templates'), where)
  return ClassificationTask('', classnames, templates)


# ----------------------------------------------------------------------------------------------
# TFDS (ArrayRecord builds, no TensorFlow).


def _feature_at(features, path: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = features
  for part in path.split('/'):
    while isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature.keys():
      return None
    feature = feature[part]
  return feature


def _value_at(example: Mapping[str, Any], path: str):
  value = example
  for part in path.split('/'):
    value = value[part]
  return value


def _open_tfds(spec: Mapping[str, Any], eval_type: str) -> EvalData:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, split = spec['name'], spec['split']
  data_dir = spec.get('data_dir') or None
  where = f'TFDS {name}:{split} (data_dir={data_dir or "default"})'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f'{where}: no such dataset ({str(e).splitlines()[0]}).') from None
  if not builder.is_prepared():
    raise FileNotFoundError(f'{where} is not prepared under {builder.data_dir}; build it with '
                            "file_format='array_record' (or use the webdataset layout).")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(f'{where} is stored as {builder.info.file_format.value}; reading it needs '
                     "TensorFlow. Rebuild it with file_format='array_record' (random access, no "
                     'TensorFlow) or use the webdataset layout.')
  features = builder.info.features
  image_key = spec.get('image_key', 'image')
  target_key = (spec.get('label_key', 'label') if eval_type == CLASSIFICATION
                else spec.get('caption_key', 'captions/text'))
  for key in (image_key, target_key):
    if _feature_at(features, key) is None:
      raise ValueError(f'{where} has no feature {key!r}; its features are '
                       f'{sorted(features.keys())}. Set image_key / label_key / caption_key.')
  # Top-level encoded images are decoded here with PIL, as open_clip does (tfds may use OpenCV).
  decoders = None
  if '/' not in image_key and isinstance(features[image_key], tfds.features.Image):
    decoders = {image_key: tfds.decode.SkipDecoding()}
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None

  def read(i: int) -> Example:
    example = source[i]
    where_i = f'{where}[{i}]'
    target = _value_at(example, target_key)
    if eval_type == CLASSIFICATION:
      return Example(_value_at(example, image_key), labels=(int(target),), where=where_i)
    captions = [target] if isinstance(target, (bytes, str)) else list(target)
    return Example(_value_at(example, image_key), where=where_i, captions=tuple(
        c.decode('utf-8') if isinstance(c, bytes) else str(c) for c in captions))

  tasks = ()
  if eval_type == CLASSIFICATION:
    label = _feature_at(features, target_key)
    names = getattr(label, 'names', None)
    tasks = (ClassificationTask(
        '', templates_lib.resolve_classnames(spec.get('classnames'), names, where),
        templates_lib.resolve_templates(spec.get('templates'), None, where)),)
  return EvalData(where, Examples(len(source), read), tasks)


# ----------------------------------------------------------------------------------------------
# Local files.


def _read_file(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _image_files(folder: str) -> list:
  return sorted(p for p in glob.glob(os.path.join(folder, '*'))
                if os.path.isfile(p) and p.rsplit('.', 1)[-1].lower() in IMAGE_EXTS)


def _as_captions(value: Any, where: str) -> list:
  captions = [value] if isinstance(value, str) else value
  if not isinstance(captions, list) or not captions or not all(
      isinstance(c, str) and c.strip() for c in captions):
    raise ValueError(f'{where}: the caption must be a non-empty string or list of strings, got '
                     f'{value!r}.')
  return captions


def _retrieval_files(pairs: Sequence[Tuple[str, Sequence[str]]], description: str) -> EvalData:
  def read(i: int) -> Example:
    path, captions = pairs[i]
    return Example(_read_file(path), captions=tuple(captions), where=path)
  return EvalData(description, Examples(len(pairs), read))


def _open_jsonl(spec: Mapping[str, Any]) -> EvalData:
  path = os.path.expanduser(spec['path'])
  root = os.path.expanduser(spec.get('image_root') or os.path.dirname(os.path.abspath(path)))
  image_key, caption_key = spec.get('image_key', 'image'), spec.get('caption_key', 'caption')
  captions: Dict[str, list] = {}  # Image path -> captions, in first-appearance order.
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where} is not valid JSON ({e}).') from None
      if not isinstance(record, dict) or not isinstance(record.get(image_key), str) or (
          caption_key not in record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{where} needs a string {image_key!r} and a {caption_key!r} (has '
                         f'{keys}); set image_key / caption_key.')
      image = os.path.join(root, record[image_key])
      captions.setdefault(image, []).extend(_as_captions(record[caption_key], where))
  missing = [p for p in captions if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} images named in {path} do not exist (e.g. '
                            f'{missing[0]}); set image_root to their folder.')
  return _retrieval_files(list(captions.items()), f'jsonl:{path}')


def _open_caption_folder(spec: Mapping[str, Any]) -> EvalData:
  folder = os.path.expanduser(spec['path'])
  pairs, missing = [], []
  for image in _image_files(folder):
    text = os.path.splitext(image)[0] + '.txt'
    if not os.path.exists(text):
      missing.append(text)
      continue
    with open(text, encoding='utf-8') as f:
      pairs.append((image, _as_captions([c for c in f.read().splitlines() if c.strip()], text)))
  if missing:
    raise FileNotFoundError(f'{len(missing)} images in {folder} have no caption file (e.g. '
                            f'{missing[0]}).')
  return _retrieval_files(pairs, f'caption_folder:{folder}')


def _open_class_folder(spec: Mapping[str, Any]) -> EvalData:
  folder = os.path.expanduser(spec['path'])
  class_dirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  items = [(image, label) for label, d in enumerate(class_dirs)
           for image in _image_files(os.path.join(folder, d))]
  task = _task_from_files(folder, spec, f'class folder {folder}',
                          [d.replace('_', ' ') for d in class_dirs])
  if len(task.classnames) != len(class_dirs):
    raise ValueError(f'{folder} has {len(class_dirs)} class folders but {len(task.classnames)} '
                     'class names; give one name per class folder, in sorted folder order.')

  def read(i: int) -> Example:
    path, label = items[i]
    return Example(_read_file(path), labels=(label,), where=path)

  return EvalData(f'class_folder:{folder}', Examples(len(items), read), (task,))


# ----------------------------------------------------------------------------------------------
# Dispatch.

_FIELDS = {
    'wds': ('path', 'split', 'classnames', 'templates'),
    'tfds': ('name', 'split', 'data_dir', 'image_key', 'label_key', 'caption_key', 'classnames',
             'templates'),
    'jsonl': ('path', 'image_root', 'image_key', 'caption_key'),
    'caption_folder': ('path',),
    'class_folder': ('path', 'classnames', 'templates'),
}
_REQUIRED = {'wds': ('path',), 'tfds': ('name', 'split'), 'jsonl': ('path',),
             'caption_folder': ('path',), 'class_folder': ('path',)}
_TYPES = {'jsonl': (RETRIEVAL,), 'caption_folder': (RETRIEVAL,),
          'class_folder': (CLASSIFICATION,)}
_OPENERS: Dict[str, Callable[[Dict[str, Any], str, int], 'EvalData']] = {
    'wds': lambda spec, eval_type, _: _open_wds(spec, eval_type),
    'tfds': lambda spec, eval_type, _: _open_tfds(spec, eval_type),
    'jsonl': lambda spec, *_: _open_jsonl(spec),
    'caption_folder': lambda spec, *_: _open_caption_folder(spec),
    'class_folder': lambda spec, *_: _open_class_folder(spec),
}
_PATH_KINDS = ('wds', 'jsonl', 'caption_folder', 'class_folder')


def register_source(kind: str, open_fn: Callable[[Dict[str, Any], str, int], 'EvalData'],
                    fields: Sequence[str], required: Sequence[str] = (),
                    types: Sequence[str] = EVAL_TYPES) -> None:
  """Adds a source kind: `open_fn(spec without 'kind' and 'limit', eval_type, image_size)`
  returns its `EvalData`; `fields` are the spec's valid fields, `types` its evaluation types."""
  if kind in _OPENERS:
    raise ValueError(f'Source kind {kind!r} is registered already.')
  _OPENERS[kind], _FIELDS[kind], _REQUIRED[kind] = open_fn, tuple(fields), tuple(required)
  if tuple(types) != EVAL_TYPES:
    _TYPES[kind] = tuple(types)


def kinds() -> Tuple[str, ...]:
  """The source kinds, plugins' included."""
  plugins.load()
  return tuple(_OPENERS)


class _Limited(Examples):
  def __init__(self, examples: Examples, limit: int):
    super().__init__(min(limit, len(examples)), examples.__getitem__)


def open_source(spec: Mapping[str, Any], eval_type: str, image_size: int) -> EvalData:
  """Opens the dataset a source spec describes (module docstring) for `eval_type`.

  Args:
    spec: {'kind': ..., **fields}.
    eval_type: 'zeroshot' or 'retrieval'.
    image_size: the model's input size (generated sources render at it).

  Raises:
    ValueError / FileNotFoundError: a bad spec, missing files or fields, no class names or
      templates, or no examples; the message names what is wrong.
  """
  spec = dict(spec)
  kind = spec.pop('kind', None)
  if kind not in kinds():
    raise ValueError(f'Source kind {kind!r} is not one of {kinds()} (source {spec}).')
  if eval_type not in EVAL_TYPES:
    raise ValueError(f'Evaluation type {eval_type!r} is not one of {EVAL_TYPES}.')
  if eval_type not in _TYPES.get(kind, EVAL_TYPES):
    raise ValueError(f'A {kind!r} source holds {_TYPES[kind][0]} data, not {eval_type} data.')
  limit = int(spec.pop('limit', 0) or 0)
  for key in spec:
    if key not in _FIELDS[kind]:
      raise ValueError(f'Unknown field {key!r} for a {kind!r} source.'
                       f'{utils.did_you_mean(key, _FIELDS[kind])}')
  missing = [k for k in _REQUIRED[kind] if not spec.get(k)]
  if missing:
    raise ValueError(f'A {kind!r} source needs {missing} (got {spec}).')
  if kind in _PATH_KINDS and not os.path.exists(os.path.expanduser(spec['path'])):
    raise FileNotFoundError(f'{kind} source path {spec["path"]} does not exist.')
  data = _OPENERS[kind](spec, eval_type, image_size)
  if limit:
    data = dataclasses.replace(data, examples=_Limited(data.examples, limit))
  if not len(data.examples):
    raise ValueError(f'{data.description} has no examples; check the path and split.')
  return data

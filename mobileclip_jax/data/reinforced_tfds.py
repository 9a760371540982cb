"""Reinforced (or plain image-caption) datasets as TFDS ArrayRecord: the format, and reading it.

A dataset is built from DataCompDR-style tar shards by dataset_build.py (locally or with Apache
Beam); `open_reinforced` reads it back with `tfds.data_source`: random access, no TensorFlow.

Features of one example ('reinforced'; a 'plain' dataset has only the first four):
  uid            text    the sample's uid (json member), else its key
  key            text    '<shard path relative to the shards' common folder>/<sample key>'
  image          bytes   the encoded image as stored (decode with PIL)
  captions       [C]     ground-truth captions (text)
  syn_captions   [S]     synthetic captions, all keys flattened in `metadata.syn_keys` order
  syn_key_index  int32 [S]  index into `metadata.syn_keys` of each synthetic caption
  paug           text    JSON list of the k stored augmentation parameter entries
  image_emb      [k, D]  teacher image embeddings, row a for augmentation a (`emb_dtype`)
  text_emb       [C+S, D] teacher text embeddings: the C captions, then the S synthetic ones
D = sum(metadata.teacher_dims); each per-teacher slice is unit-norm. Dataset-level facts are in
`DatasetMetadata`, stored as the TFDS metadata (metadata.json next to dataset_info.json); the
samples the build skipped are listed in `SKIPPED_FILE` beside them (one JSON line each: shard,
key, reason, count, detail).
"""
import dataclasses
import functools
import json
import os
import re
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds

from mobileclip_jax.data import sample_codec

VERSION = '1.0.0'
METADATA_FORMAT = 'mobileclip_jax.reinforced_tfds/1'
KINDS = ('reinforced', 'plain')
SKIPPED_FILE = 'skipped_samples.jsonl'
# float16 (the default) stores unit-norm embeddings (|x| <= 1) with 3 more mantissa bits than
# bfloat16 and holds every bfloat16 value above 6e-5 exactly; bfloat16 keeps a bfloat16 source
# (DataCompDR-12M-bf16) bit for bit.
EMB_DTYPES = {'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """Dataset-level facts, stored as the TFDS metadata (plain JSON, readable without this code).

  Attributes:
    kind: 'reinforced' or 'plain' (image-caption only: teachers, baselines).
    num_captions: C, ground-truth captions per sample.
    teachers: teacher names, in the order of their embedding slices.
    teacher_dims: per-teacher embedding width, e.g. (768, 768); D = their sum.
    k: stored augmentations (and image embeddings) per sample.
    syn_keys: synthetic-caption keys of syn.json, in the order of `syn_key_index`.
    syn_counts: synthetic captions per key (S = their sum).
    syn_key_regex: the regex that selected `syn_keys`.
    augmentation: the augmentation config the `paug` entries were sampled with.
    emb_dtype: storage dtype of the embeddings: 'float16', 'bfloat16' or 'float32'.
    tokenizer: tokenizer spec string for the student (see data/tokenizer.py).
    source_shards, image_shards: the input tar files.
    skipped: `SkipCounter.to_json()` of the build: what was skipped, by reason.
  """
  kind: str
  num_captions: int = 1
  teachers: tuple[str, ...] = ()
  teacher_dims: tuple[int, ...] = ()
  k: int = 0
  syn_keys: tuple[str, ...] = ()
  syn_counts: tuple[int, ...] = ()
  syn_key_regex: str = sample_codec.DEFAULT_SYN_KEY_REGEX
  augmentation: dict[str, Any] | None = None
  emb_dtype: str | None = None
  tokenizer: str = 'clip'
  source_shards: tuple[str, ...] = ()
  image_shards: tuple[str, ...] = ()
  skipped: dict[str, Any] = dataclasses.field(default_factory=dict)
  format: str = METADATA_FORMAT

  @property
  def embed_dim(self) -> int:
    return sum(self.teacher_dims)

  @property
  def num_syn(self) -> int:
    return sum(self.syn_counts)

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'DatasetMetadata':
    if data.get('format') != METADATA_FORMAT:
      raise ValueError(f'Metadata format {data.get("format")!r} is not {METADATA_FORMAT!r}: the '
                       'dataset was not built by launch/build_dataset.py (or by another version).')
    names = {f.name for f in dataclasses.fields(cls)}
    # JSON has no tuples: every top-level list is one of the tuple fields.
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in data.items() if k in names})


def features(meta: DatasetMetadata) -> tfds.features.FeaturesDict:
  """The TFDS features of one example (see the module docstring)."""
  spec = {
      'uid': tfds.features.Text(),
      'key': tfds.features.Text(),
      'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # bytes, never decoded by tfds
      'captions': tfds.features.Sequence(tfds.features.Text(), length=meta.num_captions),
  }
  if meta.kind == 'reinforced':
    # 'bytes': stored as raw little-endian values. Without it tfds writes every element as a
    # float32 proto field: twice the size for float16, 6x slower, and no bfloat16 at all.
    emb = functools.partial(tfds.features.Tensor, dtype=EMB_DTYPES[meta.emb_dtype],
                            encoding='bytes')
    spec.update({
        'syn_captions': tfds.features.Sequence(tfds.features.Text(), length=meta.num_syn),
        'syn_key_index': tfds.features.Tensor(shape=(meta.num_syn,), dtype=np.int32),
        'paug': tfds.features.Text(),
        'image_emb': emb(shape=(meta.k, meta.embed_dim)),
        'text_emb': emb(shape=(meta.num_captions + meta.num_syn, meta.embed_dim)),
    })
  return tfds.features.FeaturesDict(spec)


def read_reinforce_config(path_or_json: str) -> dict[str, Any]:
  """Reads a generation config as in ml-mobileclip training/configs/datacompdr12m.json.

  The one reader of Apple's format (the builder, launch/reinforce.py's --augmentation and the
  TFDS build of a generated folder all use it). `path_or_json` is a file path or JSON text.
  Returns {'augmentation', 'teachers', 'k', 'teacher_dims', 'syn_key_regex', 'emb_dtype',
  'tokenizer'}; entries the file does not set are None. Apple's files set the first three;
  this project's `launch/reinforce.py` also records the others. A file without the 'reinforce'
  section is taken as the augmentation config itself.
  """
  if os.path.isfile(path_or_json):
    with open(path_or_json, encoding='utf-8') as f:
      config = json.load(f)
  else:
    config = json.loads(path_or_json)
  out = dict.fromkeys(('augmentation', 'teachers', 'k', 'teacher_dims', 'syn_key_regex',
                       'emb_dtype', 'tokenizer'))
  if 'reinforce' not in config:
    return {**out, 'augmentation': config}
  if 'model_name' in config:
    models = config['model_name'].split(',')
    tags = config.get('pretrained', '').split(',')
    out['teachers'] = [f'{m}:{t}' if t else m for m, t in zip(models, tags + [''] * len(models))]
  out.update(augmentation=config['reinforce']['image_augmentation'], k=config.get('num_samples'))
  for key in ('teacher_dims', 'syn_key_regex', 'emb_dtype', 'tokenizer'):
    out[key] = config.get(key)
  return out


def dataset_dir(name: str, data_dir: str) -> str:
  """Folder of a built dataset: <data_dir>/<name>/<version>."""
  return os.path.join(os.path.expanduser(data_dir), name, VERSION)


def _find_version_dir(name_or_dir: str, data_dir: str | None) -> str:
  candidates = []
  if os.path.isdir(name_or_dir):
    candidates.append(name_or_dir)
  else:
    data_dir = os.path.expanduser(
        data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
    candidates.append(os.path.join(data_dir, name_or_dir))
  for folder in candidates:
    if os.path.exists(os.path.join(folder, 'dataset_info.json')):
      return folder
    versions = sorted((d for d in os.listdir(folder) if re.fullmatch(r'\d+\.\d+\.\d+', d)
                       and os.path.exists(os.path.join(folder, d, 'dataset_info.json'))),
                      key=lambda v: tuple(map(int, v.split('.')))) if os.path.isdir(folder) else []
    if versions:
      return os.path.join(folder, versions[-1])
  name = os.path.basename(os.path.normpath(name_or_dir))
  raise FileNotFoundError(
      f'No built dataset at {candidates[0]} (looked for dataset_info.json in it and in its '
      f'version folders). Build it with:\n  python launch/build_dataset.py '
      f"--src='SHARDS/{{00000000..00000063}}.tar' --name={name} "
      f'--data_dir={data_dir or os.path.dirname(os.path.normpath(name_or_dir))}')


def open_reinforced(name_or_dir: str, data_dir: str | None = None,
                    split: str = 'train') -> tuple[Any, DatasetMetadata]:
  """Opens a built dataset for random access, without TensorFlow.

  Args:
    name_or_dir: a dataset name (looked up in `data_dir`) or the dataset's folder
      (<data_dir>/<name> or <data_dir>/<name>/<version>).
    data_dir: TFDS data folder for a name (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    split: TFDS split expression, e.g. 'train' or 'train[:1000]'.

  Returns:
    (data_source, metadata): `data_source[i]` is a dict of numpy values (text and image as
    bytes, see the module docstring), `len(data_source)` the number of examples.
  """
  builder = tfds.builder_from_directory(_find_version_dir(name_or_dir, data_dir))
  meta = DatasetMetadata.from_json(dict(builder.info.metadata or {}))
  return builder.as_data_source(split=split), meta

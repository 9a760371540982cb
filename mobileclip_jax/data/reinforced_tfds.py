"""Reinforced (or plain image-caption) datasets as TFDS ArrayRecord, built from tar shards.

`build_dataset` turns DataCompDR-style webdataset shards (see `wds.py`) into a TFDS dataset
that `open_reinforced` reads back with `tfds.data_source`: random access, no TensorFlow.

Build, in two stages:
  1. Stage: a process pool reads, joins (DataCompDR-12M + image shards), decodes and validates
     each input shard into a per-shard staging file of ready examples, plus a JSON file with the
     shard's skip counts. Both are written under temporary names and renamed, and carry a
     fingerprint of the input file and the build settings, so a rerun after a crash skips every
     finished shard. Corrupt samples go through an `ErrorPolicy` (fail, or skip within a budget)
     and are counted by reason.
  2. Write: a `tfds.core.GeneratorBasedBuilder` reads the staging files in shard order and writes
     ArrayRecord. Record keys are '<shard path>/<sample key>', so a rebuild gives the same data.

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
`DatasetMetadata`, stored as the TFDS metadata (metadata.json next to dataset_info.json).
"""
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import time
from typing import Any, Iterator, Sequence

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError, ErrorPolicy, SkipCounter

VERSION = '1.0.0'
METADATA_FORMAT = 'mobileclip_jax.reinforced_tfds/1'
KINDS = ('reinforced', 'plain')
# float16 (the default) stores unit-norm embeddings (|x| <= 1) with 3 more mantissa bits than
# bfloat16 and holds every bfloat16 value above 6e-5 exactly; bfloat16 keeps a bfloat16 source
# (DataCompDR-12M-bf16) bit for bit.
EMB_DTYPES = {'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}

# Reasons for CorruptSampleError raised by the validation here (see also wds.py).
EMPTY_CAPTION = 'empty_caption'
EMB_WIDTH = 'emb_width'
EMB_NONFINITE = 'emb_nonfinite'
TOO_FEW_AUGMENTATIONS = 'too_few_augmentations'
SYN_MISMATCH = 'syn_mismatch'
# Expected when joining DataCompDR-12M with downloaded images: counted, never budgeted.
JOIN_MISSES = frozenset({wds.NO_IMAGE_FOR_UID, wds.IMAGE_WITHOUT_SAMPLE})

_PROBE_SAMPLES = 100  # Samples tried at the start of the first shard to learn the layout.
_NORM_TOLERANCE = 0.02  # Per-teacher embedding norms must be 1 within this (bf16 rounding).


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
  syn_key_regex: str = wds.DEFAULT_SYN_KEY_REGEX
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


# ----------------------------------------------------------------------------------------------
# Validation: one decoded sample -> one TFDS example.


def _embeddings(sample: wds.Sample, name: str, array: np.ndarray,
                meta: DatasetMetadata) -> np.ndarray:
  if array.shape[1] != meta.embed_dim:
    raise CorruptSampleError(sample.shard, sample.key, EMB_WIDTH,
                             f'{name} has width {array.shape[1]}, expected {meta.embed_dim} '
                             f'(teacher dims {list(meta.teacher_dims)})')
  with np.errstate(over='ignore', invalid='ignore'):
    stored = np.asarray(array, np.float32).astype(EMB_DTYPES[meta.emb_dtype])
  if not np.isfinite(stored).all():
    raise CorruptSampleError(sample.shard, sample.key, EMB_NONFINITE,
                             f'{name} has NaN/Inf (or values beyond {meta.emb_dtype} range)')
  return stored


def make_example(sample: wds.Sample, record_key: str, meta: DatasetMetadata) -> dict[str, Any]:
  """Validates a decoded sample against the dataset layout; returns its TFDS example.

  Raises CorruptSampleError for an empty caption, an image PIL cannot decode, synthetic
  captions whose keys or counts differ from the dataset's, fewer than k augmentations, and
  embeddings of the wrong width or with NaN/Inf.
  """
  shard, key = sample.shard, sample.key
  for kind, texts in (('caption', sample.captions), ('synthetic caption',
                                                      sample.syn_captions or [])):
    if any(not text.strip() for text in texts):
      raise CorruptSampleError(shard, key, EMPTY_CAPTION, f'a {kind} is empty')
  if len(sample.captions) != meta.num_captions:
    raise CorruptSampleError(shard, key, wds.EMB_ROWS, f'{len(sample.captions)} captions, '
                             f'expected {meta.num_captions}')
  wds.check_image(sample.image, shard, key)
  example = {'uid': sample.uid, 'key': record_key, 'image': sample.image,
             'captions': sample.captions}
  if meta.kind == 'plain':
    return example

  counts = tuple(np.bincount(sample.syn_key_index, minlength=len(sample.syn_keys)).tolist())
  if sample.syn_keys != meta.syn_keys or counts != meta.syn_counts:
    raise CorruptSampleError(shard, key, SYN_MISMATCH, f'synthetic captions per key '
                             f'{dict(zip(sample.syn_keys, counts))}, expected '
                             f'{dict(zip(meta.syn_keys, meta.syn_counts))}')
  if min(len(sample.paug), len(sample.image_emb)) < meta.k:
    raise CorruptSampleError(shard, key, TOO_FEW_AUGMENTATIONS,
                             f'{len(sample.paug)} paug entries and {len(sample.image_emb)} image '
                             f'embeddings, expected k={meta.k}')
  example.update(
      syn_captions=sample.syn_captions,
      syn_key_index=sample.syn_key_index,
      # Only the first k are kept, so that entry a and image_emb[a] stay paired.
      paug=json.dumps(sample.paug[:meta.k], separators=(',', ':')),
      image_emb=_embeddings(sample, 'image_emb', sample.image_emb[:meta.k], meta),
      text_emb=_embeddings(sample, 'text_emb', sample.text_emb, meta))
  return example


# ----------------------------------------------------------------------------------------------
# Stage 1: per-shard staging files, in parallel and resumable.


@dataclasses.dataclass(frozen=True)
class _ShardJob:
  """Everything a worker process needs to stage one input shard."""
  index: int
  shard: str
  image_shard: str | None
  name: str  # The shard's path relative to the common folder of all shards: key prefix.
  meta: DatasetMetadata
  policy: ErrorPolicy
  staging_dir: str

  @property
  def examples_path(self) -> str:
    return os.path.join(self.staging_dir, f'{self.index:08d}.examples')

  @property
  def stats_path(self) -> str:
    return os.path.join(self.staging_dir, f'{self.index:08d}.json')

  def fingerprint(self) -> str:
    """Hash of the inputs (path, size, mtime) and of every setting that shapes the output."""
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
             for p in (self.shard, self.image_shard) if p]
    settings = dataclasses.replace(self.meta, source_shards=(), image_shards=(), skipped={})
    payload = json.dumps([files, self.name, settings.to_json(), self.policy.mode,
                          sorted(self.policy.exempt)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_json_atomic(path: str, value: Any) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f)
  os.replace(tmp, path)


def _staged_counter(job: _ShardJob) -> SkipCounter | None:
  """The counts of a shard staged by an earlier run with the same fingerprint, else None."""
  try:
    with open(job.stats_path, encoding='utf-8') as f:
      stats = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if stats.get('fingerprint') != job.fingerprint() or not os.path.exists(job.examples_path):
    return None
  return SkipCounter.from_json(stats['counter'])


def _stage_shard(job: _ShardJob) -> SkipCounter:
  """Reads, validates and stages one shard (runs in a worker process); returns its counts."""
  counter = SkipCounter()

  def handle(error: CorruptSampleError) -> None:
    job.policy.handle(error, counter, check_budget=False)  # _stage_all checks the totals.

  samples = wds.iter_samples(job.shard, handle)
  if job.image_shard:
    samples = wds.join_by_uid(samples, wds.iter_samples(job.image_shard, handle), handle)
  reinforced = job.meta.kind == 'reinforced'
  tmp = f'{job.examples_path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'wb') as f:
      for raw in samples:
        try:
          sample = wds.decode_sample(raw, reinforced, job.meta.syn_key_regex)
          example = make_example(sample, f'{job.name}/{raw.key}', job.meta)
        except CorruptSampleError as e:
          handle(e)
          continue
        pickle.dump(example, f, protocol=pickle.HIGHEST_PROTOCOL)
        counter.ok()
    os.replace(tmp, job.examples_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _write_json_atomic(job.stats_path, {'fingerprint': job.fingerprint(), 'shard': job.shard,
                                      'counter': counter.to_json()})
  return counter


def _read_staged(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  with open(path, 'rb') as f:
    while True:
      try:
        example = pickle.load(f)
      except EOFError:
        return
      yield example['key'], example


def _stage_all(jobs: Sequence[_ShardJob], workers: int, policy: ErrorPolicy,
               progress: bool) -> tuple[SkipCounter, int, int]:
  """Stages every shard not staged before.

  Returns:
    (counts merged over all shards, shards reused from an earlier run, samples read now).
  """
  total, todo = SkipCounter(), []
  for job in jobs:
    counter = _staged_counter(job)
    if counter is None:
      todo.append(job)
    else:
      total.merge(counter)
  reused = len(jobs) - len(todo)
  policy.check(total)
  bar = tqdm.tqdm(desc=f'Validating {len(todo)} shards ({reused} done before)', unit=' samples',
                  disable=not progress, smoothing=0.1)
  done, read = reused, 0

  def finished(counter: SkipCounter) -> None:
    nonlocal done, read
    done += 1
    read += counter.seen
    total.merge(counter)
    bar.update(counter.seen)
    bar.set_postfix(shards=f'{done}/{len(jobs)}', skipped=sum(total.skipped.values()))
    policy.check(total)

  with bar:
    if workers <= 1 or len(todo) <= 1:
      for job in todo:
        finished(_stage_shard(job))
    else:
      # 'spawn': the parent may have started JAX's threads, which fork() does not survive.
      context = multiprocessing.get_context('spawn')
      with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)),
                                                  mp_context=context) as pool:
        futures = [pool.submit(_stage_shard, job) for job in todo]
        try:
          for future in concurrent.futures.as_completed(futures):
            finished(future.result())
        except BaseException:
          # Shards already running finish and stay staged for the next run.
          pool.shutdown(wait=True, cancel_futures=True)
          raise
  policy.check(total, final=True)
  return total, reused, read


# ----------------------------------------------------------------------------------------------
# Stage 2: the TFDS builder.


class ReinforcedDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes staged examples as one 'train' split of ArrayRecord files.

  The dataset name is chosen per build (so it is an instance attribute, as in tfds'
  ReadOnlyBuilder); readers need only the folder it writes (`open_reinforced`).
  """
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Reinforced or plain image-caption examples from tar shards.'}
  # tfds looks for a checksums file next to a packaged builder's code through the
  # importlib_resources backport, which it does not install on Python >= 3.9. Nothing here is
  # downloaded, so there is no such file.
  code_path = None

  def __init__(self, *, name: str, metadata: DatasetMetadata, staged_files: Sequence[str],
               data_dir: str):
    self.name = name
    self._metadata, self._staged_files = metadata, tuple(staged_files)
    super().__init__(data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() looks for README files next to the module.
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self._metadata.kind} image-caption data built by '
        'mobileclip_jax launch/build_dataset.py', features=features(self._metadata),
        metadata=tfds.core.MetadataDict(self._metadata.to_json()))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in self._staged_files:
      yield from _read_staged(path)


# ----------------------------------------------------------------------------------------------
# Build.


@dataclasses.dataclass
class BuildReport:
  """What a build did: output folder, examples written, skips by reason, shards and time."""
  path: str
  num_examples: int
  counter: SkipCounter
  num_shards: int
  shards_reused: int
  samples_read: int  # by this run (shards staged before are not read again)
  seconds: float
  metadata: DatasetMetadata

  def summary(self) -> str:
    rate = self.samples_read / self.seconds if self.seconds > 0 else 0.0
    return '\n'.join([
        f'Wrote {self.num_examples} {self.metadata.kind} examples to {self.path} in '
        f'{self.seconds:.1f} s ({rate:.0f} samples/s).',
        f'Input: {self.num_shards} shards ({self.shards_reused} staged by an earlier run).',
        self.counter.summary()])


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


def _probe(shards: Sequence[str], image_shards: Sequence[str] | None, kind: str,
           syn_key_regex: str) -> tuple[str, wds.Sample]:
  """(kind, first decodable sample) of the first shard; errors here are counted later."""
  first = next(wds.iter_samples(shards[0], lambda e: None), None)
  if first is None:
    raise ValueError(f'No sample could be read from the first shard {shards[0]}.')
  members = set(first.members)
  if kind == 'auto':
    kind = 'reinforced' if 'paug.json' in members or members & set(wds.EMB_EXTS) else 'plain'
  if kind not in KINDS:
    raise ValueError(f'Unknown kind {kind!r}: use auto, reinforced or plain.')
  if image_shards and kind == 'plain':
    raise ValueError('--images_src joins reinforcement-only shards with images; a plain '
                     'dataset reads images and captions from --src alone.')
  if not members & set(wds.IMAGE_EXTS) and not image_shards:
    raise ValueError(f'{first.shard}: sample {first.key!r} has no image ({sorted(members)}). '
                     'This is the DataCompDR-12M layout: pass the matching DataComp-12M image '
                     "shards with --images_src='.../{00000000..00001023}.tar'.")
  samples = wds.iter_samples(shards[0], lambda e: None)
  if image_shards:
    samples = wds.join_by_uid(samples, wds.iter_samples(image_shards[0], lambda e: None),
                              lambda e: None)
  error = None
  for raw, _ in zip(samples, range(_PROBE_SAMPLES)):
    try:
      return kind, wds.decode_sample(raw, kind == 'reinforced', syn_key_regex)
    except CorruptSampleError as e:
      error = e
  raise ValueError(f'None of the first {_PROBE_SAMPLES} samples of {shards[0]} could be '
                   f'decoded as {kind} data; last error: {error}')


def _teacher_dims(sample: wds.Sample, given: Sequence[int] | None) -> tuple[int, ...]:
  """Per-teacher widths: given (checked) or inferred from unit-norm slices of the embeddings."""
  rows = np.concatenate([sample.image_emb, sample.text_emb]).astype(np.float32)
  width = rows.shape[1]
  if given:
    dims = tuple(int(d) for d in given)
    if sum(dims) != width:
      raise ValueError(f'--teacher_dims {list(dims)} sum to {sum(dims)}, but the embeddings in '
                       f'{sample.shard}:{sample.key} are {width} wide.')
  else:
    count = int(round(float(np.mean(np.sum(rows**2, axis=1)))))
    if count < 1 or width % count:
      raise ValueError(f'Cannot infer the teacher widths from {width}-wide embeddings with '
                       f'squared norm ~{count}: pass --teacher_dims.')
    dims = (width // count,) * count
  bounds = np.cumsum((0,) + dims)
  norms = np.stack([np.linalg.norm(rows[:, a:b], axis=1) for a, b in zip(bounds, bounds[1:])])
  if np.abs(norms - 1).max() > _NORM_TOLERANCE:
    raise ValueError(
        f'The embeddings of {sample.shard}:{sample.key} split as teacher dims {list(dims)} have '
        f'per-teacher norms in [{norms.min():.3f}, {norms.max():.3f}], not 1: each teacher\'s '
        'slice must be unit-norm. Pass the right --teacher_dims (e.g. 768,768 for DataCompDR).')
  return dims


def _dataset_metadata(kind: str, sample: wds.Sample, *, teachers, teacher_dims, k,
                      augmentation, emb_dtype, tokenizer, syn_key_regex, shards,
                      image_shards) -> DatasetMetadata:
  common = dict(kind=kind, num_captions=len(sample.captions), tokenizer=tokenizer,
                syn_key_regex=syn_key_regex, source_shards=tuple(shards),
                image_shards=tuple(image_shards or ()))
  if kind == 'plain':
    return DatasetMetadata(**common)
  if emb_dtype not in EMB_DTYPES:
    raise ValueError(f'emb_dtype {emb_dtype!r} is not one of {sorted(EMB_DTYPES)}.')
  if augmentation is None:
    raise ValueError('A reinforced dataset needs the augmentation config its paug entries were '
                     'sampled with, e.g. ml-mobileclip training/configs/datacompdr12m.json: pass '
                     '--reinforce_config=FILE.')
  if not sample.syn_keys:
    raise ValueError(f'{sample.shard}:{sample.key}: no syn.json key matches '
                     f'{syn_key_regex!r}; set --syn_key_regex.')
  dims = _teacher_dims(sample, teacher_dims)
  teachers = tuple(teachers) if teachers else tuple(f'teacher{i}' for i in range(len(dims)))
  if len(teachers) != len(dims):
    raise ValueError(f'{len(teachers)} teacher names {list(teachers)} for {len(dims)} teacher '
                     f'dims {list(dims)}.')
  counts = np.bincount(sample.syn_key_index, minlength=len(sample.syn_keys))
  stored = min(len(sample.paug), len(sample.image_emb))
  if k and k > stored:
    raise ValueError(f'k={k} but {sample.shard}:{sample.key} stores {stored} augmentations.')
  return DatasetMetadata(
      **common, teachers=teachers, teacher_dims=dims, k=int(k) if k else stored,
      syn_keys=sample.syn_keys, syn_counts=tuple(int(c) for c in counts),
      augmentation=augmentation, emb_dtype=emb_dtype)


def dataset_dir(name: str, data_dir: str) -> str:
  """Folder of a built dataset: <data_dir>/<name>/<version>."""
  return os.path.join(os.path.expanduser(data_dir), name, VERSION)


def build_dataset(src: str | Sequence[str], name: str, data_dir: str, *,
                  images_src: str | Sequence[str] | None = None, kind: str = 'auto',
                  workers: int = 1, policy: ErrorPolicy = ErrorPolicy(),
                  emb_dtype: str = 'float16', teachers: Sequence[str] | None = None,
                  teacher_dims: Sequence[int] | None = None, k: int | None = None,
                  augmentation: dict[str, Any] | None = None, tokenizer: str = 'clip',
                  syn_key_regex: str = wds.DEFAULT_SYN_KEY_REGEX,
                  staging_dir: str | None = None, keep_staging: bool = False,
                  overwrite: bool = False, progress: bool = True) -> BuildReport:
  """Builds the TFDS dataset `name` in `data_dir` from tar shards; see the module docstring.

  Args:
    src: shard patterns (see `wds.expand_shards`).
    name: dataset name (lower_snake_case).
    data_dir: TFDS data folder; the dataset goes to <data_dir>/<name>/<VERSION>.
    images_src: image+caption shards to join with `src` shard by shard (DataCompDR-12M).
    kind: 'reinforced', 'plain' or 'auto' (reinforced if the shards have paug/embeddings).
    workers: processes validating shards in parallel.
    policy: what to do with corrupt samples.
    emb_dtype: storage of the embeddings: 'float16', 'bfloat16' or 'float32'.
    teachers, teacher_dims: teacher names and widths; widths are inferred if the embeddings
      are concatenations of equal-width unit-norm slices.
    k: augmentations kept per sample (default: as many as the first sample has).
    augmentation: the augmentation config (required for reinforced data).
    tokenizer: tokenizer spec string recorded in the metadata.
    syn_key_regex: which syn.json keys are synthetic captions.
    staging_dir: where per-shard staging files go (default <data_dir>/<name>.staging); kept
      after a failure so that a rerun resumes, deleted after success unless `keep_staging`.
    overwrite: replace an existing build of this dataset.
    progress: show progress bars.

  Returns:
    A `BuildReport`. Raises `CorruptSampleError` (policy 'fail') naming shard and sample, or
    `BudgetExceededError` (policy 'skip') with the counts by reason.
  """
  start = time.time()
  data_dir = os.path.expanduser(data_dir)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'Dataset name {name!r} must be lower_snake_case (TFDS naming).')
  out_dir = dataset_dir(name, data_dir)
  built_before = os.path.exists(os.path.join(out_dir, 'dataset_info.json'))
  if built_before and not overwrite:
    raise FileExistsError(f'{out_dir} already holds a built dataset {name!r}; pass '
                          '--overwrite to rebuild it or choose another --name.')
  shards = [os.path.abspath(p) for p in wds.expand_shards(src)]
  image_shards = [os.path.abspath(p) for p in wds.expand_shards(images_src)] if images_src else None
  if image_shards is not None and len(image_shards) != len(shards):
    raise ValueError(f'--images_src has {len(image_shards)} shards but --src has {len(shards)}: '
                     'they are joined shard by shard, in pattern order.')
  if image_shards:
    policy = dataclasses.replace(policy, exempt=policy.exempt | JOIN_MISSES)

  kind, sample = _probe(shards, image_shards, kind, syn_key_regex)
  meta = _dataset_metadata(kind, sample, teachers=teachers, teacher_dims=teacher_dims, k=k,
                           augmentation=augmentation, emb_dtype=emb_dtype, tokenizer=tokenizer,
                           syn_key_regex=syn_key_regex, shards=shards, image_shards=image_shards)
  staging_dir = staging_dir or os.path.join(data_dir, f'{name}.staging')
  os.makedirs(staging_dir, exist_ok=True)
  root = os.path.commonpath([os.path.dirname(p) for p in shards])
  job_meta = dataclasses.replace(meta, source_shards=(), image_shards=())
  jobs = [_ShardJob(i, shard, image_shards[i] if image_shards else None,
                    os.path.relpath(shard, root), job_meta, policy, staging_dir)
          for i, shard in enumerate(shards)]
  counter, reused, samples_read = _stage_all(jobs, workers, policy, progress)

  meta = dataclasses.replace(meta, skipped=counter.to_json())
  if built_before:  # Removed only now that the new data is staged.
    shutil.rmtree(out_dir)
  builder = ReinforcedDatasetBuilder(name=name, metadata=meta, data_dir=data_dir,
                                     staged_files=[job.examples_path for job in jobs])
  builder.download_and_prepare()
  if not keep_staging:
    shutil.rmtree(staging_dir)
  return BuildReport(path=builder.data_dir, num_examples=builder.info.splits['train'].num_examples,
                     counter=counter, num_shards=len(shards), shards_reused=reused,
                     samples_read=samples_read, seconds=time.time() - start, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Reading.


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

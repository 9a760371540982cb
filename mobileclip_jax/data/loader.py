"""The training input pipeline: a built TFDS dataset -> process-local numpy batches, on Grain.

Order. The global example stream is the concatenation of epochs; epoch e visits every record
once, in a permutation of the dataset drawn from (seed, e) (Grain's `index_shuffle`: O(1)
memory at any dataset size). Global batch t is stream positions [t*G, (t+1)*G), G the global
batch size; process p of P reads positions t*G + p*G/P ... t*G + (p+1)*G/P - 1, so the processes'
slices of every global batch are disjoint and together make it, and the global batch does not
depend on P. A batch may straddle two epochs; with `num_epochs` set, the last incomplete global
batch is dropped.

Per example, every random choice comes from one generator seeded by (seed, epoch, position in
the epoch), so a batch is a pure function of (config, t): the result does not depend on the
number of processes, workers or threads, and an iterator restored at batch t continues bit for
bit. For a reinforced example the draws are, in order (Apple's `preprocess_dr`): the stored
augmentation a ~ U{0..k-1}, the ground-truth caption c ~ U{0..C-1}, a synthetic-caption key
uniform among the dataset's keys that match `syn_key_regex` (or in proportion to
`syn_key_weights`), then a caption uniform within that key (among its first `num_syn` when set),
whose teacher row is the stored embedding of that caption (Apple's `sample[key + "_emb"][idx]`).
The image is augmentation a replayed at the student's size; the teacher rows are image_emb[a],
text_emb[c] and text_emb[C + s], restricted to the embedding slices of the `teachers` selected
when set (distilling from fewer teachers than the dataset stores). A plain example draws c, then
fresh augmentation parameters (`augment.sample_params` with `InputConfig.augmentation`).

Bad records (undecodable image, invalid paug entry, NaN/Inf in a teacher row used) are found
while loading. Their CorruptSampleError travels with the data to the main process, where the
`ErrorPolicy` raises it (naming the dataset, record index, key and uid) or counts it (and lists
it in the `skipped_log` file); a skipped record is replaced by a record drawn from the same
generator, so the batch stays full and deterministic. The builder ran the same paug validator
and stricter embedding checks on every record, so this happens only for damaged files.

Work is split into chunks of at most `max_chunk_size` consecutive examples of the process's
stream, so that a worker holds a few chunks rather than whole pod-size local batches: a Grain
`MapDataset` over chunk indices builds chunks in `read_threads` threads, in worker processes
with `worker_count > 0` (`mp_prefetch`, which keeps chunk order), and the main process
concatenates each batch's chunks. The iterator's state is the next batch index plus the skip
counts, saved per process by Grain's Orbax handler (`grain.checkpoint.CheckpointSave` /
`CheckpointRestore`); it can be restored with any worker or thread count.
"""
import dataclasses
import io
import json
import os
import re
import sys
from typing import Any

from absl import flags
import grain
import numpy as np
from PIL import Image

from mobileclip_jax import keys
from mobileclip_jax import utils
from mobileclip_jax.data import augment
from mobileclip_jax.data import errors
from mobileclip_jax.data import jpeg_rows
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.data.errors import (CorruptSampleError, ErrorPolicy, SkipCounter, SkipLog,
                                        read_skip_log)

# Records tried for one example before giving up: only a dataset that is mostly corrupt gets here.
MAX_ATTEMPTS = 32
_ERRORS = '_corrupt'  # Chunk entry carrying the load-time errors to the main process.
_STATE_FORMAT = 'mobileclip_jax.pipeline/1'


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Everything that shapes the training batches.

  Attributes:
    dataset: a built dataset's name (looked up in `data_dir`) or folder (see `open_reinforced`).
    data_dir: TFDS data folder for a name (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    split: TFDS split expression, e.g. 'train' or 'train[:90%]'.
    global_batch_size: examples per step over all processes; divisible by the process count.
    image_size: the student's input side in pixels.
    tokenizer: tokenizer spec (see `tokenizer.get_tokenizer`); None: the dataset's own.
    context_length: token row length L for captions and synthetic captions.
    syn_key_regex: synthetic-caption keys to sample from (matched with `re.match`).
    syn_key_weights: (key, weight) pairs: relative weights of those keys in the key draw
      (a key not listed weighs 1); () draws the key uniformly, as Apple's training code.
    seed: seed of the shuffle and of every per-example choice.
    num_epochs: passes over the data; None repeats forever.
    worker_count: processes that build chunks of batches (0: this process does).
    read_threads: threads per process (main or worker) that build chunks concurrently.
    prefetch_batches: batches built ahead (the prefetch buffer), shared among the workers.
    max_chunk_size: most examples per unit of work (the largest divisor of the local batch
      size up to this): bounds what a thread or worker holds; batches do not depend on it.
    error_policy: 'fail' or 'skip' for corrupt records.
    error_budget: with 'skip', the most records to skip: a count ('100') or a fraction
      ('0.001', '0.1%') of the examples seen by this process.
    augmentation: how a plain dataset's images are augmented (fresh parameters per example,
      RandAugment magnitudes for `image_size`: its own `image_size` is ignored); reinforced
      datasets replay their stored parameters instead.
    teachers: indices of the stored teachers (`DatasetMetadata.teachers` order) whose embedding
      slices the batches carry, in this order; None: all. Reinforced datasets only.
    num_syn: synthetic captions drawn from per key: its first `num_syn` (at most what every
      selected key stores); None: all. Reinforced datasets only.
  """
  dataset: str
  data_dir: str | None = None
  split: str = 'train'
  global_batch_size: int = 256
  image_size: int = 256
  tokenizer: str | None = None
  context_length: int = tokenizer_lib.DEFAULT_CONTEXT_LENGTH
  syn_key_regex: str = sample_codec.DEFAULT_SYN_KEY_REGEX
  syn_key_weights: tuple[tuple[str, float], ...] = ()
  seed: int = 0
  num_epochs: int | None = None
  worker_count: int = 0
  read_threads: int = 2
  prefetch_batches: int = 2
  max_chunk_size: int = 64
  error_policy: str = 'fail'
  error_budget: str | None = None
  augmentation: augment.AugmentConfig = augment.AugmentConfig()
  teachers: tuple[int, ...] | None = None
  num_syn: int | None = None

  def __post_init__(self):
    if self.teachers is not None:  # Config values arrive as lists.
      object.__setattr__(self, 'teachers', tuple(self.teachers))
      if (not self.teachers or len(set(self.teachers)) != len(self.teachers)
          or any(not isinstance(t, int) or t < 0 for t in self.teachers)):
        raise ValueError(f'InputConfig.teachers (data.teachers) must list distinct teacher '
                         f'indices >= 0, e.g. (0,); got {self.teachers}.')
    if self.num_syn is not None and self.num_syn < 1:
      raise ValueError(f'InputConfig.num_syn (data.num_syn) must be >= 1 or None (all); got '
                       f'{self.num_syn}.')
    positive = ('global_batch_size', 'image_size', 'read_threads', 'prefetch_batches',
                'max_chunk_size')
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f'InputConfig.{name} must be >= 1; got {getattr(self, name)}.')
    if self.worker_count < 0:
      raise ValueError(f'InputConfig.worker_count must be >= 0; got {self.worker_count}.')
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f'InputConfig.num_epochs must be >= 1 or None (forever); got '
                       f'{self.num_epochs}.')
    if self.context_length < 2:
      raise ValueError(f'InputConfig.context_length must be >= 2; got {self.context_length}.')
    if self.seed < 0:
      raise ValueError(f'InputConfig.seed must be >= 0; got {self.seed}.')
    ErrorPolicy.parse(self.error_policy, self.error_budget)  # Fails early on a bad pair.

  @property
  def policy(self) -> ErrorPolicy:
    return ErrorPolicy.parse(self.error_policy, self.error_budget)


@dataclasses.dataclass(frozen=True)
class ReinforcedChoices:
  """Draws (augmentation a, caption c, synthetic caption s) for one reinforced example.

  Attributes:
    k: stored augmentations.
    num_captions: C, ground-truth captions.
    syn_starts, syn_counts: the selected keys' captions are [start, start + count) in the
      flattened synthetic captions.
    syn_cumulative: cumulative normalized key weights (the last is 1), or () for uniform keys.
  """
  k: int
  num_captions: int
  syn_starts: tuple[int, ...]
  syn_counts: tuple[int, ...]
  syn_cumulative: tuple[float, ...] = ()

  @classmethod
  def for_dataset(cls, meta: reinforced_tfds.DatasetMetadata, regex: str,
                  weights: tuple[tuple[str, float], ...] = (),
                  num_syn: int | None = None) -> 'ReinforcedChoices':
    """Choices over the synthetic-caption keys of `meta` that `regex` matches (`re.match`),
    drawn in proportion to `weights` ((key, weight) pairs; unlisted keys weigh 1), each
    restricted to its first `num_syn` captions when set."""
    offsets = np.concatenate([[0], np.cumsum(meta.syn_counts)]).astype(int)
    chosen = [i for i, key in enumerate(meta.syn_keys) if re.match(regex, key)]
    if not chosen:
      raise ValueError(f'No synthetic-caption key of the dataset matches syn_key_regex '
                       f'{regex!r}; its keys are {list(meta.syn_keys)}.')
    cumulative = ()
    if weights:
      names = [meta.syn_keys[i] for i in chosen]
      weights = dict(weights)
      unknown = sorted(set(weights) - set(names))
      if unknown:
        raise ValueError(f'data.syn_key_weights names {unknown}, which are not among the keys '
                         f'syn_key_regex {regex!r} selects: {names}.')
      w = np.asarray([float(weights.get(name, 1.0)) for name in names])
      if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f'data.syn_key_weights must be finite, >= 0 and not all 0; got '
                         f'{dict(zip(names, w.tolist()))}.')
      cumulative = tuple(np.cumsum(w / w.sum()).tolist()[:-1]) + (1.0,)
    counts = [int(meta.syn_counts[i]) for i in chosen]
    if num_syn is not None:
      if num_syn > min(counts):
        stored = {meta.syn_keys[i]: n for i, n in zip(chosen, counts)}
        raise ValueError(f'num_syn (data.num_syn) {num_syn} is more than the dataset stores per '
                         f'image: {stored} synthetic captions per key.')
      counts = [num_syn] * len(chosen)
    return cls(meta.k, meta.num_captions, tuple(int(offsets[i]) for i in chosen), tuple(counts),
               cumulative)

  def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
    """(a, c, s): a ~ U{0..k-1}, c ~ U{0..C-1}, a key (uniform, or by weight), then s uniform
    within it."""
    a = int(rng.integers(self.k))
    c = int(rng.integers(self.num_captions))
    if self.syn_cumulative:
      key = int(np.searchsorted(self.syn_cumulative, rng.random(), side='right'))
    else:
      key = int(rng.integers(len(self.syn_starts)))
    return a, c, self.syn_starts[key] + int(rng.integers(self.syn_counts[key]))


def teacher_columns(meta: reinforced_tfds.DatasetMetadata,
                    teachers: tuple[int, ...] | None) -> tuple[tuple[int, ...], np.ndarray | None]:
  """(teacher dims, columns of the stored [.., D] embeddings) of the selected teachers;
  columns None when all are selected (the stored rows as they are)."""
  if teachers is None:
    return tuple(meta.teacher_dims), None
  if meta.kind != 'reinforced':
    raise ValueError(f'data.teachers={teachers} selects teachers, but the dataset is '
                     f'{meta.kind} (no teacher embeddings); drop data.teachers.')
  unknown = [t for t in teachers if t >= len(meta.teacher_dims)]
  if unknown:
    stored = ', '.join(f'{i}: {name}' for i, name in enumerate(meta.teachers))
    raise ValueError(f'data.teachers={teachers}: no teacher {unknown}; the dataset stores '
                     f'{len(meta.teacher_dims)} ({stored}).')
  offsets = np.concatenate([[0], np.cumsum(meta.teacher_dims)]).astype(int)
  columns = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in teachers])
  return tuple(int(meta.teacher_dims[t]) for t in teachers), columns


def shuffled_index(seed: int, epoch: int, position: int, num_examples: int) -> int:
  """Element `position` of epoch `epoch`'s permutation of range(num_examples).

  Grain's `index_shuffle` (a Feistel network with cycle walking: O(1) memory; a few
  microseconds per call from ~1e5 examples up, slower below, where cycles walk longer).
  """
  # The epoch's shuffle seed is hashed from (seed, epoch): no two pairs share a permutation.
  epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
  return grain.experimental.index_shuffle(position, max_index=num_examples - 1, seed=epoch_seed,
                                          rounds=4)


class ChunkLoader:
  """Builds chunk u of this process's examples (a pure function of u); picklable for workers.

  This process's batch t is chunks t * chunks_per_batch ... (t + 1) * chunks_per_batch - 1, in
  order, each of `chunk_size` examples. A chunk holds the keys of `element_spec` plus the
  CorruptSampleErrors met on the way (see `concat_chunks` and `TrainIterator`).
  """

  def __init__(self, config: InputConfig, source: Any, meta: reinforced_tfds.DatasetMetadata,
               dataset_path: str, process_index: int, process_count: int):
    """Args:
      config: the input settings.
      source: the records: `source[i]` is a dict as `open_reinforced`'s data source returns.
      meta: the dataset's metadata.
      dataset_path: names the dataset in error messages.
      process_index, process_count: which slice of every global batch this process reads.
    """
    self.config, self.meta = config, meta
    self.reinforced = meta.kind == 'reinforced'
    self._source, self._path = source, dataset_path
    self.num_examples = len(source)
    self.local_batch_size = config.global_batch_size // process_count
    self._first = process_index * self.local_batch_size  # This process's offset in a batch.
    self.chunk_size = max(d for d in range(1, min(self.local_batch_size,
                                                  config.max_chunk_size) + 1)
                          if self.local_batch_size % d == 0)
    self.chunks_per_batch = self.local_batch_size // self.chunk_size
    if not self.reinforced and config.num_syn is not None:
      raise ValueError(f'data.num_syn={config.num_syn} selects synthetic captions, but '
                       f'{dataset_path} is {meta.kind} (none stored); drop data.num_syn.')
    self.teacher_dims, self._columns = teacher_columns(meta, config.teachers)
    if self.reinforced:
      self._choices = ReinforcedChoices.for_dataset(meta, config.syn_key_regex,
                                                    config.syn_key_weights, config.num_syn)
      self._augment_config = augment.from_generation_config(meta.augmentation)
    else:  # RandAugment applies to the student-size crop, as torchvision's would.
      self._augment_config = dataclasses.replace(config.augmentation,
                                                 image_size=config.image_size)
    self._tokenizer_spec = config.tokenizer or meta.tokenizer
    self._tokenizer = tokenizer_lib.get_tokenizer(self._tokenizer_spec)

  def __getstate__(self) -> dict[str, Any]:
    # Each worker rebuilds the tokenizer from its spec: not every kind pickles (SentencePiece).
    return {k: v for k, v in self.__dict__.items() if k != '_tokenizer'}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._tokenizer = tokenizer_lib.get_tokenizer(self._tokenizer_spec)

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-example (shape, dtype) of each batch entry; a batch adds a leading [B_local]."""
    size, length = self.config.image_size, self.config.context_length
    spec = {keys.IMAGE: ((size, size, 3), np.dtype(np.uint8)),
            keys.TEXT: ((length,), np.dtype(np.int32))}
    if self.reinforced:
      dim = sum(self.teacher_dims)
      spec.update({keys.SYN_TEXT: ((length,), np.dtype(np.int32)),
                   keys.TEACHER_IMAGE: ((dim,), np.dtype(np.float32)),
                   keys.TEACHER_TEXT: ((dim,), np.dtype(np.float32)),
                   keys.TEACHER_SYN_TEXT: ((dim,), np.dtype(np.float32))})
    return spec

  def stream_positions(self, u: int) -> list[tuple[int, int]]:
    """(epoch, position in the epoch) of the examples of chunk u."""
    t, part = divmod(u, self.chunks_per_batch)
    start = t * self.config.global_batch_size + self._first + part * self.chunk_size
    return [divmod(g, self.num_examples) for g in range(start, start + self.chunk_size)]

  def record_index(self, epoch: int, position: int) -> int:
    """The record at `position` of the epoch's permutation."""
    return shuffled_index(self.config.seed, epoch, position, self.num_examples)

  def _corrupt(self, index: int, record: dict[str, Any], reason: str,
               detail: str) -> CorruptSampleError:
    key, uid = record['key'].decode(), record['uid'].decode()
    return CorruptSampleError(f'{self._path} {self.config.split}[{index}]', key, reason,
                              f'uid {uid!r}: {detail}')

  def _bad_image(self, index: int, record: dict[str, Any], e: Exception) -> CorruptSampleError:
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on damaged input.
    return self._corrupt(index, record, errors.BAD_IMAGE, f'{type(e).__name__}: {e}')

  def _open(self, index: int, record: dict[str, Any]) -> Image.Image:
    """The record's image, its header read (size, format), not yet decoded."""
    try:
      return Image.open(io.BytesIO(record['image']))
    except Exception as e:  # pylint: disable=broad-except
      raise self._bad_image(index, record, e) from None

  def _replay(self, index: int, record: dict[str, Any], image: Image.Image,
              params: Any) -> np.ndarray:
    """Decodes `image` (from `_open`) down to the bottom of params' crop and replays params."""
    try:
      (top, _, height, _), _ = augment.validate_params(params, image.height, image.width)
    except ValueError as e:
      raise self._corrupt(index, record, errors.BAD_PAUG, str(e)) from None
    try:
      image = jpeg_rows.decode_top_rows(image, record['image'], top + height)
    except Exception as e:  # pylint: disable=broad-except
      raise self._bad_image(index, record, e) from None
    return augment.replay(image, params, self.config.image_size, self._augment_config)

  def _reinforced_example(self, index: int, record: dict[str, Any],
                          rng: np.random.Generator) -> dict[str, Any]:
    a, c, s = self._choices.draw(rng)
    rows = {keys.TEACHER_IMAGE: ('image_emb', a), keys.TEACHER_TEXT: ('text_emb', c),
            keys.TEACHER_SYN_TEXT: ('text_emb', self.meta.num_captions + s)}
    embeddings = {}
    for key, (name, row) in rows.items():
      # Only the rows used are checked: the whole record costs 10x more (float16 math).
      embeddings[key] = record[name][row].astype(np.float32)
      if self._columns is not None:
        embeddings[key] = embeddings[key][self._columns]
      if not np.isfinite(embeddings[key]).all():
        raise self._corrupt(index, record, errors.EMB_NONFINITE,
                            f'{name}[{row}] has NaN/Inf values')
    try:
      entries = json.loads(record['paug'])
      params = entries[a]
    except (ValueError, TypeError, IndexError, KeyError) as e:
      raise self._corrupt(index, record, errors.BAD_PAUG,
                          f'no augmentation {a} of k={self.meta.k} ({type(e).__name__}: '
                          f'{e})') from None
    image = self._replay(index, record, self._open(index, record), params)
    return {keys.IMAGE: image, keys.TEXT: record['captions'][c],
            keys.SYN_TEXT: record['syn_captions'][s],
            **embeddings}

  def _plain_example(self, index: int, record: dict[str, Any],
                     rng: np.random.Generator) -> dict[str, Any]:
    c = int(rng.integers(self.meta.num_captions))
    image = self._open(index, record)
    params = augment.sample_params(rng, image.height, image.width, self._augment_config)
    return {keys.IMAGE: self._replay(index, record, image, params),
            keys.TEXT: record['captions'][c]}

  def example(self, epoch: int, position: int) -> tuple[dict[str, Any], list[CorruptSampleError]]:
    """The example at (epoch, position): (raw fields, errors of the records it replaced)."""
    replaced = []
    for attempt in range(MAX_ATTEMPTS):
      rng = np.random.default_rng([self.config.seed, epoch, position, attempt])
      # A replacement record is drawn at random: the next one in any order would often be a
      # duplicate in the same batch.
      index = (self.record_index(epoch, position) if attempt == 0
               else int(rng.integers(self.num_examples)))
      record = self._source[index]
      try:
        if self.reinforced:
          return self._reinforced_example(index, record, rng), replaced
        return self._plain_example(index, record, rng), replaced
      except CorruptSampleError as e:
        replaced.append(e)
    raise RuntimeError(f'{MAX_ATTEMPTS} records in a row were corrupt (epoch {epoch}, position '
                       f'{position}) in {self._path}; the last: {replaced[-1]}')

  def __call__(self, u: int) -> dict[str, Any]:
    examples, replaced = [], []
    for epoch, position in self.stream_positions(int(u)):
      example, example_replaced = self.example(epoch, position)
      examples.append(example)
      replaced.extend(example_replaced)
    length = self.config.context_length
    images = np.stack([e[keys.IMAGE] for e in examples])
    batch = {keys.IMAGE: images,
             keys.TEXT: self._tokenizer([e[keys.TEXT].decode('utf-8') for e in examples], length)}
    if self.reinforced:
      batch[keys.SYN_TEXT] = self._tokenizer(
          [e[keys.SYN_TEXT].decode('utf-8') for e in examples], length)
      for key in (keys.TEACHER_IMAGE, keys.TEACHER_TEXT, keys.TEACHER_SYN_TEXT):
        batch[key] = np.stack([e[key] for e in examples])
    batch[_ERRORS] = replaced
    return batch


def concat_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
  """One batch from its chunks, in order (the error lists are joined too)."""
  batch = {key: np.concatenate([chunk[key] for chunk in chunks])
           for key in chunks[0] if key != _ERRORS}
  batch[_ERRORS] = [error for chunk in chunks for error in chunk[_ERRORS]]
  return batch


class TrainIterator(grain.DatasetIterator):
  """Process-local training batches (dicts of numpy arrays, see `ChunkLoader.element_spec`).

  A Grain `DatasetIterator`: its state is the next batch index and the skip counts, so
  `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` save and restore
  it inside an Orbax checkpoint (one file per process). Raises StopIteration after
  `num_batches` batches when `num_epochs` is set.

  Attributes:
    metadata: the dataset's `DatasetMetadata` (kind, teacher dims, ...).
    skip_counter: examples accepted and corrupt records skipped so far, by reason.
    skipped_log: the file listing every skipped record (see `make_train_iterator`), or None.
    num_examples: records in the split.
    num_batches: batches in `num_epochs` epochs; None when repeating forever.
  """

  def __init__(self, loader: ChunkLoader, num_batches: int | None,
               skipped_log: str | None = None):
    super().__init__()
    self._loader = loader
    self._policy = loader.config.policy
    self.metadata = loader.meta
    self.num_examples = loader.num_examples
    self.num_batches = num_batches
    self.skip_counter = SkipCounter()
    self.skipped_log = skipped_log
    self._log: SkipLog | None = None  # Opened at the first batch: see _open_log.
    self._next_batch = 0
    self._inner = self._make_inner(0)

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return self._loader.element_spec

  @property
  def teacher_dims(self) -> tuple[int, ...]:
    """The widths of the teachers the batches carry (`InputConfig.teachers`)."""
    return self._loader.teacher_dims

  @property
  def kind(self) -> str:
    return self.metadata.kind

  def _make_inner(self, start: int) -> grain.DatasetIterator:
    """Batches start, start + 1, ...: chunks built in threads (and workers), then joined."""
    config, per_batch = self._loader.config, self._loader.chunks_per_batch
    stop = sys.maxsize if self.num_batches is None else self.num_batches * per_batch
    # Enough chunks in flight to keep every thread busy and `prefetch_batches` batches ahead.
    in_flight = -(-config.prefetch_batches * per_batch // max(config.worker_count, 1))
    in_flight = max(in_flight, config.read_threads)
    dataset = grain.MapDataset.range(start * per_batch, stop).map(self._loader).to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=in_flight))
    if config.worker_count > 0:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=config.worker_count, per_worker_buffer_size=in_flight))
    return iter(dataset.batch(per_batch, drop_remainder=True, batch_fn=concat_chunks))

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._inner)
    replaced = batch.pop(_ERRORS)
    self.skip_counter.ok(self._loader.local_batch_size)
    if self.skipped_log is not None and self._log is None:
      self._open_log()
    for error in replaced:
      self._policy.handle(error, self.skip_counter, self._log, batch=self._next_batch)
    self._next_batch += 1
    return batch

  def _identity(self) -> dict[str, Any]:
    config = self._loader.config
    return {'global_batch_size': config.global_batch_size, 'seed': config.seed,
            'num_examples': self.num_examples}

  def get_state(self) -> dict[str, Any]:
    return {'format': _STATE_FORMAT, 'next_batch': self._next_batch, **self._identity(),
            'skip_counter': self.skip_counter.to_json()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('format') != _STATE_FORMAT:
      raise ValueError(f'Data iterator state format {state.get("format")!r} is not '
                       f'{_STATE_FORMAT!r}: the checkpoint was written by other code.')
    saved = {k: state[k] for k in self._identity()}
    if saved != self._identity():
      raise ValueError(f'The checkpointed data iterator was for {saved}, but this run has '
                       f'{self._identity()}: the same batches cannot be resumed. Restore with '
                       'the same dataset, global batch size and seed.')
    self._inner.close()
    self._next_batch = int(state['next_batch'])
    self.skip_counter = SkipCounter.from_json(state['skip_counter'])
    self._inner = self._make_inner(self._next_batch)

  def start_prefetch(self) -> None:
    self._inner.start_prefetch()

  def _open_log(self) -> None:
    """Opens the skipped-records list, first dropping the rows of batches from here on.

    Those were written by a run that went further than the checkpoint this one resumed from (or
    by an earlier run, for a fresh start): they are met again, so the list stays exact.
    """
    if os.path.exists(self.skipped_log):
      with utils.atomic_write(self.skipped_log, encoding='utf-8') as f:
        f.writelines(json.dumps(row) + '\n' for row in read_skip_log(self.skipped_log)
                     if row['batch'] < self._next_batch)
    self._log = SkipLog(self.skipped_log)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      if self._log is not None:
        self._log.close()
      if hasattr(self, '_inner'):  # Not yet set if __init__ failed.
        self._inner.close()


def make_train_iterator(config: InputConfig, process_index: int | None = None,
                        process_count: int | None = None,
                        skipped_log: str | None = None) -> TrainIterator:
  """Opens the dataset and returns this process's batch iterator (see the module docstring).

  Args:
    config: the input settings.
    process_index, process_count: this process's slice of every global batch; default
      `jax.process_index()` and `jax.process_count()`.
    skipped_log: a local file (one per process, e.g. WORKDIR/skipped_records.p0.jsonl) that
      lists every corrupt record this process skips, one JSON line each: shard (dataset, split
      and record index), key, reason, count, detail, batch. Kept exact over resumes: rows of
      batches at or after the restored one are dropped when the first batch is read. None:
      counted only.

  Returns:
    A `TrainIterator` of dicts: 'image' uint8 [B, H, W, 3] (normalized on the device by the
    train step: 4x less host memory and host-to-device traffic), 'text' int32 [B, L],
    and for reinforced data 'syn_text' int32 [B, L], 'teacher_image_emb',
    'teacher_text_emb', 'teacher_syn_text_emb' float32 [B, D_T]; B = global_batch_size /
    process_count.

  Raises:
    FileNotFoundError: the dataset is not built (the message says how to build it).
    ValueError: inconsistent settings (batch size, regex, tokenizer spec).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (batch building never uses JAX)
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if config.global_batch_size % process_count:
    raise ValueError(f'global_batch_size {config.global_batch_size} is not divisible by the '
                     f'{process_count} processes; every process reads an equal slice.')
  source, meta = reinforced_tfds.open_reinforced(config.dataset, config.data_dir, config.split)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {config.split!r} of {config.dataset} has no examples.')
  num_batches = None
  if config.num_epochs is not None:
    num_batches = config.num_epochs * len(source) // config.global_batch_size
    if num_batches == 0:
      raise ValueError(f'{config.num_epochs} epoch(s) of {len(source)} examples make no full '
                       f'global batch of {config.global_batch_size}.')
  if config.worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags, which a program without absl.app never parses.
    flags.FLAGS.mark_as_parsed()
  loader = ChunkLoader(config, source, meta, str(source.dataset_info.data_dir), process_index,
                       process_count)
  return TrainIterator(loader, num_batches, skipped_log)

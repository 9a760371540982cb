"""Batch plans and image loading of evaluation data, and the base class of the evaluators.

A stream of N items (images or prompts, known to every process) over P processes with global
batch B (a multiple of the mesh's batch shards): batch b holds items b*B .. b*B + B - 1, and
process p loads items b*B + p*B/P + j for j < B/P. Every process runs ceil(N / B) batches; slots
past N are padding (index -1): they are embedded like any row (zeros) and dropped from the
gathered result, so they never enter a metric. A process-local stream (each process's own
captions in retrieval) runs max_p ceil(N_p / (B/P)) batches on every process.

Embeddings come from the package's one embedding engine (mobileclip_jax/embedding.py): inputs
arrive as global arrays split over the mesh's batch axes (images as uint8, normalized on device),
embeddings are L2-normalized in float32; at the end of a stream they are brought to host on every
process together with their integer key columns, padding rows are dropped and rows are sorted by
key: results do not depend on the number of processes, devices or the batch size.
"""
import collections
import concurrent.futures
import io
import logging
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh
import numpy as np
from PIL import Image

from mobileclip_jax import embedding
from mobileclip_jax import inference as inference_lib
from mobileclip_jax import sharding
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.models import reduce as reduce_lib

_PREFETCH_BATCHES = 2


# ----------------------------------------------------------------------------------------------
# Batch plans.


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's batch shards."""
  if batch_size < 1:
    raise ValueError(f'Evaluation batch_size must be >= 1, got {batch_size}.')
  shards = sharding.num_batch_shards(mesh)
  if shards % jax.process_count():
    raise ValueError(f'The mesh has {shards} batch shards, not a multiple of the '
                     f'{jax.process_count()} processes.')
  return -(-batch_size // shards) * shards


def stream_slots(num_items: int, global_batch: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> List[np.ndarray]:
  """This process's item ids per batch of a stream every process knows (-1 = padding).

  Returns:
    ceil(num_items / global_batch) (at least 1) int32 arrays of global_batch / process_count ids.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  local = global_batch // count
  ids = [b * global_batch + p * local + np.arange(local)
         for b in range(max(1, -(-num_items // global_batch)))]
  return [np.where(i < num_items, i, -1).astype(np.int32) for i in ids]


def local_slots(num_local: int, local_batch: int, num_batches: int) -> List[np.ndarray]:
  """Ids of a process-local stream of `num_local` items in `num_batches` batches (-1 = padding)."""
  ids = np.arange(num_batches * local_batch, dtype=np.int32)
  return np.split(np.where(ids < num_local, ids, -1), num_batches)


# ----------------------------------------------------------------------------------------------
# Host-side loading.


def load_image(image: datasets.ImageLike, size: int, interpolation: str,
               where: str = '') -> np.ndarray:
  """Encoded bytes / uint8 array / PIL image -> uint8 [size, size, 3] (open_clip's eval resize)."""
  try:
    if isinstance(image, (bytes, np.bytes_)):
      image = Image.open(io.BytesIO(image))
    elif isinstance(image, np.ndarray):
      image = Image.fromarray(image.astype(np.uint8, copy=False))
    return preprocess.resize_center_crop(image, size, interpolation)
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, ... on damaged or odd input.
    raise ValueError(f'{where}: cannot read the image ({type(e).__name__}: {e}).') from None


def prefetch_map(fn: Callable[[int], Any], slot_batches: Iterable[np.ndarray],
                 pool: concurrent.futures.Executor,
                 depth: int = _PREFETCH_BATCHES) -> Iterator[List[Any]]:
  """[fn(i) for each slot, None for padding] per batch, computed by `pool` `depth` batches ahead."""
  pending = collections.deque()
  for slots in slot_batches:
    pending.append([pool.submit(fn, int(i)) if i >= 0 else None for i in slots])
    if len(pending) > depth:
      yield [f.result() if f else None for f in pending.popleft()]
  while pending:
    yield [f.result() if f else None for f in pending.popleft()]


# ----------------------------------------------------------------------------------------------
# The evaluator base class.


class EvaluatorBase:
  """What the zero-shot and retrieval evaluators share: cadence, model checks, the image stream.

  Attributes:
    name: the evaluator's name (metric names are '<prefix>/<name>.../<metric>').
    every_steps: cadence in training steps; 0 = only at the first and the last step.
  """
  default_prefix = ''

  def __init__(self, name: str, data: datasets.EvalData, model_config, mesh: Mesh, *,
               every_steps: int = 0, batch_size: int = 256, text_batch_size: int = 0,
               prefix: str = '', cache: bool = False, num_workers: int = 8,
               inference: Optional[inference_lib.Inference] = None,
               artifacts: Optional[inference_lib.Artifacts] = None):
    if every_steps < 0:
      raise ValueError(f'Evaluator {name!r}: every_steps must be >= 0, got {every_steps}.')
    if num_workers < 1:
      raise ValueError(f'Evaluator {name!r}: num_workers must be >= 1, got {num_workers}.')
    self.name, self.data, self.model_config, self.mesh = name, data, model_config, mesh
    self.every_steps = every_steps
    self.prefix = prefix or self.default_prefix
    self.batch_size = global_batch_size(batch_size, mesh)
    self.text_batch_size = global_batch_size(text_batch_size or batch_size, mesh)
    self.num_workers = num_workers
    self.inference = inference or inference_lib.NO_INFERENCE
    self.artifacts = artifacts or inference_lib.Artifacts()
    missing = [n for n in self.inference.needs() if n not in self.artifacts]
    if missing:
      raise ValueError(f'Evaluator {name!r}: the inference options need {missing} '
                       '(inference.load_artifacts).')
    self.sides = self._sides()
    # The selector's pass carries no columns: the cache would replay it without them.
    self.cache = cache and not self.inference.selector_tau
    self._cached_images: Optional[List[Dict[str, np.ndarray]]] = None
    self._tokenizer: Optional[tokenizer_lib.Tokenizer] = None

  def _sides(self) -> Tuple[int, ...]:
    """Every image side this evaluator may encode at, ascending (the model's is the last)."""
    full, inf = self.model_config.image_size, self.inference
    sides = {full, inf.image_size or full, inf.cascade_size or full}
    if inf.selector_tau:
      sides.update(inference_lib.selector_pass(self.artifacts)[2])
    for side in sides - {full}:  # The model's own side needs no check (nor any resize).
      inference_lib.check_side(self.model_config, side)
    if max(sides) != full:
      raise ValueError(f'Evaluator {self.name!r}: image sides {sorted(sides)} exceed the '
                       f'model\'s {full}; dynamic resolution only shrinks images.')
    return tuple(sorted(sides))

  def due(self, step: int, last_step: int) -> bool:
    """Whether to run at `step`: the first and last steps, and every `every_steps`."""
    return step in (0, last_step) or bool(self.every_steps and step % self.every_steps == 0)

  def run(self, model, variables: Mapping[str, Any]) -> Dict[str, float]:
    """Evaluates `model` with `variables` ({'params', 'batch_stats'}: numpy or jax Arrays).

    Every process must call it (collectives); every process gets the same metrics.
    """
    self._check_model(model)
    start = time.perf_counter()
    metrics = self._evaluate(model, embedding.place_variables(variables, self.mesh))
    logging.info('Evaluator %s: %d examples of %s in %.1f s.', self.name,
                 len(self.data.examples), self.data.description, time.perf_counter() - start)
    return metrics

  def _evaluate(self, model, variables) -> Dict[str, float]:
    raise NotImplementedError

  def _check_model(self, model) -> None:
    """The model must expect this evaluator's preprocessing (its inputs were made for it)."""
    mine, theirs = self.model_config, getattr(model, 'config', None)
    fields = ('image_size', 'mean', 'std', 'interpolation', 'tokenizer')
    if theirs is None or any(getattr(mine, f) != getattr(theirs, f, None) for f in fields) or (
        mine.text.context_length != theirs.text.context_length):
      raise ValueError(f'Evaluator {self.name!r} was built for {mine.name} preprocessing '
                       f'({ {f: getattr(mine, f) for f in fields} }) and cannot evaluate this '
                       'model; build it with the model\'s own config.')

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tokenizer is None:
      self._tokenizer = tokenizer_lib.get_tokenizer(self.model_config.tokenizer)
    return self._tokenizer

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), context_length] tokens for the model's text tower."""
    return self.tokenizer(list(texts), self.model_config.text.context_length)

  def _load(self, index: int):
    example = self.data.examples[index]
    c = self.model_config
    return load_image(example.image, c.image_size, c.interpolation, example.where), example

  def image_batches(self, columns: Callable[[int, datasets.Example], Dict[str, np.ndarray]],
                    column_shapes: Mapping[str, tuple],
                    indices: Optional[np.ndarray] = None) -> Iterator[Dict[str, np.ndarray]]:
    """This process's image batches: 'inputs' uint8 [Bl, S, S, 3], 'index' [Bl], the columns.

    `columns(index, example)` gives an example's int32 columns of `column_shapes` (called in
    stream order, on this thread); padding rows get zeros. `indices` streams only those
    examples (every process must pass the same). With `cache`, the first full pass is kept and
    replayed.
    """
    if self._cached_images is not None and indices is None:
      yield from self._cached_images
      return
    size = self.model_config.image_size
    if indices is None:
      slot_batches = stream_slots(len(self.data.examples), self.batch_size)
    else:
      indices = np.asarray(indices, np.int32)
      slot_batches = [np.where(s >= 0, indices[np.maximum(s, 0)], -1).astype(np.int32)
                      for s in stream_slots(len(indices), self.batch_size)]
    kept = []
    pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
    try:
      for slots, loaded in zip(slot_batches, prefetch_map(self._load, slot_batches, pool)):
        batch = {'inputs': np.zeros((len(slots), size, size, 3), np.uint8), 'index': slots}
        batch.update({name: np.zeros((len(slots),) + tuple(shape), np.int32)
                      for name, shape in column_shapes.items()})
        for row, item in enumerate(loaded):
          if item is not None:
            batch['inputs'][row] = item[0]
            for name, value in columns(int(slots[row]), item[1]).items():
              batch[name][row] = value
        if self.cache and indices is None:
          kept.append(batch)
        yield batch
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    if self.cache and indices is None:
      self._cached_images = kept

  # --------------------------------------------------------------------------------------------
  # Embedding, with the evaluator's inference options (mobileclip_jax/inference.py).

  def embed_text(self, model, variables, batches, keys) -> Dict[str, np.ndarray]:
    """embedding.embed_stream of token batches with the text tower's reduction."""
    tower_pass, extra = inference_lib.tower_pass(self.inference, self.artifacts, 'text')
    return embedding.embed_stream(model, {**variables, **extra}, self.mesh, embedding.TEXT,
                                  batches, keys, tower_pass)

  def encode_images_at(self, model, variables, side: int, columns, column_shapes,
                       indices: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Unit image 'embeddings' at `side`, 'index', the columns and 'side', in index order."""
    full = self.model_config.image_size
    tower_pass, extra = inference_lib.tower_pass(self.inference, self.artifacts, 'image', side,
                                                 full)
    variables = inference_lib.image_variables(variables, self.artifacts, side, full)
    out = embedding.embed_stream(model, {**variables, **extra}, self.mesh, embedding.IMAGE,
                                 self.image_batches(columns, column_shapes, indices), ('index',),
                                 tower_pass)
    out['side'] = np.full(len(out['index']), side, np.int32)
    return out

  def encode_images(self, model, variables, columns, column_shapes) -> Dict[str, np.ndarray]:
    """Unit image 'embeddings' [N, D] of the whole dataset, 'index', the columns and the 'side'
    each image was encoded at, in index order.

    The side is the model's, `image_size`, the cascade's first pass, or with `selector_tau` the
    learned selector's choice per image: one selector pass over every image, then one pass per
    side over the images that chose it (batches grouped by side).
    """
    inf = self.inference
    if not inf.selector_tau:
      side = inf.cascade_size or inf.image_size or self.model_config.image_size
      return self.encode_images_at(model, variables, side, columns, column_shapes)
    tower_pass, extra, sides = inference_lib.selector_pass(self.artifacts)
    predicted = embedding.embed_stream(
        model, extra, self.mesh, embedding.SELECT,
        self.image_batches(lambda *_: {}, {}), ('index',), tower_pass)['embeddings']
    choice = np.asarray(reduce_lib.choose_size(predicted, sides, inf.selector_tau))
    parts = [self.encode_images_at(model, variables, side, columns, column_shapes,
                                   np.flatnonzero(choice == i))
             for i, side in enumerate(sides) if np.any(choice == i)]
    out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(out['index'], kind='stable')
    return {name: value[order] for name, value in out.items()}

  def side_metrics(self, images: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """With dynamic resolution: the share of images encoded at each side ('<group>/at_<S>px')."""
    if not self.inference.dynamic:
      return {}
    group = f'{self.prefix}/{self.name}'
    return {f'{group}/at_{side}px': float(np.mean(images['side'] == side))
            for side in self.sides}

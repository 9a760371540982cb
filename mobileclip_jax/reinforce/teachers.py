"""The teacher ensemble of a reinforced dataset: loading, and jitted embedding sharded over devices.

A teacher is a zoo model (`models/clip.py`) with its variables, from a model checkpoint or a
training run (`checkpoint.load_variables`) or from an open_clip state_dict file
(`convert.from_open_clip`). Each teacher keeps its own input resolution, mean/std and tokenizer.

`TeacherEnsemble` embeds uint8 images and caption strings with every teacher through the
package's embedding engine (mobileclip_jax/embedding.py: fixed-size padded batches split over the
local devices, normalized on device, L2-normalized like open_clip's `F.normalize`). The teachers
are concatenated in order, so row r is [teacher_0 (dims[0]) | teacher_1 (dims[1]) | ...], each slice
unit-norm: DataCompDR's layout.
"""
import dataclasses
import functools
import hashlib
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from mobileclip_jax import checkpoint
from mobileclip_jax import embedding
from mobileclip_jax import rules
from mobileclip_jax import sharding
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.convert import open_clip as convert_open_clip
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.models import clip as clip_lib

OPEN_CLIP_PREFIX = 'open_clip:'


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """One teacher: a zoo model, its variables (numpy) and where they came from.

  Attributes:
    config: the model's ModelConfig (resolution, mean/std, tokenizer, towers).
    variables: {'params': ..., 'batch_stats': ...} as numpy arrays.
    tag: short name of the weights (checkpoint folder or state_dict file stem), no ','.
    source: the path the weights were read from.
  """
  config: clip_lib.ModelConfig
  variables: Dict[str, Any]
  tag: str
  source: str

  @property
  def name(self) -> str:
    return self.config.name

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  @functools.cached_property
  def checksum(self) -> str:
    return checksum(self.variables)

  def describe(self) -> Dict[str, Any]:
    """JSON description recorded with the dataset."""
    c = self.config
    return {'name': c.name, 'tag': self.tag, 'source': self.source, 'embed_dim': c.embed_dim,
            'image_size': c.image_size, 'mean': list(c.mean), 'std': list(c.std),
            'tokenizer': c.tokenizer, 'context_length': self.context_length, 'dtype': c.dtype,
            'checksum': self.checksum}


def checksum(variables: Mapping[str, Any]) -> str:
  """sha256 over every variable (path, dtype, shape, bytes): identifies the weights."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda item: rules.path_str(item[0])):
    array = np.ascontiguousarray(leaf)
    digest.update(f'{rules.path_str(path)}|{array.dtype}|{array.shape}|'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _tag(path: str) -> str:
  base = os.path.basename(os.path.normpath(path))
  stem = base.split('.', 1)[0] or base
  return stem.replace(',', '_').replace(':', '_')


def _with_dtype(config: clip_lib.ModelConfig, dtype: Optional[str]) -> clip_lib.ModelConfig:
  return config if dtype is None else dataclasses.replace(config, dtype=dtype)


def load_open_clip_teacher(path: str, name: str, dtype: Optional[str] = None,
                           **overrides) -> Teacher:
  """A teacher from an open_clip state_dict file of zoo variant `name` (with `create_model`
  overrides); `dtype` sets the compute dtype ('float32' or 'bfloat16').

  The file is read by `convert.files.read_state_dict` (.safetensors, .pt/.pth/.bin, .npz).
  """
  config = _with_dtype(clip_lib.get_config(name, **overrides), dtype)
  variables = convert_open_clip.from_open_clip(convert_files.read_state_dict(path), config)
  return Teacher(config, variables, _tag(path), os.path.abspath(path))


def load_checkpoint_teacher(path: str, dtype: Optional[str] = None) -> Teacher:
  """A teacher from a model checkpoint or a training run (its latest step)."""
  variables, config = checkpoint.load_variables(path)
  return Teacher(_with_dtype(config, dtype), variables, _tag(path), os.path.abspath(path))


def load_teacher(spec: str, dtype: Optional[str] = None) -> Teacher:
  """A teacher from a command-line spec.

  Args:
    spec: 'open_clip:NAME=PATH' (an open_clip state_dict of zoo variant NAME, e.g.
      'open_clip:ViT-L-14-quickgelu=/w/dfn2b.bin') or a model checkpoint / training run folder.
    dtype: compute dtype override ('float32' or 'bfloat16'); None keeps the checkpoint's.
  """
  if spec.startswith(OPEN_CLIP_PREFIX):
    name, sep, path = spec[len(OPEN_CLIP_PREFIX):].partition('=')
    if not sep or not name or not path:
      raise ValueError(f'Teacher spec {spec!r} must be open_clip:NAME=PATH, e.g. '
                       'open_clip:ViT-L-14-quickgelu=/weights/state_dict.pt')
    return load_open_clip_teacher(path, name, dtype)
  return load_checkpoint_teacher(spec, dtype)


# ----------------------------------------------------------------------------------------------
# Embedding (mobileclip_jax/embedding.py's engine).


class PendingEmbeddings:
  """Every teacher's embeddings still being computed; `result()` waits and joins them."""

  def __init__(self, parts: List[embedding.Pending], count: int, width: int):
    self._parts, self._count, self._width = parts, count, width

  def result(self) -> np.ndarray:
    """float32 [N, sum(dims)]: the teachers' unit-norm slices side by side."""
    if self._count == 0:
      return np.zeros((0, self._width), np.float32)
    return np.concatenate([part.result() for part in self._parts], axis=1)


class TeacherEnsemble:
  """Teachers whose embeddings are concatenated, run jitted over the local devices.

  Args:
    teachers: the teachers, in embedding-slice order.
    devices: devices to shard batches over (default: `jax.local_devices()`).
    images_per_device: images per device per step; the global image batch is this times the
      number of devices.
    texts_per_device: texts per device per step.
  """

  def __init__(self, teachers: Sequence[Teacher], devices: Optional[Sequence[Any]] = None,
               images_per_device: int = 32, texts_per_device: int = 128):
    if not teachers:
      raise ValueError('A teacher ensemble needs at least one teacher.')
    if images_per_device < 1 or texts_per_device < 1:
      raise ValueError(f'images_per_device={images_per_device} and texts_per_device='
                       f'{texts_per_device} must be >= 1.')
    self.teachers = tuple(teachers)
    devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = sharding.create_mesh(devices=devices)
    self.image_batch = images_per_device * len(devices)
    self.text_batch = texts_per_device * len(devices)
    self._models = [clip_lib.CLIP(t.config) for t in self.teachers]
    replicated = sharding.replicated(self.mesh)
    self._variables = [jax.device_put(t.variables, replicated) for t in self.teachers]
    self._tokenizers: Dict[str, tokenizer_lib.Tokenizer] = {}

  @property
  def dims(self) -> Tuple[int, ...]:
    """Per-teacher embedding widths, in slice order."""
    return tuple(t.embed_dim for t in self.teachers)

  @property
  def width(self) -> int:
    return sum(self.dims)

  @property
  def names(self) -> Tuple[str, ...]:
    """'NAME:TAG' per teacher, as the dataset metadata records them."""
    return tuple(f'{t.name}:{t.tag}' for t in self.teachers)

  @property
  def image_sizes(self) -> Tuple[int, ...]:
    """The distinct input resolutions of the teachers, ascending."""
    return tuple(sorted({t.image_size for t in self.teachers}))

  def embed_images_async(self, views: Mapping[int, np.ndarray]) -> PendingEmbeddings:
    """Starts embedding N images with every teacher.

    Args:
      views: for each of `image_sizes`, uint8 [N, size, size, 3]: the same N images at that
        resolution (not normalized: each teacher applies its own mean/std).

    Returns:
      A `PendingEmbeddings`; its `result()` is float32 [N, sum(dims)].
    """
    missing = [s for s in self.image_sizes if s not in views]
    if missing:
      raise ValueError(f'No images at resolution(s) {missing}; the teachers need '
                       f'{list(self.image_sizes)}.')
    counts = {len(v) for v in views.values()}
    if len(counts) != 1:
      raise ValueError(f'Image views hold different numbers of images: '
                       f'{ {s: len(v) for s, v in views.items()} }.')
    parts = []
    for teacher, model, variables in zip(self.teachers, self._models, self._variables):
      images = np.asarray(views[teacher.image_size])
      if images.dtype != np.uint8 or images.shape[1:] != (teacher.image_size,) * 2 + (3,):
        raise ValueError(f'Images for {teacher.name} must be uint8 [N, {teacher.image_size}, '
                         f'{teacher.image_size}, 3], got {images.dtype} {images.shape}.')
      parts.append(embedding.embed_array(model, variables, self.mesh, embedding.IMAGE, images,
                                         self.image_batch))
    return PendingEmbeddings(parts, counts.pop(), self.width)

  def embed_images(self, views: Mapping[int, np.ndarray]) -> np.ndarray:
    """float32 [N, sum(dims)] image embeddings; see `embed_images_async`."""
    return self.embed_images_async(views).result()

  def _tokenizer(self, spec: str) -> tokenizer_lib.Tokenizer:
    if spec not in self._tokenizers:
      self._tokenizers[spec] = tokenizer_lib.get_tokenizer(spec)
    return self._tokenizers[spec]

  def embed_texts_async(self, texts: Sequence[str]) -> PendingEmbeddings:
    """Starts embedding N texts, tokenized per teacher (its tokenizer and context length)."""
    tokens: Dict[Tuple[str, int], np.ndarray] = {}
    parts = []
    for teacher, model, variables in zip(self.teachers, self._models, self._variables):
      key = (teacher.config.tokenizer, teacher.context_length)
      if key not in tokens:
        tokens[key] = (self._tokenizer(key[0])(list(texts), key[1]) if texts
                       else np.zeros((0, key[1]), np.int32))
      parts.append(embedding.embed_array(model, variables, self.mesh, embedding.TEXT,
                                         tokens[key], self.text_batch))
    return PendingEmbeddings(parts, len(texts), self.width)

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [N, sum(dims)] text embeddings of N strings."""
    return self.embed_texts_async(texts).result()

  def describe(self) -> Dict[str, Any]:
    return {'teachers': [t.describe() for t in self.teachers], 'teacher_dims': list(self.dims)}

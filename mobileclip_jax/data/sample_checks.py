"""Validation of one decoded sample against the dataset's layout, into its TFDS example.

Every check the trainer relies on happens here, once per sample, so that what builds also
trains: the stored augmentations go through the trainer's own validator
(`augment.validate_params`, against the decoded image's size), and every teacher embedding row
must be finite, of the dataset's width, and unit-norm per teacher slice.
"""
import json
from typing import Any, Sequence

import numpy as np

from mobileclip_jax.data import augment
from mobileclip_jax.data import errors
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data.errors import CorruptSampleError
from mobileclip_jax.data.reinforced_tfds import EMB_DTYPES, DatasetMetadata

# Per-teacher embedding norms must be 1 within this: bfloat16 storage rounds each element to 8
# significant bits, which moves a 768-wide unit vector's norm by ~1e-3.
NORM_TOLERANCE = 0.02


def teacher_norms(rows: np.ndarray, dims: Sequence[int]) -> np.ndarray:
  """[T, R] norms of each teacher's slice of each of the R rows ([R, sum(dims)])."""
  bounds = np.cumsum((0,) + tuple(dims))
  rows = np.asarray(rows, np.float32)
  return np.stack([np.linalg.norm(rows[:, a:b], axis=1) for a, b in zip(bounds, bounds[1:])])


def _embeddings(sample: sample_codec.Sample, name: str, array: np.ndarray,
                meta: DatasetMetadata) -> np.ndarray:
  """`array` in the storage dtype, after the width, finiteness and unit-norm checks."""
  shard, key = sample.shard, sample.key
  if array.shape[1] != meta.embed_dim:
    raise CorruptSampleError(shard, key, errors.EMB_WIDTH,
                             f'{name} has width {array.shape[1]}, expected {meta.embed_dim} '
                             f'(teacher dims {list(meta.teacher_dims)})')
  with np.errstate(over='ignore', invalid='ignore'):
    stored = np.asarray(array, np.float32).astype(EMB_DTYPES[meta.emb_dtype])
  if not np.isfinite(stored).all():
    row = int(np.argmin(np.isfinite(stored).all(axis=1)))
    raise CorruptSampleError(shard, key, errors.EMB_NONFINITE,
                             f'{name}[{row}] has NaN/Inf (or values beyond {meta.emb_dtype} '
                             'range)')
  norms = teacher_norms(array, meta.teacher_dims)
  error = np.abs(norms - 1)
  if error.max() > NORM_TOLERANCE:
    teacher, row = np.unravel_index(int(np.argmax(error)), error.shape)
    raise CorruptSampleError(shard, key, errors.EMB_NORM,
                             f'{name}[{row}] of teacher {meta.teachers[teacher]!r} has norm '
                             f'{norms[teacher, row]:.4g}, expected 1 (within {NORM_TOLERANCE})')
  return stored


def _check_paug(sample: sample_codec.Sample, meta: DatasetMetadata, height: int,
                width: int) -> None:
  for i, entry in enumerate(sample.paug[:meta.k]):
    try:
      augment.validate_params(entry, height, width)
    except ValueError as e:
      raise CorruptSampleError(sample.shard, sample.key, errors.BAD_PAUG,
                               f'paug entry {i}: {e}') from None


def make_example(sample: sample_codec.Sample, record_key: str,
                 meta: DatasetMetadata) -> dict[str, Any]:
  """Validates a decoded sample against the dataset layout; returns its TFDS example.

  Raises CorruptSampleError for an empty caption, synthetic captions whose keys or counts differ
  from the dataset's, fewer than k augmentations, embeddings of the wrong width, with NaN/Inf or
  with a per-teacher norm that is not 1, an image PIL cannot decode, and a stored augmentation
  the trainer would refuse (malformed, or a crop box outside the image). The cheap checks come
  first: the image is decoded only for a sample that passed them.
  """
  shard, key = sample.shard, sample.key
  for kind, texts in (('caption', sample.captions), ('synthetic caption',
                                                      sample.syn_captions or [])):
    if any(not text.strip() for text in texts):
      raise CorruptSampleError(shard, key, errors.EMPTY_CAPTION, f'a {kind} is empty')
  if len(sample.captions) != meta.num_captions:
    raise CorruptSampleError(shard, key, errors.EMB_ROWS, f'{len(sample.captions)} captions, '
                             f'expected {meta.num_captions}')
  example = {'uid': sample.uid, 'key': record_key, 'image': sample.image,
             'captions': sample.captions}
  if meta.kind == 'plain':
    sample_codec.check_image(sample.image, shard, key)
    return example

  counts = tuple(np.bincount(sample.syn_key_index, minlength=len(sample.syn_keys)).tolist())
  if sample.syn_keys != meta.syn_keys or counts != meta.syn_counts:
    raise CorruptSampleError(shard, key, errors.SYN_MISMATCH, f'synthetic captions per key '
                             f'{dict(zip(sample.syn_keys, counts))}, expected '
                             f'{dict(zip(meta.syn_keys, meta.syn_counts))}')
  if min(len(sample.paug), len(sample.image_emb)) < meta.k:
    raise CorruptSampleError(shard, key, errors.TOO_FEW_AUGMENTATIONS,
                             f'{len(sample.paug)} paug entries and {len(sample.image_emb)} image '
                             f'embeddings, expected k={meta.k}')
  example.update(
      syn_captions=sample.syn_captions,
      syn_key_index=sample.syn_key_index,
      # Only the first k are kept, so that entry a and image_emb[a] stay paired.
      paug=json.dumps(sample.paug[:meta.k], separators=(',', ':')),
      image_emb=_embeddings(sample, 'image_emb', sample.image_emb[:meta.k], meta),
      text_emb=_embeddings(sample, 'text_emb', sample.text_emb, meta))
  width, height = sample_codec.check_image(sample.image, shard, key)
  _check_paug(sample, meta, height, width)
  return example

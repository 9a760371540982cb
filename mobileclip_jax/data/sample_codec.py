"""One DataCompDR sample: its tar members <-> a `Sample` with one layout for every variant.

Members per sample key (spec section 5; see wds.py for how members are grouped):

  jpg|jpeg|png|webp  encoded image (kept encoded; `check_image` decodes it once on demand)
  txt                ground-truth caption, UTF-8
  json               {"uid": ..., "sha256": ...}
  syn.json           {"syn_text": [S strings]} or several keys "syn_text_<captioner>"
  paug.json          {"param_aug": [k entries]} (the list may itself be a JSON string)
  npz | pth.gz       "image_emb" [k, D], "text_emb" [C+S, D] (v1, rows: C ground-truth captions
                     then the synthetic ones in key order) or "text_emb" [C, D] plus one
                     "<syn key>_emb" [S_key, D] per synthetic key (DFNDR); pth.gz is a gzip'd
                     `torch.save` dict, read without torch (torch_pickle.py).

`decode_sample` turns a raw sample into a `Sample`; `encode_sample` is its inverse.
"""
import dataclasses
import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mobileclip_jax.data import errors
from mobileclip_jax.data import torch_pickle
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError

DEFAULT_SYN_KEY_REGEX = r'^syn_text.*$'


def check_image(data: bytes, shard: str = '', key: str = '') -> tuple[int, int]:
  """Decodes an encoded image once; returns (width, height) or raises 'bad_image'."""
  truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False  # A truncated image must fail, not be padded.
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return image.size
  except UnidentifiedImageError:
    raise CorruptSampleError(shard, key, errors.BAD_IMAGE,
                             'not an image format PIL can read') from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on damaged input.
    raise CorruptSampleError(shard, key, errors.BAD_IMAGE, f'{type(e).__name__}: {e}') from None
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def load_npz(data: bytes) -> dict[str, np.ndarray]:
  """All arrays of an .npz file (no pickled objects)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


def load_embeddings(data: bytes, ext: str, shard: str = '', key: str = '') -> dict[str, Any]:
  """The dict stored in an 'npz' or 'pth.gz' member; unreadable data raises 'bad_embeddings'."""
  try:
    value = load_npz(data) if ext == 'npz' else torch_pickle.load_pth_gz(data)
  except Exception as e:  # pylint: disable=broad-except
    # zip/gzip/pickle/numpy each raise their own error types on damaged bytes.
    raise CorruptSampleError(shard, key, errors.BAD_EMBEDDINGS,
                             f'cannot read {ext}: {type(e).__name__}: {e}') from None
  if not isinstance(value, dict):
    raise CorruptSampleError(shard, key, errors.BAD_EMBEDDINGS,
                             f'{ext} holds a {type(value).__name__}, expected a dict')
  return value


@dataclasses.dataclass
class Sample:
  """A decoded sample. Reinforced fields are None for a plain image-caption sample.

  Attributes:
    shard, key: where it came from.
    uid: the 'uid' of the json member, else the key.
    image: encoded image bytes (not decoded); image_format: its member extension.
    captions: the C ground-truth captions.
    sha256: the 'sha256' of the json member, if any.
    syn_keys: the synthetic-caption keys of this sample, in syn.json order.
    syn_captions: the S synthetic captions, all keys flattened in key order.
    syn_key_index: int32 [S], index into `syn_keys` of each synthetic caption.
    paug: the k stored augmentation entries (JSON values).
    image_emb: [k, D] teacher image embeddings, one row per augmentation, stored dtype.
    text_emb: [C+S, D] teacher text embeddings: ground-truth rows, then synthetic rows.
  """
  shard: str
  key: str
  uid: str
  image: bytes
  image_format: str
  captions: list[str]
  sha256: str | None = None
  syn_keys: tuple[str, ...] | None = None
  syn_captions: list[str] | None = None
  syn_key_index: np.ndarray | None = None
  paug: list[Any] | None = None
  image_emb: np.ndarray | None = None
  text_emb: np.ndarray | None = None


def sample_ids(raw: wds.RawSample) -> tuple[str, str | None]:
  """(uid, sha256) of a raw sample from its json member; the key when it has none."""
  if 'json' not in raw.members:
    return raw.key, None
  meta = wds.decode_json(raw.members['json'], raw.shard, raw.key, 'json')
  if not isinstance(meta, dict):
    return raw.key, None
  uid = meta.get('uid')
  return (raw.key if uid is None else str(uid)), meta.get('sha256')


def _as_matrix(value: Any, name: str, raw: wds.RawSample) -> np.ndarray:
  if not isinstance(value, np.ndarray) or value.ndim != 2:
    shape = getattr(value, 'shape', type(value).__name__)
    raise CorruptSampleError(raw.shard, raw.key, errors.BAD_EMBEDDINGS,
                             f'{name} must be a 2-D array, got {shape}')
  return value


def decode_sample(raw: wds.RawSample, reinforced: bool,
                  syn_key_regex: str = DEFAULT_SYN_KEY_REGEX) -> Sample:
  """Decodes and normalizes one sample; raises CorruptSampleError naming shard and key.

  Args:
    raw: the stored sample.
    reinforced: also decode synthetic captions, augmentation parameters and embeddings.
    syn_key_regex: which syn.json keys are synthetic captions (as open_clip's
      --dataset-reinforcement-syn-text-key-regex).

  Returns:
    A `Sample` whose `text_emb` rows are the C ground-truth captions then the S synthetic
    captions of `syn_keys` in order, from either the v1 combined 'text_emb' or the DFNDR
    per-key '<key>_emb' arrays.
  """
  shard, key = raw.shard, raw.key
  image_format, image = raw.member(*wds.IMAGE_EXTS)
  captions = [wds.decode_text(raw.member('txt')[1], shard, key, 'txt')]
  uid, sha256 = sample_ids(raw)
  sample = Sample(shard, key, uid, image, image_format, captions, sha256)
  if not reinforced:
    return sample

  syn = wds.decode_json(raw.member('syn.json')[1], shard, key, 'syn.json')
  if not isinstance(syn, dict):
    raise CorruptSampleError(shard, key, errors.BAD_JSON, 'syn.json is not a JSON object')
  sample.syn_keys = tuple(k for k in syn if re.match(syn_key_regex, k))
  sample.syn_captions, index = [], []
  for i, syn_key in enumerate(sample.syn_keys):
    texts = syn[syn_key]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
      raise CorruptSampleError(shard, key, errors.BAD_JSON,
                               f'syn.json[{syn_key!r}] is not a list of strings')
    sample.syn_captions.extend(texts)
    index.extend([i] * len(texts))
  sample.syn_key_index = np.asarray(index, np.int32)

  paug = wds.decode_json(raw.member('paug.json')[1], shard, key, 'paug.json')
  paug = paug.get('param_aug') if isinstance(paug, dict) else None
  try:
    sample.paug = json.loads(paug) if isinstance(paug, str) else paug
  except json.JSONDecodeError as e:
    raise CorruptSampleError(shard, key, errors.BAD_JSON, f'paug.json param_aug: {e}') from None
  if not isinstance(sample.paug, list):
    raise CorruptSampleError(shard, key, errors.BAD_JSON, 'paug.json has no "param_aug" list')

  ext, data = raw.member(*wds.EMB_EXTS)
  emb = load_embeddings(data, ext, shard, key)
  for name in ('image_emb', 'text_emb'):
    if name not in emb:
      raise CorruptSampleError(shard, key, errors.BAD_EMBEDDINGS,
                               f'{ext} has no {name!r} (has {sorted(emb)})')
  sample.image_emb = _as_matrix(emb['image_emb'], 'image_emb', raw)
  text_emb = _as_matrix(emb['text_emb'], 'text_emb', raw)
  num_gt, num_syn = len(captions), len(sample.syn_captions)
  if len(text_emb) > num_gt:  # v1: one array for ground-truth and synthetic captions.
    parts = [('text_emb', text_emb, num_gt + num_syn)]
  else:  # DFNDR: ground truth in text_emb, each synthetic key in '<key>_emb'.
    parts = [('text_emb', text_emb, num_gt)]
    for i, syn_key in enumerate(sample.syn_keys):
      if f'{syn_key}_emb' not in emb:
        raise CorruptSampleError(shard, key, errors.BAD_EMBEDDINGS,
                                 f'{ext} has no {syn_key}_emb for '
                                 f'the captions of syn.json[{syn_key!r}]')
      parts.append((f'{syn_key}_emb', _as_matrix(emb[f'{syn_key}_emb'], syn_key, raw),
                    int(np.sum(sample.syn_key_index == i))))
  for name, array, rows in parts:
    if len(array) != rows or array.shape[1] != sample.image_emb.shape[1]:
      raise CorruptSampleError(shard, key, errors.EMB_ROWS,
                               f'{name} has shape {array.shape}, expected '
                               f'({rows}, {sample.image_emb.shape[1]}) for {num_gt} ground-truth '
                               f'and {num_syn} synthetic captions')
  sample.text_emb = np.concatenate([array for _, array, _ in parts]) if len(parts) > 1 else (
      text_emb)
  return sample


def encode_sample(sample: Sample, per_key_emb: bool = False) -> dict[str, bytes]:
  """Members of a sample in the DataCompDR format, the inverse of `decode_sample`.

  Embeddings go to 'npz' (in their dtype), either as v1 (one 'text_emb' for ground-truth and
  synthetic captions) or, with `per_key_emb`, as DFNDR ('text_emb' for the ground truth and
  '<key>_emb' per synthetic key).
  """
  if len(sample.captions) != 1:
    raise ValueError(f'Sample {sample.key!r} has {len(sample.captions)} captions; the tar '
                     'format stores exactly one (txt).')
  members = {sample.image_format: sample.image, 'txt': sample.captions[0].encode('utf-8')}
  meta = {'uid': sample.uid} if sample.sha256 is None else {'uid': sample.uid,
                                                           'sha256': sample.sha256}
  members['json'] = json.dumps(meta).encode('utf-8')
  if sample.syn_keys is None:
    return members
  index = np.asarray(sample.syn_key_index)
  members['syn.json'] = json.dumps({
      key: [c for c, j in zip(sample.syn_captions, index) if j == i]
      for i, key in enumerate(sample.syn_keys)}).encode('utf-8')
  members['paug.json'] = json.dumps({'param_aug': sample.paug}).encode('utf-8')
  arrays = {'image_emb': sample.image_emb}
  if per_key_emb:
    num_gt = len(sample.captions)
    arrays['text_emb'] = sample.text_emb[:num_gt]
    for i, key in enumerate(sample.syn_keys):
      arrays[f'{key}_emb'] = sample.text_emb[num_gt:][index == i]
  else:
    arrays['text_emb'] = sample.text_emb
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  members['npz'] = buffer.getvalue()
  return members



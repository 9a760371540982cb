"""The layout of a dataset to build: from the flags and the generation config, else a consensus.

k, the teacher widths and the synthetic-caption keys come from the caller (flags, or the
generation config that `read_reinforce_config` reads) when given; whatever is not given is the
value most of the first `PROBE_SAMPLES` decodable samples agree on (more than half of them).
No single sample decides: a bad first sample is one vote, and is later skipped and counted like
any other by the per-sample checks (sample_checks.py).
"""
import collections
from typing import Any, Hashable, Iterator, Sequence

import numpy as np

from mobileclip_jax.data import sample_checks
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import uid_join
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError
from mobileclip_jax.data.reinforced_tfds import EMB_DTYPES, KINDS, DatasetMetadata

PROBE_SAMPLES = 100


def _raw_samples(shards: Sequence[str], image_shards: Sequence[str] | None
                 ) -> Iterator[wds.RawSample]:
  """The samples of the shards in order (joined with their images); errors are ignored here:
  stage 1 reads every shard again and counts them."""
  ignore = lambda error: None  # pylint: disable=unnecessary-lambda-assignment
  for i, shard in enumerate(shards):
    samples = wds.iter_samples(shard, ignore)
    if image_shards:
      samples = uid_join.join_by_uid(samples, wds.iter_samples(image_shards[i], ignore), ignore)
    yield from samples


def probe(shards: Sequence[str], image_shards: Sequence[str] | None, kind: str,
          syn_key_regex: str) -> tuple[str, list[sample_codec.Sample]]:
  """(kind, up to PROBE_SAMPLES decodable samples from the start of the shards).

  'auto' is 'reinforced' if most of the first samples carry paug.json or embeddings.
  """
  raws = []
  for raw in _raw_samples(shards, image_shards):
    raws.append(raw)
    if len(raws) == PROBE_SAMPLES:
      break
  if not raws:
    raise ValueError(f'No sample could be read from the shards ({shards[0]}, ...).')
  if kind == 'auto':
    reinforced = sum(bool('paug.json' in r.members or set(r.members) & set(wds.EMB_EXTS))
                     for r in raws)
    kind = 'reinforced' if 2 * reinforced > len(raws) else 'plain'
  if kind not in KINDS:
    raise ValueError(f'Unknown kind {kind!r}: use auto, reinforced or plain.')
  if image_shards and kind == 'plain':
    raise ValueError('--images_src joins reinforcement-only shards with images; a plain '
                     'dataset reads images and captions from --src alone.')
  with_image = sum(bool(set(r.members) & set(wds.IMAGE_EXTS)) for r in raws)
  if 2 * with_image <= len(raws) and not image_shards:
    raise ValueError(f'{raws[0].shard}: most samples have no image (e.g. {raws[0].key!r}: '
                     f'{sorted(raws[0].members)}). This is the DataCompDR-12M layout: pass the '
                     'matching DataComp-12M image shards with '
                     "--images_src='.../{00000000..00001023}.tar'.")
  samples, error = [], None
  for raw in raws:
    try:
      samples.append(sample_codec.decode_sample(raw, kind == 'reinforced', syn_key_regex))
    except CorruptSampleError as e:
      error = e
  if not samples:
    raise ValueError(f'None of the first {len(raws)} samples could be decoded as {kind} data; '
                     f'last error: {error}')
  return kind, samples


def _consensus(values: Sequence[Hashable], what: str, fix: str) -> Any:
  """The value more than half of `values` share; else a ValueError with the distribution."""
  counts = collections.Counter(values)
  value, n = counts.most_common(1)[0]
  if 2 * n <= len(values):
    shown = ', '.join(f'{v!r}: {c}' for v, c in counts.most_common(5))
    raise ValueError(f'The first {len(values)} samples do not agree on {what} ({shown}); '
                     f'{fix}.')
  return value


def _inferred_dims(sample: sample_codec.Sample) -> tuple[int, ...] | None:
  """Equal teacher widths from unit-norm slices (squared row norm = number of teachers)."""
  rows = np.concatenate([sample.image_emb, sample.text_emb]).astype(np.float32)
  if not np.isfinite(rows).all():
    return None
  count = int(round(float(np.mean(np.sum(rows**2, axis=1)))))
  width = rows.shape[1]
  if count < 1 or width % count:
    return None
  dims = (width // count,) * count
  unit = np.abs(sample_checks.teacher_norms(rows, dims) - 1).max() <= sample_checks.NORM_TOLERANCE
  return dims if unit else None


def _teacher_dims(samples: Sequence[sample_codec.Sample], given: Sequence[int] | None,
                  width: int) -> tuple[int, ...]:
  if not given:
    fix = 'pass --teacher_dims (e.g. 768,768 for DataCompDR)'
    dims = _consensus([_inferred_dims(s) for s in samples], 'the teacher widths (from unit-norm '
                      'slices of the embeddings)', fix)
    if dims is None:
      raise ValueError(f'The teacher widths cannot be inferred: the embeddings of most of the '
                       f'first {len(samples)} samples are not equal-width unit-norm slices (or '
                       f'hold NaN/Inf); {fix}.')
    return dims
  dims = tuple(int(d) for d in given)
  if sum(dims) != width:
    raise ValueError(f'--teacher_dims {list(dims)} sum to {sum(dims)}, but the embeddings of '
                     f'the first samples are {width} wide.')
  bad = []
  for s in samples:
    rows = np.concatenate([s.image_emb, s.text_emb])
    if rows.shape[1] == width and np.isfinite(rows.astype(np.float32)).all():
      norms = sample_checks.teacher_norms(rows, dims)
      if np.abs(norms - 1).max() > sample_checks.NORM_TOLERANCE:
        bad.append((s, norms))
  if 2 * len(bad) > len(samples):
    s, norms = bad[0]
    raise ValueError(
        f'Split as teacher dims {list(dims)}, the embeddings of {len(bad)} of the first '
        f'{len(samples)} samples are not unit-norm per teacher (e.g. {s.shard}:{s.key}: norms '
        f'in [{norms.min():.3f}, {norms.max():.3f}]). Pass the right --teacher_dims (e.g. '
        '768,768 for DataCompDR).')
  return dims


def dataset_metadata(kind: str, samples: Sequence[sample_codec.Sample], *, teachers,
                     teacher_dims, k, augmentation, emb_dtype, tokenizer, syn_key_regex,
                     shards, image_shards) -> DatasetMetadata:
  """The dataset's layout: the given values, the rest from the consensus of `samples`."""
  num_captions = _consensus([len(s.captions) for s in samples], 'the number of captions',
                            'fix the shards')
  common = dict(kind=kind, num_captions=num_captions, tokenizer=tokenizer,
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
  syn_keys, syn_counts = _consensus(
      [(s.syn_keys, tuple(np.bincount(s.syn_key_index, minlength=len(s.syn_keys)).tolist()))
       for s in samples], 'the synthetic captions per syn.json key', 'fix the shards or narrow '
      '--syn_key_regex')
  if not syn_keys:
    raise ValueError(f'{samples[0].shard}: no syn.json key matches {syn_key_regex!r}; set '
                     '--syn_key_regex.')
  width = _consensus([s.image_emb.shape[1] for s in samples], 'the embedding width',
                     'fix the shards')
  dims = _teacher_dims(samples, teacher_dims, width)
  teachers = tuple(teachers) if teachers else tuple(f'teacher{i}' for i in range(len(dims)))
  if len(teachers) != len(dims):
    raise ValueError(f'{len(teachers)} teacher names {list(teachers)} for {len(dims)} teacher '
                     f'dims {list(dims)}.')
  if not k:
    k = _consensus([min(len(s.paug), len(s.image_emb)) for s in samples],
                   'the number of stored augmentations', 'pass --k')
  stored = [min(len(s.paug), len(s.image_emb)) for s in samples]
  if 2 * sum(n >= k for n in stored) <= len(stored):
    raise ValueError(f'k={k}, but most of the first {len(samples)} samples store fewer '
                     f'augmentations (e.g. {samples[0].shard}:{samples[0].key} stores '
                     f'{stored[0]}); pass a smaller --k.')
  return DatasetMetadata(
      **common, teachers=teachers, teacher_dims=dims, k=int(k), syn_keys=syn_keys,
      syn_counts=syn_counts, augmentation=augmentation, emb_dtype=emb_dtype)


def metadata_for(shards: Sequence[str], image_shards: Sequence[str] | None, kind: str,
                 **settings: Any) -> DatasetMetadata:
  """Probes the shards and returns the dataset's `DatasetMetadata` (see `dataset_metadata`)."""
  kind, samples = probe(shards, image_shards, kind, settings['syn_key_regex'])
  return dataset_metadata(kind, samples, shards=shards, image_shards=image_shards, **settings)


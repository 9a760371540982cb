"""DataCompDR-12M's layout: reinforcement-only shards joined with image shards on the uid."""
from typing import Iterable, Iterator

from mobileclip_jax.data import errors
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError


def join_by_uid(samples: Iterable[wds.RawSample], images: Iterable[wds.RawSample],
                on_error: wds.ErrorHandler | None = None) -> Iterator[wds.RawSample]:
  """Adds image and caption members from `images` to `samples` with the same uid.

  This is the DataCompDR-12M layout: its shards hold only the reinforcement, and shard i joins
  with shard i of DataComp-12M on the json uid. Both are read in one pass; image samples that
  come before the one needed are held in memory (at most one image shard). A sample whose uid
  has no image is reported as 'no_image_for_uid', an unused image as 'image_without_sample',
  and differing sha256 in the two json members as 'sha256_mismatch'. A caption in the sample
  itself wins over the one of the image shard.
  """
  pending: dict[str, tuple[wds.RawSample, str | None]] = {}
  image_iter = iter(images)

  def ids_or_report(raw: wds.RawSample) -> tuple[str, str | None] | None:
    try:
      return sample_codec.sample_ids(raw)
    except CorruptSampleError as e:
      wds.report(on_error, e)
      return None

  for sample in samples:
    ids = ids_or_report(sample)
    if ids is None:
      continue
    uid, sha256 = ids
    while uid not in pending:
      image = next(image_iter, None)
      if image is None:
        break
      image_ids = ids_or_report(image)
      if image_ids is not None:
        pending[image_ids[0]] = (image, image_ids[1])
    if uid not in pending:
      wds.report(on_error, CorruptSampleError(sample.shard, sample.key, errors.NO_IMAGE_FOR_UID,
                                           f'uid {uid} is not in the image shards'))
      continue
    image, image_sha256 = pending.pop(uid)
    if sha256 and image_sha256 and sha256 != image_sha256:
      wds.report(on_error, CorruptSampleError(
          sample.shard, sample.key, errors.SHA256_MISMATCH,
          f'uid {uid}: sha256 {sha256} but the image '
          f'in {image.shard}:{image.key} has {image_sha256}; the image changed since the '
          'embeddings were computed'))
      continue
    members = {e: d for e, d in image.members.items() if e in wds.IMAGE_EXTS or e == 'txt'}
    members.update(sample.members)
    yield wds.RawSample(sample.shard, sample.key, members)
  for image in [raw for raw, _ in pending.values()] + list(image_iter):
    wds.report(on_error, CorruptSampleError(image.shard, image.key, errors.IMAGE_WITHOUT_SAMPLE,
                                         'no reinforced sample has its uid'))

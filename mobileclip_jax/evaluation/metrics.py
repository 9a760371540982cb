"""Zero-shot accuracy and image-text retrieval recall, computed on host embeddings (numpy).

One tie rule everywhere: a candidate ranks ahead of the target when its score is higher, or equal
with a lower index; i.e. the order of a stable sort by descending score, and the order in which
`jax.lax.top_k` returns equal values. A target is found at k when its rank is < k.

Retrieval follows the CLIP / clip_benchmark convention with several captions per image: text->image
R@k is the fraction of captions whose image ranks < k among all images; image->text R@k is the
fraction of images for which *any* of their captions ranks < k among all captions.

Embeddings are L2-normalized float32; similarities are computed in row chunks of bounded size, so
COCO-5k (5,000 x 25,000 similarities) never materializes more than `_CHUNK_ELEMENTS` scores.
"""
from typing import Dict, Sequence

import numpy as np

_CHUNK_ELEMENTS = 1 << 24  # Scores per chunk (64 MiB of float32).


def _row_chunks(rows: int, cols: int):
  step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
  for start in range(0, rows, step):
    yield start, min(rows, start + step)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Rank of each row's target column under the tie rule of the module docstring.

  Args:
    scores: float [N, C].
    targets: int [N], column index of each row's target.

  Returns:
    int64 [N]: 0 when the target is first.
  """
  target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
  higher = np.count_nonzero(scores > target_scores, axis=1)
  tied_before = np.count_nonzero(
      (scores == target_scores) & (np.arange(scores.shape[1]) < targets[:, None]), axis=1)
  return higher + tied_before


def zero_shot_classifier(text_embeddings: np.ndarray, num_classes: int) -> np.ndarray:
  """The CLIP prompt ensemble: per-prompt unit embeddings averaged per class, re-normalized.

  Args:
    text_embeddings: float32 [num_classes * num_templates, D], L2-normalized, class-major
      (all templates of class 0, then class 1, ...).
    num_classes: C.

  Returns:
    float32 [C, D], unit rows.
  """
  per_class = text_embeddings.reshape(num_classes, -1, text_embeddings.shape[-1]).mean(axis=1)
  return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def topk_accuracy(image_embeddings: np.ndarray, classifier: np.ndarray, targets: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
  """Zero-shot top-k accuracy.

  Args:
    image_embeddings: float32 [N, D], unit rows.
    classifier: float32 [C, D], unit rows (`zero_shot_classifier`).
    targets: int [N] in [0, C).
    ks: the k's (a k >= C gives 1.0).

  Returns:
    {k: accuracy in [0, 1]}; NaN for every k if an embedding is not finite (a diverged model
    must not look accurate).
  """
  num_classes = classifier.shape[0]
  if not (np.isfinite(image_embeddings).all() and np.isfinite(classifier).all()):
    return {k: float('nan') for k in ks}
  ranks = np.concatenate([
      target_ranks(image_embeddings[a:b] @ classifier.T, targets[a:b])
      for a, b in _row_chunks(len(targets), num_classes)])
  return {k: float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                     text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                     ) -> Dict[str, Dict[int, float]]:
  """Image->text and text->image recall@k with several captions per image.

  Args:
    image_embeddings: float32 [N, D], unit rows.
    text_embeddings: float32 [T, D], unit rows.
    text_image: int [T], the image index of each caption; every image needs >= 1 caption.
    ks: the k's.

  Returns:
    {'image_to_text': {k: recall}, 'text_to_image': {k: recall}}; NaN when an embedding is not
    finite.
  """
  num_images, num_texts = len(image_embeddings), len(text_embeddings)
  captions_per_image = np.bincount(text_image, minlength=num_images)
  if len(captions_per_image) != num_images or not captions_per_image.all():
    raise ValueError('retrieval_recall needs every image to have at least one caption and every '
                     f'caption an image in [0, {num_images}); got caption counts '
                     f'{captions_per_image.tolist()[:20]}...')
  if not (np.isfinite(image_embeddings).all() and np.isfinite(text_embeddings).all()):
    nan = {k: float('nan') for k in ks}
    return {'image_to_text': dict(nan), 'text_to_image': dict(nan)}

  t2i = np.concatenate([
      target_ranks(text_embeddings[a:b] @ image_embeddings.T, text_image[a:b])
      for a, b in _row_chunks(num_texts, num_images)])

  i2t = []
  text_index = np.arange(num_texts)
  for a, b in _row_chunks(num_images, num_texts):
    scores = image_embeddings[a:b] @ text_embeddings.T                      # [b - a, T]
    positive = text_image[None, :] == np.arange(a, b)[:, None]
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    # The best-placed positive: the highest-scoring caption, the first one among equals.
    first_best = np.argmax(positive & (scores == best), axis=1)[:, None]
    i2t.append(np.count_nonzero(scores > best, axis=1) + np.count_nonzero(
        (scores == best) & (text_index < first_best), axis=1))
  i2t = np.concatenate(i2t)
  return {'image_to_text': {k: float(np.mean(i2t < k)) for k in ks},
          'text_to_image': {k: float(np.mean(t2i < k)) for k in ks}}

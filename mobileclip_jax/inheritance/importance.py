"""Importance scores of units, and choosing k of n units by them.

'magnitude': a unit's share of the weight energy of every tensor it indexes,
  score_F(u) = sum over parameter tensors T with an axis on F of ||T[.., u, ..]||^2 / ||T||^2,
  so each tensor contributes 1 in total (a 49k-row embedding does not drown a LayerScale). For
  an MCi stage this sums the BatchNorm scales, LayerScales and every conv reading or writing the
  channel; for a head, its qkv columns and proj rows; for a neuron, its fc1 column and fc2 row.
'first': units 0..k-1 (TinyCLIP's manual image inheritance).
'masks': the learned log-alphas of a masked run (masks.py); units without a mask fall back to
  'magnitude'.
Blocks (layers) are kept uniformly spaced for 'first' and 'magnitude' (TinyCLIP's manual text
inheritance), by their learned gates for 'masks'.
"""
from typing import Dict, Mapping, Optional

import numpy as np

from mobileclip_jax.inheritance import units

SELECT = ('first', 'magnitude', 'masks')


def magnitude_scores(params: Mapping, layout: units.Layout) -> Dict[str, np.ndarray]:
  """{family: [size] scores} from the parameter tensors (not the BatchNorm statistics)."""
  scores = {name: np.zeros(f.size, np.float64) for name, f in layout.families.items()}
  for (collection, path), axes in layout.axes.items():
    if collection != 'params' or not units.families_of(axes):
      continue
    value = np.asarray(_get(params, path), np.float64)
    energy = np.square(value)
    total = energy.sum()
    if total == 0:
      continue
    sub_shape = [n for axis in axes for n, _ in axis]
    energy = energy.reshape(sub_shape)
    position = 0
    for axis in axes:
      for n, fam in axis:
        if fam is not None:
          others = tuple(i for i in range(len(sub_shape)) if i != position)
          scores[fam] += energy.sum(others) / total
        position += 1
  return scores


def uniform(n: int, k: int) -> np.ndarray:
  """k of n indices, uniformly spaced from 0: floor(i * n / k) (12 -> 6: 0, 2, ..., 10)."""
  return np.asarray([i * n // k for i in range(k)], np.int64)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """The k highest-scoring indices in ascending order (ties: the lower index)."""
  order = np.argsort(-np.asarray(scores), kind='stable')
  return np.sort(order[:k])


def choose(n: int, k: int, method: str, scores: Optional[np.ndarray]) -> np.ndarray:
  if method == 'first' or scores is None:
    return np.arange(k)
  return top_k(scores, k)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree

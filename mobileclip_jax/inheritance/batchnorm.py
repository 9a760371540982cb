"""Re-estimating BatchNorm running statistics of an inherited model on training batches.

Slicing keeps each BatchNorm's statistics of the kept channels, but a BatchNorm whose input lost
channels, neurons or blocks upstream (or was trained under soft masks) sees other inputs now.
`reestimate` replaces every running mean / variance by its average over a few train-mode batches
(what PyTorch's BatchNorm does with momentum=None): each batch's statistics are read back from the
model's own momentum update, (new - (1 - m) old) / m, so the modules are not changed.
"""
from typing import Any, Dict, Iterable, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip_jax.data import preprocess
from mobileclip_jax.models import layers


def reestimate(model, variables: Mapping[str, Any],
               batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
  """Variables whose batch_stats are the mean batch statistics over `batches`.

  Args:
    model: the CLIP module of `variables`.
    variables: {'params', 'batch_stats'}.
    batches: (uint8 images [B, S, S, 3], int32 tokens [B, L]) pairs (normalized here with the
      model's mean / std).
  Returns the variables (numpy) with the new statistics; unchanged if the model has no BatchNorm.
  """
  if not variables.get('batch_stats'):
    return dict(variables)
  momentum = layers.BatchNorm.momentum
  config = model.config

  @jax.jit
  def batch_stats(v, images, tokens):
    images = preprocess.normalize(images, config.mean, config.std)
    _, updates = model.apply(v, images, tokens, train=True, mutable=['batch_stats'],
                             rngs={'dropout': jax.random.PRNGKey(0)})
    return jax.tree.map(lambda new, old: (new - (1 - momentum) * old) / momentum,
                        updates['batch_stats'], v['batch_stats'])

  total, count = None, 0
  for images, tokens in batches:
    stats = batch_stats(variables, jnp.asarray(images), jnp.asarray(tokens))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if count == 0:
    raise ValueError('Re-estimating BatchNorm statistics needs at least one batch.')
  out = dict(variables)
  out['batch_stats'] = jax.tree.map(lambda x: np.asarray(x / count), total)
  return out

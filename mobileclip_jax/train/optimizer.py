"""AdamW as in open_clip's MobileCLIP recipe: warmup + cosine, clipping, weight-decay set, eps rule.

Weight decay applies to the same parameters as open_clip's rule, evaluated on the PyTorch name
and shape of each parameter (from the conversion table): decayed iff ndim >= 2 and the name has
none of 'bn', 'ln', 'bias', 'logit_scale'. So token/position embeddings and the (C, 1, 1)
layer-scale tensors of the FastViT towers are decayed; norms, biases and the scale are not.
"""
import math
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from mobileclip_jax.convert import open_clip as oc_convert
from mobileclip_jax.models import clip as clip_lib

_NO_DECAY_SUBSTRINGS = ('bn', 'ln', 'bias', 'logit_scale')
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def default_eps(model_name: str) -> float:
  """open_clip's default: 1e-6 for ViT models (by name), 1e-8 otherwise."""
  return 1e-6 if 'vit' in model_name.lower() else 1e-8


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, kind: str = 'cosine',
                constant_steps: int = 0) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """open_clip's schedule: lr * (step + 1) / warmup, then cosine to 0 over the remaining steps.

  'constant_cosine' holds the base lr for `constant_steps` after warmup, then decays (MobileCLIP-B
  LT: 300k constant + 300k cosine).
  """
  if kind not in ('cosine', 'constant_cosine'):
    raise ValueError(f"schedule.kind must be 'cosine' or 'constant_cosine', got {kind!r}.")
  if total_steps <= warmup_steps:
    raise ValueError(f'The schedule has {total_steps} steps, not more than its {warmup_steps} '
                     'warmup steps.')
  hold = constant_steps if kind == 'constant_cosine' else 0

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * (step + 1) / max(warmup_steps, 1)
    decay_steps = max(total_steps - warmup_steps - hold, 1)
    progress = jnp.clip((step - warmup_steps - hold) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * progress)) * base_lr
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def weight_decay_mask(model_config: clip_lib.ModelConfig, params: Any) -> Any:
  """A boolean tree like `params`: True where open_clip's rule decays the parameter."""
  decayed = {}
  for entry in oc_convert.conversion_table(model_config):
    if entry.collection == 'params':
      name = entry.torch_key
      decayed[entry.path] = (len(entry.torch_shape) >= 2
                             and not any(s in name for s in _NO_DECAY_SUBSTRINGS))

  def leaf(key_path, _):
    return decayed[tuple(k.key for k in key_path)]

  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(model_config: clip_lib.ModelConfig, params: Any, schedule: Callable, *,
                   b1: float, b2: float, eps: Optional[float], weight_decay: float,
                   grad_clip: float) -> optax.GradientTransformation:
  """Global-norm clipping -> AdamW with the schedule and open_clip's weight-decay set."""
  eps = default_eps(model_config.name) if eps is None else eps
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask(model_config, params)))
  return optax.chain(*parts)


def clamp_logit_scale(params: Dict[str, Any]) -> Dict[str, Any]:
  """open_clip clamps the learned log scale to [0, log 100] after every step."""
  if 'logit_scale' not in params:
    return params
  return {**params, 'logit_scale': jnp.clip(params['logit_scale'], 0.0, MAX_LOG_LOGIT_SCALE)}

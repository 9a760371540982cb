"""AdamW as in open_clip's MobileCLIP recipe: warmup + cosine, clipping, eps rule, rule-based decay.

Which parameters are decayed, their learning-rate multipliers and which are frozen come from
ordered regex rules over Flax parameter paths (train/rules.py, set in the config). Frozen
parameters get no update and no optimizer state.
"""
import math
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import optax

from mobileclip_jax import losses
from mobileclip_jax import rules as rules_lib

MAX_LOG_LOGIT_SCALE = math.log(losses.MAX_LOGIT_SCALE)


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


def _masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)  # Frozen parameters (optax.multi_transform's mask).


def _scale_by_tree(factors: Any) -> optax.GradientTransformation:
  """Multiplies each update by its factor (a tree like the parameters)."""
  def update(updates, state, params=None):
    del params
    scale = lambda u, f: u if _masked(u) else u * f
    return jax.tree.map(scale, updates, factors, is_leaf=_masked), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decayed_weights(rates: Any) -> optax.GradientTransformation:
  """updates + rate * params, with a per-parameter rate (weight_decay x its multiplier)."""
  def update(updates, state, params=None):
    decay = lambda u, p, r: u + r * p if r and not _masked(u) else u
    return jax.tree.map(decay, updates, params, rates, is_leaf=_masked), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(params: Any, schedule: Callable, *, b1: float, b2: float, eps: float,
                   weight_decay: float, grad_clip: float, wd_rules: Sequence,
                   lr_rules: Sequence = (), freeze: Sequence[str] = ()
                   ) -> optax.GradientTransformation:
  """Global-norm clipping -> Adam -> decoupled weight decay -> lr (with multipliers).

  With every multiplier 1 this is optax.adamw with the decay mask of `wd_rules`. `params` may be
  abstract (ShapeDtypeStructs): only its paths are read.
  """
  wd = rules_lib.tree_values(wd_rules, params, 1.0, 'optim.wd_rules',
                             lambda path, x, m: weight_decay * float(m), strict=False)
  # Masked as optax.adamw masks its decay, so that the optimizer state keeps adamw's structure.
  decay = optax.masked(_decayed_weights(wd), jax.tree.map(lambda rate: rate != 0, wd))
  adamw = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), decay]
  if lr_rules:
    adamw.append(_scale_by_tree(rules_lib.tree_values(lr_rules, params, 1.0, 'optim.lr_rules',
                                                      lambda path, x, m: float(m))))
  adamw.append(optax.scale_by_learning_rate(schedule))
  # Nested like optax.chain(clip, optax.adamw(...)): the state of older checkpoints restores.
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  tx = optax.chain(*parts, optax.chain(*adamw))
  if not freeze:
    return tx
  labels = rules_lib.freeze_labels(freeze, params)
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def clamp_logit_scale(params: Dict[str, Any]) -> Dict[str, Any]:
  """open_clip clamps the learned log scale to [0, log 100] after every step."""
  if 'logit_scale' not in params:
    return params
  return {**params, 'logit_scale': jnp.clip(params['logit_scale'], 0.0, MAX_LOG_LOGIT_SCALE)}

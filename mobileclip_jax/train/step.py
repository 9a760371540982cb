"""The train state and the train step: the loss and its gradients, then the optimizer update.

One step: uint8 images normalized on device; student image embeddings once; ground-truth and synthetic captions through the text
tower in one pass (interleaved per example, so the concatenation needs no cross-device move);
the DR loss (local rows x gathered columns under the mesh); gradients; optax; the logit-scale
clamp; metrics.

Gradient accumulation keeps the full batch of negatives (GradCache, as open_clip's
`--accum-freq`): pass 1 embeds every micro-batch without gradients; the loss and its gradient
with respect to the embeddings are computed on the whole batch; pass 2 re-runs each micro-batch's
forward and back-propagates its slice of the embedding gradients into the parameters. Embeddings
are gathered across micro-batches, never gradients of a partial loss; the cost is one extra
forward. In train mode BatchNorm normalizes each micro-batch with its own statistics (like the
reference's per-GPU BN) and its running statistics are updated once per micro-batch.

Captioners (`captions=True`, CoCa): the loss is clip_weight * CLIP + caption_weight * the
caption cross-entropy (open_clip's CoCaLoss), the latter summed over every non-padding token of
the batch and divided by their global count. The count depends on the tokens alone, so under
accumulation each micro-batch's summed cross-entropy gets the cotangent caption_weight / count
in pass 2, beside its embedding gradients.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from mobileclip_jax import keys
from mobileclip_jax import losses
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.data import preprocess
from mobileclip_jax.train import optimizer as optimizer_lib

PAD_ID = 0  # Every tokenizer's padding (data/tokenizer.py), ignored by the caption loss.
NORM_METRICS = ('param', 'update')  # The global norms a step can log besides grad_norm.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def _embed(model: nn.Module, params, batch_stats, images, tokens, rng, captions: bool = False):
  """Train-mode forward: (image emb [B, E], text emb [N, E]), new batch statistics; captioners
  add the caption cross-entropy summed over the non-padding tokens ([], `losses.caption_nll`)."""
  out, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, tokens, train=True,
      mutable=['batch_stats'], rngs={'dropout': rng})
  if captions:
    out = (out['image_features'], out['text_features'],
           losses.caption_nll(out['logits'], out['labels'], PAD_ID)[0])
  return out, updates.get('batch_stats', batch_stats)


def _interleave(gt: jax.Array, syn: Optional[jax.Array]) -> jax.Array:
  """[B, L] (+ [B, L]) -> [B * kinds, L] with each example's captions adjacent."""
  if syn is None:
    return gt
  return jnp.stack([gt, syn], axis=1).reshape((-1,) + gt.shape[1:])


def _deinterleave(emb: jax.Array, kinds: int) -> Tuple[jax.Array, Optional[jax.Array]]:
  if kinds == 1:
    return emb, None
  emb = emb.reshape((-1, kinds) + emb.shape[1:])
  return emb[:, 0], emb[:, 1]


def make_grad_fn(model: nn.Module, loss_config: losses.LossConfig, *, mesh: Optional[Mesh],
                 accum_steps: int = 1, use_syn: bool, use_teachers: bool, captions: bool = False,
                 seed: int = 0) -> Callable:
  """Returns grad_fn(state, batch) -> (loss, metrics, grads, new batch statistics).

  The loss and parameter gradients of one step (see the module docstring); `make_update`
  applies the optimizer to them.
  """
  kinds = 2 if use_syn else 1

  def loss_fn(image_emb, text_emb, logit_scale, logit_bias, batch, caption_sum=None):
    gt_emb, syn_emb = _deinterleave(text_emb, kinds)
    embeddings = {keys.IMAGE_EMB: image_emb, keys.TEXT_EMB: gt_emb, keys.SYN_TEXT_EMB: syn_emb,
                  keys.LOGIT_SCALE: logit_scale, keys.LOGIT_BIAS: logit_bias}
    if use_teachers:
      embeddings.update({k: batch[k] for k in keys.TEACHERS
                         if use_syn or k != keys.TEACHER_SYN_TEXT})
    loss, metrics = losses.dr_loss(embeddings, loss_config, mesh=mesh)
    if not captions:
      return loss, metrics
    caption = caption_sum / _caption_count(batch)
    metrics = {**metrics, 'caption/loss': caption}
    return loss_config.clip_weight * loss + loss_config.caption_weight * caption, metrics

  def micro_split(x):  # [B, ...] -> [A, B / A, ...], every micro-batch spread over all devices.
    b = x.shape[0]
    x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      spec = P(None, sharding_lib.BATCH_AXES, *([None] * (x.ndim - 2)))
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x

  def micro_merge(x):  # Inverse of micro_split.
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])

  def grad_fn(state: TrainState, batch: Dict[str, jax.Array]):
    """batch: 'image' uint8 [B, H, W, 3] (normalized here, on device), 'text' int32 [B, L] and,
    for DR, 'syn_text' and the teacher embeddings [B, D_T]."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    images = preprocess.normalize(batch[keys.IMAGE], model.config.mean, model.config.std)
    tokens = _interleave(batch[keys.TEXT], batch[keys.SYN_TEXT] if use_syn else None)
    params = state.params
    scale, bias = params['logit_scale'], params.get('logit_bias')
    tower_params = {k: v for k, v in params.items() if k not in ('logit_scale', 'logit_bias')}

    def embed(tp, stats, x, t, r):
      return _embed(model, {**tp, **_scalars(params)}, stats, x, t, r, captions)

    if accum_steps == 1:
      def full_loss(tower_params, scale, bias):
        outputs, new_stats = embed(tower_params, state.batch_stats, images, tokens, rng)
        loss, metrics = loss_fn(*outputs[:2], scale, bias, batch, *outputs[2:])
        return loss, (metrics, new_stats)
      (loss, (metrics, new_stats)), (g_towers, g_scale, g_bias) = jax.value_and_grad(
          full_loss, argnums=(0, 1, 2), has_aux=True)(tower_params, scale, bias)
    else:
      images_m, tokens_m = micro_split(images), micro_split(tokens)
      rngs = jax.random.split(rng, accum_steps)

      def pass1(_, xs):
        return None, embed(tower_params, state.batch_stats, *xs)[0]
      _, outputs_m = jax.lax.scan(pass1, None, (images_m, tokens_m, rngs))
      image_emb, text_emb = micro_merge(outputs_m[0]), micro_merge(outputs_m[1])
      extra = (jnp.sum(outputs_m[2]),) if captions else ()  # The batch's caption sum.
      (loss, metrics), (g_image, g_text, g_scale, g_bias, *g_extra) = jax.value_and_grad(
          loss_fn, argnums=(0, 1, 2, 3) + ((5,) if captions else ()), has_aux=True)(
              image_emb, text_emb, scale, bias, batch, *extra)
      cotangents = (micro_split(g_image), micro_split(g_text))
      if captions:  # The same d loss / d caption sum for every micro-batch.
        cotangents += (jnp.broadcast_to(g_extra[0], (accum_steps,)),)

      def pass2(carry, xs):
        acc, stats = carry
        (x, t, r), cotangent = xs[:3], xs[3:]
        _, vjp, new_stats = jax.vjp(lambda tp: embed(tp, stats, x, t, r), tower_params,
                                    has_aux=True)
        (grads,) = vjp(cotangent)
        return (jax.tree.map(jnp.add, acc, grads), new_stats), None
      zeros = jax.tree.map(jnp.zeros_like, tower_params)
      (g_towers, new_stats), _ = jax.lax.scan(
          pass2, (zeros, state.batch_stats), (images_m, tokens_m, rngs) + cotangents)

    grads = {**g_towers, 'logit_scale': g_scale}
    if bias is not None:
      grads['logit_bias'] = g_bias
    return loss, metrics, grads, new_stats

  return grad_fn


def make_update(tx: optax.GradientTransformation, *, regularizer: Optional[Callable] = None,
                norms: Sequence[str] = ()) -> Callable:
  """Returns update(state, loss, metrics, grads) -> (state, metrics): the optimizer's half of
  the step, after `make_grad_fn`'s (the new batch statistics are the caller's to set).

  Metrics: the loss terms, `grad_norm` (the clipping's own) and the global norms named in `norms`
  ('param': of the new parameters, 'update': of the step's updates).

  `regularizer(params, step) -> (loss, metrics)`, if given, is added to the loss (and its
  gradient to the gradient): a term of the parameters alone, such as learned inheritance's
  sparsity constraint (inheritance/masks.py).
  """

  def update(state: TrainState, loss: jax.Array, metrics: Dict[str, jax.Array], grads: Any):
    params = state.params
    if regularizer is not None:
      (penalty, penalty_metrics), g_penalty = jax.value_and_grad(regularizer, has_aux=True)(
          params, state.step)
      grads = jax.tree.map(jnp.add, grads, g_penalty)
      loss, metrics = loss + penalty, {**metrics, **penalty_metrics}
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optimizer_lib.clamp_logit_scale(optax.apply_updates(params, updates))
    metrics = dict(metrics)
    metrics.update({'loss': loss, 'logit_scale': jnp.exp(new_params['logit_scale']),
                    'grad_norm': optax.tree.norm(grads)})
    trees = {'param': new_params, 'update': updates}
    for name in norms:
      metrics[f'{name}_norm'] = optax.tree.norm(trees[name])
    return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), metrics

  return update


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_config: losses.LossConfig, *, mesh: Optional[Mesh], accum_steps: int = 1,
                    use_syn: bool, use_teachers: bool, captions: bool = False, seed: int = 0,
                    regularizer: Optional[Callable] = None,
                    norms: Sequence[str] = ()) -> Callable:
  """Returns step(state, batch) -> (state, metrics): `make_grad_fn`'s half, then `make_update`'s,
  as one function; train/setup.py jits it with shardings, or jits the two halves apart."""
  grad_fn = make_grad_fn(model, loss_config, mesh=mesh, accum_steps=accum_steps, use_syn=use_syn,
                         use_teachers=use_teachers, captions=captions, seed=seed)
  update = make_update(tx, regularizer=regularizer, norms=norms)

  def step(state: TrainState, batch: Dict[str, jax.Array]):
    loss, metrics, grads, new_stats = grad_fn(state, batch)
    state, metrics = update(state, loss, metrics, grads)
    return state.replace(batch_stats=new_stats), metrics

  return step


def _caption_count(batch: Dict[str, jax.Array]) -> jax.Array:
  """Non-padding caption targets (tokens after the first) in the batch: the loss's divisor."""
  return jnp.sum(batch[keys.TEXT][:, 1:] != PAD_ID).astype(jnp.float32)


def _scalars(params):
  """The non-tower parameters (logit scale / bias), passed through untouched by the towers."""
  return {k: v for k, v in params.items() if k in ('logit_scale', 'logit_bias')}

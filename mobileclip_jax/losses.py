"""Contrastive and distillation losses of MobileCLIP / MobileCLIP2 training, over embeddings.

The objective is the one of Apple's open_clip patch (`training/open_clip_v2.patch` in
apple/ml-mobileclip: `DistillClipLoss`, `DRClipLoss`, `DistillSigLipLoss`):

- CLIP: symmetric InfoNCE over the batch, logits s * u_i . v_j with L2-normalized student image
  and text embeddings u, v, s = exp(min(logit_scale, log 100)) and the diagonal as labels.
- KD: the stored teacher vectors are the concatenation of K per-teacher unit vectors. The target of
  row i is the teacher ensemble's distribution P_i = (1/K) sum_k softmax_j(tau_k u^k_i . v^k_j)
  ("average after softmax"), computed separately image->text and text->image; the loss is the
  soft cross-entropy -sum_j P_ij log softmax_j(student logits), averaged over rows, and half the
  sum of both directions.
- DR: per caption kind (ground truth, synthetic) L = clip_weight * CLIP + distill_weight * KD,
  summed over kinds with per-kind weights; the image embeddings are shared by the kinds.
- Sigmoid ablation (SigLIP): -log sigmoid(y_ij (t u_i . v_j + b)), y = +1 on the diagonal and -1
  elsewhere, summed over columns, averaged over rows (open_clip `SigLipLoss`, big_vision). Its
  distillation counterpart follows Apple's `DistillSigLipLoss`: the targets are the soft labels
  y_ij = 2 P_ij - 1 in [-1, 1] with P_ij = (1/K) sum_k sigmoid(tau_k u^k_i . v^k_j + b_k), and the
  loss is -log sigmoid(y_ij z_ij) summed over columns, averaged over rows. This is not a binary
  cross-entropy against P: a teacher that is unsure (P = 1/2, y = 0) contributes log 2 and no
  gradient. Apple's teacher biases b_k default to 0; for teachers trained with a softmax loss
  (such as the DFN / OpenAI CLIP teachers) set them (`LossConfig.teacher_biases`), otherwise
  tau_k * cos is large and positive for most pairs and every pair looks like a match.

Design points:
- Every function L2-normalizes inside (each teacher slice too: vectors stored in fp16/bf16 are not
  exactly unit) and computes in float32 (or wider for float64 inputs), with full-precision matmuls,
  whatever the input dtype: a bf16 cosine times a scale of 100 is off by a whole logit.
- `logit_scale` is the learned log value. The reference clamps the parameter to [0, log 100] after
  each optimizer step; here the forward pass uses min(logit_scale, log 100), which gives the same
  loss and a zero gradient above the clamp.
- With a `mesh`, the loss runs under `jax.shard_map` with the batch split over `batch_axes`: each
  device takes its local rows against all-gathered columns (logits [B_local, B_global], never
  [B_global, B_global] on one device), its labels offset by its row position, and the row sums are
  psum-reduced to the global mean. This is open_clip's `--local-loss --gather-with-grad`; the
  all-gather is differentiable (its transpose is a reduce-scatter), so the gradients are the ones of
  the single-device loss.
- `LossConfig.block_size` > 0 (the default) streams the columns instead (`streamed_loss.py`):
  blocks of columns with an online log-sum-exp and a custom VJP that recomputes them, and under a
  mesh each device's columns passed around a ring of devices rather than all-gathered, so a
  device holds [B_local, block_size] tiles, never [B_local, B_global]. block_size=0 keeps the form
  above, the reference the streamed loss is tested against.
- `average='logits'` averages the teachers' logits tau_k u^k . v^k before one softmax (sigmoid).
  Apple's code, with averaging after softmax switched off, applies one scale tau to the dot product
  of the concatenated vectors, i.e. tau * sum_k u^k . v^k: that is `average='logits'` with
  teacher_scales = (K * tau,) * K.
"""
import dataclasses
import math
from typing import Mapping

import jax
from jax import lax
import jax.numpy as jnp
import optax

from mobileclip_jax import keys
from mobileclip_jax import streamed_loss
from mobileclip_jax.sharding import BATCH_AXES

Array = jax.Array

# open_clip clamps the learned logit scale to log(100) (`logit_scale.clamp_(0, math.log(100))`).
MAX_LOGIT_SCALE = 100.0

# The `embeddings` mapping of `dr_loss` (names in mobileclip_jax/keys.py).
_BATCH_KEYS = (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB) + keys.TEACHERS
_PARAM_KEYS = (keys.LOGIT_SCALE, keys.LOGIT_BIAS)
# Caption kind -> (student text key, teacher text key).
_CAPTION_KINDS = {'gt': (keys.TEXT_EMB, keys.TEACHER_TEXT),
                  'syn': (keys.SYN_TEXT_EMB, keys.TEACHER_SYN_TEXT)}
# Columns per block of the streamed loss: [8192, 1024] fp32 tiles at 65,536 on 8 devices.
DEFAULT_BLOCK_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The training objective. Defaults are MobileCLIP2's recipe (`run_dfndr2b.sh`).

  Attributes:
    kind: 'softmax' (CLIP / InfoNCE, the paper) or 'sigmoid' (SigLIP ablation).
    clip_weight: weight of the contrastive term in each caption kind's loss.
    distill_weight: weight of the distillation term (the paper's lambda, with clip_weight 1-lambda).
    gt_weight: weight of the ground-truth caption kind in the total.
    syn_weight: weight of the synthetic caption kind in the total (Apple sums the kinds: 1, 1).
    teacher_scales: per-teacher logit scales tau_k (inverse temperatures, not logs).
    teacher_dims: per-teacher embedding widths; the stored teacher vectors are their concatenation.
    teacher_biases: per-teacher logit biases b_k, 'sigmoid' only (a bias is a no-op under a row
      softmax); None means zeros, as Apple's default.
    average: 'probs' averages the per-teacher softmax (sigmoid) outputs; 'logits' averages the
      per-teacher logits before a single softmax (sigmoid).
    student_scale: when set, the distillation term uses this fixed student logit scale instead of
      the learned one (decoupled temperatures); the contrastive term always uses the learned one.
    block_size: columns per block of the streamed loss (`streamed_loss.py`: memory O(rows x
      block_size) per device, columns passed around the devices in a ring); 0 builds the whole
      [rows, batch] matrices with all-gathered columns (the reference form).
    caption_weight: CoCa's objective (train/step.py): clip_weight * CLIP + caption_weight *
      `caption_nll` mean; 0 for the other objectives (dr_loss does not read it).
  """
  kind: str = 'softmax'
  clip_weight: float = 0.0
  distill_weight: float = 1.0
  gt_weight: float = 1.0
  syn_weight: float = 1.0
  teacher_scales: tuple[float, ...] = (70.0, 60.0)
  teacher_dims: tuple[int, ...] = (768, 768)
  teacher_biases: tuple[float, ...] | None = None
  average: str = 'probs'
  student_scale: float | None = None
  block_size: int = DEFAULT_BLOCK_SIZE
  caption_weight: float = 0.0

  def __post_init__(self):
    # Config overrides arrive as lists; tuples keep the config hashable (a static jit argument).
    for name in ('teacher_scales', 'teacher_dims', 'teacher_biases'):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    if self.kind not in ('softmax', 'sigmoid'):
      raise ValueError(f"LossConfig.kind must be 'softmax' or 'sigmoid', got {self.kind!r}.")
    if self.average not in ('probs', 'logits'):
      raise ValueError(f"LossConfig.average must be 'probs' or 'logits', got {self.average!r}.")
    for name in ('clip_weight', 'distill_weight', 'gt_weight', 'syn_weight', 'caption_weight'):
      if getattr(self, name) < 0:
        raise ValueError(f'LossConfig.{name} must be >= 0, got {getattr(self, name)}.')
    num_teachers = len(self.teacher_dims)
    if num_teachers == 0 or any(int(d) != d or d <= 0 for d in self.teacher_dims):
      raise ValueError('LossConfig.teacher_dims must list the positive embedding width of each '
                       f'teacher, e.g. (768, 768); got {self.teacher_dims}.')
    if len(self.teacher_scales) != num_teachers or any(s <= 0 for s in self.teacher_scales):
      raise ValueError(f'LossConfig.teacher_scales {self.teacher_scales} must hold one positive '
                       f'logit scale per teacher of teacher_dims {self.teacher_dims}.')
    if self.teacher_biases is not None:
      if self.kind != 'sigmoid':
        raise ValueError('LossConfig.teacher_biases only apply to the sigmoid loss (a bias does '
                         "not change a row softmax); drop them or set kind='sigmoid'.")
      if len(self.teacher_biases) != num_teachers:
        raise ValueError(f'LossConfig.teacher_biases {self.teacher_biases} must hold one bias '
                         f'per teacher of teacher_dims {self.teacher_dims}.')
    if self.student_scale is not None and self.student_scale <= 0:
      raise ValueError(f'LossConfig.student_scale must be > 0 or None, got {self.student_scale}.')
    if int(self.block_size) != self.block_size or self.block_size < 0:
      raise ValueError('LossConfig.block_size must be an integer >= 0 (0: the unstreamed loss), '
                       f'got {self.block_size}.')


def dr_loss(embeddings: Mapping[str, Array | float | None], config: LossConfig, *,
            mesh: jax.sharding.Mesh | None = None,
            batch_axes: tuple[str, ...] = BATCH_AXES) -> tuple[Array, dict[str, Array]]:
  """The dataset-reinforcement objective (Apple's `DRClipLoss`), with its metrics.

  Args:
    embeddings: student outputs, stored teacher embeddings and the learned scalars:
      'image_emb' [B, E], 'text_emb' [B, E] (ground-truth captions), optional 'syn_text_emb'
      [B, E] (one synthetic caption per image); optional 'teacher_image_emb',
      'teacher_text_emb', 'teacher_syn_text_emb' [B, sum(config.teacher_dims)];
      'logit_scale' [] (log value) and, for kind 'sigmoid', 'logit_bias' []. A value of None counts
      as absent. Without teacher embeddings (plain image-caption data) each kind's loss is the
      contrastive loss alone; without synthetic captions only the 'gt' kind is computed.
    config: the objective.
    mesh: when given, the batch is split over `batch_axes` of this mesh and each device computes
      its rows against all-gathered columns.
    batch_axes: mesh axes the batch dimension is sharded over.

  Returns:
    (total, metrics): total [] float32, the weighted sum over caption kinds. metrics maps to []
    float32: 'total'; 'scale' (the student's effective scale) and for 'sigmoid' 'bias'; per kind
    ('gt', 'syn'): '<kind>/loss', '<kind>/clip' and with teachers '<kind>/distill',
    '<kind>/agreement_i2t', '<kind>/agreement_t2i' (the fraction of rows where the student's
    argmax equals the teacher ensemble's argmax).
  """
  embeddings = {k: v for k, v in embeddings.items() if v is not None}
  unknown = sorted(set(embeddings) - set(_BATCH_KEYS) - set(_PARAM_KEYS))
  if unknown:
    raise ValueError(f'dr_loss got unknown embedding keys {unknown}; '
                     f'expected some of {_BATCH_KEYS + _PARAM_KEYS}.')
  needed = (keys.IMAGE_EMB, keys.TEXT_EMB, keys.LOGIT_SCALE)
  for key in needed + ((keys.LOGIT_BIAS,) if config.kind == 'sigmoid' else ()):
    if key not in embeddings:
      raise ValueError(f"dr_loss needs '{key}' (kind {config.kind!r}); got keys "
                       f'{sorted(embeddings)}.')
  batch = {k: v for k, v in embeddings.items() if k in _BATCH_KEYS}
  params = {k: v for k, v in embeddings.items() if k in _PARAM_KEYS}
  return _objective(batch, params, config, mesh, batch_axes)


def caption_nll(logits: Array, labels: Array, pad_id: int = 0) -> tuple[Array, Array]:
  """(summed cross-entropy, number of tokens) of next-token logits [B, n, V] against labels
  [B, n], positions whose label is `pad_id` left out.

  open_clip's CoCaLoss caption term is sum / count over its (per-GPU) batch
  (`CrossEntropyLoss(ignore_index=pad_id)`); the train step divides by the global count, which
  is that loss on one device and does not depend on how the batch is split.
  """
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  valid = labels != pad_id
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def _objective(batch: dict[str, Array], params: dict[str, Array | float], config: LossConfig,
               mesh: jax.sharding.Mesh | None,
               batch_axes: tuple[str, ...]) -> tuple[Array, dict[str, Array]]:
  """Validates the inputs, reduces the per-row terms to global means and weights them."""
  kinds = _check_batch(batch, config)
  params = {k: jnp.asarray(v, streamed_loss.compute_dtype(jnp.result_type(v)))
            for k, v in params.items()}
  means = _mean_over_rows(batch, params, config, mesh, batch_axes)
  has_teacher = keys.TEACHER_IMAGE in batch
  # SigLIP sums over all pairs, so one direction (image rows) holds the whole loss.
  loss_directions = ('i2t', 't2i') if config.kind == 'softmax' else ('i2t',)
  metrics = {'scale': _student_scale(params[keys.LOGIT_SCALE])}
  if config.kind == 'sigmoid':
    metrics['bias'] = params[keys.LOGIT_BIAS]
  kind_weights = {'gt': config.gt_weight, 'syn': config.syn_weight}
  total = 0.0
  for kind in kinds:
    clip = sum(means[f'{kind}/clip_{d}'] for d in loss_directions) / len(loss_directions)
    metrics[f'{kind}/clip'] = clip
    if has_teacher:
      distill = sum(means[f'{kind}/distill_{d}'] for d in loss_directions) / len(loss_directions)
      metrics[f'{kind}/distill'] = distill
      for direction in ('i2t', 't2i'):
        metrics[f'{kind}/agreement_{direction}'] = means[f'{kind}/agreement_{direction}']
      loss = config.clip_weight * clip + config.distill_weight * distill
    else:
      loss = clip
    metrics[f'{kind}/loss'] = loss
    total = total + kind_weights[kind] * loss
  metrics['total'] = total
  return total, metrics


def _check_batch(batch: dict[str, Array], config: LossConfig) -> tuple[str, ...]:
  """Checks shapes and key combinations; returns the caption kinds present."""
  kinds = ('gt', 'syn') if keys.SYN_TEXT_EMB in batch else ('gt',)
  has_teacher = keys.TEACHER_IMAGE in batch
  for kind in kinds:
    teacher_key = _CAPTION_KINDS[kind][1]
    if (teacher_key in batch) != has_teacher:
      raise ValueError(
          f"Teacher embeddings must come for the image and every caption kind or not at all: got "
          f"'{keys.TEACHER_IMAGE}' {'present' if has_teacher else 'absent'} but '{teacher_key}' "
          f"{'present' if teacher_key in batch else 'absent'}.")
  if keys.TEACHER_SYN_TEXT in batch and keys.SYN_TEXT_EMB not in batch:
    raise ValueError(f"Got '{keys.TEACHER_SYN_TEXT}' without '{keys.SYN_TEXT_EMB}': pass the "
                     "student's synthetic caption embeddings too, or drop the teacher ones.")
  for key, value in batch.items():
    if value.ndim != 2 or value.shape[0] != batch[keys.IMAGE_EMB].shape[0]:
      raise ValueError(f"'{key}' must be [B, D] with B = {batch[keys.IMAGE_EMB].shape[0]} (the "
                       f'image batch); got shape {value.shape}.')
  for key in (keys.TEXT_EMB, keys.SYN_TEXT_EMB):
    if key in batch and batch[key].shape[1] != batch[keys.IMAGE_EMB].shape[1]:
      raise ValueError(f"'{key}' width {batch[key].shape[1]} differs from '{keys.IMAGE_EMB}' width "
                       f'{batch[keys.IMAGE_EMB].shape[1]}: the student towers must project to one '
                       'space.')
  width = sum(config.teacher_dims)
  for key in (keys.TEACHER_IMAGE, keys.TEACHER_TEXT, keys.TEACHER_SYN_TEXT):
    if key in batch and batch[key].shape[1] != width:
      raise ValueError(f"'{key}' has width {batch[key].shape[1]} but teacher_dims "
                       f'{config.teacher_dims} sum to {width}: set teacher_dims to the widths of '
                       'the teachers the embeddings were stored with.')
  return kinds


def _mean_over_rows(batch: dict[str, Array], params: dict[str, Array], config: LossConfig,
                    mesh: jax.sharding.Mesh | None,
                    batch_axes: tuple[str, ...]) -> dict[str, Array]:
  """Global row means of every per-row term, on one device or over the mesh's batch axes."""
  global_batch = batch[keys.IMAGE_EMB].shape[0]
  if mesh is None:
    sums = _row_sums(batch, batch, params, 0, config)
    return {k: v / global_batch for k, v in sums.items()}
  missing = [a for a in batch_axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'batch_axes {batch_axes} name axes {missing} that the mesh (axes '
                     f'{mesh.axis_names}) lacks.')
  num_shards = math.prod(mesh.shape[a] for a in batch_axes)
  if global_batch % num_shards:
    raise ValueError(f'The global batch {global_batch} does not split over the {num_shards} '
                     f'devices of mesh axes {batch_axes}: use a multiple of {num_shards}.')

  def local(rows, params):
    if config.block_size:
      # Streamed: this device's own columns travel around the ring of batch devices.
      ring = streamed_loss.Ring.of(mesh, tuple(batch_axes))
      sums = _row_sums(rows, rows, params, None, config, ring)
    else:
      # Columns stay in their input dtype for the gather (half the traffic for bf16 embeddings).
      cols = {k: lax.all_gather(v, batch_axes, axis=0, tiled=True) for k, v in rows.items()}
      offset = lax.axis_index(batch_axes) * rows[keys.IMAGE_EMB].shape[0]
      sums = _row_sums(rows, cols, params, offset, config)
    return {k: lax.psum(v, batch_axes) / global_batch for k, v in sums.items()}

  spec = jax.sharding.PartitionSpec(batch_axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()),
                       out_specs=jax.sharding.PartitionSpec())(batch, params)


def _row_sums(rows: dict[str, Array], cols: dict[str, Array], params: dict[str, Array],
              offset: Array | int | None, config: LossConfig,
              ring: streamed_loss.Ring | None = None) -> dict[str, Array]:
  """Sums over `rows` of each term, every row against all columns.

  Args:
    rows: [R, D] arrays by key, rows offset..offset+R-1 of the global batch.
    cols: [C, D] arrays by key, the whole global batch (the same dict as rows on one device);
      with a `ring`, this device's own columns (the same dict as rows).
    params: 'logit_scale' and, for 'sigmoid', 'logit_bias', [] each.
    offset: the global index of the first row; row r's positive is column offset + r (the
      streamed loss takes it from the ring).
    config: the objective; block_size > 0 streams the columns (`streamed_loss.py`).
    ring: the batch devices the streamed loss passes the columns around, under shard_map.

  Returns:
    '<kind>/<term>_<direction>' -> [] sum over the rows, for terms clip, distill, agreement.
  """
  scale = _student_scale(params[keys.LOGIT_SCALE])
  bias = params[keys.LOGIT_BIAS] if config.kind == 'sigmoid' else 0.0
  has_teacher = keys.TEACHER_IMAGE in rows

  def both(f):
    """(f(rows), f(cols)), computed once when the columns are the rows."""
    of_rows = f(rows)
    return (of_rows, of_rows) if cols is rows else (of_rows, f(cols))

  def teacher(x):
    # Teacher embeddings are data: no gradient flows into them. The streamed loss normalizes each
    # block as it scores it, so the columns travel in their stored dtype (fp16: half the bytes).
    x = lax.stop_gradient(x)
    return x if config.block_size else streamed_loss.unit_slices(x, config.teacher_dims)

  unit = {k: both(lambda x, k=k: streamed_loss.unit(x[k]))
          for k in (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB) if k in rows}
  teachers = {k: both(lambda x, k=k: teacher(x[k]))
                  for k in (keys.TEACHER_IMAGE, keys.TEACHER_TEXT, keys.TEACHER_SYN_TEXT) if k in rows}
  sums = {}
  for kind, (text_key, teacher_text_key) in _CAPTION_KINDS.items():
    if text_key not in rows:
      continue
    image_rows, image_cols = unit[keys.IMAGE_EMB]
    text_rows, text_cols = unit[text_key]
    teacher_image_rows = teacher_text_rows = teacher_image_cols = teacher_text_cols = None
    if has_teacher:
      teacher_image_rows, teacher_image_cols = teachers[keys.TEACHER_IMAGE]
      teacher_text_rows, teacher_text_cols = teachers[teacher_text_key]
    directions = {
        'i2t': (image_rows, text_cols, teacher_image_rows, teacher_text_cols),
        't2i': (text_rows, image_cols, teacher_text_rows, teacher_image_cols),
    }
    for direction, (a_rows, b_cols, teacher_rows, teacher_cols) in directions.items():
      # The sigmoid loss is complete with image rows; text rows only give the agreement metric.
      losses = config.kind == 'softmax' or direction == 'i2t'
      if config.block_size:
        terms = streamed_loss.direction_row_sums(a_rows, b_cols, teacher_rows, teacher_cols, scale,
                                                 bias, config, losses, ring)
      else:
        terms = _direction_row_sums(a_rows, b_cols, teacher_rows, teacher_cols, scale, bias,
                                    offset, config, losses)
      sums.update({f'{kind}/{name}_{direction}': value for name, value in terms.items()})
  return sums


def _direction_row_sums(a_rows: Array, b_cols: Array, teacher_rows: list[Array] | None,
                        teacher_cols: list[Array] | None, scale: Array, bias: Array | float,
                        offset: Array | int, config: LossConfig, losses: bool) -> dict[str, Array]:
  """Row sums of the terms for unit rows of one modality against all unit columns of the other.

  Args:
    a_rows: [R, E] unit student rows (image rows for image->text).
    b_cols: [C, E] unit student columns of the other modality.
    teacher_rows: per-teacher [R, D_k] unit rows, or None without teachers.
    teacher_cols: per-teacher [C, D_k] unit columns, or None.
    scale: [] student logit scale (exp'd and clamped).
    bias: [] student logit bias (0 for softmax).
    offset: global index of the first row.
    config: the objective.
    losses: False computes only the agreement (without gradient).

  Returns:
    'clip', 'distill' (with teachers) when `losses`, 'agreement' (with teachers) -> [] sums.
  """
  if not losses:
    a_rows, b_cols, scale, bias = lax.stop_gradient((a_rows, b_cols, scale, bias))
  cosines = streamed_loss.matmul_t(a_rows, b_cols)
  logits = scale * cosines + bias
  sums = {}
  if losses:
    positives = offset + jnp.arange(logits.shape[0])
    if config.kind == 'softmax':
      positive_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
      sums['clip'] = jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive_logits)
    else:
      signs = jnp.where(positives[:, None] == jnp.arange(logits.shape[1])[None, :], 1.0, -1.0)
      sums['clip'] = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
  if teacher_rows is None:
    return sums
  targets = lax.stop_gradient(_teacher_targets(teacher_rows, teacher_cols, config))
  if losses:
    distill_logits = logits if config.student_scale is None else (
        config.student_scale * cosines + bias)
    if config.kind == 'softmax':
      sums['distill'] = -jnp.sum(targets * jax.nn.log_softmax(distill_logits, axis=1))
    else:
      sums['distill'] = -jnp.sum(jax.nn.log_sigmoid(targets * distill_logits))
  agree = jnp.argmax(lax.stop_gradient(logits), axis=1) == jnp.argmax(targets, axis=1)
  sums['agreement'] = jnp.sum(agree.astype(logits.dtype))
  return sums


def _teacher_targets(rows: list[Array], cols: list[Array], config: LossConfig) -> Array:
  """The teacher ensemble's targets [R, C]: row softmax probabilities, or sigmoid soft labels.

  For 'softmax': (1/K) sum_k softmax(tau_k s_k) ('probs') or softmax((1/K) sum_k tau_k s_k)
  ('logits'), with s_k the teacher-k cosines. For 'sigmoid', with the teacher biases b_k added to
  the logits and sigmoid for softmax, the labels 2 P - 1 in [-1, 1] (Apple's DistillSigLipLoss).
  """
  biases = config.teacher_biases or (0.0,) * len(config.teacher_dims)
  logits = [tau * streamed_loss.matmul_t(r, c) + b
            for tau, b, r, c in zip(config.teacher_scales, biases, rows, cols)]
  activation = (lambda x: jax.nn.softmax(x, axis=1)) if config.kind == 'softmax' else jax.nn.sigmoid
  if config.average == 'probs':
    probs = sum(activation(x) for x in logits) / len(logits)
  else:
    probs = activation(sum(logits) / len(logits))
  return probs if config.kind == 'softmax' else 2.0 * probs - 1.0


def _student_scale(logit_scale: Array) -> Array:
  """exp of the learned log scale, clamped at MAX_LOGIT_SCALE as open_clip does."""
  return jnp.exp(jnp.minimum(logit_scale, math.log(MAX_LOGIT_SCALE)))

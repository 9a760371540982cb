"""Tests of mobileclip_jax.losses.

Ground truths, none of them written by calling the code under test:
- a float64 numpy reference written from the formulas (mobileclip-spec.md section 4.1; Apple's
  `DistillClipLoss` / `DRClipLoss` / `DistillSigLipLoss` in training/open_clip_v2.patch; SigLIP),
  full B x B matrices, no sharding;
- open_clip's own `ClipLoss`, `DistillClipLoss` and `SigLipLoss` in torch;
- closed forms: perfect alignment, a teacher equal to the student (KD = target entropy, zero
  gradient), identical teachers = one teacher.
The sharded path (8 fake CPU devices) must equal the single-device loss, metrics and gradients,
and its compiled per-device program must hold no [B_global, B_global] array.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip_jax import keys
from mobileclip_jax import losses
from mobileclip_jax import torch_compat

# ----------------------------------------------------------------------------------------------
# float64 numpy reference, from the formulas.


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _softmax(z):
  return np.exp(_log_softmax(z))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _scale(logit_scale):
  return math.exp(min(logit_scale, math.log(100.0)))


def _ensemble(a, b, scales, dims, average, activation, biases=None):
  """Teacher ensemble over rows of a against rows of b, each teacher slice normalized."""
  edges = np.cumsum([0] + list(dims))
  biases = biases or [0.0] * len(dims)
  logits = [tau * _unit(a[:, lo:hi]) @ _unit(b[:, lo:hi]).T + bias
            for tau, bias, lo, hi in zip(scales, biases, edges[:-1], edges[1:])]
  if average == 'probs':
    return np.mean([activation(x) for x in logits], axis=0)
  return activation(np.mean(logits, axis=0))


def ref_kind(img, txt, t_img, t_txt, logit_scale, kind='softmax', logit_bias=0.0, scales=None,
             dims=None, biases=None, average='probs', student_scale=None):
  """(clip, distill, agreement_i2t, agreement_t2i) of one caption kind, full-batch float64."""
  img, txt = np.float64(img), np.float64(txt)
  cos = _unit(img) @ _unit(txt).T
  batch = cos.shape[0]
  if kind == 'softmax':
    z = _scale(logit_scale) * cos
    clip = 0.5 * (-np.mean(np.diag(_log_softmax(z))) - np.mean(np.diag(_log_softmax(z.T))))
  else:
    z = _scale(logit_scale) * cos + logit_bias
    clip = -np.sum(_log_sigmoid((2 * np.eye(batch) - 1) * z)) / batch
  if t_img is None:
    return clip, None, None, None
  t_img, t_txt = np.float64(t_img), np.float64(t_txt)
  z_kd = z if student_scale is None else student_scale * cos + (kind == 'sigmoid') * logit_bias
  if kind == 'softmax':
    p_i2t = _ensemble(t_img, t_txt, scales, dims, average, _softmax)
    p_t2i = _ensemble(t_txt, t_img, scales, dims, average, _softmax)
    distill = 0.5 * (-np.mean(np.sum(p_i2t * _log_softmax(z_kd), 1))
                     - np.mean(np.sum(p_t2i * _log_softmax(z_kd.T), 1)))
  else:
    p_i2t = 2 * _ensemble(t_img, t_txt, scales, dims, average, _sigmoid, biases) - 1
    p_t2i = 2 * _ensemble(t_txt, t_img, scales, dims, average, _sigmoid, biases) - 1
    distill = -np.sum(_log_sigmoid(p_i2t * z_kd)) / batch
  agreement_i2t = np.mean(np.argmax(z, 1) == np.argmax(p_i2t, 1))
  agreement_t2i = np.mean(np.argmax(z.T, 1) == np.argmax(p_t2i, 1))
  return clip, distill, agreement_i2t, agreement_t2i


# ----------------------------------------------------------------------------------------------
# Helpers.

_dr_loss = jax.jit(losses.dr_loss, static_argnames=('config', 'mesh', 'batch_axes'))


# One term of the DR objective on ground-truth captions, as the formulas below write it.
def clip_loss(image, text, logit_scale, mesh=None):
  config = losses.LossConfig(kind='softmax', clip_weight=1.0, distill_weight=0.0)
  embeddings = {keys.IMAGE_EMB: image, keys.TEXT_EMB: text, keys.LOGIT_SCALE: logit_scale}
  return losses.dr_loss(embeddings, config, mesh=mesh)[1]['gt/clip']


def siglip_loss(image, text, logit_scale, logit_bias):
  config = losses.LossConfig(kind='sigmoid', clip_weight=1.0, distill_weight=0.0)
  embeddings = {keys.IMAGE_EMB: image, keys.TEXT_EMB: text, keys.LOGIT_SCALE: logit_scale,
                keys.LOGIT_BIAS: logit_bias}
  return losses.dr_loss(embeddings, config)[1]['gt/clip']


def distill_loss(image, text, teacher_image, teacher_text, logit_scale, teacher_scales,
                 teacher_dims, average='probs', student_scale=None):
  config = losses.LossConfig(kind='softmax', clip_weight=0.0, distill_weight=1.0,
                             teacher_scales=teacher_scales, teacher_dims=teacher_dims,
                             average=average, student_scale=student_scale)
  embeddings = {keys.IMAGE_EMB: image, keys.TEXT_EMB: text, keys.TEACHER_IMAGE: teacher_image,
                keys.TEACHER_TEXT: teacher_text, keys.LOGIT_SCALE: logit_scale}
  return losses.dr_loss(embeddings, config)[1]['gt/distill']


def siglip_distill_loss(image, text, teacher_image, teacher_text, logit_scale, logit_bias,
                        teacher_scales, teacher_dims, teacher_biases=None, average='probs',
                        student_scale=None):
  config = losses.LossConfig(kind='sigmoid', clip_weight=0.0, distill_weight=1.0,
                             teacher_scales=teacher_scales, teacher_dims=teacher_dims,
                             teacher_biases=teacher_biases, average=average,
                             student_scale=student_scale)
  embeddings = {keys.IMAGE_EMB: image, keys.TEXT_EMB: text, keys.TEACHER_IMAGE: teacher_image,
                keys.TEACHER_TEXT: teacher_text, keys.LOGIT_SCALE: logit_scale,
                keys.LOGIT_BIAS: logit_bias}
  return losses.dr_loss(embeddings, config)[1]['gt/distill']


_clip_loss = jax.jit(clip_loss)
_siglip_loss = jax.jit(siglip_loss)
_distill_loss = jax.jit(distill_loss, static_argnames=(
    'teacher_scales', 'teacher_dims', 'average', 'student_scale'))
_siglip_distill_loss = jax.jit(siglip_distill_loss, static_argnames=(
    'teacher_scales', 'teacher_dims', 'teacher_biases', 'average', 'student_scale'))


def _embeddings(seed, batch, width, teacher_dims, dtype=np.float32, syn=True, teachers=True):
  """Random student and teacher embeddings; texts correlate with images so losses are O(1)."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, width))
  out = {keys.IMAGE_EMB: image, keys.TEXT_EMB: image + rng.normal(size=(batch, width)),
         keys.LOGIT_SCALE: np.log(20.0)}
  if syn:
    out[keys.SYN_TEXT_EMB] = image + 1.5 * rng.normal(size=(batch, width))
  if teachers:
    teacher_width = sum(teacher_dims)
    teacher_image = rng.normal(size=(batch, teacher_width))
    out[keys.TEACHER_IMAGE] = teacher_image
    out[keys.TEACHER_TEXT] = teacher_image + rng.normal(size=(batch, teacher_width))
    if syn:
      out[keys.TEACHER_SYN_TEXT] = teacher_image + 1.5 * rng.normal(size=(batch, teacher_width))
  return {k: np.asarray(v, dtype) for k, v in out.items()}


# float64 under jax_enable_x64 checks the formulas to rounding; float32 is the training dtype.
_PRECISIONS = [pytest.param(np.float64, 1e-10, id='float64'),
               pytest.param(np.float32, 1e-5, id='float32')]


def _close(actual, expected, tol):
  np.testing.assert_allclose(np.float64(actual), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# The formulas.


@pytest.mark.parametrize('dtype,tol', _PRECISIONS)
def test_clip_loss_matches_reference(dtype, tol):
  e = _embeddings(0, 12, 16, (8,), dtype, syn=False, teachers=False)
  with jax.enable_x64(dtype == np.float64):
    actual = _clip_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.LOGIT_SCALE])
  expected = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], None, None,
                      float(e[keys.LOGIT_SCALE]))[0]
  _close(actual, expected, tol)


@pytest.mark.parametrize('dims,scales', [((24,), (50.0,)), ((32, 48), (70.0, 60.0)),
                                         ((768, 768), (100.0, 100.0))])
@pytest.mark.parametrize('average', ['probs', 'logits'])
def test_distill_loss_matches_reference(dims, scales, average):
  e = _embeddings(1, 10, 16, dims, np.float64, syn=False)
  with jax.enable_x64(True):
    actual = _distill_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                           e[keys.TEACHER_TEXT], e[keys.LOGIT_SCALE], teacher_scales=scales,
                           teacher_dims=dims, average=average)
  expected = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                      e[keys.TEACHER_TEXT], float(e[keys.LOGIT_SCALE]), scales=scales,
                      dims=dims, average=average)[1]
  _close(actual, expected, 1e-10)


@pytest.mark.parametrize('dtype,tol', _PRECISIONS)
def test_distill_loss_with_fixed_student_scale_matches_reference(dtype, tol):
  dims, scales = (32, 48), (70.0, 60.0)
  e = _embeddings(2, 10, 16, dims, dtype, syn=False)
  with jax.enable_x64(dtype == np.float64):
    actual = _distill_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                           e[keys.TEACHER_TEXT], e[keys.LOGIT_SCALE], teacher_scales=scales,
                           teacher_dims=dims, student_scale=35.0)
  expected = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                      e[keys.TEACHER_TEXT], float(e[keys.LOGIT_SCALE]), scales=scales,
                      dims=dims, student_scale=35.0)[1]
  _close(actual, expected, tol)


@pytest.mark.parametrize('dtype,tol', _PRECISIONS)
def test_siglip_loss_matches_reference(dtype, tol):
  e = _embeddings(3, 12, 16, (8,), dtype, syn=False, teachers=False)
  with jax.enable_x64(dtype == np.float64):
    actual = _siglip_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.LOGIT_SCALE], dtype(-3.0))
  expected = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], None, None, float(e[keys.LOGIT_SCALE]),
                      kind='sigmoid', logit_bias=-3.0)[0]
  _close(actual, expected, tol)


@pytest.mark.parametrize('biases', [None, (-8.0, -5.0)])
@pytest.mark.parametrize('average', ['probs', 'logits'])
def test_siglip_distill_loss_matches_reference(biases, average):
  dims, scales = (32, 48), (10.0, 20.0)
  e = _embeddings(4, 10, 16, dims, np.float64, syn=False)
  with jax.enable_x64(True):
    actual = _siglip_distill_loss(
        e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE], e[keys.TEACHER_TEXT],
        e[keys.LOGIT_SCALE], -2.0, teacher_scales=scales, teacher_dims=dims,
        teacher_biases=biases, average=average)
  expected = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                      e[keys.TEACHER_TEXT], float(e[keys.LOGIT_SCALE]), kind='sigmoid',
                      logit_bias=-2.0, scales=scales, dims=dims, biases=biases,
                      average=average)[1]
  _close(actual, expected, 1e-10)


def _ref_dr(e, config, logit_bias=0.0):
  """Reference DR total and metrics from ref_kind, per caption kind present in `e`."""
  metrics, total = {}, 0.0
  kinds = {'gt': (keys.TEXT_EMB, keys.TEACHER_TEXT, config.gt_weight),
           'syn': (keys.SYN_TEXT_EMB, keys.TEACHER_SYN_TEXT, config.syn_weight)}
  for kind, (text_key, teacher_key, kind_weight) in kinds.items():
    if text_key not in e:
      continue
    clip, distill, agree_i2t, agree_t2i = ref_kind(
        e[keys.IMAGE_EMB], e[text_key], e.get(keys.TEACHER_IMAGE), e.get(teacher_key),
        float(e[keys.LOGIT_SCALE]), kind=config.kind, logit_bias=logit_bias,
        scales=config.teacher_scales, dims=config.teacher_dims, biases=config.teacher_biases,
        average=config.average, student_scale=config.student_scale)
    metrics[f'{kind}/clip'] = clip
    if distill is None:
      loss = clip
    else:
      loss = config.clip_weight * clip + config.distill_weight * distill
      metrics.update({f'{kind}/distill': distill, f'{kind}/agreement_i2t': agree_i2t,
                      f'{kind}/agreement_t2i': agree_t2i})
    metrics[f'{kind}/loss'] = loss
    total += kind_weight * loss
  metrics['total'] = total
  return total, metrics


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_dr_loss_matches_reference(kind):
  config = losses.LossConfig(
      kind=kind, clip_weight=0.25, distill_weight=0.75, gt_weight=1.0, syn_weight=0.5,
      teacher_scales=(30.0, 20.0), teacher_dims=(32, 48),
      teacher_biases=(-6.0, -4.0) if kind == 'sigmoid' else None)
  e = _embeddings(5, 16, 16, config.teacher_dims, np.float64)
  if kind == 'sigmoid':
    e[keys.LOGIT_BIAS] = np.float64(-2.0)
  with jax.enable_x64(True):
    total, metrics = _dr_loss(e, config)
  expected_total, expected = _ref_dr(e, config, logit_bias=-2.0)
  _close(total, expected_total, 1e-10)
  assert set(expected) <= set(metrics)
  for name, value in expected.items():
    _close(metrics[name], value, 1e-10)
  # The agreement must be informative here, or its comparison above proves little.
  assert 0.0 < expected['gt/agreement_i2t'] and 0.0 < expected['syn/agreement_t2i']


def test_dr_loss_without_teachers_is_clip_and_without_synthetic_is_gt_only():
  config = losses.LossConfig(clip_weight=0.25, distill_weight=0.75, gt_weight=2.0, syn_weight=0.5,
                             teacher_dims=(8,), teacher_scales=(50.0,))
  e = _embeddings(6, 8, 16, (8,), syn=True, teachers=False)
  total, metrics = _dr_loss(e, config)
  gt = ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], None, None, float(e[keys.LOGIT_SCALE]))[0]
  syn = ref_kind(e[keys.IMAGE_EMB], e[keys.SYN_TEXT_EMB], None, None,
                 float(e[keys.LOGIT_SCALE]))[0]
  _close(total, 2.0 * gt + 0.5 * syn, 1e-5)
  assert not any('distill' in k or 'agreement' in k for k in metrics)

  e = _embeddings(6, 8, 16, (8,), syn=False, teachers=True)
  total, metrics = _dr_loss(e, config)
  assert not any(k.startswith('syn/') for k in metrics)
  _close(total, 2.0 * metrics['gt/loss'], 1e-6)
  # None counts as absent (how a train step passes data without synthetic captions).
  total_none, _ = _dr_loss({**e, keys.SYN_TEXT_EMB: None, keys.TEACHER_SYN_TEXT: None}, config)
  _close(total_none, total, 0)


def test_logit_scale_is_clamped_at_100():
  e = _embeddings(7, 8, 16, (8,), syn=False, teachers=False)
  value_and_grad = jax.jit(jax.value_and_grad(clip_loss, argnums=2))
  at_clamp, _ = value_and_grad(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], np.float32(math.log(100.0)))
  above, grad_above = value_and_grad(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], np.float32(math.log(1e3)))
  _, grad_below = value_and_grad(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], np.float32(math.log(50.0)))
  _close(above, ref_kind(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], None, None, math.log(1e3))[0], 1e-5)
  _close(above, at_clamp, 0)
  assert grad_above == 0.0 and abs(grad_below) > 1e-3


# ----------------------------------------------------------------------------------------------
# open_clip itself.


@pytest.fixture(scope='module')
def open_clip_loss():
  try:
    open_clip = torch_compat.import_open_clip()
  except ImportError:
    pytest.skip('open_clip is not installed (pip install -e .[torch])')
  import torch  # pylint: disable=g-import-not-at-top
  return open_clip.loss, torch


def test_clip_loss_matches_open_clip(open_clip_loss):
  loss_module, torch = open_clip_loss
  e = _embeddings(8, 12, 16, (8,), syn=False, teachers=False)
  expected = loss_module.ClipLoss()(
      torch.from_numpy(_unit(np.float64(e[keys.IMAGE_EMB]))),
      torch.from_numpy(_unit(np.float64(e[keys.TEXT_EMB]))),
      torch.tensor(math.exp(e[keys.LOGIT_SCALE]), dtype=torch.float64))
  actual = _clip_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.LOGIT_SCALE])
  _close(actual, expected.item(), 1e-5)


def test_distill_loss_matches_open_clip(open_clip_loss):
  loss_module, torch = open_clip_loss
  e = _embeddings(9, 12, 16, (24,), syn=False)
  t = {k: torch.from_numpy(_unit(np.float64(v))) for k, v in e.items() if np.ndim(v) == 2}
  tau = 40.0
  _, expected = loss_module.DistillClipLoss()(
      t[keys.IMAGE_EMB], t[keys.TEXT_EMB], torch.tensor(math.exp(e[keys.LOGIT_SCALE])),
      t[keys.TEACHER_IMAGE], t[keys.TEACHER_TEXT], torch.tensor(tau, dtype=torch.float64))
  actual = _distill_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.TEACHER_IMAGE],
                         e[keys.TEACHER_TEXT], e[keys.LOGIT_SCALE], teacher_scales=(tau,),
                         teacher_dims=(24,))
  _close(actual, expected.item(), 1e-5)


def test_siglip_loss_matches_open_clip(open_clip_loss):
  loss_module, torch = open_clip_loss
  e = _embeddings(10, 12, 16, (8,), syn=False, teachers=False)
  expected = loss_module.SigLipLoss()(
      torch.from_numpy(_unit(np.float64(e[keys.IMAGE_EMB]))),
      torch.from_numpy(_unit(np.float64(e[keys.TEXT_EMB]))),
      torch.tensor(math.exp(e[keys.LOGIT_SCALE]), dtype=torch.float64),
      torch.tensor(-4.0, dtype=torch.float64))
  actual = _siglip_loss(e[keys.IMAGE_EMB], e[keys.TEXT_EMB], e[keys.LOGIT_SCALE], np.float32(-4.0))
  _close(actual, expected.item(), 1e-5)


# ----------------------------------------------------------------------------------------------
# Closed forms and invariances.


def test_perfect_alignment_gives_known_values():
  basis = np.eye(8, 16, dtype=np.float32)
  log_100 = np.float32(math.log(100.0))
  # InfoNCE: log(1 + 7 exp(-100)), zero in float32.
  assert abs(float(_clip_loss(basis, 3.0 * basis, log_100))) < 1e-6
  # SigLIP with bias -10: positives at +90, seven negatives at -10 per row.
  expected = math.log1p(math.exp(-90.0)) + 7 * math.log1p(math.exp(-10.0))
  _close(_siglip_loss(basis, basis, log_100, np.float32(-10.0)), expected, 1e-5)


def test_teacher_equal_to_student_gives_target_entropy_and_zero_gradient():
  e = _embeddings(11, 12, 16, (16,), syn=False)
  image, text = e[keys.IMAGE_EMB], e[keys.TEXT_EMB]
  tau = 20.0

  def distill(image, text, logit_scale, student_scale):
    return distill_loss(image, text, e[keys.IMAGE_EMB], e[keys.TEXT_EMB], logit_scale,
                        teacher_scales=(tau,), teacher_dims=(16,), student_scale=student_scale)

  cos = _unit(np.float64(image)) @ _unit(np.float64(text)).T
  entropy = 0.5 * sum(-np.mean(np.sum(_softmax(z) * _log_softmax(z), 1))
                      for z in (tau * cos, tau * cos.T))
  # Learned scale equal to tau, and a decoupled fixed student scale tau with another learned one.
  for logit_scale, student_scale in ((np.float32(math.log(tau)), None),
                                     (np.float32(math.log(3.0)), tau)):
    value, grads = jax.jit(jax.value_and_grad(distill, argnums=(0, 1, 2)), static_argnums=3)(
        image, text, logit_scale, student_scale)
    _close(value, entropy, 1e-5)
    for grad in grads:
      np.testing.assert_allclose(grad, 0.0, atol=2e-6)


def test_identical_teachers_equal_one_teacher():
  e = _embeddings(12, 10, 16, (24,), syn=False)
  args = (e[keys.IMAGE_EMB], e[keys.TEXT_EMB])
  doubled = {k: np.concatenate([e[k], 2.0 * e[k]], axis=1)
             for k in (keys.TEACHER_IMAGE, keys.TEACHER_TEXT)}
  for average in ('probs', 'logits'):
    one = _distill_loss(*args, e[keys.TEACHER_IMAGE], e[keys.TEACHER_TEXT],
                        e[keys.LOGIT_SCALE], teacher_scales=(30.0,), teacher_dims=(24,),
                        average=average)
    two = _distill_loss(*args, doubled[keys.TEACHER_IMAGE], doubled[keys.TEACHER_TEXT],
                        e[keys.LOGIT_SCALE], teacher_scales=(30.0, 30.0),
                        teacher_dims=(24, 24), average=average)
    _close(two, one, 1e-6)


def test_embeddings_are_normalized_per_teacher_slice():
  dims = (32, 48)
  e = _embeddings(13, 10, 16, dims, syn=False)
  rng = np.random.default_rng(0)
  # Per-row, per-slice factors as stored fp16 vectors would have (not exactly unit) and worse.
  factors = np.concatenate([np.repeat(rng.uniform(0.5, 2.0, (10, 1)), d, 1) for d in dims], 1)
  scaled = {k: v * factors.astype(np.float32) for k, v in e.items()
            if k in (keys.TEACHER_IMAGE, keys.TEACHER_TEXT)}
  scaled[keys.IMAGE_EMB] = 3.0 * e[keys.IMAGE_EMB]
  config = losses.LossConfig(clip_weight=0.5, distill_weight=0.5, teacher_scales=(70.0, 60.0),
                             teacher_dims=dims)
  _, metrics = _dr_loss(e, config)
  _, metrics_scaled = _dr_loss({**e, **scaled}, config)
  for name in ('gt/clip', 'gt/distill'):
    _close(metrics_scaled[name], metrics[name], 1e-5)


def test_bf16_inputs_are_computed_in_float32():
  e = _embeddings(14, 12, 16, (24,), syn=False)
  config = losses.LossConfig(clip_weight=0.5, distill_weight=0.5, teacher_scales=(100.0,),
                             teacher_dims=(24,))
  as_bf16 = {k: jnp.asarray(v, jnp.bfloat16) if np.ndim(v) == 2 else v for k, v in e.items()}
  rounded = {k: np.asarray(v, np.float32) for k, v in as_bf16.items()}
  total_bf16, _ = _dr_loss(as_bf16, config)
  total_rounded, _ = _dr_loss(rounded, config)
  assert total_bf16.dtype == jnp.float32
  _close(total_bf16, total_rounded, 1e-6)


def test_user_errors_are_explained():
  e = _embeddings(15, 8, 16, (24,), syn=False)
  config = losses.LossConfig(teacher_dims=(16, 16), teacher_scales=(70.0, 60.0))
  with pytest.raises(ValueError, match=r'teacher_dims \(16, 16\) sum to 32'):
    losses.dr_loss(e, config)
  with pytest.raises(ValueError, match='one positive logit scale per teacher'):
    losses.LossConfig(teacher_dims=(768, 768), teacher_scales=(100.0,))
  with pytest.raises(ValueError, match='only apply to the sigmoid loss'):
    losses.LossConfig(teacher_biases=(-10.0, -10.0))
  with pytest.raises(ValueError, match="needs 'logit_bias'"):
    losses.dr_loss(e, losses.LossConfig(kind='sigmoid', teacher_dims=(24,), teacher_scales=(1.,)))
  with pytest.raises(ValueError, match="unknown embedding keys \\['image'\\]"):
    losses.dr_loss({**e, 'image': e[keys.IMAGE_EMB]}, config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), losses.BATCH_AXES)
  with pytest.raises(ValueError, match='global batch 12 does not split over the 8 devices'):
    clip_loss(np.ones((12, 4)), np.ones((12, 4)), 1.0, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# Sharded over the batch: local rows x all-gathered columns.


def _mesh(shape):
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), losses.BATCH_AXES)


def _sharded(e, mesh):
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(losses.BATCH_AXES))
  return {k: jax.device_put(v, batch_sharding) if np.ndim(v) == 2 else v for k, v in e.items()}


_STUDENT_KEYS = (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB, keys.LOGIT_SCALE,
                 keys.LOGIT_BIAS)


def _value_and_grads(e, config, mesh):
  """(total, metrics), gradients of the total w.r.t. the student embeddings and scalars."""
  student = {k: v for k, v in e.items() if k in _STUDENT_KEYS}
  data = {k: v for k, v in e.items() if k not in _STUDENT_KEYS}

  def total(student):
    return losses.dr_loss({**student, **data}, config, mesh=mesh)

  return jax.jit(jax.value_and_grad(total, has_aux=True))(student)


def _assert_sharded_equals_single_device(e, config, mesh):
  (total, metrics), grads = _value_and_grads(_sharded(e, mesh), config, mesh)
  (total_1, metrics_1), grads_1 = _value_and_grads(e, config, None)
  assert metrics.keys() == metrics_1.keys()
  for name in metrics:
    _close(metrics[name], metrics_1[name], 1e-5)
  _close(total, total_1, 1e-5)
  assert grads.keys() == grads_1.keys()
  for name in grads:
    assert np.max(np.abs(grads_1[name])) > 1e-4, name  # a gradient that is there to compare
    np.testing.assert_allclose(grads[name], grads_1[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2), (1, 8)])
def test_sharded_dr_loss_equals_single_device(mesh_shape):
  config = losses.LossConfig(clip_weight=0.25, distill_weight=0.75, syn_weight=0.5,
                             teacher_scales=(70.0, 60.0), teacher_dims=(16, 8))
  _assert_sharded_equals_single_device(_embeddings(16, 32, 12, config.teacher_dims), config,
                                       _mesh(mesh_shape))


def test_sharded_sigmoid_dr_loss_equals_single_device():
  config = losses.LossConfig(kind='sigmoid', clip_weight=0.5, distill_weight=0.5,
                             teacher_scales=(10.0, 20.0), teacher_dims=(16, 8),
                             teacher_biases=(-5.0, -8.0))
  e = _embeddings(17, 32, 12, config.teacher_dims)
  e[keys.LOGIT_BIAS] = np.float32(-3.0)
  _assert_sharded_equals_single_device(e, config, _mesh((4, 2)))


def test_sharded_loss_never_builds_the_global_logit_matrix():
  # The unstreamed form; test_streamed_loss.py checks that the streamed one holds only tiles.
  global_batch, local_batch = 64, 8
  config = losses.LossConfig(clip_weight=0.5, distill_weight=0.5, teacher_scales=(70.0, 60.0),
                             teacher_dims=(16, 8), block_size=0)
  mesh = _mesh((4, 2))
  e = _sharded(_embeddings(18, global_batch, 12, config.teacher_dims), mesh)
  student = {k: v for k, v in e.items() if k in _STUDENT_KEYS}
  data = {k: v for k, v in e.items() if k not in _STUDENT_KEYS}
  step = jax.jit(jax.grad(lambda s: losses.dr_loss({**s, **data}, config, mesh=mesh)[0]))
  hlo = step.lower(student).compile().as_text()
  shapes = set(re.findall(r'\[(\d+),(\d+)\]', hlo))
  assert (str(local_batch), str(global_batch)) in shapes  # the local-rows x global-columns logits
  assert (str(global_batch), str(global_batch)) not in shapes

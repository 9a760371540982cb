"""Tests of mobileclip_jax.streamed_loss: the streamed DR loss equals the unstreamed one.

The reference is `losses`' block_size=0 form (full [rows, batch] matrices, all-gathered columns),
itself checked against a float64 numpy reference written from the formulas and against open_clip in
test_losses.py. Here the streamed form must give the same total, every metric and the gradients
with respect to every student input: to float64 rounding under jax_enable_x64, to float32 rounding
in the training dtype; on one device and on meshes (8, 1) and (4, 2) of the 8 fake CPU devices, the columns circulated or gathered;
with block sizes that leave a smaller last block; for every switch of the objective. And its
compiled program must hold [rows, block] tiles, never a [rows, batch] matrix.
"""
import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

from mobileclip_jax import config as config_lib
from mobileclip_jax import keys
from mobileclip_jax import losses
from mobileclip_jax import streamed_loss

_STUDENT_KEYS = (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB, keys.LOGIT_SCALE, keys.LOGIT_BIAS)


def _embeddings(seed, batch, dtype, teacher_dims=(16, 8), width=12, syn=True, teachers=True,
                sigmoid=False):
  """Random embeddings; texts correlate with images so that losses and agreements are informative."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, width))
  out = {keys.IMAGE_EMB: image, keys.TEXT_EMB: image + rng.normal(size=(batch, width)),
         keys.LOGIT_SCALE: np.log(20.0)}
  if syn:
    out[keys.SYN_TEXT_EMB] = image + 1.5 * rng.normal(size=(batch, width))
  if teachers:
    teacher_image = rng.normal(size=(batch, sum(teacher_dims)))
    out[keys.TEACHER_IMAGE] = teacher_image
    out[keys.TEACHER_TEXT] = teacher_image + rng.normal(size=teacher_image.shape)
    if syn:
      out[keys.TEACHER_SYN_TEXT] = teacher_image + 1.5 * rng.normal(size=teacher_image.shape)
  if sigmoid:
    out[keys.LOGIT_BIAS] = -3.0
  return {k: np.asarray(v, dtype) for k, v in out.items()}


@pytest.fixture(params=['ring', 'gather'])
def exchange(request, monkeypatch):
  """Columns circulated around the devices (accelerators) or gathered once (the CPU backend)."""
  gather = request.param == 'gather'
  monkeypatch.setattr(streamed_loss, 'GATHER_PLATFORMS', frozenset({'cpu'} if gather else ()))
  return request.param


def _on_mesh_only(mesh_shape, exchange):
  if mesh_shape is None and exchange == 'gather':
    pytest.skip('one device: no columns to exchange')


def _mesh(shape):
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), losses.BATCH_AXES)


def _value_and_grads(e, config, mesh):
  """(total, metrics), gradients of the total w.r.t. the student embeddings and scalars."""
  if mesh is not None:
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(losses.BATCH_AXES))
    e = {k: jax.device_put(v, rows) if np.ndim(v) == 2 else v for k, v in e.items()}
  student = {k: v for k, v in e.items() if k in _STUDENT_KEYS}
  data = {k: v for k, v in e.items() if k not in _STUDENT_KEYS}

  def total(student):
    return losses.dr_loss({**student, **data}, config, mesh=mesh)

  return jax.device_get(jax.jit(jax.value_and_grad(total, has_aux=True))(student))


def _assert_streamed_equals_reference(e, config, mesh, block_size, rtol, reference=None):
  """The streamed loss on `mesh` against the unstreamed one on one device (or `reference`)."""
  (total, metrics), grads = _value_and_grads(e, dataclasses.replace(config, block_size=block_size),
                                             mesh)
  (total_0, metrics_0), grads_0 = reference or _value_and_grads(
      e, dataclasses.replace(config, block_size=0), None)
  assert metrics.keys() == metrics_0.keys()
  for name in metrics:
    np.testing.assert_allclose(metrics[name], metrics_0[name], rtol=rtol, atol=0, err_msg=name)
  np.testing.assert_allclose(total, total_0, rtol=rtol, atol=0)
  assert grads.keys() == grads_0.keys()
  for name in grads:
    scale = np.max(np.abs(grads_0[name]))
    assert scale > 1e-3, name  # A gradient that is there to compare.
    np.testing.assert_allclose(grads[name], grads_0[name], rtol=0, atol=rtol * scale, err_msg=name)
  if 'gt/agreement_i2t' in metrics_0:  # Informative: neither all nor none of the rows agree.
    assert 0.0 < metrics_0['gt/agreement_i2t'] < 1.0


_RECIPE = losses.LossConfig(clip_weight=0.25, distill_weight=0.75, syn_weight=0.5,
                            teacher_scales=(70.0, 60.0), teacher_dims=(16, 8))
_SIGMOID = losses.LossConfig(kind='sigmoid', clip_weight=0.5, distill_weight=0.5,
                             teacher_scales=(10.0, 20.0), teacher_dims=(16, 8),
                             teacher_biases=(-5.0, -8.0))

# (config, embeddings options): every switch of the objective at least once.
_CASES = {
    'recipe': (_RECIPE, {}),
    'logits_fixed_student_scale': (dataclasses.replace(_RECIPE, average='logits',
                                                       student_scale=35.0), {}),
    'clip_only_gt_only': (_RECIPE, dict(syn=False, teachers=False)),
    'sigmoid': (_SIGMOID, dict(sigmoid=True)),
    'sigmoid_logits_fixed_student_scale_gt_only': (
        dataclasses.replace(_SIGMOID, average='logits', student_scale=15.0),
        dict(sigmoid=True, syn=False)),
    'sigmoid_clip_only': (_SIGMOID, dict(sigmoid=True, teachers=False)),
}


@functools.lru_cache(maxsize=None)
def _float64_reference(case):
  config, options = _CASES[case]
  e = _embeddings(1, 40, np.float64, **options)
  with jax.enable_x64(True):
    return e, _value_and_grads(e, dataclasses.replace(config, block_size=0), None)


# Both meshes for the recipe and the sigmoid loss; one for the other switches.
@pytest.mark.parametrize('case,mesh_shape', [
    (case, mesh) for case in _CASES for mesh in (None, (4, 2))] + [
    ('recipe', (8, 1)), ('sigmoid', (8, 1))])
def test_streamed_equals_reference_in_float64(case, mesh_shape, exchange):
  _on_mesh_only(mesh_shape, exchange)
  # 40 rows: on one device blocks of 3 leave a last block of 1; on 8 devices 5 local rows leave 2.
  e, reference = _float64_reference(case)
  with jax.enable_x64(True):
    _assert_streamed_equals_reference(e, _CASES[case][0],
                                      None if mesh_shape is None else _mesh(mesh_shape),
                                      block_size=3, rtol=1e-12, reference=reference)


@pytest.mark.parametrize('mesh_shape,block_size', [(None, 16), (None, 4096), ((4, 2), 2)])
def test_streamed_equals_reference_in_float32(mesh_shape, block_size, exchange):
  _on_mesh_only(mesh_shape, exchange)
  config, options = _CASES['recipe']
  e = _embeddings(2, 64, np.float32, **options)
  _assert_streamed_equals_reference(e, config, None if mesh_shape is None else _mesh(mesh_shape),
                                    block_size=block_size, rtol=1e-5)


def _array_shapes(e, config, mesh):
  student = {k: v for k, v in e.items() if k in _STUDENT_KEYS}
  data = {k: v for k, v in e.items() if k not in _STUDENT_KEYS}
  grad = jax.jit(jax.grad(lambda s: losses.dr_loss({**s, **data}, config, mesh=mesh)[0]))
  return set(re.findall(r'\[(\d+),(\d+)\]', grad.lower(student).compile().as_text()))


@pytest.mark.parametrize('mesh_shape', [None, (4, 2)])
def test_streamed_program_holds_tiles_not_the_logit_matrix(mesh_shape, exchange):
  _on_mesh_only(mesh_shape, exchange)
  batch, block = 64, 4
  mesh = None if mesh_shape is None else _mesh(mesh_shape)
  rows = batch // (1 if mesh is None else 8)
  e = _embeddings(3, batch, np.float32)
  streamed = _array_shapes(e, dataclasses.replace(_RECIPE, block_size=block), mesh)
  reference = _array_shapes(e, dataclasses.replace(_RECIPE, block_size=0), mesh)
  assert (str(rows), str(batch)) in reference  # What the check below would catch.
  assert (str(rows), str(block)) in streamed
  assert (str(rows), str(batch)) not in streamed and (str(batch), str(batch)) not in streamed


def test_block_size_is_a_config_key_and_is_checked():
  assert config_lib.base_config().loss.block_size == losses.DEFAULT_BLOCK_SIZE > 0
  for bad in (-1, 2.5):
    with pytest.raises(ValueError, match='block_size must be an integer >= 0'):
      losses.LossConfig(block_size=bad)

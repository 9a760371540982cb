"""Smoke test of `launch/benchmark.py train` on a tiny config (benchmarks are not tests).

- The benchmark's PyTorch DR loss equals open_clip's own `DistillClipLoss` (one teacher, one
  caption kind) and `mobileclip_jax.losses.dr_loss` (two teachers, both kinds), values and
  gradients, so the two sides of the benchmark do the same work.
- One tiny configuration runs end to end (a torch process and a JAX process, each fresh) and
  yields a complete row whose first-step losses and gradient norms agree.
- Bad options are named before any process starts.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mobileclip_jax import keys  # noqa: E402
from mobileclip_jax import losses  # noqa: E402
from mobileclip_jax import torch_compat  # noqa: E402
from mobileclip_jax.benchmark import common  # noqa: E402
from mobileclip_jax.benchmark import train  # noqa: E402
from mobileclip_jax.benchmark import train_torch  # noqa: E402

# ViT-B-16 shrunk to one 32-wide block at 32 px and a one-layer 32-wide text tower: the whole
# train step compiles in seconds (a MobileCLIP MCi tower, even tiny, takes minutes on 2 cores).
_TINY = json.dumps({'image_size': 32, 'embed_dim': 16,
                    'image': {'width': 32, 'depth': 1, 'heads': 2, 'patch_size': 8},
                    'text': {'layers': 1, 'width': 32, 'heads': 2}})


def _embeddings(batch, embed_dim, teacher_dims, seed=0):
  rng = np.random.default_rng(seed)
  student = lambda: rng.standard_normal((batch, embed_dim)).astype(np.float32)
  teacher = lambda: rng.standard_normal((batch, sum(teacher_dims))).astype(np.float32)
  return {keys.IMAGE_EMB: student(), keys.TEXT_EMB: student(), keys.SYN_TEXT_EMB: student(),
          keys.TEACHER_IMAGE: teacher(), keys.TEACHER_TEXT: teacher(),
          keys.TEACHER_SYN_TEXT: teacher()}


def _torch_dr_loss(e, logit_scale, **kwargs):
  """train_torch.torch_dr_loss on numpy inputs; (total, terms, d total / d student embeddings)."""
  t = {k: torch.tensor(v, requires_grad=k in (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB))
       for k, v in e.items()}
  total, terms = train_torch.torch_dr_loss(
      t[keys.IMAGE_EMB], t[keys.TEXT_EMB], t[keys.SYN_TEXT_EMB], t[keys.TEACHER_IMAGE],
      t[keys.TEACHER_TEXT], t[keys.TEACHER_SYN_TEXT], torch.tensor(logit_scale), **kwargs)
  total.backward()
  grads = {k: t[k].grad.numpy() for k in (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB)}
  return total.item(), {k: v.item() for k, v in terms.items()}, grads


def test_torch_dr_loss_equals_open_clips_distill_clip_loss_for_one_teacher():
  open_clip = torch_compat.import_open_clip()
  e = _embeddings(batch=6, embed_dim=8, teacher_dims=(12,))
  logit_scale, teacher_scale = np.log(1 / 0.07), 50.0
  total, terms, _ = _torch_dr_loss(e, logit_scale, teacher_scales=(teacher_scale,),
                                   teacher_dims=(12,), clip_weight=0.3, distill_weight=0.7,
                                   gt_weight=1.0, syn_weight=0.0)
  # open_clip's loss takes unit features (the model's forward normalizes) and scales, not logs.
  unit = lambda k: torch.nn.functional.normalize(torch.tensor(e[k]), dim=-1)
  contrastive, distill = open_clip.loss.DistillClipLoss()(
      unit(keys.IMAGE_EMB), unit(keys.TEXT_EMB), torch.tensor(np.exp(logit_scale)),
      unit(keys.TEACHER_IMAGE), unit(keys.TEACHER_TEXT), torch.tensor(teacher_scale))
  np.testing.assert_allclose(terms['gt/clip'], contrastive.item(), rtol=1e-6)
  np.testing.assert_allclose(terms['gt/distill'], distill.item(), rtol=1e-6)
  np.testing.assert_allclose(total, 0.3 * contrastive.item() + 0.7 * distill.item(), rtol=1e-6)


def test_torch_dr_loss_equals_jax_dr_loss_with_two_teachers_and_both_kinds():
  dims, scales = (12, 10), (70.0, 60.0)
  e = _embeddings(batch=6, embed_dim=8, teacher_dims=dims, seed=1)
  weights = dict(clip_weight=0.25, distill_weight=0.75, gt_weight=1.0, syn_weight=0.5)
  logit_scale = 2.5
  total, terms, torch_grads = _torch_dr_loss(e, logit_scale, teacher_scales=scales,
                                             teacher_dims=dims, **weights)
  config = losses.LossConfig(teacher_scales=scales, teacher_dims=dims, **weights)

  def jax_loss(students):
    return losses.dr_loss({**e, **students, keys.LOGIT_SCALE: jnp.float32(logit_scale)},
                          config)
  students = {k: e[k] for k in (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB)}
  (want_total, metrics), want_grads = jax.jit(jax.value_and_grad(jax_loss, has_aux=True))(
      students)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  for name in train.LOSS_TERMS:
    np.testing.assert_allclose(terms[name], metrics[name], rtol=1e-5, err_msg=name)
  for key, grad in torch_grads.items():
    np.testing.assert_allclose(grad, want_grads[key], rtol=1e-4, atol=1e-7, err_msg=key)


def test_tiny_config_yields_a_complete_row_whose_first_steps_agree():
  # The benchmark's processes get one device and the fast suite's code generation (conftest).
  options = dict(variants='ViT-B-16', batch='2', dtype='float32', torch_modes='eager',
                 repeats='1', warmup='0', attempts='1', overrides=_TINY)
  rows = list(train.run(options))
  assert len(rows) == 1
  row = rows[0]
  assert 'error' not in row, row.get('error')
  json.dumps(row)  # JSON-able.
  assert (row['variant'], row['batch'], row['image_size']) == ('ViT-B-16', 2, 32)
  assert row['losses_agree'], (row['first_step'], row['tolerances'])
  assert row['loss_rel_diff'] < 1e-4 and row['grad_norm_rel_diff'] < 1e-3
  assert set(row['term_rel_diff']) == set(train.LOSS_TERMS)
  for prefix in ('jax', 'torch'):
    assert 0 < row[f'{prefix}_min_s'] <= row[f'{prefix}_median_s']
    assert row[f'{prefix}_examples_per_s'] == pytest.approx(2 / row[f'{prefix}_median_s'],
                                                            rel=1e-2)
    assert row[f'{prefix}_peak_rss_mb'] > 0 and row[f'{prefix}_cpu_s_per_step'] > 0
  assert row['ratio_median'] == pytest.approx(row['jax_median_s'] / row['torch_median_s'], rel=1e-2)
  assert row['jax_compile_s'] > 0 and row['jax_device_count'] == 1
  # XLA's FLOPs of the timed step: at least the matmuls of forward + backward (3x the forward's
  # 2 * MACs over the linear layers' weights, per token / patch), at most 10x that.
  text_tokens, patches = 2 * 2 * 77, 2 * (32 // 8) ** 2
  linear_macs = text_tokens * 12 * 32 * 32 + patches * 12 * 32 * 32
  assert 6 * linear_macs <= row['jax_flops_per_step'] <= 60 * linear_macs, row['jax_flops_per_step']
  for prefix in ('jax', 'torch'):
    assert row[f'{prefix}_tflops_per_s'] == pytest.approx(
        row['jax_flops_per_step'] / row[f'{prefix}_median_s'] / 1e12, rel=1e-2)
    assert row[f'{prefix}_mfu'] is None  # No peak for a CPU.
  assert row['peak_flops_per_s'] is None and row['dtype'] == 'float32'
  assert 0 < row['jax_compile_peak_rss_mb'] <= row['jax_peak_rss_mb']
  assert row['jax_step_buffers_mb']['temp'] > 0
  # The recipe reached both sides: AdamW's eps follows open_clip's rule for ViT names.
  assert row['recipe']['eps'] == 1e-6 and row['recipe']['loss']['teacher_scales'] == [70.0, 60.0]
  assert {'jax', 'flax', 'torch', 'open_clip', 'timm'} <= set(row['versions'])


def test_peak_flops_by_device_kind_and_the_mfu_of_a_row():
  assert common.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert common.peak_flops('NVIDIA H100 PCIe') == 756e12  # The longer key wins.
  assert common.peak_flops('cuda:NVIDIA H200') == 989e12
  assert common.peak_flops('TPU v5 lite') == 197e12 and common.peak_flops('TPU v5') == 459e12
  assert common.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert common.peak_flops('cpu:cpu') is None
  side = dict(median_s=0.5, min_s=0.4, cpu_s_per_step=1.0, peak_rss_mb=1.0, others_cpu_frac=0.0,
              first_step={'loss': 1.0, 'grad_norm': 1.0, **{k: 1.0 for k in train.LOSS_TERMS}},
              sections=1, device='gpu:NVIDIA H200', versions={})
  jax_r = dict(side, flops_per_step=4.945e14, compile_s=1.0, compile_peak_rss_mb=1.0,
               device_count=1)
  torch_eager = dict(side, median_s=1.0, parameters=10, threads=1)
  torch_compile = dict(side, median_s=0.25, compile_s=30.0)
  o = dict(dtype='bfloat16', torch_modes=['eager', 'compile'], loss_rtol=None, grad_rtol=None,
           repeats=1, warmup=0)
  row = train._row('S0', 64, 256, {}, jax_r, {'eager': torch_eager, 'compile': torch_compile}, o)
  assert row['jax_mfu'] == pytest.approx(4.945e14 / 0.5 / 989e12)  # 100%.
  assert row['torch_mfu'] == pytest.approx(0.5) and row['torch_compile_mfu'] == pytest.approx(2.0)
  assert row['ratio_median'] == 0.5 and row['ratio_vs_compile_median'] == 2.0
  assert row['torch_compile_compile_s'] == 30.0 and row['tolerances']['loss'] == 3e-2
  failed = train._row('S0', 64, 256, {}, jax_r, {'eager': torch_eager,
                                                 'compile': {'error': 'inductor failed'}}, o)
  assert failed['torch_compile_error'] == 'inductor failed' and 'ratio_vs_compile_median' not in failed


@pytest.mark.parametrize('options,match', [
    ({'variant': 'MobileCLIP2-S0'}, r"Unknown option\(s\) \['variant'\].*valid: variants"),
    ({'overrides': '{"attention": "sigmoid"}'}, r"\['attention'\] have no counterpart"),
    ({'overrides': '{"image": {"depths": [1, 1]}}'}, r"\['image.depths'\] have no counterpart"),
    ({'overrides': '{"image": {"depth": 1}}', 'variants': 'MobileCLIP2-S0'},
     r'image tower of MobileCLIP2-S0 is built by timm'),
    ({'overrides': 'image_size=64'}, r'overrides must be a JSON object'),
    ({'variants': 'MobileCLIP2-S9'}, r"Unknown model 'MobileCLIP2-S9'"),
    ({'batch': '8,eight'}, r"Option batch='eight' is not a valid int"),
    ({'batch': '0'}, r'batch must list positive integers'),
    ({'warmup': '-1'}, r'warmup must be at least 0'),
    ({'dtype': 'float16'}, r'dtype must be one of float32, bfloat16'),
    ({'torch_modes': 'compile'}, r'torch_modes must list eager first'),
    ({'torch_modes': 'eager,jit'}, r'torch_modes must list eager first'),
])
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    next(train.run(options))

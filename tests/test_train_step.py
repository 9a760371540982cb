"""The train step: sharded == single device, accumulation == full batch, open_clip's optimizer rules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mobileclip_jax
from mobileclip_jax import losses
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import optimizer as optimizer_lib
from mobileclip_jax.train import step as step_lib

CONTEXT = 16
TINY_TEXT = dict(layers=1, width=32, heads=2, vocab_size=1000, context_length=CONTEXT)
# Two stages cover every MCi block type (MobileOne stem, RepMixer, downsample with SE, RepCPE,
# attention) at half the graph of four: compile time dominates these tests.
TINY_MCI = dict(embed_dim=16, image=dict(depths=(1, 1), widths=(16, 64), token_mixers=(
    'repmixer', 'attention'), pos_emb=(False, True), se_downsample=(False, True)), text=TINY_TEXT)
# MobileCLIP2-B's conv-stem ViT at one layer: BatchNorm (in the stem) at a fifth of the compile
# time of the reduced MCi.
TINY_B = dict(embed_dim=16, image_size=32, image=dict(width=32, depth=1, heads=2), text=TINY_TEXT)
TINY_VIT = dict(embed_dim=16, image_size=32, image=dict(width=32, depth=2, heads=2, patch_size=8),
                text=TINY_TEXT)


def _tokens(rng, batch):
  lengths = rng.integers(2, CONTEXT - 1, batch)
  tokens = np.zeros((batch, CONTEXT), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 0] = 998
    tokens[i, 1:n] = rng.integers(1, 990, n - 1)
    tokens[i, n] = 999  # EOT: the largest id, where the text tower pools.
  return tokens


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_batch(batch=16, size=32, dims=(8, 8), seed=0):
  rng = np.random.default_rng(seed)
  teacher = lambda: np.concatenate([_unit(rng.normal(size=(batch, d))) for d in dims], -1)
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'text': _tokens(rng, batch), 'syn_text': _tokens(rng, batch),
          'teacher_image_emb': teacher(), 'teacher_text_emb': teacher(),
          'teacher_syn_text_emb': teacher()}


def _setup(name, overrides, accum_steps=1, mesh=None, loss_config=None, total_steps=10,
           adamw=False):
  config = clip_lib.get_config(name, **overrides)
  model = clip_lib.CLIP(config)
  variables = model.init(jax.random.PRNGKey(0), *clip_lib.dummy_inputs(config))
  schedule = optimizer_lib.lr_schedule(1e-3, total_steps, 2)
  if adamw:
    tx = optimizer_lib.make_optimizer(config, variables['params'], schedule, b1=0.9, b2=0.95,
                                      eps=None, weight_decay=0.2, grad_clip=1.0)
  else:
    # Equivalence tests use SGD: Adam turns float noise in exactly-zero gradients (e.g. of the
    # attention key bias, to which softmax is invariant) into full-size +-lr updates.
    tx = optax.sgd(lambda step: 10 * schedule(step))
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                              batch_stats=variables.get('batch_stats', {}),
                              opt_state=tx.init(variables['params']))
  loss_config = loss_config or losses.LossConfig(clip_weight=0.25, distill_weight=0.75,
                                                 teacher_scales=(70.0, 60.0), teacher_dims=(8, 8))
  step = step_lib.make_train_step(model, tx, loss_config, mesh=mesh, accum_steps=accum_steps,
                                  use_syn=True, use_teachers=True)
  return state, step


def _run(state, step, batch, mesh=None, steps=2):
  if mesh is None:
    fn = jax.jit(step)
  else:
    state_sh = sharding_lib.infer_shardings(state, mesh, min_fsdp_size=64)
    state = jax.device_put(state, state_sh)
    fn = jax.jit(step, in_shardings=(state_sh, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding_lib.replicated(mesh)))
    batch = sharding_lib.global_batch(batch, mesh)
  history = []
  for _ in range(steps):
    state, metrics = fn(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _single_device(name, overrides):
  batch = make_batch()
  state, step = _setup(name, overrides)
  return batch, _run(state, step, batch)


@pytest.fixture(scope='module')
def single_device_b():
  return _single_device('MobileCLIP2-B', TINY_B)


def _check_sharded_equals_single_device(name, overrides, single, shape):
  batch, (want_state, want_history) = single
  mesh = sharding_lib.create_mesh(*shape)
  state, step = _setup(name, overrides, mesh=mesh)
  got_state, got_history = _run(state, step, batch, mesh)
  for got, want in zip(got_history, want_history):
    for key in ('loss', 'gt/distill', 'syn/clip', 'grad_norm'):
      np.testing.assert_allclose(got[key], want[key], rtol=2e-4, err_msg=key)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(got_state.params)[0],
                               jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  for got, want in zip(jax.tree.leaves(got_state.batch_stats),
                       jax.tree.leaves(want_state.batch_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('shape', [(8, 1), (4, 2), (1, 8)])
def test_sharded_step_equals_single_device(single_device_b, shape):
  _check_sharded_equals_single_device('MobileCLIP2-B', TINY_B, single_device_b, shape)


@pytest.mark.slow
def test_sharded_mci_step_equals_single_device():
  single = _single_device('MobileCLIP2-S0', TINY_MCI)
  _check_sharded_equals_single_device('MobileCLIP2-S0', TINY_MCI, single, (4, 2))


@pytest.mark.parametrize('accum_steps', [2, 4])
def test_accumulation_keeps_all_negatives_and_equals_the_full_batch(accum_steps):
  # A BatchNorm-free model: micro-batches then see exactly the full-batch computation.
  batch = make_batch()
  want_state, want = _run(*_setup('ViT-B-16', TINY_VIT), batch)
  got_state, got = _run(*_setup('ViT-B-16', TINY_VIT, accum_steps=accum_steps), batch)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g['loss'], w['loss'], rtol=1e-5)
    np.testing.assert_allclose(g['grad_norm'], w['grad_norm'], rtol=1e-4)
  for g, w in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_accumulation_runs_sharded_with_batchnorm_models():
  mesh = sharding_lib.create_mesh(4, 2)
  state, step = _setup('MobileCLIP2-B', TINY_B, accum_steps=2, mesh=mesh)
  _, history = _run(state, step, make_batch(), mesh, steps=3)
  assert all(np.isfinite(h['loss']) for h in history)


def test_loss_falls_on_a_fixed_batch():
  state, step = _setup('MobileCLIP2-B', TINY_B, total_steps=40, adamw=True)
  _, history = _run(state, step, make_batch(batch=8), steps=25)
  assert history[-1]['loss'] < 0.7 * history[0]['loss']


def test_weight_decay_set_follows_open_clips_name_and_ndim_rule():
  config = clip_lib.get_config('MobileCLIP2-S0')
  abstract = jax.eval_shape(clip_lib.CLIP(config).init, jax.random.PRNGKey(0),
                            *clip_lib.dummy_inputs(config))
  mask = optimizer_lib.weight_decay_mask(config, abstract['params'])
  p = mask['visual']
  assert p['stages_0']['blocks_0']['layer_scale']['gamma']            # (C, 1, 1) in timm: decayed.
  assert p['stages_0']['blocks_0']['mlp']['fc1']['kernel']
  assert not p['stages_0']['blocks_0']['mlp']['fc1']['bias']
  assert not p['stem_0']['conv_kxk_0']['bn']['scale']
  assert mask['text']['token_embedding']['embedding'] and mask['text']['positional_embedding']
  assert mask['text']['text_projection'] and not mask['logit_scale']
  assert not mask['text']['blocks_0']['norm1']['scale']                # ln_1.weight.


def test_schedule_equals_open_clips_cosine_lr():
  pytest.importorskip('torch')
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  torch_compat.import_open_clip()
  from open_clip_train import scheduler  # pylint: disable=g-import-not-at-top

  class FakeOptimizer:
    param_groups = [{'lr': 0.0}]

  opt = FakeOptimizer()
  reference = scheduler.cosine_lr(opt, 1e-3, 100, 1000)
  ours = optimizer_lib.lr_schedule(1e-3, 1000, 100)
  for step in (0, 1, 50, 99, 100, 101, 500, 999):
    reference(step)
    np.testing.assert_allclose(float(ours(step)), opt.param_groups[0]['lr'], rtol=1e-5, atol=1e-10)


def test_eps_rule_and_logit_scale_clamp():
  assert optimizer_lib.default_eps('MobileCLIP2-L-14') == 1e-8
  assert optimizer_lib.default_eps('ViT-L-14') == 1e-6
  clamped = optimizer_lib.clamp_logit_scale({'logit_scale': jnp.array(7.0), 'x': 1})
  np.testing.assert_allclose(clamped['logit_scale'], np.log(100.0), rtol=1e-6)


def test_objective_selection():
  assert step_lib.select_objective(make_batch().keys(), 'auto') == (True, True)
  assert step_lib.select_objective(['image', 'text'], 'auto') == (False, False)
  assert step_lib.select_objective(make_batch().keys(), 'clip') == (False, False)
  with pytest.raises(ValueError, match='needs a reinforced dataset'):
    step_lib.select_objective(['image', 'text'], 'dr')


def test_create_model_is_the_public_entry():
  assert isinstance(mobileclip_jax.create_model('MobileCLIP2-S4'), clip_lib.CLIP)

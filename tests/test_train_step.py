"""The train step as train/setup.py builds it: sharded == single device, accumulation == full
batch, the optimizer's rules (open_clip's decay set, lr multipliers, freezing), sharding rules."""
import dataclasses

import jax
import numpy as np
import optax
import pytest

from mobileclip_jax import config as config_lib
from mobileclip_jax import rules
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.convert import open_clip as oc_convert
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import optimizer as optimizer_lib
from mobileclip_jax.train import setup

CONTEXT = 16
TINY_TEXT = dict(layers=1, width=32, heads=2, vocab_size=1000, context_length=CONTEXT)
# Two stages cover every MCi block type (MobileOne stem, RepMixer, downsample with SE, RepCPE,
# attention) at half the graph of four: compile time dominates these tests.
TINY_MCI = dict(embed_dim=16, image_size=32, image=dict(depths=(1, 1), widths=(16, 64), token_mixers=(
    'repmixer', 'attention'), pos_emb=(False, True), se_downsample=(False, True)), text=TINY_TEXT)
# MobileCLIP2-B's conv-stem ViT at one layer: BatchNorm (in the stem) at a fifth of the compile
# time of the reduced MCi.
TINY_B = dict(embed_dim=16, image_size=32, image=dict(width=32, depth=1, heads=2), text=TINY_TEXT)
TINY_VIT = dict(embed_dim=16, image_size=32, image=dict(width=32, depth=2, heads=2, patch_size=8),
                text=TINY_TEXT)
DIMS = (8, 8)


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


def make_batch(batch=16, size=32, dims=DIMS, seed=0):
  rng = np.random.default_rng(seed)
  teacher = lambda: np.concatenate([_unit(rng.normal(size=(batch, d))) for d in dims], -1)
  return {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          'text': _tokens(rng, batch), 'syn_text': _tokens(rng, batch),
          'teacher_image_emb': teacher(), 'teacher_text_emb': teacher(),
          'teacher_syn_text_emb': teacher()}


def make_config(name, overrides, batch=16, accum_steps=1, total_steps=10, **optim):
  c = config_lib.base_config()
  c.model.name = name
  for key, value in overrides.items():
    if isinstance(value, dict):
      c.model[key].update(value)
    else:
      c.model[key] = value
  c.batch_size, c.accum_steps = batch, accum_steps
  c.schedule.total, c.schedule.warmup = f'{total_steps}_steps', '2_steps'
  # Equivalence tests: a large eps keeps Adam from turning float noise in exactly-zero
  # gradients (e.g. of the attention key bias, to which softmax is invariant) into +-lr updates.
  c.optim.eps = 1e-4
  c.optim.update(optim)
  c.loss.clip_weight, c.loss.distill_weight = 0.25, 0.75
  c.sharding.min_fsdp_size = 64
  return c


def build(config, mesh=None):
  mesh = mesh or sharding_lib.create_mesh(devices=jax.devices()[:1])
  spec = setup.InputSpec.synthetic(setup.model_config(config), DIMS)
  return setup.build(config, mesh, spec=spec)


def train(run, batch, steps=2):
  """(final state, per-step metrics) of `steps` steps on one fixed batch."""
  state = run.init_state()
  batch = sharding_lib.global_batch(batch, run.mesh)
  history = []
  for _ in range(steps):
    state, metrics = run.step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _assert_same_run(got, want, rtol=2e-4):
  (got_state, got_history), (want_state, want_history) = got, want
  for g, w in zip(got_history, want_history):
    for key in ('loss', 'gt/distill', 'syn/clip', 'grad_norm'):
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=key)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_state.params)[0],
                          jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  for g, w in zip(jax.tree.leaves(got_state.batch_stats), jax.tree.leaves(want_state.batch_stats)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def single_device_b():
  return train(build(make_config('MobileCLIP2-B', TINY_B)), make_batch())


def test_norm_metrics_log_the_named_global_norms(single_device_b):
  assert 'param_norm' not in single_device_b[1][0] and 'update_norm' not in single_device_b[1][0]
  config = make_config('MobileCLIP2-B', TINY_B)
  config.norm_metrics = ('param', 'update')
  run = build(config)
  before = jax.device_get(run.init_state().params)
  after, (metrics,) = train(run, make_batch(), steps=1)
  norm = lambda tree: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                                  for x in jax.tree.leaves(tree)))
  np.testing.assert_allclose(metrics['param_norm'], norm(after.params), rtol=1e-5)
  np.testing.assert_allclose(metrics['update_norm'],
                             norm(jax.tree.map(np.subtract, after.params, before)), rtol=1e-3)
  config.norm_metrics = ('param', 'updates')
  with pytest.raises(ValueError, match=r"\['updates'\] not among \('param', 'update'\)"):
    build(config)


@pytest.mark.parametrize('shape', [(8, 1), (4, 2), (1, 8)])
def test_sharded_step_equals_single_device(single_device_b, shape):
  run = build(make_config('MobileCLIP2-B', TINY_B), sharding_lib.create_mesh(*shape))
  if shape[1] > 1:  # The fsdp axis really splits parameters and optimizer state.
    specs = {s.spec for s in jax.tree.leaves(run.state_shardings)}
    assert any('fsdp' in spec for spec in specs), specs
  _assert_same_run(train(run, make_batch()), single_device_b)


@pytest.mark.slow
def test_sharded_mci_step_equals_single_device():
  config = make_config('MobileCLIP2-S0', TINY_MCI)
  _assert_same_run(train(build(config, sharding_lib.create_mesh(4, 2)), make_batch()),
                   train(build(config), make_batch()))


def test_the_step_is_traced_for_its_meshs_platform_alone():
  # layers.for_platform: the CPU forms only, not a lax.platform_dependent choice whose other
  # branch would be traced, differentiated and lowered too (a third of the S0 step's tracing).
  run = build(make_config('MobileCLIP2-S0', TINY_MCI))
  jaxpr = str(jax.make_jaxpr(run.grad_fn)(run.abstract_state, run.abstract_batch))
  assert 'platform_index' not in jaxpr and 'scan' in jaxpr


def test_the_cpu_step_is_scheduled_for_memory_unless_configured_otherwise():
  temps = {}
  for scheduler in ('default', 'memory', 'concurrency'):
    config = make_config('MobileCLIP2-S0', TINY_MCI)
    if scheduler != 'default':
      config.cpu_scheduler = scheduler
    temps[scheduler] = build(config).step.memory_analysis().temp_size_in_bytes
  assert temps['default'] == temps['memory'] < 0.8 * temps['concurrency'], temps  # 8.5 vs 14.2 MB.
  config.cpu_scheduler = 'latency'
  with pytest.raises(ValueError,
                     match="cpu_scheduler='latency': use one of 'memory', 'concurrency'"):
    build(config)


def test_the_update_as_its_own_program_gives_the_fused_steps_run():
  # On CPU the optimizer's update is a second program (`update_program='auto'`): it must give
  # what the one-program step gives, update the batch statistics and still donate the state.
  runs = {}
  for choice in ('auto', 'fused'):
    config = make_config('MobileCLIP2-S0', TINY_MCI)
    config.update_program = choice
    runs[choice] = build(config)
  assert [len(run.step.programs) for run in runs.values()] == [2, 1]
  memory = [run.step.memory_analysis() for run in runs.values()]
  for field in ('argument', 'output', 'alias'):  # The same state and batch in and out.
    assert len({getattr(m, f'{field}_size_in_bytes') for m in memory}) == 1, field
  separate, fused = (train(run, make_batch(), steps=3) for run in runs.values())
  assert jax.tree.structure(separate) == jax.tree.structure(fused)
  for got, want in zip(jax.tree.leaves(separate), jax.tree.leaves(fused)):
    np.testing.assert_array_equal(got, want)  # The same operations: bit for bit.
  assert separate[0].step == 3
  initial = runs['auto'].init_state()
  for got, before in zip(jax.tree.leaves(separate[0].batch_stats),
                         jax.tree.leaves(initial.batch_stats)):
    assert not np.array_equal(got, before)  # Every BatchNorm's running statistics moved.
  state = runs['auto'].init_state()
  runs['auto'].step(state, sharding_lib.global_batch(make_batch(), runs['auto'].mesh))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves((state.params, state.opt_state)))
  config.update_program = 'split'
  with pytest.raises(ValueError, match="update_program='split': use one of 'auto', 'separate'"):
    build(config)


@pytest.fixture(scope='module')
def vit_full_batch_run():
  return train(build(make_config('ViT-B-16', TINY_VIT)), make_batch())


@pytest.mark.parametrize('accum_steps', [2, 4])
def test_accumulation_keeps_all_negatives_and_equals_the_full_batch(accum_steps,
                                                                    vit_full_batch_run):
  # A BatchNorm-free model: micro-batches then see exactly the full-batch computation.
  got = train(build(make_config('ViT-B-16', TINY_VIT, accum_steps=accum_steps)), make_batch())
  _assert_same_run(got, vit_full_batch_run, rtol=1e-4)


def test_accumulation_with_batchnorm_is_the_same_sharded_or_not(single_device_b):
  # Per micro-batch BatchNorm statistics and their running averages do not depend on the mesh.
  config = make_config('MobileCLIP2-B', TINY_B, accum_steps=2)
  want = train(build(config), make_batch(), steps=3)
  _assert_same_run(train(build(config, sharding_lib.create_mesh(4, 2)), make_batch(), steps=3),
                   want)
  full_batch = single_device_b  # The same model and batch without accumulation.
  assert not np.allclose(want[1][0]['loss'], full_batch[1][0]['loss'], rtol=1e-6)


def test_loss_falls_on_a_fixed_batch():
  config = make_config('MobileCLIP2-B', TINY_B, batch=8, total_steps=40)
  config.optim.eps = None  # The recipe's AdamW.
  _, history = train(build(config), make_batch(batch=8), steps=25)
  assert history[-1]['loss'] < 0.7 * history[0]['loss']


def _open_clip_decay_set(model_config):
  """open_clip's rule on the PyTorch names and shapes: ndim >= 2 and none of bn/ln/bias/scale."""
  decayed = set()
  for entry in oc_convert.conversion_table(model_config):
    name = entry.torch_key
    if entry.collection == 'params' and len(entry.torch_shape) >= 2 and not any(
        s in name for s in ('bn', 'ln', 'bias', 'logit_scale')):
      decayed.add('/'.join(entry.path))
  return decayed


def _two_blocks_deep(model_config):
  """The variant with at most two blocks per stage and two text layers: every parameter name of
  the full model, fewer block indices (no rule names an index), about a fifth of the tracing."""
  image, text = model_config.image, model_config.text
  depth = (dict(depths=tuple(min(d, 2) for d in image.depths)) if hasattr(image, 'depths')
           else dict(depth=min(image.depth, 2)))
  return dataclasses.replace(model_config, image=dataclasses.replace(image, **depth),
                             text=dataclasses.replace(text, layers=min(text.layers, 2)))


@pytest.mark.parametrize('name', sorted(clip_lib.MODEL_CONFIGS))
def test_default_decay_rules_give_open_clips_decay_set(name):
  model_config = _two_blocks_deep(clip_lib.get_config(name))
  params = clip_lib.abstract_variables(model_config)['params']
  wd_rules = rules.DEFAULT_WD_RULES
  if model_config.image_layout == 'open_clip':
    wd_rules = (rules.OPEN_CLIP_VIT_WD_RULE,) + wd_rules
  mults = rules.tree_values(wd_rules, params, 1.0, 'optim.wd_rules', strict=False)
  flat = {rules.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mults)[0]}
  assert {path for path, m in flat.items() if m} == _open_clip_decay_set(model_config)


def test_lr_multipliers_and_frozen_parameters():
  # No clipping: frozen parameters leave the global norm, which would rescale the others.
  base = make_config('ViT-B-16', TINY_VIT, grad_clip=0.0)
  frozen = make_config('ViT-B-16', TINY_VIT, grad_clip=0.0, freeze=(r'^text/',),
                       lr_rules=((r'^visual/head/', 0.0), (r'^visual/', 2.0)))
  run, base_run = build(frozen), build(base)
  opt_leaves = jax.tree.leaves(run.abstract_state.opt_state)
  assert len(opt_leaves) < len(jax.tree.leaves(base_run.abstract_state.opt_state))
  start = jax.device_get(run.init_state().params)
  state, _ = train(run, make_batch(), steps=2)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, start)
  assert not any(jax.tree.leaves(changed['text']))            # Frozen: not a bit moved.
  assert not any(jax.tree.leaves(changed['visual']['head']))  # lr x 0.
  assert changed['visual']['blocks_0']['mlp']['fc1']['kernel'] and changed['logit_scale']
  # lr x 2 on the first step (Adam's update is lr * sign-like, weight decay aside): twice the
  # base run's step for the same gradients.
  one = lambda r: train(r, make_batch(), steps=1)[0].params
  base_delta = one(base_run)['visual']['blocks_0']['mlp']['fc1']['bias'] - start['visual'][
      'blocks_0']['mlp']['fc1']['bias']
  got_delta = one(run)['visual']['blocks_0']['mlp']['fc1']['bias'] - start['visual'][
      'blocks_0']['mlp']['fc1']['bias']
  np.testing.assert_allclose(got_delta, 2 * base_delta, rtol=1e-4, atol=1e-9)


def test_rules_that_match_nothing_or_are_malformed_are_refused():
  with pytest.raises(ValueError, match=r"optim.freeze: the rule\(s\) \['\^txt/'\] match no"):
    build(make_config('ViT-B-16', TINY_VIT, freeze=('^txt/',)))
  with pytest.raises(ValueError, match='is not a regular expression'):
    build(make_config('ViT-B-16', TINY_VIT, lr_rules=(('visual/(', 2.0),)))


def test_sharding_rules_override_the_fsdp_default():
  config = make_config('ViT-B-16', TINY_VIT)
  config.sharding.rules = ((r'params/visual/blocks_\d+/mlp/fc1/kernel$', 'replicate'),
                           (r'params/text/token_embedding/embedding$', ('fsdp', None)))
  run = build(config, sharding_lib.create_mesh(4, 2))
  params = run.state_shardings.params
  assert params['visual']['blocks_0']['mlp']['fc1']['kernel'].spec == jax.sharding.PartitionSpec()
  assert params['text']['token_embedding']['embedding'].spec == jax.sharding.PartitionSpec(
      'fsdp', None)
  # Unmatched large arrays keep the default: split along their largest divisible dimension.
  assert 'fsdp' in params['visual']['blocks_0']['mlp']['fc2']['kernel'].spec
  config.sharding.rules = ((r'fc1/kernel$', ('fsdp',)),)
  with pytest.raises(ValueError, match='one mesh axis'):
    build(config, sharding_lib.create_mesh(4, 2))


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


def test_optimizer_equals_torchs_adamw_after_clip_grad_norm():
  # open_clip's update: clip_grad_norm_, then AdamW with the decayed group and the undecayed one.
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  params = {'fc': {'kernel': rng.normal(size=(5, 3)).astype(np.float32),
                   'bias': rng.normal(size=(3,)).astype(np.float32)}}
  schedule = optimizer_lib.lr_schedule(0.1, 10, 2)
  tx = optimizer_lib.make_optimizer(params, schedule, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.2,
                                    grad_clip=1.0, wd_rules=rules.DEFAULT_WD_RULES)
  theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params['fc'].items()}
  opt = torch.optim.AdamW([{'params': [theirs['kernel']], 'weight_decay': 0.2},
                           {'params': [theirs['bias']], 'weight_decay': 0.0}],
                          lr=0.1, betas=(0.9, 0.95), eps=1e-6)
  state, clipped = tx.init(params), []
  for step, scale in enumerate((3.0, 0.01, 2.0)):  # Clipped, not clipped (norm < 1), clipped.
    grads = jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for name, p in theirs.items():
      p.grad = torch.tensor(grads['fc'][name])
    clipped.append(float(torch.nn.utils.clip_grad_norm_(list(theirs.values()), 1.0)) > 1.0)
    for group in opt.param_groups:
      group['lr'] = float(schedule(step))
    opt.step()
    for name, p in theirs.items():  # torch divides by (norm + 1e-6): ~1e-7 relative here.
      np.testing.assert_allclose(params['fc'][name], p.detach().numpy(), rtol=2e-6, atol=1e-7)
  assert clipped == [True, False, True]


def test_eps_rule_and_logit_scale_clamp():
  assert optimizer_lib.default_eps('MobileCLIP2-L-14') == 1e-8
  assert optimizer_lib.default_eps('ViT-L-14') == 1e-6
  clamped = optimizer_lib.clamp_logit_scale({'logit_scale': np.array(7.0), 'x': 1})
  np.testing.assert_allclose(clamped['logit_scale'], np.log(100.0), rtol=1e-6)


def test_objective_selection():
  reinforced = make_batch().keys()
  assert setup.select_objective(reinforced, 'auto') == setup.Objective(True, True)
  assert setup.select_objective(['image', 'text'], 'auto') == setup.Objective(False, False)
  assert setup.select_objective(reinforced, 'clip') == setup.Objective(False, False)
  with pytest.raises(ValueError, match='needs a reinforced dataset'):
    setup.select_objective(['image', 'text'], 'dr')


def test_sigmoid_loss_trains_from_the_siglip_init_and_needs_a_bias():
  config = make_config('ViT-B-16', TINY_VIT)
  config.loss.kind, config.loss.teacher_biases = 'sigmoid', (-10.0, -10.0)
  with pytest.raises(ValueError, match='set model.init_logit_bias'):
    build(config)
  config.model.init_logit_scale, config.model.init_logit_bias = float(np.log(10.0)), -10.0
  state, history = train(build(config), make_batch())
  assert history[0]['bias'] == pytest.approx(-10.0) and history[0]['scale'] == pytest.approx(10.0)
  assert np.isfinite([h['loss'] for h in history]).all() and 'gt/distill' in history[0]
  assert float(state.params['logit_bias']) != -10.0  # Learned.


def test_batch_that_does_not_split_over_the_mesh_is_refused():
  with pytest.raises(ValueError, match='use a multiple of 16'):
    build(make_config('ViT-B-16', TINY_VIT, batch=24, accum_steps=2),
          sharding_lib.create_mesh(8, 1))


def test_optimizer_state_keeps_the_layout_of_earlier_checkpoints():
  # Checkpoints written with optax.chain(clip, optax.adamw(mask=...)) must restore: same tree.
  run = build(make_config('ViT-B-16', TINY_VIT))
  params = run.abstract_state.params
  schedule = optimizer_lib.lr_schedule(1e-3, 10, 2)
  before = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, b1=0.9, b2=0.95, eps=1e-4, weight_decay=0.2,
      mask=jax.tree.map(lambda _: True, params)))
  assert (jax.tree.structure(jax.eval_shape(run.tx.init, params)) ==
          jax.tree.structure(jax.eval_shape(before.init, params)))

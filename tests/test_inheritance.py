"""Weight inheritance: slicing a trained model into a smaller one, learned masks, the launcher.

The reference for "the child is the parent with those units removed" is the parent itself with
the units' reading weights set to zero (written out here per unit kind, not taken from the
package's unit table), run by the unmodified CLIP module, in train and eval mode.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_flags

import mobileclip_jax
from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.inheritance import masks
from mobileclip_jax.inheritance import schedule
from mobileclip_jax.inheritance import slicing
from mobileclip_jax.inheritance import stages
from mobileclip_jax.inheritance import units
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import reparam
from mobileclip_jax.train import setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT = 16
TEXT = dict(width=64, heads=2, layers=3, vocab_size=100, context_length=CONTEXT)
MCI = dict(image_size=32, embed_dim=32, text=TEXT, image=dict(
    depths=(2, 2), widths=(32, 64), token_mixers=('repmixer', 'attention'),
    pos_emb=(False, True), se_downsample=(False, True)))
MCT = dict(image_size=32, embed_dim=32, image=MCI['image'],
           text=dict(width=64, heads=2, layers=2, vocab_size=100, context_length=CONTEXT))
VIT = dict(image_size=32, embed_dim=32, text=TEXT, image=dict(width=64, depth=3, heads=2))
CONFIGS = {'mci': ('MobileCLIP2-S0', MCI), 'mct': ('MobileCLIP-S0', MCT),
           'vit': ('MobileCLIP2-B', VIT)}


def _config(kind):
  name, overrides = CONFIGS[kind]
  return clip_lib.get_config(name, **overrides)


def _perturbed(config):
  """Random weights, perturbed so that LayerScales, BatchNorm statistics and biases are not at
  their (symmetric) init values."""
  model = clip_lib.CLIP(config)
  variables = jax.jit(functools.partial(clip_lib.init_variables, model))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.2) * rng.normal(
      size=x.shape).astype(np.float32) if x.ndim else np.asarray(x), variables)
  variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])  # Variances > 0.
  return variables


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def parent(request):
  config = _config(request.param)
  return request.param, config, _perturbed(config)


def _inputs(config, batch=4):
  images = jax.random.normal(jax.random.PRNGKey(2), (batch, config.image_size, config.image_size,
                                                     3))
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(3), (batch, CONTEXT), 1, 99))
  tokens[:, -3] = 99  # EOT (the largest id) before some padding.
  return images, jnp.asarray(tokens)


def _run(model, variables, config, tower, train=True):
  """(eval, train) embeddings of one tower ('visual' or 'text') in one compiled call; train mode
  normalizes with batch statistics. train=False: (eval,) alone."""
  images, tokens = _inputs(config)
  x, method = (images, 'encode_image') if tower == 'visual' else (tokens, 'encode_text')

  def embeddings(v):
    if not train:
      return (model.apply(v, x, method=method),)
    train_mode, _ = model.apply(v, x, True, method=method, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.PRNGKey(4)})
    return model.apply(v, x, method=method), train_mode
  return jax.jit(embeddings)(variables)


def _close(got, want, tol=2e-5):
  for g, w in zip(got, want):
    scale = float(jnp.abs(w).max())
    assert float(jnp.abs(g - w).max()) <= tol * scale, (float(jnp.abs(g - w).max()), scale)


def _tree_copy(variables):
  return jax.tree.map(np.array, variables)


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _zero_rows(tree, path, rows, axis=0):
  """Zeroes `rows` of a parameter along `axis` (Dense [in, out]: 0; conv HWIO: 2)."""
  value = _get(tree, path)
  index = [slice(None)] * value.ndim
  index[axis] = np.asarray(rows, np.int64)
  value[tuple(index)] = 0.0


def _dropped(n, kept):
  return sorted(set(range(n)) - set(np.asarray(kept).tolist()))


# ----------------------------------------------------------------------------------------------
# Keeping everything; removing units == zeroing them.


def test_keeping_everything_returns_the_parent(parent):
  """Same config, bit-identical variables: the same module computes the same outputs."""
  _, config, variables = parent
  child, child_config = mobileclip_jax.inherit(variables, config, {})
  assert child_config == config
  assert jax.tree.structure(child) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(child), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def _text_zeroed(params, kept, prefix, n_layers, heads, head_dim, offset=0):
  """The parent's text / ViT transformer with the removed blocks, heads and neurons zeroed."""
  tower = 'text' if prefix == 'text' else 'visual'
  for i in range(n_layers):
    block = f'{prefix}/blocks_{i + offset}'
    if i not in kept[f'{tower}/layers']:  # Block removed: both residual updates zero.
      for leaf in ('attn/proj/kernel', 'attn/proj/bias', 'mlp/fc2/kernel', 'mlp/fc2/bias'):
        _get(params, f'{block}/{leaf}')[...] = 0.0
      continue
    for h in _dropped(heads, kept[f'{block}/heads']):  # The head's rows of proj.
      _zero_rows(params, f'{block}/attn/proj/kernel', range(h * head_dim, (h + 1) * head_dim))
    _zero_rows(params, f'{block}/mlp/fc2/kernel',
               _dropped(_get(params, f'{block}/mlp/fc2/kernel').shape[0], kept[f'{block}/mlp']))
  if offset:  # MCt: the RepMixer blocks around the transformer, their ConvFFN's neurons.
    for block in (f'{prefix}/blocks_0', f'{prefix}/blocks_{n_layers + 1}'):
      n = _get(params, f'{block}/mlp/fc2/kernel').shape[2]
      _zero_rows(params, f'{block}/mlp/fc2/kernel', _dropped(n, kept[f'{block}/mlp']), axis=2)


def _hard_masked(config, kept, variables):
  """MaskedCLIP and variables whose 0/1 gates keep exactly `kept` (other gates open)."""
  model = masks.MaskedCLIP(config, kinds=masks.KINDS)
  init = jax.eval_shape(lambda rng: clip_lib.init_variables(model, rng),
                        jax.random.PRNGKey(0))['params']['masks']
  layout = units.layout(config)
  gates = {}
  for name, value in init.items():
    if not value.shape:  # The multipliers.
      gates[name] = jnp.zeros(())
      continue
    fam = next(f for f in layout.families if masks.param_name(f) == name)
    logits = np.full(value.shape, -20.0, np.float32)
    logits[np.asarray(kept.get(fam, np.arange(value.shape[0])))] = 20.0
    gates[name] = jnp.asarray(logits)
  return model, {'params': {**variables['params'], 'masks': gates},
                 'batch_stats': variables['batch_stats']}


def _check(child, child_config, reference_model, reference, config, tower, tol=2e-5):
  got = _run(clip_lib.CLIP(child_config), child, child_config, tower)
  _close(got, _run(reference_model, reference, config, tower), tol)


TEXT_KEEPS = {'layers_mlp': {'text.layers': [0, 2], 'text.mlp_ratio': 1.5},
              'heads_width': {'text.heads': [1], 'text.width': 32}}


@pytest.mark.parametrize('what', sorted(TEXT_KEEPS))
@pytest.mark.parametrize('kind', ['mci', 'mct'])
def test_removing_text_layers_heads_neurons_equals_zeroing_them(kind, what):
  """Blocks and neurons: the parent with them zeroed. Heads: fewer heads of the same size need
  a narrower stream (width = heads x head_dim), which passes through LayerNorms: the parent
  with the heads zeroed and LayerNorm statistics over the kept channels (0/1 gates)."""
  config = _config(kind)
  variables = _perturbed(config)
  keep = dict(TEXT_KEEPS[what])
  if kind == 'mct' and 'text.layers' in keep:
    keep['text.layers'] = [1]
  child, child_config, kept = slicing.inherit_units(variables, config, keep)
  zeroed = _tree_copy(variables)
  t = config.text
  _text_zeroed(zeroed['params'], kept, 'text', t.layers, t.heads, t.width // t.heads,
               offset=0 if t.variant == 'base' else 1)
  if 'text.width' in keep:
    assert len(kept['text/head_dim']) == t.width // t.heads  # Only whole heads went.
    _check(child, child_config, *_hard_masked(config, kept, zeroed), config, 'text')
  else:
    _check(child, child_config, clip_lib.CLIP(config), zeroed, config, 'text')


def test_narrower_text_width_equals_the_parent_with_layernorm_over_the_kept_channels():
  """Width 64 -> 32 keeping both heads: the child is the parent with the dropped channels unread,
  LayerNorm statistics over the kept ones (0/1 gates of MaskedCLIP) and the dropped head
  dimensions' q/k/v columns zeroed (head_dim 32 -> 16, q rescaled by sqrt(16/32)). The plain
  parent with those weights zeroed differs: LayerNorm statistics cover all channels."""
  config = _config('mci')
  variables = _perturbed(config)
  child, child_config, kept = slicing.inherit_units(variables, config, {'text.width': 32})
  assert child_config.text.heads == 2 and len(kept['text/head_dim']) == 16
  zeroed = _tree_copy(variables)
  hd, heads = 32, 2
  drop = _dropped(hd, kept['text/head_dim'])
  for i in range(config.text.layers):
    block = f'text/blocks_{i}'
    cols = [t * heads * hd + h * hd + d for t in range(3) for h in range(heads) for d in drop]
    _get(zeroed['params'], f'{block}/attn/qkv/kernel')[:, cols] = 0.0
    _get(zeroed['params'], f'{block}/attn/qkv/bias')[cols] = 0.0
    _zero_rows(zeroed['params'], f'{block}/attn/proj/kernel',
               [h * hd + d for h in range(heads) for d in drop])
  _check(child, child_config, *_hard_masked(config, kept, zeroed), config, 'text')
  plain = _run(clip_lib.CLIP(config), zeroed, config, 'text', train=False)[0]
  got = _run(clip_lib.CLIP(child_config), child, child_config, 'text')[0]  # As _check's.
  assert float(jnp.abs(plain - got).max()) > 1e-2 * float(jnp.abs(got).max())


def test_masked_layernorm_is_layernorm_of_the_kept_channels():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 12)) * 3 + 1
  scale, bias = jax.random.normal(jax.random.PRNGKey(1), (2, 12))
  kept = np.array([0, 3, 4, 7, 11])
  gate = jnp.zeros(12).at[kept].set(1.0)
  got = masks.masked_layer_norm(x, scale, bias, gate, 1e-5)[..., kept]
  want = layers.LayerNorm(epsilon=1e-5).apply(
      {'params': {'scale': scale[kept], 'bias': bias[kept]}}, x[..., kept])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _mci_zeroed(params, kept, image):
  """The parent's MCi tower with the dropped channels, neurons, heads and SE units unread (their
  input rows zeroed in every module that mixes channels) and the dropped blocks' LayerScales 0."""
  v = 'visual'
  chan = lambda i: _dropped(image.widths[i], kept[f'{v}/stages_{i}/channels'])
  final = _dropped(int(image.widths[-1] * 2), kept[f'{v}/final_conv/channels'])
  _zero_rows(params, f'{v}/stem_2/conv_kxk_0/conv/kernel', chan(0), axis=2)
  down = f'{v}/stages_1/downsample'
  _zero_rows(params, f'{down}/proj_1/conv_kxk_0/conv/kernel', chan(1), axis=2)
  _zero_rows(params, f'{down}/proj_0/se/fc1/kernel', chan(1), axis=2)
  _zero_rows(params, f'{v}/final_conv/se/fc1/kernel', final, axis=2)
  _zero_rows(params, f'{v}/head/kernel', final)
  for se in (f'{down}/proj_0/se', f'{v}/final_conv/se'):
    n = _get(params, f'{se}/fc2/kernel').shape[2]
    _zero_rows(params, f'{se}/fc2/kernel', _dropped(n, kept[se]), axis=2)
  for i, depth in enumerate(image.depths):
    for j in range(depth):
      block = f'{v}/stages_{i}/blocks_{j}'
      if j not in kept[f'{v}/stages_{i}/blocks']:
        names = (('token_mixer/layer_scale', 'layer_scale') if image.token_mixers[i] == 'repmixer'
                 else ('layer_scale_1', 'layer_scale_2'))
        for name in names:
          _get(params, f'{block}/{name}/gamma')[...] = 0.0
        continue
      _zero_rows(params, f'{block}/mlp/fc1/kernel', chan(i), axis=2)
      n = _get(params, f'{block}/mlp/fc2/kernel').shape[2]
      _zero_rows(params, f'{block}/mlp/fc2/kernel', _dropped(n, kept[f'{block}/mlp']), axis=2)
      if image.token_mixers[i] == 'attention':
        _zero_rows(params, f'{block}/token_mixer/qkv/kernel', chan(i))
        for h in _dropped(image.widths[i] // image.head_dim, kept[f'{block}/heads']):
          _zero_rows(params, f'{block}/token_mixer/proj/kernel',
                     range(h * image.head_dim, (h + 1) * image.head_dim))


MCI_KEEPS = {'blocks_mlp': {'image.depths': ([1], 1), 'image.mlp_ratio': 1.5},
             'all': {'image.depths': (1, [0]), 'image.widths': (16, 32), 'image.mlp_ratio': 2.0}}


@pytest.mark.parametrize('what', sorted(MCI_KEEPS))
def test_removing_mci_blocks_channels_neurons_equals_zeroing_them(what):
  """BatchNorms are per channel, so this holds in train mode (batch statistics) too."""
  config = _config('mci')
  variables = _perturbed(config)
  child, child_config, kept = slicing.inherit_units(variables, config, MCI_KEEPS[what])
  zeroed = _tree_copy(variables)
  _mci_zeroed(zeroed['params'], kept, config.image)
  _check(child, child_config, clip_lib.CLIP(config), zeroed, config, 'visual')


def test_removing_vit_layers_heads_neurons_equals_zeroing_them():
  """Width 64 -> 32 with one of two heads: a narrower stream (LayerNorms: 0/1 gates), and the
  conv stem keeps 8 of its 16 middle channels (BatchNorm, per channel; unread in the parent)."""
  config = _config('vit')
  variables = _perturbed(config)
  keep = {'image.depth': [0, 2], 'image.heads': [0], 'image.width': 32, 'image.mlp_ratio': 2.0}
  child, child_config, kept = slicing.inherit_units(variables, config, keep)
  zeroed = _tree_copy(variables)
  _text_zeroed(zeroed['params'], kept, 'visual', 3, 2, 32)
  stem = _dropped(16, kept['visual/patch_embed/channels'])
  _zero_rows(zeroed['params'], 'visual/patch_embed/backbone_1/conv/kernel', stem, axis=2)
  _zero_rows(zeroed['params'], 'visual/patch_embed/backbone_2/kernel', stem, axis=2)
  _check(child, child_config, *_hard_masked(config, kept, zeroed), config, 'visual')


# ----------------------------------------------------------------------------------------------
# Counts, reparameterization, learned masks.


@pytest.mark.parametrize('kind,keep', [
    ('mci', {'text.layers': 1, 'image.widths': (16, 32), 'image.depths': (1, 1)}),
    ('mct', {'text.width': 32, 'text.mlp_ratio': 2.0, 'image.mlp_ratio': 1.0}),
    ('vit', {'image.depth': 1, 'image.width': 32, 'image.heads': 1, 'text.heads': 1,
             'text.width': 16})])
def test_inherited_parameter_count_equals_the_child_configs(kind, keep):
  config = _config(kind)
  parent_vars = _perturbed(config)
  child, child_config = mobileclip_jax.inherit(parent_vars, config, keep)
  abstract = clip_lib.abstract_variables(child_config)
  assert jax.tree.map(np.shape, child) == jax.tree.map(lambda x: x.shape, dict(abstract))
  want = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  assert slicing.param_count(child) == want < slicing.param_count(parent_vars)
  counts = clip_lib.count_params(config.name, image_size=32, embed_dim=32,
                                 **_tower_overrides(kind, keep))
  assert sum(counts.values()) + 1 == want  # + the logit scale.


def _tower_overrides(kind, keep):
  """The parent's overrides with the keep spec's sizes: the child asked for directly."""
  out = {t: dict(CONFIGS[kind][1][t]) for t in ('image', 'text')}
  for key, value in keep.items():
    tower, field = key.split('.')
    out[tower][field] = value
  return out


def test_named_targets_are_exact_reductions():
  s2, s0 = clip_lib.get_config('MobileCLIP2-S2'), clip_lib.get_config('MobileCLIP2-S0')
  child, _ = slicing.child_config(s2, stages.target_keep(s2, s0))
  assert dataclasses.replace(child, name=s0.name) == s0
  s4, s3 = clip_lib.get_config('MobileCLIP2-S4'), clip_lib.get_config('MobileCLIP2-S3')
  child, _ = slicing.child_config(s4, stages.target_keep(s4, s3))
  assert dataclasses.replace(child, name=s3.name) == s3
  with pytest.raises(ValueError, match='not a reduction'):
    stages.target_keep(s0, clip_lib.get_config('MobileCLIP-S0'))  # MCt text tower.


@pytest.mark.parametrize('kind', ['mci', 'mct'])
def test_slicing_then_reparameterizing_equals_reparameterizing_then_slicing(kind):
  """The same kept units (chosen on the train-time weights) sliced out of the folded weights."""
  config = _config(kind)
  variables = _perturbed(config)
  keep = {'image.widths': (16, 32), 'image.depths': (1, 2), 'image.mlp_ratio': 2.0,
          'text.width': 32, 'text.mlp_ratio': 2.0}
  child, child_config, kept = slicing.inherit_units(variables, config, keep)
  a = reparam.reparameterize(child)
  folded_config = dataclasses.replace(config, reparameterized=True)
  b = slicing.slice_variables(reparam.reparameterize(variables), units.layout(folded_config),
                              kept)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  folded_child = dataclasses.replace(child_config, reparameterized=True)
  tower = 'visual' if kind == 'mci' else 'text'
  got = _run(clip_lib.CLIP(folded_child), b, folded_child, tower, train=False)[0]
  want = _run(clip_lib.CLIP(child_config), child, child_config, tower, train=False)[0]
  _close([got], [want], tol=1e-4)


GATE_KEEPS = {
    'mci': ('visual', {'image.widths': (16, 32), 'image.depths': (2, [1]),
                       'image.mlp_ratio': 2.0}),
    'mct': ('text', {'text.layers': [0], 'text.mlp_ratio': 2.0, 'text.heads': [1],
                     'text.width': 32}),
    'vit': ('visual', {'image.depth': [1, 2], 'image.heads': [1], 'image.width': 32,
                       'image.mlp_ratio': 3.0})}


def test_open_gates_reproduce_the_parent_and_closed_gates_the_child(parent):
  """MaskedCLIP, the vehicle of learned inheritance: all gates open = the parent; 0/1 gates =
  the child they choose (`keep_from_masks`), in train and eval mode."""
  kind, config, variables = parent
  tower, keep = GATE_KEEPS[kind]
  child, child_config, kept = slicing.inherit_units(variables, config, keep)
  model, hard = _hard_masked(config, kept, variables)
  opened = {**hard, 'params': {**hard['params'], 'masks': {
      k: jnp.full_like(g, 20.0) if g.ndim else g for k, g in hard['params']['masks'].items()}}}
  _close(_run(model, opened, config, tower, train=False),
         _run(clip_lib.CLIP(config), variables, config, tower, train=False))
  learned = masks.keep_from_masks(hard, config)
  assert slicing.child_config(config, learned)[0] == child_config
  _close(_run(model, hard, config, tower),
         _run(clip_lib.CLIP(child_config), child, child_config, tower))


def _mask_run_config(target, steps):
  c = config_lib.base_config()
  c.model.name = 'ViT-B-16'
  c.model.update(dict(embed_dim=16, image_size=16))
  c.model.image.update(dict(width=32, depth=2, heads=2, patch_size=8))
  c.model.text.update(dict(width=32, heads=2, layers=2, vocab_size=100, context_length=8))
  c.batch_size, c.schedule.total, c.schedule.warmup = 8, f'{steps}_steps', '1_steps'
  c.optim.lr_rules = ((r'^masks/', 500.0),)  # Gates and multipliers at lr 0.5.
  c.optim.lr = 1e-3
  c.inherit.masks = 'heads,mlp,embed,layers'
  c.inherit.target, c.inherit.ramp, c.inherit.mask_init = target, '1_steps', 1.0
  c.loss.clip_weight, c.loss.distill_weight, c.loss.teacher_scales = 0.5, 0.5, (50.0,)
  return c


def test_a_learned_mask_run_moves_the_parameter_fraction_to_the_target():
  """Through train/setup.py: the masked model, the constraint as the step's regularizer, the
  multipliers by gradient ascent; p falls toward q = target while the multipliers grow."""
  config = _mask_run_config(target=0.5, steps=10)
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  run = setup.build(config, mesh, spec=setup.InputSpec.synthetic(setup.model_config(config),
                                                                 (8,)))
  assert isinstance(run.model, masks.MaskedCLIP) and run.regularizer is not None
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  state, history = run.init_state(), []
  for _ in range(10):
    batch = {'image': rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             'text': rng.integers(1, 100, (8, 8)).astype(np.int32),
             'syn_text': rng.integers(1, 100, (8, 8)).astype(np.int32),
             **{k: unit(rng.normal(size=(8, 8)))
                for k in ('teacher_image_emb', 'teacher_text_emb', 'teacher_syn_text_emb')}}
    state, metrics = run.step(state, sharding_lib.global_batch(batch, mesh))
    history.append({k: float(v) for k, v in metrics.items()})
  for tower in ('text', 'visual'):
    p = [h[f'masks/{tower}/p'] for h in history]
    assert p[-1] < p[0] - 0.05 and p[-1] > 0.5 - 0.2, p
    assert history[-1][f'masks/{tower}/lambda_1'] > 0  # Ascent: p > q made lambda_1 grow.
  assert all(h['masks/q'] == 0.5 for h in history[1:])
  assert 'masks/constraint' in history[0]


def test_init_from_takes_the_files_weights_and_a_masked_run_adds_fresh_gates(tmp_path):
  """`model.init_from`: the file's weights, placed, at step 0 with a fresh optimizer state; a
  masked run's gates (the file has none) are those of its own random init."""
  config = _mask_run_config(target=0.5, steps=2)
  model_config = setup.model_config(config)
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  spec = setup.InputSpec.synthetic(model_config, (8,))
  fresh = jax.device_get(setup.build(config, mesh, spec=spec).init_state())
  weights = {k: jax.tree.map(lambda x: x + np.float32(0.5), v)
             for k, v in fresh.params.items() if k != 'masks'}
  checkpoint_lib.save_variables(str(tmp_path / 'parent'), {'params': weights}, model_config)
  config.model.init_from = str(tmp_path / 'parent')
  run = setup.build(config, mesh, spec=spec)
  state = run.init_state()
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in state.params.items()
                                               if k != 'masks'}, weights)
  jax.tree.map(np.testing.assert_array_equal, state.params['masks'], fresh.params['masks'])
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)  # Zeros, count 0.
  assert jax.tree.map(lambda x: x.sharding, state) == jax.tree.map(lambda x: x.sharding,
                                                                     run.abstract_state)


def test_bad_keep_specs_say_what_to_change():
  config = _config('mci')
  cases = [({'text.layer': 2}, 'Did you mean'), ({'text.heads': 1}, 'width'),
           ({'image.widths': (16, 64)}, r'integer in 2\.\.2'),
           ({'image.widths': (32, 48)}, 'multiple of head_dim'),
           ({'image.depth': 1}, 'other image tower'), ({'text.layers': [0, 0]}, 'distinct'),
           ({'text.mlp_ratio': 5.0}, 'neurons'), ({'select': 'random'}, 'select')]
  for keep, message in cases:
    with pytest.raises(ValueError, match=message):
      slicing.child_config(config, keep)
  with pytest.raises(ValueError, match='do not fit'):
    mobileclip_jax.inherit(_perturbed(_config('vit')), config, {})


# ----------------------------------------------------------------------------------------------
# The launcher's files, and training the child through setup.build.


def _parse_train_flags(flagfile, recipe):
  """The training config launch/train.py gets from `--config=recipe --flagfile=flagfile`."""
  argv = ['train.py', f'--config={recipe}', f'--flagfile={flagfile}']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_launch_inherit_writes_a_child_that_trains_with_its_flags(tmp_path):
  """launch/inherit.py on a tiny checkpoint: the child's files; its train.flags on a recipe give
  the child's model config, and setup.build's state starts from the child's weights."""
  config = _config('mci')
  variables = _perturbed(config)
  parent_dir, out = str(tmp_path / 'parent'), str(tmp_path / 'child')
  checkpoint_lib.save_variables(parent_dir, variables, config)
  argv = [sys.executable, os.path.join(REPO, 'launch', 'inherit.py'), f'--checkpoint={parent_dir}',
          '--model=MobileCLIP2-S0', '--keep=text.layers=2;image.widths=16,32', '--select=first',
          f'--out={out}']
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'train.flags' in proc.stdout
  with open(os.path.join(out, schedule.INHERIT_JSON)) as f:
    record = json.load(f)
  assert record['keep']['image.widths'] == [16, 32] and record['param_fraction']['visual'] < 0.5
  assert record['kept']['text/layers'] == [0, 1]
  saved, child_config = checkpoint_lib.load_variables(out)
  want, want_config = mobileclip_jax.inherit(
      variables, config, {'text.layers': [0, 1], 'image.widths': (16, 32), 'select': 'first'})
  assert child_config == want_config
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

  c = _parse_train_flags(os.path.join(out, schedule.TRAIN_FLAGS),
                         os.path.join(REPO, 'configs', 'demo.py') + ':student_dr,quick')
  assert setup.model_config(c) == child_config and c.model.init_from == os.path.abspath(out)
  with c.unlocked():
    c.batch_size = 8
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  run = setup.build(c, mesh, spec=setup.InputSpec.synthetic(child_config, (8, 8)))
  for a, b in zip(jax.tree.leaves(run.init_state().params), jax.tree.leaves(saved['params'])):
    np.testing.assert_array_equal(a, b)
  # The parent's recipe without the architecture flags: init_from names the flags to add.
  c2 = config_lib.base_config()
  c2.model.update(dict(image_size=32, embed_dim=32, init_from=out))
  c2.model.image.update(MCI['image'])
  c2.model.text.update(TEXT)
  run = setup.build(c2, mesh, spec=setup.InputSpec.synthetic(setup.model_config(c2), (8, 8)))
  with pytest.raises(ValueError, match=r'--config\.model\.image\.widths=\(16, 32\)'):
    run.init_state()
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)  # No overwriting.
  assert proc.returncode != 0 and 'already holds a model checkpoint' in proc.stderr

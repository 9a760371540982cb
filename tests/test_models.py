"""The Flax model zoo equals the PyTorch reference (open_clip + timm, Apple's MCt) number for number."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobileclip_jax
from mobileclip_jax import convert
from mobileclip_jax.models import attention
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mobileone
from mobileclip_jax.models import text as text_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TOL = 1e-5

# Reference parameter counts in millions (image tower incl. projection, text tower incl. token
# embedding and projection), measured by instantiating timm 1.0.31 / open_clip 3.3.0 / Apple's code.
REFERENCE_PARAMS_M = {
    'MobileCLIP-S0': (11.41, 42.44), 'MobileCLIP-S1': (21.54, 63.43),
    'MobileCLIP-S2': (35.82, 63.43), 'MobileCLIP-B': (86.35, 63.43),
    'MobileCLIP2-S0': (11.41, 63.43), 'MobileCLIP2-S2': (35.82, 63.43),
    'MobileCLIP2-S3': (125.24, 123.65), 'MobileCLIP2-S4': (321.78, 123.65),
    'MobileCLIP2-B': (86.35, 63.43), 'MobileCLIP2-L-14': (303.97, 123.65),
}


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS_M))
def test_param_counts_equal_reference_table(name):
  counts = mobileclip_jax.count_params(name)
  assert (round(counts['image'] / 1e6, 2), round(counts['text'] / 1e6, 2)) == REFERENCE_PARAMS_M[name]


@functools.lru_cache(maxsize=8)  # The slow tests' full-size variants each replace the last.
def _encoder(config, tower, train=False):
  """One tower's jitted forward, made once per (config, tower, train): the S0 tests reuse it."""
  model = clip_lib.CLIP(config)
  if tower == 'text':
    return jax.jit(lambda v, t: model.apply(v, t, method='encode_text'))
  mutable = ['batch_stats'] if train else False
  return jax.jit(lambda v, x: model.apply(v, x, train, method='encode_image', mutable=mutable))


class _Reference:
  """One perturbed open_clip model, its inputs and reference outputs (eval, train-BN, reparam)."""

  def __init__(self, name, batch=2):
    import torch_reference as ref  # pylint: disable=g-import-not-at-top  (needs torch)
    torch = ref.torch
    self.name = name
    model, gen = ref.reference_model(name)
    self.images, self.tokens = ref.reference_inputs(name, model, gen, batch)
    self.state_dict = ref.state_dict_numpy(model)
    with torch.no_grad():
      x, t = torch.from_numpy(self.images), torch.from_numpy(self.tokens).long()
      self.image_features = model.encode_image(x).numpy()
      self.text_features = model.encode_text(t).numpy()
      self.is_mci = 'fastvit' in type(model.visual.trunk).__module__ if hasattr(
          model.visual, 'trunk') else False
      if self.is_mci:
        trained = ref.train_mode_copy(model)
        self.image_features_trainbn = trained.encode_image(x).numpy()
        self.state_dict_after_train = ref.state_dict_numpy(trained)
        reparam = ref.timm.models.reparameterize_model(model)
        self.image_features_reparam = reparam.encode_image(x).numpy()
        self.reparam_state_dict = ref.state_dict_numpy(reparam)
    self.images_nhwc = jnp.asarray(ref.nhwc(self.images))
    self.config = mobileclip_jax.get_config(name)
    self.variables = convert.from_open_clip(self.state_dict, name)


@pytest.fixture(scope='module')
def s0():
  return _Reference('MobileCLIP2-S0')


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_parity(ref: _Reference):
  image = _encoder(ref.config, 'image')(ref.variables, ref.images_nhwc)
  text = _encoder(ref.config, 'text')(ref.variables, ref.tokens)
  assert image.shape == ref.image_features.shape and text.shape == ref.text_features.shape
  assert _rel(image, ref.image_features) <= TOL
  assert _rel(text, ref.text_features) <= TOL


def _check_round_trip(ref: _Reference):
  back = convert.to_open_clip(ref.variables, ref.name)
  assert sorted(back) == sorted(ref.state_dict)
  for key, value in ref.state_dict.items():
    assert back[key].shape == value.shape, key
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def _check_reparam(ref: _Reference):
  fused = mobileclip_jax.reparameterize(ref.variables)
  config = clip_lib.get_config(ref.name, reparameterized=True)
  image = _encoder(config, 'image')(fused, ref.images_nhwc)
  assert _rel(image, ref.image_features) <= TOL       # equals the train-time eval forward,
  assert _rel(image, ref.image_features_reparam) <= TOL  # and timm's reparameterize_model.
  from_timm = convert.from_open_clip(ref.reparam_state_dict, ref.name)
  assert jax.tree.structure(from_timm) == jax.tree.structure(fused)
  for a, b in zip(jax.tree.leaves(from_timm), jax.tree.leaves(fused)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_s0_matches_open_clip(s0):
  _check_parity(s0)


def test_s0_round_trip_is_bit_exact(s0):
  _check_round_trip(s0)


def test_s0_train_mode_batchnorm_matches_torch(s0):
  image, updates = _encoder(s0.config, 'image', train=True)(s0.variables, s0.images_nhwc)
  assert _rel(image, s0.image_features_trainbn) <= TOL
  # Running statistics advance exactly as torch's (momentum 0.1, unbiased variance).
  new_vars = dict(s0.variables, batch_stats=updates['batch_stats'])
  after = convert.to_open_clip(new_vars, s0.name)
  for key in after:
    if key.startswith('visual.') and key.endswith(('running_mean', 'running_var')):
      np.testing.assert_allclose(after[key], s0.state_dict_after_train[key], rtol=1e-4, atol=1e-6,
                                 err_msg=key)


def test_s0_reparameterized_matches_eval_and_timm(s0):
  _check_reparam(s0)


@pytest.mark.parametrize('tower,path', [
    ('image', ('visual', 'stages_2', 'blocks_3', 'mlp', 'fc1', 'kernel')),
    ('text', ('text', 'blocks_5', 'mlp', 'fc2', 'kernel')),
])
def test_parity_check_detects_a_one_percent_weight_change(s0, tower, path):
  params = jax.tree.map(np.array, s0.variables['params'])
  leaf = params
  for k in path[:-1]:
    leaf = leaf[k]
  leaf[path[-1]] = leaf[path[-1]] * 1.01
  got = _encoder(s0.config, tower)(dict(s0.variables, params=params),
                                   s0.images_nhwc if tower == 'image' else s0.tokens)
  assert _rel(got, s0.image_features if tower == 'image' else s0.text_features) > TOL


SLOW_VARIANTS = ['MobileCLIP2-S2', 'MobileCLIP2-S3', 'MobileCLIP2-S4', 'MobileCLIP2-B',
                 'MobileCLIP2-L-14', 'MobileCLIP-S1', 'MobileCLIP-S2', 'MobileCLIP-B']


@pytest.mark.slow
@pytest.mark.parametrize('name', SLOW_VARIANTS)
def test_full_size_variant_matches_open_clip(name):
  ref = _Reference(name, batch=1)
  _check_parity(ref)
  _check_round_trip(ref)
  if ref.is_mci:
    _check_reparam(ref)


def test_wrong_variant_and_damaged_state_dicts_are_named(s0):
  with pytest.raises(ValueError, match=r'(?s)does not match MobileCLIP2-S2.*missing.*shape mismatch'):
    convert.from_open_clip(s0.state_dict, 'MobileCLIP2-S2')
  truncated = dict(s0.state_dict)
  del truncated['text.ln_final.weight']
  with pytest.raises(ValueError, match=r'1 missing: text\.ln_final\.weight'):
    convert.from_open_clip(truncated, s0.name)
  bad = dict(s0.state_dict, **{'text.text_projection': np.zeros((512, 768), np.float32)})
  with pytest.raises(ValueError, match=r'text\.text_projection: expected \(512, 512\), got \(512, 768\)'):
    convert.from_open_clip(bad, s0.name)
  with pytest.raises(ValueError, match='Unknown model'):
    convert.from_open_clip(s0.state_dict, 'MobileCLIP2-S9')


def _mct_fixture():
  data = np.load(os.path.join(FIXTURES, 'apple_mct_small.npz'))
  with open(os.path.join(FIXTURES, 'apple_mct_small.json')) as f:
    meta = json.load(f)
  state = {k[len('param:'):]: data[k] for k in data.files if k.startswith('param:')}
  cfg = meta['text_cfg']
  config = clip_lib.get_config(
      'MobileCLIP-S0', embed_dim=meta['projection_dim'],
      text=dict(width=cfg['dim'], heads=cfg['n_heads_per_layer'], vocab_size=cfg['vocab_size'],
                layers=cfg['n_transformer_layers'], context_length=cfg['context_length']))
  return state, data, config


@pytest.mark.parametrize('reparameterized', [False, True])
def test_mct_matches_apple_reference(reparameterized):
  state, data, config = _mct_fixture()
  variables = convert.from_open_clip(state, config, tower='text')
  text_vars = {c: tree['text'] for c, tree in variables.items()}
  if reparameterized:
    text_vars = mobileclip_jax.reparameterize(text_vars)
  tower = text_lib.TextTransformer(config=config.text, embed_dim=config.embed_dim,
                                   opts=layers.Options(reparameterized=reparameterized))
  out = tower.apply(text_vars, jnp.asarray(data['tokens']))
  want = data['text_features_reparam' if reparameterized else 'text_features']
  assert _rel(out, want) <= TOL
  if not reparameterized:  # And back to Apple's names, bit-exact.
    back = convert.to_open_clip(variables, config, tower='text')
    assert sorted(k for k in back if not k.endswith('num_batches_tracked')) == sorted(
        k for k in state if not k.endswith('num_batches_tracked'))
    for k, v in state.items():
      if not k.endswith('num_batches_tracked'):
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_mci_accepts_other_resolutions():
  size = 320  # Not the trained 256: 10 x 10 and 5 x 5 grids in the attention stages.
  # Full size, abstractly: MCi4 downsamples once more (grid size // 64) than MCi0 (size // 32).
  model = mobileclip_jax.create_model('MobileCLIP2-S4')
  variables = clip_lib.abstract_variables(model.config)  # Made at 256.
  images = jnp.zeros((2, size, size, 3))
  out = jax.eval_shape(lambda v: model.apply(v, images, method='encode_image'), variables)
  assert out.shape == (2, model.config.embed_dim)
  # A real forward on a reduced MCi, its weights made at 256.
  tiny = mobileclip_jax.create_model('MobileCLIP2-S0', embed_dim=16, text=dict(
      layers=1, width=32, heads=2), image=dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)))
  variables = jax.jit(functools.partial(clip_lib.init_variables, tiny))(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
  emb = jax.jit(lambda v, x: tiny.apply(v, x, method='encode_image'))(variables, x)
  assert emb.shape == (2, 16) and bool(jnp.all(jnp.isfinite(emb)))


def _naive_attention(q, k, v, kind, mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if kind == 'sigmoid':
    w = 1 / (1 + np.exp(-(logits - np.log(k.shape[1]))))
    if mask is not None:
      w = np.where(mask, w, 0.0)
  else:
    if mask is not None:
      logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', w, v)


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('causal', [False, True])
def test_attention_equals_the_naive_formula(kind, causal):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 13, 3, 8)).astype(np.float32) for _ in range(3))
  got = attention.dot_product_attention(q, k, v, kind=kind, is_causal=causal)
  mask = np.tril(np.ones((13, 13), bool)) if causal else None
  np.testing.assert_allclose(got, _naive_attention(q, k, v, kind, mask), rtol=1e-5, atol=1e-5)


def test_attention_backward_concatenates_the_qkv_cotangents():
  """Slicing q, k, v out of the fused projection pads each cotangent to the fused shape in the
  backward (S0's step held 0.26 GB of them); the split's transpose concatenates them."""
  mha = attention.MultiHeadAttention(num_heads=2)
  x = jnp.ones((2, 5, 8))
  variables = mha.init(jax.random.PRNGKey(0), x)
  loss = lambda v, x: mha.apply(v, x).sum()
  program = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(variables, x))  # With inner jaxprs.
  assert ' pad[' not in program and ' concatenate[' in program


def test_sigmoid_attention_gives_masked_positions_zero_weight():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype(np.float32) for _ in range(3))
  mask = np.ones((1, 1, 6, 6), bool)
  mask[..., 4:] = False  # Keys 4 and 5 are padding.
  out = attention.dot_product_attention(q, k, v, kind='sigmoid', mask=mask)
  v2 = v.copy()
  v2[:, 4:] = 1e6  # Anything at masked keys must not leak into the output.
  out2 = attention.dot_product_attention(q, k, v2, kind='sigmoid', mask=mask)
  np.testing.assert_array_equal(out, out2)
  np.testing.assert_allclose(out, _naive_attention(q, k, v, 'sigmoid', mask), rtol=1e-5, atol=1e-6)


# Two stages hold every MCi block type (the last one attention) at half the compile time of four.
TWO_STAGE_MCI = dict(depths=(1, 1), widths=(16, 64), token_mixers=('repmixer', 'attention'),
                     pos_emb=(False, True), se_downsample=(False, True))


def test_sigmoid_attention_switch_reaches_every_attention_layer(monkeypatch):
  tiny = dict(embed_dim=16, image=dict(TWO_STAGE_MCI, depths=(1, 2)),
              text=dict(layers=3, width=32, heads=2, layer_scale_init=1e-4, hybrid_norm=True))
  images, tokens = jnp.ones((2, 64, 64, 3)), jnp.ones((2, 77), jnp.int32)
  calls = []
  real = attention.dot_product_attention
  def recording(q, k, v, **kw):
    calls.append(kw['kind'])
    return real(q, k, v, **kw)
  monkeypatch.setattr(attention, 'dot_product_attention', recording)
  for kind in ('softmax', 'sigmoid'):
    model = mobileclip_jax.create_model('MobileCLIP2-S0', attention=kind, qk_norm=True, **tiny)
    variables = jax.jit(functools.partial(clip_lib.init_variables, model))(jax.random.PRNGKey(0))
    calls.clear()
    jax.jit(model.apply)(variables, images, tokens)  # Traced once: one call per layer.
    assert calls == [kind] * 5  # 2 image attention blocks + 3 text layers.
  block = variables['params']['text']['blocks_0']
  assert {'ls_1', 'ls_2', 'attn_norm'} <= set(block) and {'q_norm', 'k_norm'} <= set(block['attn'])


def test_batchnorm_group_statistics():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 3)) * 3 + 1
  bn = layers.BatchNorm(group_size=2)
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  xs = np.asarray(x, np.float64).reshape(4, 2, 4, 4, 3)
  mean = xs.mean((1, 2, 3), keepdims=True)
  var = xs.var((1, 2, 3), keepdims=True)
  np.testing.assert_allclose(y, ((xs - mean) / np.sqrt(var + 1e-5)).reshape(x.shape), atol=1e-5)
  n = 2 * 4 * 4
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean.mean(0).ravel(), atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'],
                             0.9 + 0.1 * (var.mean(0) * n / (n - 1)).ravel(), atol=1e-6)
  with pytest.raises(ValueError, match='does not divide'):
    layers.BatchNorm(group_size=3).apply(variables, x, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('group', [0, 2])
def test_batchnorm_train_gradients_equal_torch(group):
  """Train-mode gradients against torch.nn.BatchNorm2d's backward (one torch call per group)."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(8, 5, 6, 3)) * 3 + 1).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  params = {'scale': np.float32([1.5, -0.5, 2.0]), 'bias': np.float32([0.1, 0.2, 0.3])}
  bn = layers.BatchNorm(group_size=group)
  stats = bn.init(jax.random.PRNGKey(0), x)['batch_stats']
  loss = lambda x, p: jnp.vdot(bn.apply({'params': p, 'batch_stats': stats}, x, train=True,
                                        mutable=['batch_stats'])[0], g)
  dx, dparams = jax.grad(loss, (0, 1))(x, params)
  t_bn = torch.nn.BatchNorm2d(3)
  t_x = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
  with torch.no_grad():
    t_bn.weight.copy_(torch.from_numpy(params['scale']))
    t_bn.bias.copy_(torch.from_numpy(params['bias']))
  y = torch.cat([t_bn(part) for part in t_x.split(group or len(x))])
  (y * torch.from_numpy(g).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_allclose(dx, t_x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams['scale'], t_bn.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams['bias'], t_bn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
  tiny = dict(embed_dim=16, image=TWO_STAGE_MCI, text=dict(layers=2, width=32, heads=2))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 77), 0, 49408)
  f32 = mobileclip_jax.create_model('MobileCLIP2-S0', **tiny)
  b16 = mobileclip_jax.create_model('MobileCLIP2-S0', dtype='bfloat16', **tiny)
  variables = jax.jit(functools.partial(clip_lib.init_variables, f32))(jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      clip_lib.abstract_variables(b16.config)))
  for a, b in zip(jax.jit(f32.apply)(variables, images, tokens),
                  jax.jit(b16.apply)(variables, images, tokens)):
    assert b.dtype == jnp.float32
    assert _rel(b, a) < 3e-2


def test_unknown_overrides_name_the_nearest_field():
  with pytest.raises(ValueError, match="Unknown model override 'atention'.*attention"):
    mobileclip_jax.create_model('MobileCLIP2-S0', atention='sigmoid')
  with pytest.raises(ValueError, match="Unknown text tower override 'layer'.*layers"):
    mobileclip_jax.create_model('MobileCLIP2-S0', text=dict(layer=2))
  with pytest.raises(ValueError, match='attention must be one of'):
    mobileclip_jax.create_model('MobileCLIP2-S0', attention='linear')


@pytest.mark.parametrize('kernel,stride,pad,multiplier', [
    (7, 1, 3, 1), (3, 2, 1, 1), (3, 2, 1, 2), (3, 2, 0, 1), (1, 1, 0, 1), ((1, 11), 1, (0, 5), 1),
    (7, 2, 3, 2), (2, 2, 1, 1), (5, 1, 0, 3), (3, 1, 2, 1)])
def test_cpu_depthwise_conv_and_its_gradients_equal_xlas_grouped_conv(kernel, stride, pad,
                                                                      multiplier):
  rng = np.random.default_rng(0)
  kh, kw = layers.pair(kernel)
  pad = layers.pair(pad)
  x = jnp.asarray(rng.normal(size=(2, 9, 12, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kh, kw, 1, 4 * multiplier)), jnp.float32)
  shifted = lambda x, k: layers._shift_depthwise_conv(x, k, stride, pad)
  native = lambda x, k: layers._xla_conv(x, k, stride, pad, x.shape[-1])
  np.testing.assert_allclose(shifted(x, k), native(x, k), rtol=1e-5, atol=1e-5)
  # A cotangent that differs at every output position, so that a misplaced tap shows.
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * jnp.cos(conv(x, k) * 0.3 + 1))
  got, want = jax.grad(loss(shifted), (0, 1))(x, k), jax.grad(loss(native), (0, 1))(x, k)
  for name, g, w in zip(('dx', 'dkernel'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize('kernel,stride,phases', [(7, 1, 1), (3, 2, 4)])
def test_cpu_depthwise_kernel_gradient_reduces_once_per_stride_phase(kernel, stride, phases):
  # One reduce per tap (49 for 7x7) became one YNNPACK fusion each in XLA:CPU's loop bodies,
  # rebuilt by a linear search at every load of a cached step (layers._taps_kernel_grad).
  x = jnp.ones((2, 16, 16, 8))
  dkernel = jax.grad(lambda k: layers._shift_depthwise_conv(x, k, stride, (1, 1)).sum())
  program = jax.jit(dkernel).lower(jnp.ones((kernel, kernel, 1, 8))).as_text()
  assert program.count('stablehlo.reduce') == phases + 1  # + the sum over the examples.


@pytest.mark.parametrize('kernel_size,stride', [(3, 1), (1, 2)])
def test_conv_with_gelu_input_is_a_1x1_conv_of_gelu_and_refuses_other_shapes(kernel_size, stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  fused = layers.Conv(features=5, kernel_size=1, gelu_input=True)
  variables = fused.init(jax.random.PRNGKey(1), x)
  want = layers.Conv(features=5, kernel_size=1).apply(variables, layers.gelu(x))
  np.testing.assert_allclose(fused.apply(variables, x), want, rtol=1e-6, atol=1e-6)
  conv = layers.Conv(features=5, kernel_size=kernel_size, stride=stride, gelu_input=True,
                     name='fc2')
  with pytest.raises(ValueError, match='fc2: gelu_input needs an unpadded 1x1 conv'):
    conv.init(jax.random.PRNGKey(1), x)


def _random_variables(variables, seed=0):
  """Every leaf random: variances in [0.5, 2], the rest normal (an init's BN would fold to ~1)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.5, a.shape), jnp.float32)
  return jax.tree.map_with_path(leaf, variables)


def test_train_time_mobileone_block_evaluates_its_branches_as_one_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 6))
  block = mobileone.MobileOneBlock(features=6, kernel_size=3, use_act=False)
  v = _random_variables(block.init(jax.random.PRNGKey(1), x))
  p, s = v['params'], v['batch_stats']
  bn = lambda y, p, s: (y - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']
  conv = lambda k, pad: jax.lax.conv_general_dilated(x, k, (1, 1), [(pad, pad)] * 2,
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  branch = lambda name, pad: bn(conv(p[name]['conv']['kernel'], pad), p[name]['bn'], s[name]['bn'])
  want = bn(x, p['identity'], s['identity']) + branch('conv_scale', 0) + branch('conv_kxk_0', 1)
  np.testing.assert_allclose(block.apply(v, x), want, rtol=1e-5, atol=1e-5)
  convs = lambda train: str(jax.make_jaxpr(
      lambda v: block.apply(v, x, train, mutable=['batch_stats']))(v)).count('conv_general_dilated')
  assert (convs(False), convs(True)) == (1, 2)  # Eval folds; training runs both conv branches.


def test_cpu_folded_kernel_is_computed_once_not_in_every_pixel():
  """XLA:CPU fused the fold's arithmetic (a dozen BN parameters per channel) into the taps loop,
  recomputing it for every output pixel; the taps now read x and two folded buffers."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 32))
  mixer = mobileone.RepMixer(kernel_size=3)
  v = _random_variables(mixer.init(jax.random.PRNGKey(1), x))
  hlo = jax.jit(lambda v, x: mixer.apply(v, x)).lower(v, x).compile().as_text()
  root = next(line for line in hlo[hlo.index('ENTRY'):].splitlines() if 'ROOT' in line)
  operands = root[root.index('fusion(') + len('fusion('):root.index(')')].split(', ')
  assert len(operands) == 3 and not any(o.startswith('%v') for o in operands), root


def test_cpu_depthwise_conv_chain_keeps_no_padded_copy_for_the_backward():
  """x = gelu(conv(x)), 6 layers: the backward needs each conv's input and output (2 per layer);
  XLA:CPU's temporaries, with the step's memory scheduler, hold 13.5 input-sized activations.
  A forward that padded the whole batch gave XLA a pad equal to the backward's, which it merged
  and kept from forward to backward: 15.1."""
  depth, x = 6, jnp.ones((4, 32, 32, 64))

  def loss(kernels, x):
    for k in kernels:
      x = layers.gelu(layers._shift_depthwise_conv(x, k, 1, (1, 1)))
    return x.sum()

  compiled = jax.jit(jax.grad(loss)).lower([jnp.full((3, 3, 1, 64), 0.1)] * depth, x).compile(
      compiler_options={'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'})
  temps = compiled.memory_analysis().temp_size_in_bytes / (x.size * 4)
  assert temps < 14.3, temps


def test_cpu_depthwise_conv_in_bfloat16_follows_the_float32_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(7, 7, 1, 8)) / 7, jnp.float32)
  conv = lambda x, k: layers._shift_depthwise_conv(x, k, 1, (3, 3))
  native = lambda x, k: layers._xla_conv(x, k, 1, (3, 3), 8)
  got = conv(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  want = native(x.astype(jnp.bfloat16).astype(jnp.float32), k.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k).astype(jnp.float32)))
  got = jax.grad(loss(conv), (0, 1))(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  want = jax.grad(loss(native), (0, 1))(x, k)
  for name, g, w in zip(('dx', 'dkernel'), got, want):
    assert g.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=5e-2, atol=5e-2 * float(jnp.abs(w).max()),
                               err_msg=name)


def test_for_platform_traces_only_that_platforms_form_and_only_while_it_runs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 6))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 6))
  conv = lambda x, k: layers.depthwise_conv(x, k, 2, (1, 1))
  jaxpr = lambda fn: str(jax.make_jaxpr(fn)(x, k))
  on_cpu, on_gpu = jaxpr(layers.for_platform(conv, 'cpu')), jaxpr(layers.for_platform(conv, 'gpu'))
  assert 'platform_index' not in on_cpu and 'feature_group_count' not in on_cpu
  assert 'optimization_barrier' in on_cpu  # The taps read x as a buffer.
  assert 'platform_index' not in on_gpu and 'optimization_barrier' not in on_gpu
  assert 'feature_group_count=6' in on_gpu
  assert 'platform_index' in jaxpr(conv)  # Outside: both forms, XLA picks (export relies on it).
  np.testing.assert_allclose(jax.jit(layers.for_platform(conv, 'cpu'))(x, k),
                             jax.jit(layers.for_platform(conv, 'gpu'))(x, k), rtol=1e-5, atol=1e-5)


def test_init_traces_the_plain_form_and_makes_model_inits_variables():
  # Init's forward only gives shapes: tracing the CPU taps (and their VJP) there was 2/3 of it.
  config = clip_lib.get_config('MobileCLIP2-S0', embed_dim=16, image_size=32, image=dict(
      depths=(1, 1), widths=(16, 32), token_mixers=('repmixer', 'repmixer'), pos_emb=(False, False),
      se_downsample=(False, False)), text=dict(layers=1, width=32, heads=2))
  model = clip_lib.model_from_config(config)
  init = lambda rng: clip_lib.init_variables(model, rng)
  jaxpr = str(jax.make_jaxpr(init)(jax.random.PRNGKey(0)))
  assert 'platform_index' not in jaxpr and 'scan' not in jaxpr and 'feature_group_count' in jaxpr
  variables = jax.jit(init)(jax.random.PRNGKey(3))
  expected = jax.jit(model.init)(jax.random.PRNGKey(3), *clip_lib.dummy_inputs(config))
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  abstract = clip_lib.abstract_variables(config)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), variables)
  abstract['params'].clear()  # Callers get their own containers; the cached tree is untouched.
  assert clip_lib.abstract_variables(config)['params']


@pytest.mark.parametrize('stride', [1, 2])
def test_cpu_pointwise_conv_and_its_gradients_equal_xlas_conv(stride):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 5, 3)), jnp.float32)
  matmul = lambda x, k: layers._pointwise_matmul(x, k, stride)
  native = lambda x, k: layers._xla_conv(x, k, stride, (0, 0), 1)
  np.testing.assert_allclose(matmul(x, k), native(x, k), rtol=1e-5, atol=1e-5)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
  for g, w in zip(jax.grad(loss(matmul), (0, 1))(x, k), jax.grad(loss(native), (0, 1))(x, k)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

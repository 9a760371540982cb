"""CoCa equals open_clip 3.3's CoCa: parameter counts, conversion both ways, embeddings, logits."""
import jax
import numpy as np
import pytest

import mobileclip_jax
from mobileclip_jax import convert
from mobileclip_jax.models import coca as coca_lib

TOL = 1e-5
# open_clip docs/model_profile.csv (millions): total, image tower, text tower.
PROFILE_M = {'coca_ViT-B-32': (253.56, None, None), 'coca_ViT-L-14': (638.45, 306.72, 123.65)}


@pytest.fixture(scope='module')
def ref():
  return pytest.importorskip('coca_reference', reason='needs torch and open_clip')


@pytest.mark.parametrize('name', sorted(PROFILE_M))
def test_param_counts_equal_open_clip_profile(name):
  counts = mobileclip_jax.count_params(name)
  total, image, text = PROFILE_M[name]
  assert round((sum(counts.values()) + 1) / 1e6, 2) == total  # + the logit scale.
  if image is not None:
    assert (round(counts['image'] / 1e6, 2), round(counts['text'] / 1e6, 2)) == (image, text)


@pytest.mark.parametrize('name', sorted(coca_lib.COCA_CONFIGS))
def test_param_counts_equal_open_clip_per_tower(ref, name):
  """open_clip built on the meta device (no memory) from its json, longer contexts as Apple's."""
  config = ref.open_clip.get_model_config(name.split('-context')[0])
  context = coca_lib.COCA_CONFIGS[name].text.context_length
  config['text_cfg']['context_length'] = config['multimodal_cfg']['context_length'] = context
  with ref.torch.device('meta'):
    model = ref.open_clip.CoCa(**{k: v for k, v in config.items() if k != 'custom_text'})
  count = lambda module: sum(p.numel() for p in module.parameters())
  expected = {'image': count(model.visual), 'text': count(model.text),
              'decoder': count(model.text_decoder)}
  assert mobileclip_jax.count_params(name) == expected
  assert count(model) == sum(expected.values()) + 1


class _Tiny:
  """A tiny random open_clip CoCa, its inputs and outputs, and the converted variables."""

  def __init__(self, ref, seed=0):
    self.torch = ref.torch
    self.model, gen = ref.tiny_coca(seed)
    self.images = ref.images(gen, 3, 32)
    self.tokens = ref.tiny_tokens(gen, 3)
    self.state_dict = ref.tr.state_dict_numpy(self.model)
    self.module = mobileclip_jax.create_model(ref.BASE, **ref.TINY)
    self.variables = convert.from_open_clip(self.state_dict, ref.BASE, **ref.TINY)
    self.images_nhwc = ref.tr.nhwc(self.images)
    self.outputs = self.reference(self.model)

  def reference(self, model):
    with self.torch.no_grad():
      x, t = self.torch.from_numpy(self.images), self.torch.from_numpy(self.tokens).long()
      return {'logits': model(x, t)['logits'].numpy(), 'image': model.encode_image(x).numpy(),
              'text': model.encode_text(t).numpy(),
              'image_raw': model.encode_image(x, normalize=False).numpy()}

  def ours(self, variables=None):
    v = self.variables if variables is None else variables
    apply = lambda *args, **kw: np.asarray(self.module.apply(v, *args, **kw))
    return {'logits': apply(self.images_nhwc, self.tokens, method='caption_logits'),
            'image': apply(self.images_nhwc, method='encode_image'),
            'text': apply(self.tokens, method='encode_text'),
            'image_raw': apply(self.images_nhwc, False, method='encode_image')}


@pytest.fixture(scope='module')
def tiny(ref):
  return _Tiny(ref)


def _errors(ours, reference):
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  return {k: rel(ours[k], reference[k]) for k in reference}


def test_tiny_coca_equals_open_clip(tiny):
  errors = _errors(tiny.ours(), tiny.outputs)
  assert max(errors.values()) <= TOL, errors
  # The tokens end at different places, so the padding masks take part.
  assert len({int((row == 0).sum()) for row in tiny.tokens}) == 3


def test_one_changed_weight_fails_the_check(ref, tiny):
  state = dict(tiny.state_dict)
  key = 'text_decoder.cross_attn.1.mlp.c_fc.weight'
  state[key] = state[key].copy()
  state[key][3, 5] *= 1.05
  errors = _errors(tiny.ours(convert.from_open_clip(state, ref.BASE, **ref.TINY)), tiny.outputs)
  assert errors['logits'] > TOL, errors
  assert errors['image'] <= TOL and errors['text'] <= TOL  # Only the decoder changed.


def test_legacy_cls_mask_is_reproduced(ref, tiny):
  """open_clip's corrected CLS mask gives other features: ours follow the legacy one."""
  tiny.model.text.correct_cls_mask = True
  try:
    corrected = tiny.reference(tiny.model)
  finally:
    tiny.model.text.correct_cls_mask = False
  errors = _errors(tiny.ours(), corrected)
  assert errors['text'] > 1e-3 and errors['logits'] > 1e-3, errors


def test_conversion_round_trips_and_loads_into_open_clip(ref, tiny):
  back = convert.to_open_clip(tiny.variables, ref.BASE, **ref.TINY)
  assert set(back) == set(tiny.state_dict)
  for k, v in tiny.state_dict.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  # JAX-made (random init) variables load strictly into open_clip and give our outputs there.
  variables = tiny.module.init(jax.random.key(3), tiny.images_nhwc, tiny.tokens)
  model = ref.open_clip.CoCa(**ref.TINY_OPEN_CLIP).eval()
  state = convert.to_open_clip(variables, ref.BASE, **ref.TINY)
  model.load_state_dict({k: ref.torch.from_numpy(v) for k, v in state.items()}, strict=True)
  errors = _errors(tiny.ours(variables), tiny.reference(model))
  assert max(errors.values()) <= TOL, errors


def _zero_state_dict(config):
  """A state_dict of `config`'s shapes as zero-stride views (no memory, even for L-14)."""
  return {e.torch_key: np.broadcast_to(np.zeros((), np.float32), e.torch_shape)
          for e in convert.conversion_table(config)}


def test_checkpoint_of_another_variant_names_the_mismatching_tensors():
  b32 = _zero_state_dict(mobileclip_jax.get_config('coca_ViT-B-32'))
  with pytest.raises(ValueError) as err:
    convert.from_open_clip(b32, 'coca_ViT-L-14')
  message = str(err.value)
  assert 'does not match coca_ViT-L-14' in message
  assert ('text.transformer.resblocks.0.attn.in_proj_weight: expected (2304, 768), got '
          '(1536, 512)') in message
  assert 'missing: visual.transformer.resblocks.12.' in message  # L-14 has 24 layers.
  # A longer-context captioner's checkpoint is told apart by its position embeddings.
  long = _zero_state_dict(mobileclip_jax.get_config('coca_ViT-L-14-context256'))
  with pytest.raises(ValueError, match=r'text.positional_embedding: expected \(77, 768\), '
                                       r'got \(256, 768\)'):
    convert.from_open_clip(long, 'coca_ViT-L-14')
  # A CLIP checkpoint is not a CoCa one (no pooler, text at the top level, no decoder).
  clip = _zero_state_dict(mobileclip_jax.get_config('ViT-L-14'))
  with pytest.raises(ValueError, match=r'(?s)missing: text.transformer.*visual.proj: expected '
                                       r'\(768, 768\), got \(1024, 768\).*unexpected: ln_final'):
    convert.from_open_clip(clip, 'coca_ViT-L-14')


def test_tokens_longer_than_the_context_are_refused(ref, tiny):
  too_long = np.zeros((1, 13), np.int32)
  for method in ('caption_logits', 'encode_text'):
    args = (tiny.images_nhwc[:1], too_long) if method == 'caption_logits' else (too_long,)
    with pytest.raises(ValueError, match='expects 12 tokens per text, got 13; tokenize with '
                                         'context_length=12'):
      tiny.module.apply(tiny.variables, *args, method=method)


def test_invalid_coca_configs_are_refused():
  with pytest.raises(ValueError, match='image.width must differ from embed_dim'):
    mobileclip_jax.get_config('coca_ViT-B-32', image=dict(width=512))
  with pytest.raises(ValueError, match=r'text.width \(256\), decoder.width \(512\)'):
    mobileclip_jax.get_config('coca_ViT-B-32', text=dict(width=256))
  with pytest.raises(ValueError, match='Did you mean coca_ViT-L-14'):
    mobileclip_jax.create_model('coca_ViT-L14')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['coca_ViT-B-32', 'coca_ViT-L-14'])
def test_full_size_coca_equals_open_clip(ref, name):
  """Full size, random weights (peak RSS measured: B-32 2.7 GB, L-14 5.7 GB)."""
  torch = ref.torch
  torch.manual_seed(0)
  model = ref.open_clip.create_model(name, pretrained=None).eval()
  gen = torch.Generator().manual_seed(1)
  ref.randomize_(model, gen, logit_scale=1.0)
  state = ref.tr.state_dict_numpy(model)
  images = torch.randn(2, 3, 224, 224, generator=gen)
  tokens = ref.open_clip.get_tokenizer(name)(['a photo of a cat', 'two dogs in the snow'])
  with torch.no_grad():
    reference = {'logits': model(images, tokens)['logits'].numpy(),
                 'image': model.encode_image(images).numpy(),
                 'text': model.encode_text(tokens).numpy()}
  del model
  module = mobileclip_jax.create_model(name)
  variables = convert.from_open_clip(state, name)
  del state
  x, t = ref.tr.nhwc(images.numpy()), tokens.numpy().astype(np.int32)
  ours = {'logits': module.apply(variables, x, t, method='caption_logits'),
          'image': module.apply(variables, x, method='encode_image'),
          'text': module.apply(variables, t, method='encode_text')}
  errors = _errors({k: np.asarray(v) for k, v in ours.items()}, reference)
  assert max(errors.values()) <= TOL, errors

"""The two-tower CLIP model and the named configs of every released MobileCLIP variant.

`create_model(name, **overrides)` returns the Flax module. Variables are
`{'params': ..., 'batch_stats': ...}`; images are [B, H, W, 3] float32, already normalized with
the variant's mean/std; tokens are [B, 77] int32. Embeddings come back unnormalized, float32.
"""
import dataclasses
import functools
import math
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mci
from mobileclip_jax.models import text as text_lib
from mobileclip_jax.models import vit

ImageConfig = Union[mci.MCiConfig, vit.ViTConfig]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a CLIP variant: towers, embedding width and preprocessing."""
  name: str
  image: ImageConfig
  text: text_lib.TextConfig
  embed_dim: int
  image_size: int
  mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
  interpolation: str = 'bilinear'     # Inference resize (shortest side, then centre crop).
  tokenizer: str = 'clip'
  # State-dict layout of the PyTorch reference: 'timm' towers live under `visual.trunk.`,
  # 'open_clip' ViTs under `visual.`; text under `text.` (custom_text) or at the top level.
  image_layout: str = 'timm'
  text_layout: str = 'open_clip_custom'
  attention: str = 'softmax'          # 'softmax' or 'sigmoid', every attention layer.
  qk_norm: bool = False
  reparameterized: bool = False       # Inference form of the RepMixer/MobileOne towers.
  bn_group_size: int = 0              # Examples per BatchNorm statistics group; 0 = global batch.
  dtype: str = 'float32'              # Compute dtype; parameters stay float32.
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: Optional[float] = None  # Set for the sigmoid (SigLIP) loss.

  def __post_init__(self):
    if self.attention not in attn_lib.ATTENTION_KINDS:
      raise ValueError(f'attention must be one of {attn_lib.ATTENTION_KINDS}, got {self.attention!r}.')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.')
    if self.reparameterized and not isinstance(self.image, mci.MCiConfig) and self.text.variant != 'mct':
      raise ValueError(f'{self.name} has no reparameterizable tower (reparameterized=True needs an '
                       'MCi image tower or the MCt text tower).')

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def options(self) -> layers.Options:
    """The options every block of both towers shares."""
    return layers.Options(attention=self.attention, qk_norm=self.qk_norm,
                          reparameterized=self.reparameterized, bn_group_size=self.bn_group_size,
                          dtype=self.compute_dtype)


class CLIP(nn.Module):
  """Image tower `visual`, text tower `text` and the learned `logit_scale` (log of the scale)."""
  config: ModelConfig

  def setup(self):
    c = self.config
    if isinstance(c.image, mci.MCiConfig):
      self.visual = mci.MCi(config=c.image, embed_dim=c.embed_dim, opts=c.options)
    else:
      self.visual = vit.ViT(config=c.image, embed_dim=c.embed_dim, image_size=c.image_size,
                            opts=c.options)
    self.text = text_lib.TextTransformer(config=c.text, embed_dim=c.embed_dim, opts=c.options)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(c.init_logit_scale), (),
                                  jnp.float32)
    if c.init_logit_bias is not None:
      self.logit_bias = self.param('logit_bias', nn.initializers.constant(c.init_logit_bias), (),
                                   jnp.float32)

  def encode_image(self, images: jax.Array, train: bool = False, **reduce) -> jax.Array:
    """images [B, H, W, 3] normalized -> unnormalized embeddings [B, embed_dim] float32.

    `reduce`: the tower's reduced-inference arguments (reduction, ranker, extra_hook).
    """
    return self.visual(images, train, **reduce).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array, train: bool = False, **reduce) -> jax.Array:
    """tokens [B, L] int32 -> unnormalized embeddings [B, embed_dim] float32 (`reduce` as above)."""
    return self.text(tokens, train, **reduce).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array,
               train: bool = False) -> Tuple[jax.Array, jax.Array]:
    return self.encode_image(images, train), self.encode_text(tokens, train)


def _text(width: int, heads: int, causal: bool = False, **kw) -> text_lib.TextConfig:
  return text_lib.TextConfig(width=width, heads=heads, causal=causal, **kw)


_VIT_B_MCI = vit.ViTConfig(width=768, depth=12, heads=12, stem='mci_conv', embed_class=False)
_VIT_L_14 = vit.ViTConfig(width=1024, depth=24, heads=16, patch_size=14, patch_bias=False,
                          norm_pre=True, norm_eps=1e-5)
_MC = dict(image_size=256)
_MC2_OPENAI = dict(image_size=256, mean=OPENAI_MEAN, std=OPENAI_STD)


def _openai_vit(width, depth, heads, patch, act):
  return vit.ViTConfig(width=width, depth=depth, heads=heads, patch_size=patch, patch_bias=False,
                       norm_pre=True, head_bias=False, act=act, norm_eps=1e-5)


def _teacher(name, width, depth, heads, patch, text_width, text_heads, text_layers, embed, act):
  return ModelConfig(
      name, _openai_vit(width, depth, heads, patch, act),
      _text(text_width, text_heads, causal=True, layers=text_layers, act=act), embed,
      image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation='bicubic',
      image_layout='open_clip', text_layout='open_clip')


def _registry() -> Dict[str, ModelConfig]:
  m = mci.MCI_CONFIGS
  base512, base768 = _text(512, 8), _text(768, 12)
  configs = [
      # MobileCLIP (v1, DataCompDR-1B).
      ModelConfig('MobileCLIP-S0', m['mci0'], _text(512, 8, variant='mct', layers=4), 512,
                  text_layout='apple_mct', **_MC),
      ModelConfig('MobileCLIP-S1', m['mci1'], base512, 512, **_MC),
      ModelConfig('MobileCLIP-S2', m['mci2'], base512, 512, **_MC),
      ModelConfig('MobileCLIP-B', _VIT_B_MCI, _text(512, 8, causal=True), 512, image_size=224),
      # MobileCLIP2 (DFNDR-2B). S0's text tower is the base transformer per its released config.
      ModelConfig('MobileCLIP2-S0', m['mci0'], base512, 512, **_MC),
      ModelConfig('MobileCLIP2-S2', m['mci2'], base512, 512, **_MC),
      ModelConfig('MobileCLIP2-S3', m['mci3'], base768, 768, **_MC2_OPENAI),
      ModelConfig('MobileCLIP2-S4', m['mci4'], base768, 768, **_MC2_OPENAI),
      ModelConfig('MobileCLIP2-B', _VIT_B_MCI, _text(512, 8, causal=True), 512, image_size=224),
      ModelConfig('MobileCLIP2-L-14', dataclasses.replace(_VIT_L_14, drop_path=0.1), base768, 768,
                  image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation='bicubic'),
  ]
  # CLIP teachers in open_clip's own layout (QuickGELU variants for OpenAI / DFN weights).
  for act, suffix in (('gelu', ''), ('quick_gelu', '-quickgelu')):
    configs += [
        _teacher(f'ViT-B-16{suffix}', 768, 12, 12, 16, 512, 8, 12, 512, act),
        _teacher(f'ViT-L-14{suffix}', 1024, 24, 16, 14, 768, 12, 12, 768, act),
        _teacher(f'ViT-H-14{suffix}', 1280, 32, 16, 14, 1024, 16, 24, 1024, act),
    ]
  return {c.name: c for c in configs}


MODEL_CONFIGS = _registry()


def config_to_dict(config) -> Dict[str, Any]:
  """A JSON-serializable dict of a ModelConfig or CoCaConfig (the image tower's kind under
  `image_kind`; 'coca' under `kind` for captioners)."""
  from mobileclip_jax.models import coca  # pylint: disable=g-import-not-at-top
  out = dataclasses.asdict(config)
  out['image_kind'] = 'mci' if isinstance(config.image, mci.MCiConfig) else 'vit'
  if isinstance(config, coca.CoCaConfig):
    out['kind'] = 'coca'
  return out


def config_from_dict(d: Dict[str, Any]):
  """Inverse of `config_to_dict`."""
  from mobileclip_jax.models import coca  # pylint: disable=g-import-not-at-top
  d = dict(d)
  image_cls = {'mci': mci.MCiConfig, 'vit': vit.ViTConfig}[d.pop('image_kind')]
  tuples = lambda x: {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}
  d['image'] = image_cls(**tuples(d['image']))
  d['text'] = text_lib.TextConfig(**tuples(d['text']))
  if d.pop('kind', 'clip') == 'coca':
    d['decoder'] = coca.DecoderConfig(**d['decoder'])
    return coca.CoCaConfig(**tuples(d))
  return ModelConfig(**tuples(d))


def _replace(obj, overrides: Dict[str, Any], what: str):
  fields = {f.name for f in dataclasses.fields(obj)}
  for key in overrides:
    if key not in fields:
      raise ValueError(f'Unknown {what} override {key!r}.{utils.did_you_mean(key, fields)}')
  return dataclasses.replace(obj, **overrides)


def _named_configs() -> Dict[str, Any]:
  """Every named config: the CLIP variants here and the CoCa captioners of coca.py."""
  from mobileclip_jax.models import coca  # pylint: disable=g-import-not-at-top  (coca imports this module)
  return {**MODEL_CONFIGS, **coca.COCA_CONFIGS}


def get_config(name: str, **overrides):
  """The named ModelConfig (or CoCaConfig for 'coca_*') with overrides applied.

  Top-level fields are overridden directly (`attention='sigmoid'`, `embed_dim=64`,
  `dtype='bfloat16'`, `reparameterized=True`, ...); tower fields through a dict
  (`image=dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128))`, `text=dict(layers=2)`, and
  `decoder=dict(...)` for CoCa).
  """
  configs = _named_configs()
  if name not in configs:
    raise ValueError(f'Unknown model {name!r}.{utils.did_you_mean(name, configs)}')
  config = configs[name]
  nested = {k: overrides.pop(k) for k in ('image', 'text', 'decoder')
            if isinstance(overrides.get(k), dict) and hasattr(config, k)}
  for key, value in nested.items():
    overrides[key] = _replace(getattr(config, key), dict(value), f'{key} tower')
  return _replace(config, overrides, 'model')


def model_from_config(config) -> nn.Module:
  """The Flax module of a ModelConfig (CLIP) or CoCaConfig (CoCa)."""
  from mobileclip_jax.models import coca  # pylint: disable=g-import-not-at-top
  return coca.CoCa(config) if isinstance(config, coca.CoCaConfig) else CLIP(config)


def create_model(name: str, **overrides) -> nn.Module:
  """The Flax module for a named variant: CLIP, or CoCa for 'coca_*' (overrides: `get_config`)."""
  return model_from_config(get_config(name, **overrides))


def dummy_inputs(config, batch: int = 1) -> Tuple[jax.Array, jax.Array]:
  """Zero images [B, S, S, 3] and tokens [B, context_length] for init / shape inference."""
  return (jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32),
          jnp.zeros((batch, config.text.context_length), jnp.int32))


def init_variables(model: nn.Module, rng: jax.Array) -> Dict[str, Any]:
  """`model.init` on `dummy_inputs`: the one way a model's variables are made.

  The variables do not depend on how the towers compute, and init's forward only gives shapes
  (XLA drops it), so it is traced in the plainest form: one grouped convolution rather than the
  CPU's unrolled taps with their custom VJP (`layers.for_platform`). Tracing S4's init: 5.3 ->
  1.7 s; S0's: 2.7 -> 0.9 s.
  """
  return layers.for_platform(model.init, layers.PLAIN)(rng, *dummy_inputs(model.config))


@functools.lru_cache(maxsize=64)
def _abstract_variables(config) -> Dict[str, Any]:
  return jax.eval_shape(functools.partial(init_variables, model_from_config(config)),
                        jax.random.PRNGKey(0))


def abstract_variables(config) -> Dict[str, Any]:
  """Shapes and dtypes of a ModelConfig's (or CoCaConfig's) variables, as ShapeDtypeStructs.

  `jax.eval_shape` of `init_variables`: no memory, no compute. Cached per config (converters,
  evaluators, exporters and inheritance all ask for the same model's tree); each call returns
  fresh containers.
  """
  return jax.tree.map(lambda leaf: leaf, _abstract_variables(config))


def count_params(name: str, **overrides) -> Dict[str, int]:
  """Parameter counts {'image', 'text'} (+ 'decoder' for CoCa) via jax.eval_shape (no memory).

  image = the whole image tower with its projection (and CoCa's attentional pooler); text = the
  text tower with the token embedding and projection; the logit scale is in none. BatchNorm
  statistics are buffers, not parameters, as in PyTorch.
  """
  shapes = abstract_variables(get_config(name, **overrides))['params']
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  towers = {'image': 'visual', 'text': 'text', 'decoder': 'text_decoder'}
  return {k: count(shapes[v]) for k, v in towers.items() if v in shapes}

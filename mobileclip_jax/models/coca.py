"""CoCa (contrastive captioner) in open_clip's layout, and the named CoCa configs.

open_clip's CoCa, reproduced exactly (its released weights convert one to one):
  - image tower: the open_clip ViT whose tokens go through an attentional pooler (256 queries)
    and `ln_post`; pooled query 0, projected, is the contrastive image embedding, queries
    1..255 are the decoder's memory (open_clip's "original CoCa setup", not the paper's);
  - text tower: the causal CLIP text transformer with a CLS token appended at the end (pooled
    for the contrastive embedding) and open_clip's legacy padding mask (see text.py);
  - multimodal decoder: per layer a causal self-attention block, then a cross-attention block
    over the memory (each with its own MLP); `ln_final`; an untied output projection to the
    vocabulary. It takes the text tower's token outputs (no embedding of its own).

Images are [B, H, W, 3] normalized with the config's mean/std; tokens [B, L] int32 with
L <= text.context_length (76 for the released configs: 77 positions with the CLS token).
`decode` runs the text tower and decoder with KV caches (attention.py) for `decoding.generate`.
"""
import dataclasses
import math
from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import text as text_lib
from mobileclip_jax.models import vit


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """open_clip's MultimodalTransformer (its MultimodalCfg)."""
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  context_length: int = 76     # Longest token sequence it decodes (open_clip's causal mask size).
  act: str = 'gelu'
  norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CoCaConfig:
  """Everything that defines a CoCa variant: towers, decoder, embedding width, preprocessing."""
  name: str
  image: vit.ViTConfig
  text: text_lib.TextConfig
  decoder: DecoderConfig
  embed_dim: int
  image_size: int = 224
  mean: Tuple[float, float, float] = clip_lib.OPENAI_MEAN
  std: Tuple[float, float, float] = clip_lib.OPENAI_STD
  interpolation: str = 'bicubic'
  tokenizer: str = 'clip'
  dtype: str = 'float32'              # Compute dtype; parameters stay float32.
  init_logit_scale: float = math.log(1 / 0.07)

  def __post_init__(self):
    if self.dtype not in clip_lib.DTYPES:
      raise ValueError(f'dtype must be one of {sorted(clip_lib.DTYPES)}, got {self.dtype!r}.')
    if self.image.attn_pool_queries < 2:
      raise ValueError(f'{self.name}: CoCa needs attentional pooling with >= 2 queries (one '
                       f'embedding + memory), got image.attn_pool_queries={self.image.attn_pool_queries}.')
    if not (self.text.embed_cls and self.text.causal):
      raise ValueError(f'{self.name}: the CoCa text tower is causal with a CLS token '
                       '(text.causal=True, text.embed_cls=True).')
    if not self.text.width == self.decoder.width == self.embed_dim:
      raise ValueError(f'{self.name}: text.width ({self.text.width}), decoder.width '
                       f'({self.decoder.width}) and embed_dim ({self.embed_dim}) must be equal: the '
                       'decoder reads the text tokens and attends to the pooled image tokens.')
    if self.image.width == self.embed_dim:
      raise ValueError(f'{self.name}: image.width must differ from embed_dim ({self.embed_dim}); '
                       "with equal widths open_clip packs the pooler's projections into another "
                       'state_dict layout, which is not supported.')

  @property
  def compute_dtype(self):
    return clip_lib.DTYPES[self.dtype]

  @property
  def options(self) -> layers.Options:
    """The options every block shares (softmax attention, no QK-norm: open_clip's CoCa)."""
    return layers.Options(dtype=self.compute_dtype)


class MultimodalDecoder(nn.Module):
  """Text token outputs [B, n, C] attending to memory [B_m, M, C] -> logits [B, n, vocab] float32.

  B is a multiple of B_m (the beams of one image share its memory). With `decode`, see
  attention.MultiHeadAttention: self-attention keys/values in 'cache', the memory's in
  'cross_cache' (pass the memory on the first call only).
  """
  config: DecoderConfig
  vocab_size: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, memory: Optional[jax.Array] = None,
               decode: bool = False) -> jax.Array:
    cfg = self.config
    if not decode and x.shape[1] > cfg.context_length:
      raise ValueError(f'The decoder takes at most {cfg.context_length} tokens, got {x.shape[1]}.')
    width = cfg.width
    # The text tower's init (open_clip defines the same for the decoder but never calls it).
    proj_std = width ** -0.5 * (2 * cfg.layers) ** -0.5
    block = dict(num_heads=cfg.heads, mlp_dim=int(width * cfg.mlp_ratio), act=cfg.act,
                 norm_eps=cfg.norm_eps, qkv_init=nn.initializers.normal(width ** -0.5),
                 proj_init=nn.initializers.normal(proj_std),
                 fc1_init=nn.initializers.normal((2 * width) ** -0.5),
                 fc2_init=nn.initializers.normal(proj_std), opts=self.opts)
    for i in range(cfg.layers):
      x = attn_lib.TransformerBlock(is_causal=True, name=f'blocks_{i}', **block)(x, decode=decode)
      x = attn_lib.TransformerBlock(cross_attention=True, name=f'cross_{i}', **block)(
          x, memory=memory, decode=decode)
    x = layers.LayerNorm(epsilon=cfg.norm_eps, dtype=self.opts.dtype, name='ln_final')(x)
    proj = self.param('text_projection', nn.initializers.normal(width ** -0.5),
                      (width, self.vocab_size), jnp.float32)
    return (x @ proj.astype(x.dtype)).astype(jnp.float32)


def _normalize(x: jax.Array) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CoCa(nn.Module):
  """`visual`, `text`, `text_decoder` and `logit_scale`, as open_clip's CoCa."""
  config: CoCaConfig

  def setup(self):
    c = self.config
    self.visual = vit.ViT(config=c.image, embed_dim=c.embed_dim, image_size=c.image_size,
                          opts=c.options)
    self.text = text_lib.TextTransformer(config=c.text, embed_dim=c.embed_dim, opts=c.options)
    self.text_decoder = MultimodalDecoder(config=c.decoder, vocab_size=c.text.vocab_size,
                                          opts=c.options)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(c.init_logit_scale), (),
                                  jnp.float32)

  def image_tokens(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] -> (unnormalized embeddings [B, E] float32, memory [B, Q - 1, E])."""
    latent, memory = self.visual(images, train, return_tokens=True)
    return latent.astype(jnp.float32), memory

  def encode_image(self, images: jax.Array, normalize: bool = True,
                   train: bool = False) -> jax.Array:
    """open_clip's CoCa.encode_image: [B, E] float32, L2-normalized unless normalize=False."""
    latent = self.image_tokens(images, train)[0]
    return _normalize(latent) if normalize else latent

  def encode_text(self, tokens: jax.Array, normalize: bool = True,
                  train: bool = False) -> jax.Array:
    """open_clip's CoCa.encode_text: tokens [B, L] -> [B, E] float32, L2-normalized by default."""
    latent = self.text(tokens, train).astype(jnp.float32)
    return _normalize(latent) if normalize else latent

  def caption_logits(self, images: jax.Array, tokens: jax.Array,
                     train: bool = False) -> jax.Array:
    """Teacher-forced next-token logits [B, L - 1, vocab] (targets tokens[:, 1:]).

    open_clip's `model(images, tokens)['logits']`.
    """
    return self(images, tokens, train)['logits']

  def __call__(self, images: jax.Array, tokens: jax.Array,
               train: bool = False) -> Dict[str, jax.Array]:
    """open_clip's CoCa.forward: normalized image/text features, caption logits, labels, scale."""
    latent, memory = self.image_tokens(images, train)
    text_latent, token_outputs = self.text(tokens, train, return_tokens=True)
    return {'image_features': _normalize(latent),
            'text_features': _normalize(text_latent.astype(jnp.float32)),
            'logits': self.text_decoder(token_outputs[:, :-1], memory),
            'labels': tokens[:, 1:],
            'logit_scale': jnp.exp(self.logit_scale)}

  def decode(self, tokens: jax.Array, memory: Optional[jax.Array] = None,
             decode: bool = False) -> jax.Array:
    """Next-token logits [B', n, vocab] after each of tokens [B', n] (B' = B_memory x beams).

    Without `decode` the tokens are whole prefixes (open_clip's generate without a cache); with
    it they continue the cached sequences (memory: [B_memory, Q - 1, E] on the first call only).
    """
    if decode:
      token_outputs = self.text(tokens, decode=True)
    else:
      token_outputs = self.text(tokens, return_tokens=True)[1]
    return self.text_decoder(token_outputs, memory, decode=decode)


def _vit(width: int, depth: int, heads: int, patch: int) -> vit.ViTConfig:
  """open_clip's VisionTransformer with CoCa's attentional pooler (256 queries, 8 heads)."""
  return vit.ViTConfig(width=width, depth=depth, heads=heads, patch_size=patch, patch_bias=False,
                       norm_pre=True, head_bias=False, norm_eps=1e-5, attn_pool_queries=256,
                       attn_pool_heads=8)


def _text(width: int, heads: int, context: int) -> text_lib.TextConfig:
  return text_lib.TextConfig(width=width, heads=heads, layers=12, context_length=context,
                             causal=True, embed_cls=True)


def _registry() -> Dict[str, CoCaConfig]:
  l14 = lambda name, context: CoCaConfig(
      name, _vit(1024, 24, 16, 14), _text(768, 12, context),
      DecoderConfig(768, 12, 12, context_length=context), 768)
  configs = [
      CoCaConfig('coca_ViT-B-32', _vit(768, 12, 12, 32), _text(512, 8, 76),
                 DecoderConfig(512, 8, 12), 512),
      l14('coca_ViT-L-14', 76),
      # MobileCLIP2's captioners with longer contexts (apple/mobileclip2_coca_*_context128/256):
      # named by their position count like the 77-position original, so 127 / 255 tokens.
      l14('coca_ViT-L-14-context128', 127),
      l14('coca_ViT-L-14-context256', 255),
  ]
  return {c.name: c for c in configs}


COCA_CONFIGS = _registry()


"""Vision transformers: MobileCLIP-B's conv-stem ViT-B/16, ViT-L/14 and the CLIP teacher ViTs.

Names follow timm's VisionTransformer (`patch_embed`, `cls_token`, `pos_embed`, `norm_pre`,
`blocks_{i}`, `norm`, `head`); open_clip's own VisionTransformer (the teachers' layout: `conv1`,
`class_embedding`, `ln_pre`, `transformer.resblocks`, `ln_post`, `proj`) maps onto the same
modules through the conversion tables.
"""
import dataclasses
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import reduce as reduce_lib


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT image tower."""
  width: int
  depth: int
  heads: int
  patch_size: int = 16
  mlp_ratio: float = 4.0
  stem: str = 'patch'           # 'patch' (one strided conv) or 'mci_conv' (MobileCLIP-B's conv stem).
  stem_padding: int = 0         # Padding of the conv stem's first conv: 0 in timm, 1 in Apple's v1 B.
  patch_bias: bool = True       # Bias of the patchify conv (CLIP models have none).
  embed_class: bool = True      # Position embedding also covers the class token (timm no_embed_class=False).
  norm_pre: bool = False        # LayerNorm before the first block (CLIP's ln_pre).
  head_bias: bool = True        # open_clip's `proj` has none; timm's classifier head has one.
  act: str = 'gelu'
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  # open_clip's attentional pooling (CoCa): this many learned queries (0 = off) attend to the
  # tokens; `norm` then acts on the pooled tokens and query 0, projected, is the embedding.
  attn_pool_queries: int = 0
  attn_pool_heads: int = 8

  def __post_init__(self):
    if self.stem not in ('patch', 'mci_conv'):
      raise ValueError(f"ViTConfig.stem must be 'patch' or 'mci_conv', got {self.stem!r}.")
    if self.stem == 'mci_conv' and self.patch_size != 16:
      raise ValueError('The MobileCLIP conv stem has a fixed stride of 16 (patch_size=16).')


class ConvStem(nn.Module):
  """MobileCLIP-B stem: conv4x4/s4+BN+GELU, conv2x2/s2+BN+GELU, conv2x2/s2 (bias): stride 16."""
  width: int
  first_padding: int = 0
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mid = self.width // 4
    for i, (k, c) in enumerate(((4, mid), (2, mid))):
      pad = (self.first_padding,) * 2 if i == 0 else (0, 0)
      x = layers.ConvBN(features=c, kernel_size=k, stride=k, padding=pad, opts=self.opts,
                        name=f'backbone_{i}')(x, train)
      x = layers.gelu(x)
    return layers.Conv(features=self.width, kernel_size=2, stride=2, padding=(0, 0),
                       dtype=self.opts.dtype, name='backbone_2')(x)


class ViT(nn.Module):
  """ViT image encoder: images [B, H, W, 3] (normalized) -> class-token embeddings [B, embed_dim].

  With `return_tokens` also the other normalized tokens: [B, N - 1, width] (patches), or with
  attentional pooling the Q - 1 pooled tokens [B, Q - 1, embed_dim] (CoCa's decoder memory).
  The position embedding is learned for `image_size`; other resolutions are interpolated
  bicubically, as timm's dynamic_img_size does.
  """
  config: ViTConfig
  embed_dim: int
  image_size: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, return_tokens: bool = False,
               reduction: Optional[reduce_lib.TokenReduction] = None,
               ranker: Optional[Callable] = None, extra_hook: Optional[Callable] = None):
    cfg, dtype = self.config, self.opts.dtype
    b = images.shape[0]
    if reduction is not None and (cfg.attn_pool_queries or return_tokens):
      raise ValueError('Token reduction covers the class-token embedding, not an attentional '
                       'pooler (CoCa) or the token outputs.')
    if cfg.stem == 'mci_conv':
      x = ConvStem(width=cfg.width, first_padding=cfg.stem_padding, opts=self.opts,
                   name='patch_embed')(images, train)
    else:
      x = layers.Conv(features=cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                      padding=(0, 0), use_bias=cfg.patch_bias, dtype=dtype,
                      name='patch_embed')(images)
    grid_h, grid_w = x.shape[1:3]
    x = x.reshape(b, grid_h * grid_w, cfg.width)

    grid = self.image_size // cfg.patch_size
    num_pos = grid * grid + (1 if cfg.embed_class else 0)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, num_pos, cfg.width),
                     jnp.float32)
    pos = _resize_pos_embed(pos, grid, (grid_h, grid_w), cfg.embed_class).astype(x.dtype)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, cfg.width), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.width))
    if cfg.embed_class:
      x = jnp.concatenate([cls, x], axis=1) + pos
    else:
      x = jnp.concatenate([cls, x + pos], axis=1)
    norm = lambda name: layers.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name=name)
    if cfg.norm_pre:
      x = norm('norm_pre')(x)

    blocks = [attn_lib.TransformerBlock(
        num_heads=cfg.heads, mlp_dim=int(cfg.width * cfg.mlp_ratio), act=cfg.act,
        norm_eps=cfg.norm_eps, drop_path=cfg.drop_path * i / max(cfg.depth - 1, 1),
        opts=self.opts, name=f'blocks_{i}') for i in range(cfg.depth)]
    reduced = None
    if reduction is None:
      for blk in blocks:
        x = blk(x, train=train)
    else:
      if reduction.cut_padding:
        raise ValueError('cut_padding is a text-tower option; image towers have no padding.')
      plan = reduce_lib.Plan(reduction, cfg.depth, attention=self.opts.attention, protected=1,
                             ranker=ranker, extra=extra_hook, what='The ViT')
      reduced = reduce_lib.sequence_tokens(b, x.shape[1])
      x, reduced = reduce_lib.run_blocks(blocks, x, reduced, plan, train)
    if cfg.attn_pool_queries:
      x = attn_lib.AttentionalPooler(width=self.embed_dim, num_heads=cfg.attn_pool_heads,
                                     num_queries=cfg.attn_pool_queries, norm_eps=cfg.norm_eps,
                                     dtype=dtype, name='attn_pool')(x)
    x = norm('norm')(x)
    pooled = nn.Dense(self.embed_dim, use_bias=cfg.head_bias, kernel_init=layers.trunc_normal_02,
                      dtype=dtype, name='head')(reduce_lib.pool(x, reduced, 0))
    return (pooled, x[:, 1:]) if return_tokens else pooled


def _resize_pos_embed(pos: jax.Array, grid: int, new_grid, embed_class: bool) -> jax.Array:
  """Bicubic resize of the patch part of a [1, N, C] position embedding to `new_grid`."""
  if tuple(new_grid) == (grid, grid):
    return pos
  prefix, patches = (pos[:, :1], pos[:, 1:]) if embed_class else (pos[:, :0], pos)
  c = pos.shape[-1]
  patches = jax.image.resize(patches.reshape(1, grid, grid, c), (1, *new_grid, c), 'bicubic')
  return jnp.concatenate([prefix, patches.reshape(1, math.prod(new_grid), c)], axis=1)

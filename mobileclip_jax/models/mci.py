"""MCi0..MCi4: the FastViT-family image encoders of MobileCLIP / MobileCLIP2 (NHWC).

Structure and names follow timm's `fastvit_mci*` (timm/models/fastvit.py): `stem_{0,1,2}`,
`stages_{i}/{downsample,pos_emb,blocks_{j}}`, `final_conv`, `head/fc`. The projection to the
CLIP embedding is `head/fc` (Linear with bias), as in open_clip's timm towers.
"""
import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MCiConfig:
  """Architecture of one MCi variant (per-stage tuples have one entry per stage)."""
  depths: Tuple[int, ...]
  widths: Tuple[int, ...]
  mlp_ratio: float
  token_mixers: Tuple[str, ...]    # 'repmixer' or 'attention' per stage.
  pos_emb: Tuple[bool, ...]        # RepCPE (7x7 conditional positional encoding) before the stage.
  se_downsample: Tuple[bool, ...]  # Squeeze-excite in the stage's downsampling conv.
  attn_norm: str = 'batchnorm'     # Pre-norm of attention blocks: 'batchnorm' or 'layernorm'.
  stem_scale_branch: bool = True
  head_dim: int = 32
  final_ratio: float = 2.0
  layer_scale_init: float = 1e-5

  def __post_init__(self):
    n = len(self.depths)
    for field in ('widths', 'token_mixers', 'pos_emb', 'se_downsample'):
      if len(getattr(self, field)) != n:
        raise ValueError(f'MCiConfig.{field} needs {n} entries (one per stage), got '
                         f'{getattr(self, field)}.')
    if self.attn_norm not in ('batchnorm', 'layernorm'):
      raise ValueError(f"MCiConfig.attn_norm must be 'batchnorm' or 'layernorm', got {self.attn_norm!r}.")


_MCI012 = dict(mlp_ratio=3.0, token_mixers=('repmixer',) * 3 + ('attention',),
               pos_emb=(False, False, False, True), se_downsample=(False, False, True, True))
_MCI34 = dict(mlp_ratio=4.0, token_mixers=('repmixer',) * 3 + ('attention',) * 2,
              pos_emb=(False, False, False, True, True), se_downsample=(False,) * 5,
              attn_norm='layernorm', stem_scale_branch=False)
MCI_CONFIGS = {
    'mci0': MCiConfig(depths=(2, 6, 10, 2), widths=(64, 128, 256, 512), **_MCI012),
    'mci1': MCiConfig(depths=(4, 12, 20, 4), widths=(64, 128, 256, 512), **_MCI012),
    'mci2': MCiConfig(depths=(4, 12, 24, 4), widths=(80, 160, 320, 640), **_MCI012),
    'mci3': MCiConfig(depths=(2, 12, 24, 4, 2), widths=(96, 192, 384, 768, 1536), **_MCI34),
    'mci4': MCiConfig(depths=(2, 12, 24, 4, 4), widths=(128, 256, 512, 1024, 2048), **_MCI34),
}


class ReparamLargeKernelConv(nn.Module):
  """RepLKNet-style downsampling conv: (7x7 conv+BN) + (3x3 conv+BN), then SE and GELU.

  Inference form: one 7x7 `reparam_conv` (the 3x3 branch zero-padded into it).
  """
  features: int
  kernel_size: int = 7
  small_kernel: int = 3
  stride: int = 2
  use_se: bool = False
  reparameterized: bool = False
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    groups = x.shape[-1]
    if self.reparameterized:
      out = layers.Conv(self.features, self.kernel_size, self.stride, groups, dtype=self.dtype,
                        name='reparam_conv')(x)
    else:
      conv = lambda k, name: layers.ConvBN(self.features, k, self.stride, groups,
                                           bn_group_size=self.bn_group_size, dtype=self.dtype,
                                           name=name)(x, train)
      out = conv(self.kernel_size, 'large_conv') + conv(self.small_kernel, 'small_conv')
    if self.use_se:
      out = layers.SqueezeExcite(rd_ratio=0.25, dtype=self.dtype, name='se')(out)
    return layers.gelu(out)


class RepCPE(nn.Module):
  """Conditional positional encoding x + dwconv7x7(x); inference form folds the identity in."""
  kernel_size: int = 7
  reparameterized: bool = False
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    pad = (self.kernel_size // 2,) * 2
    if self.reparameterized:
      return layers.Conv(c, self.kernel_size, groups=c, padding=pad, dtype=self.dtype,
                         name='reparam_conv')(x)
    return x + layers.Conv(c, self.kernel_size, groups=c, padding=pad, dtype=self.dtype,
                           name='pos_enc')(x)


class PatchEmbed(nn.Module):
  """Stage downsampling: `proj_0` ReparamLargeKernelConv (stride 2), `proj_1` 1x1 MobileOne."""
  features: int
  use_se: bool = False
  reparameterized: bool = False
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common = dict(reparameterized=self.reparameterized, bn_group_size=self.bn_group_size,
                  dtype=self.dtype)
    x = ReparamLargeKernelConv(self.features, use_se=self.use_se, name='proj_0', **common)(x, train)
    return layers.MobileOneBlock(self.features, 1, name='proj_1', **common)(x, train)


class AttentionBlock(nn.Module):
  """x + gamma1 * MHSA(Norm(x)) over the flattened H*W tokens; x + gamma2 * ConvMlp(x)."""
  mlp_ratio: float
  head_dim: int = 32
  norm: str = 'batchnorm'
  attention: str = 'softmax'
  qk_norm: bool = False
  layer_scale_init: float = 1e-5
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    if self.norm == 'batchnorm':
      y = layers.BatchNorm(group_size=self.bn_group_size, dtype=self.dtype, name='norm')(x, train)
    else:
      y = layers.LayerNorm(dtype=self.dtype, name='norm')(x)
    y = attn_lib.MultiHeadAttention(c // self.head_dim, qkv_bias=False, attention=self.attention,
                                    qk_norm=self.qk_norm, dtype=self.dtype,
                                    name='token_mixer')(y.reshape(b, h * w, c))
    x = x + layers.LayerScale(self.layer_scale_init, name='layer_scale_1')(y.reshape(b, h, w, c))
    y = layers.ConvMlp(int(c * self.mlp_ratio), bn_group_size=self.bn_group_size, dtype=self.dtype,
                       name='mlp')(x, train)
    return x + layers.LayerScale(self.layer_scale_init, name='layer_scale_2')(y)


class Stage(nn.Module):
  """One FastViT stage: optional `downsample`, optional `pos_emb`, then `blocks_{j}`."""
  config: MCiConfig
  index: int
  attention: str = 'softmax'
  qk_norm: bool = False
  reparameterized: bool = False
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg, i = self.config, self.index
    common = dict(reparameterized=self.reparameterized, bn_group_size=self.bn_group_size,
                  dtype=self.dtype)
    width = cfg.widths[i]
    if x.shape[-1] != width:
      x = PatchEmbed(width, cfg.se_downsample[i], name='downsample', **common)(x, train)
    if cfg.pos_emb[i]:
      x = RepCPE(reparameterized=self.reparameterized, dtype=self.dtype, name='pos_emb')(x)
    for j in range(cfg.depths[i]):
      if cfg.token_mixers[i] == 'repmixer':
        x = layers.RepMixerBlock(cfg.mlp_ratio, layer_scale_init=cfg.layer_scale_init,
                                 name=f'blocks_{j}', **common)(x, train)
      else:
        x = AttentionBlock(cfg.mlp_ratio, cfg.head_dim, cfg.attn_norm, self.attention,
                           self.qk_norm, cfg.layer_scale_init, self.bn_group_size, self.dtype,
                           name=f'blocks_{j}')(x, train)
    return x


class MCi(nn.Module):
  """MCi image encoder: images [B, H, W, 3] (normalized) -> embeddings [B, embed_dim].

  Any resolution divisible by the total stride (32 for 4 stages, 64 for 5) works.
  """
  config: MCiConfig
  embed_dim: int
  attention: str = 'softmax'
  qk_norm: bool = False
  reparameterized: bool = False
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    common = dict(reparameterized=self.reparameterized, bn_group_size=self.bn_group_size,
                  dtype=self.dtype)
    c0 = cfg.widths[0]
    stem = dict(use_scale_branch=cfg.stem_scale_branch, **common)
    x = layers.MobileOneBlock(c0, 3, stride=2, name='stem_0', **stem)(images, train)
    x = layers.MobileOneBlock(c0, 3, stride=2, groups=c0, name='stem_1', **stem)(x, train)
    x = layers.MobileOneBlock(c0, 1, name='stem_2', **common)(x, train)
    for i in range(len(cfg.depths)):
      x = Stage(cfg, i, self.attention, self.qk_norm, name=f'stages_{i}', **common)(x, train)
    c_last = x.shape[-1]
    x = layers.MobileOneBlock(int(c_last * cfg.final_ratio), 3, groups=c_last, use_se=True,
                              name='final_conv', **common)(x, train)
    pooled = x.astype(jnp.float32).mean((1, 2)).astype(x.dtype)
    return nn.Dense(self.embed_dim, kernel_init=layers.trunc_normal_02, dtype=self.dtype,
                    name='head')(pooled)

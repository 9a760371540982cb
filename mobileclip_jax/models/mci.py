"""MCi0..MCi4: the FastViT-family image encoders of MobileCLIP / MobileCLIP2 (NHWC).

Structure and names follow timm's `fastvit_mci*` (timm/models/fastvit.py): `stem_{0,1,2}`,
`stages_{i}/{downsample,pos_emb,blocks_{j}}`, `final_conv`, `head/fc`. The projection to the
CLIP embedding is `head/fc` (Linear with bias), as in open_clip's timm towers.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mobileone
from mobileclip_jax.models import reduce as reduce_lib


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

  @property
  def stride(self) -> int:
    """Total downsampling: the stem's 4, then 2 per stage that widens."""
    widths = (self.widths[0],) + tuple(self.widths)
    return 4 * 2 ** sum(a != b for a, b in zip(widths[:-1], widths[1:]))

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
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = dict(features=self.features, stride=self.stride, groups=x.shape[-1])
    fold = mobileone.folded(self, train)
    if self.opts.reparameterized:
      out = layers.Conv(kernel_size=self.kernel_size, dtype=self.opts.dtype, name='reparam_conv',
                        **conv)(x)
    elif fold:  # Eval: both branches as one conv.
      out = layers.conv(x, **fold['reparam_conv'], stride=self.stride, groups=x.shape[-1],
                        dtype=self.opts.dtype)
    else:
      branch = lambda k, name: layers.ConvBN(kernel_size=k, opts=self.opts, name=name, **conv)(
          x, train)
      out = branch(self.kernel_size, 'large_conv') + branch(self.small_kernel, 'small_conv')
    if self.use_se:
      out = layers.SqueezeExcite(rd_ratio=0.25, dtype=self.opts.dtype, name='se')(out)
    return layers.gelu(out)


class RepCPE(nn.Module):
  """Conditional positional encoding x + dwconv7x7(x); inference form folds the identity in."""
  kernel_size: int = 7
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    conv = dict(features=c, kernel_size=self.kernel_size, groups=c,
                padding=(self.kernel_size // 2,) * 2, dtype=self.opts.dtype)
    if self.opts.reparameterized:
      return layers.Conv(name='reparam_conv', **conv)(x)
    return x + layers.Conv(name='pos_enc', **conv)(x)


class PatchEmbed(nn.Module):
  """Stage downsampling: `proj_0` ReparamLargeKernelConv (stride 2), `proj_1` 1x1 MobileOne."""
  features: int
  use_se: bool = False
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ReparamLargeKernelConv(features=self.features, use_se=self.use_se, opts=self.opts,
                               name='proj_0')(x, train)
    return mobileone.MobileOneBlock(features=self.features, kernel_size=1, opts=self.opts,
                                 name='proj_1')(x, train)


class AttentionBlock(nn.Module):
  """x + gamma1 * MHSA(Norm(x)) over the flattened H*W tokens; x + gamma2 * ConvMlp(x).

  `merge` > 0 (reduced inference): ToMe merges that many of the normalized tokens (matched by
  cosine of the tokens themselves, since the keys would cost the projection it saves), attention
  runs on the rest with proportional attention, and its output is unmerged onto the H x W grid
  before the residual, so the ConvMlp's 7x7 depthwise conv still sees every position.
  """
  mlp_ratio: float
  head_dim: int = 32
  norm: str = 'batchnorm'
  layer_scale_init: float = 1e-5
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, merge: int = 0) -> jax.Array:
    b, h, w, c = x.shape
    if self.norm == 'batchnorm':
      y = layers.BatchNorm(group_size=self.opts.bn_group_size, dtype=self.opts.dtype,
                           name='norm')(x, train)
    else:
      y = layers.LayerNorm(dtype=self.opts.dtype, name='norm')(x)
    mixer = attn_lib.MultiHeadAttention(num_heads=c // self.head_dim, qkv_bias=False,
                                        opts=self.opts, name='token_mixer')
    y = y.reshape(b, h * w, c)
    r = reduce_lib.mergeable(h * w, merge, 0)
    if r:
      m = reduce_lib.bipartite_soft_matching(y, r)
      merged, size = reduce_lib.merge_wavg(y, m)
      y = reduce_lib.unmerge(mixer(merged, key_size=size), m, h * w)
    else:
      y = mixer(y)
    scale = lambda name: layers.LayerScale(init_value=self.layer_scale_init, name=name)
    x = x + scale('layer_scale_1')(y.reshape(b, h, w, c))
    y = mobileone.ConvMlp(hidden=int(c * self.mlp_ratio), opts=self.opts, name='mlp')(x, train)
    return x + scale('layer_scale_2')(y)


class Stage(nn.Module):
  """One FastViT stage: optional `downsample`, optional `pos_emb`, then `blocks_{j}`."""
  config: MCiConfig
  index: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               merges: Tuple[int, ...] = ()) -> jax.Array:
    """`merges`: ToMe's r for each attention block of the stage (reduced inference)."""
    cfg, i = self.config, self.index
    width = cfg.widths[i]
    if x.shape[-1] != width:
      x = PatchEmbed(features=width, use_se=cfg.se_downsample[i], opts=self.opts,
                     name='downsample')(x, train)
    if cfg.pos_emb[i]:
      x = RepCPE(opts=self.opts, name='pos_emb')(x)
    for j in range(cfg.depths[i]):
      if cfg.token_mixers[i] == 'repmixer':
        block = mobileone.RepMixerBlock(mlp_ratio=cfg.mlp_ratio,
                                     layer_scale_init=cfg.layer_scale_init, opts=self.opts,
                                     name=f'blocks_{j}')
      else:
        block = functools.partial(
            AttentionBlock(mlp_ratio=cfg.mlp_ratio, head_dim=cfg.head_dim, norm=cfg.attn_norm,
                           layer_scale_init=cfg.layer_scale_init, opts=self.opts,
                           name=f'blocks_{j}'), merge=merges[j] if merges else 0)
      x = block(x, train)
    return x


class MCi(nn.Module):
  """MCi image encoder: images [B, H, W, 3] (normalized) -> embeddings [B, embed_dim].

  Any resolution divisible by the total stride (`stride`: 32 for MCi0-2, 64 for MCi3/4) works.
  `reduction` (a reduce.TokenReduction) may only merge: its `merge_layers` count the attention
  blocks of all attention stages; the grid convolutions leave nothing to prune.
  """
  config: MCiConfig
  embed_dim: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               reduction: Optional[reduce_lib.TokenReduction] = None, ranker=None,
               extra_hook=None) -> jax.Array:
    cfg, opts = self.config, self.opts
    merges = [()] * len(cfg.depths)
    if reduction is not None:
      if reduction.prune or reduction.cut_padding or extra_hook is not None:
        raise ValueError('MCi towers only merge tokens (merge=r): their attention stages feed '
                         'grid convolutions, which need every position.')
      attention = [i for i, mixer in enumerate(cfg.token_mixers) if mixer == 'attention']
      reduction.check_depth(sum(cfg.depths[i] for i in attention), 'The MCi tower (attention)')
      count = 0
      for i in attention:
        merges[i] = tuple(reduction.merges_at(count + j) for j in range(cfg.depths[i]))
        count += cfg.depths[i]
    c0 = cfg.widths[0]
    stem = dict(features=c0, kernel_size=3, stride=2, use_scale_branch=cfg.stem_scale_branch,
                opts=opts)
    x = mobileone.MobileOneBlock(name='stem_0', **stem)(images, train)
    x = mobileone.MobileOneBlock(groups=c0, name='stem_1', **stem)(x, train)
    x = mobileone.MobileOneBlock(features=c0, kernel_size=1, opts=opts, name='stem_2')(x, train)
    for i in range(len(cfg.depths)):
      stage = Stage(config=cfg, index=i, opts=opts, name=f'stages_{i}')
      x = stage(x, train, merges[i])
    c_last = x.shape[-1]
    x = mobileone.MobileOneBlock(features=int(c_last * cfg.final_ratio), kernel_size=3,
                              groups=c_last, use_se=True, opts=opts, name='final_conv')(x, train)
    pooled = x.astype(jnp.float32).mean((1, 2)).astype(x.dtype)
    return nn.Dense(self.embed_dim, kernel_init=layers.trunc_normal_02, dtype=opts.dtype,
                    name='head')(pooled)

"""Text towers: the CLIP base transformer and MCt (MobileCLIP-S0's RepMixer text encoder).

Both embed tokens, add a learned position embedding, run their blocks, apply a final LayerNorm,
take the token at argmax(token id) (the EOT token has the largest id) and project it without
bias. Released MobileCLIP text towers are bidirectional and unmasked (padding tokens are
attended to, as the weights expect); only the B variants and the CLIP teachers are causal.
"""
import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers



@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Architecture of a text tower."""
  variant: str = 'base'                  # 'base' (transformer) or 'mct' (RepMixer + transformer).
  width: int = 512
  heads: int = 8
  layers: int = 12                       # Transformer layers (MCt: between its two RepMixer blocks).
  mlp_ratio: float = 4.0
  vocab_size: int = 49408
  context_length: int = 77
  causal: bool = False
  act: str = 'gelu'
  norm_eps: float = 1e-5
  layer_scale_init: Optional[float] = None  # Sigmoid-attention stabilizer (LayerScale per branch).
  hybrid_norm: bool = False                 # Sigmoid-attention stabilizer (norm on attention output).
  repmixer_kernel: int = 11                 # MCt: 1 x k depthwise token mixing.

  def __post_init__(self):
    if self.variant not in ('base', 'mct'):
      raise ValueError(f"TextConfig.variant must be 'base' or 'mct', got {self.variant!r}.")


class TextTransformer(nn.Module):
  """tokens [B, L] int32 (L <= context_length) -> embeddings [B, embed_dim]."""
  config: TextConfig
  embed_dim: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    cfg, dtype = self.config, self.opts.dtype
    b, seq_len = tokens.shape
    if seq_len > cfg.context_length or (cfg.variant == 'mct' and seq_len != cfg.context_length):
      raise ValueError(f'{cfg.variant} text tower expects {cfg.context_length} tokens per text, '
                       f'got {seq_len}; tokenize with context_length={cfg.context_length}.')
    width = cfg.width
    x = nn.Embed(cfg.vocab_size, width, embedding_init=nn.initializers.normal(0.02),
                 name='token_embedding')(tokens)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                     (cfg.context_length, width), jnp.float32)
    x = (x + pos[:seq_len]).astype(dtype or jnp.float32)

    # open_clip's initialization of the text transformer.
    proj_std = width ** -0.5 * (2 * cfg.layers) ** -0.5
    block = dict(
        num_heads=cfg.heads, is_causal=cfg.causal, layer_scale_init=cfg.layer_scale_init,
        hybrid_norm=cfg.hybrid_norm, act=cfg.act, norm_eps=cfg.norm_eps,
        qkv_init=nn.initializers.normal(width ** -0.5), proj_init=nn.initializers.normal(proj_std),
        fc1_init=nn.initializers.normal((2 * width) ** -0.5),
        fc2_init=nn.initializers.normal(proj_std), opts=self.opts)
    if cfg.variant == 'base':
      mlp_dim = int(width * cfg.mlp_ratio)
      for i in range(cfg.layers):
        x = attn_lib.TransformerBlock(mlp_dim=mlp_dim, name=f'blocks_{i}', **block)(x, train=train)
    else:
      # Apple's MCt: FFN width rounded up to a multiple of 16; blocks 0 and L+1 are RepMixer
      # blocks running 1 x k depthwise convs along the sequence ([B, L, D] as [B, 1, L, D]).
      mlp_dim = int(math.ceil(width * cfg.mlp_ratio / 16.0) * 16)
      repmixer = lambda i: layers.RepMixerBlock(
          mlp_ratio=cfg.mlp_ratio, kernel_size=(1, cfg.repmixer_kernel),
          mlp_kernel_size=(1, cfg.repmixer_kernel), use_scale_branch=False, opts=self.opts,
          name=f'blocks_{i}')
      x = repmixer(0)(x[:, None], train)[:, 0]
      for i in range(1, cfg.layers + 1):
        x = attn_lib.TransformerBlock(mlp_dim=mlp_dim, name=f'blocks_{i}', **block)(x, train=train)
      x = repmixer(cfg.layers + 1)(x[:, None], train)[:, 0]

    x = layers.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name='ln_final')(x)
    pooled = x[jnp.arange(b), jnp.argmax(tokens, axis=-1)]
    proj = self.param('text_projection', nn.initializers.normal(width ** -0.5),
                      (width, self.embed_dim), jnp.float32)
    return pooled @ proj.astype(pooled.dtype)

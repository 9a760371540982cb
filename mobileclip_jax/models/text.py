"""Text towers: the CLIP base transformer and MCt (MobileCLIP-S0's RepMixer text encoder).

Both embed tokens, add a learned position embedding, run their blocks, apply a final LayerNorm,
take the token at argmax(token id) (the EOT token has the largest id) and project it without
bias. Released MobileCLIP text towers are bidirectional and unmasked (padding tokens are
attended to, as the weights expect); only the B variants and the CLIP teachers are causal.

CoCa's text tower (`embed_cls`) appends a learned CLS token after the tokens and pools it
(LayerNorm after pooling); its token outputs, before `ln_final`, feed the multimodal decoder.
Its attention masks padding keys with open_clip's legacy mask (correct_cls_mask=False, which
its released weights were trained with): the key mask is [True, tokens != pad] over the L + 1
positions, i.e. shifted by one, so key j > 0 is hidden when token j - 1 is padding.
"""
import dataclasses
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mobileone
from mobileclip_jax.models import reduce as reduce_lib

PAD_ID = 0  # open_clip's pad_id; every tokenizer here pads with 0.


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
  embed_cls: bool = False                   # CoCa: learned CLS appended at the end, pooled.

  def __post_init__(self):
    if self.variant not in ('base', 'mct'):
      raise ValueError(f"TextConfig.variant must be 'base' or 'mct', got {self.variant!r}.")
    if self.embed_cls and self.variant != 'base':
      raise ValueError('embed_cls (the CoCa CLS token) needs the base transformer.')


class TextTransformer(nn.Module):
  """tokens [B, L] int32 (L <= context_length) -> embeddings [B, embed_dim].

  With `return_tokens` also the token outputs [B, L, width]. With `decode` (causal towers only)
  the tokens continue the sequences held in the 'cache' collection and only the token outputs
  come back (see attention.py; create the cache with one call on [B, max_len] tokens).

  With `reduction` (a reduce.TokenReduction; base variant without CLS token only) the blocks merge
  or prune tokens (models/reduce.py); `ranker` scores tokens for prune='learned';
  `extra_hook(layer)` adds a hook per block (the reducer-training tools use it).
  """
  config: TextConfig
  embed_dim: int
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False, *, return_tokens: bool = False,
               decode: bool = False, reduction: Optional[reduce_lib.TokenReduction] = None,
               ranker: Optional[Callable] = None, extra_hook: Optional[Callable] = None):
    cfg, dtype = self.config, self.opts.dtype
    b, seq_len = tokens.shape
    if reduction is not None and (cfg.variant != 'base' or cfg.embed_cls or decode
                                  or return_tokens):
      raise ValueError('Token reduction covers the base text transformer\'s embedding (not MCt\'s '
                       'RepMixer blocks, which need the whole sequence, nor CoCa\'s CLS tower, '
                       'decoding or token outputs).')
    if seq_len > cfg.context_length or (cfg.variant == 'mct' and seq_len != cfg.context_length):
      raise ValueError(f'{cfg.variant} text tower expects {cfg.context_length} tokens per text, '
                       f'got {seq_len}; tokenize with context_length={cfg.context_length}.')
    if decode and not cfg.causal:
      raise ValueError('decode=True needs a causal text tower.')
    width = cfg.width
    x = nn.Embed(cfg.vocab_size, width, embedding_init=nn.initializers.normal(0.02),
                 name='token_embedding')(tokens)
    num_pos = cfg.context_length + (1 if cfg.embed_cls else 0)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01), (num_pos, width),
                     jnp.float32)
    mask = None
    if decode:
      start, key_valid = _decode_positions(self, tokens)
      x = x + jax.lax.dynamic_slice_in_dim(pos, start, seq_len)
      if cfg.embed_cls:
        mask = key_valid[:, None, None, :]
    else:
      if cfg.embed_cls:
        cls = self.param('cls_emb', nn.initializers.normal(0.01), (width,), jnp.float32)
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (b, 1, width))], axis=1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), tokens != PAD_ID], axis=1)
        mask = valid[:, None, None, :]
      x = x + pos[:x.shape[1]]
    x = x.astype(dtype or jnp.float32)

    # open_clip's initialization of the text transformer.
    proj_std = width ** -0.5 * (2 * cfg.layers) ** -0.5
    block = dict(
        num_heads=cfg.heads, is_causal=cfg.causal, layer_scale_init=cfg.layer_scale_init,
        hybrid_norm=cfg.hybrid_norm, act=cfg.act, norm_eps=cfg.norm_eps,
        qkv_init=nn.initializers.normal(width ** -0.5), proj_init=nn.initializers.normal(proj_std),
        fc1_init=nn.initializers.normal((2 * width) ** -0.5),
        fc2_init=nn.initializers.normal(proj_std), opts=self.opts)
    reduced = None
    if cfg.variant == 'base':
      mlp_dim = int(width * cfg.mlp_ratio)
      blocks = [attn_lib.TransformerBlock(mlp_dim=mlp_dim, name=f'blocks_{i}', **block)
                for i in range(cfg.layers)]
      if reduction is None:
        for blk in blocks:
          x = blk(x, mask, train, decode=decode)
      else:
        plan = reduce_lib.Plan(reduction, cfg.layers, attention=self.opts.attention, protected=2,
                               ranker=ranker, extra=extra_hook, what='The text tower')
        reduced = reduce_lib.text_tokens(tokens, cfg.causal, mask_padding=reduction.cut_padding)
        x, reduced = reduce_lib.run_blocks(blocks, x, reduced, plan, train)
    else:
      # Apple's MCt: FFN width rounded up to a multiple of 16; blocks 0 and L+1 are RepMixer
      # blocks running 1 x k depthwise convs along the sequence ([B, L, D] as [B, 1, L, D]).
      mlp_dim = int(math.ceil(width * cfg.mlp_ratio / 16.0) * 16)
      repmixer = lambda i: mobileone.RepMixerBlock(
          mlp_ratio=cfg.mlp_ratio, kernel_size=(1, cfg.repmixer_kernel),
          mlp_kernel_size=(1, cfg.repmixer_kernel), use_scale_branch=False, opts=self.opts,
          name=f'blocks_{i}')
      x = repmixer(0)(x[:, None], train)[:, 0]
      for i in range(1, cfg.layers + 1):
        x = attn_lib.TransformerBlock(mlp_dim=mlp_dim, name=f'blocks_{i}', **block)(x, train=train)
      x = repmixer(cfg.layers + 1)(x[:, None], train)[:, 0]

    ln_final = layers.LayerNorm(epsilon=cfg.norm_eps, dtype=dtype, name='ln_final')
    if decode:
      return x if cfg.embed_cls else ln_final(x)
    if cfg.embed_cls:  # The CLS token is last; the decoder takes the others before ln_final.
      token_outputs, pooled = x[:, :seq_len], ln_final(x[:, -1])
    else:
      x = ln_final(x)
      token_outputs, pooled = x, reduce_lib.pool(x, reduced, jnp.argmax(tokens, axis=-1))
    proj = self.param('text_projection', nn.initializers.normal(width ** -0.5),
                      (width, self.embed_dim), jnp.float32)
    embedding = pooled @ proj.astype(pooled.dtype)
    return (embedding, token_outputs) if return_tokens else embedding


def _decode_positions(module: nn.Module, tokens: jax.Array):
  """Decoding bookkeeping in 'cache': the next position and which keys are visible.

  Returns (position of tokens[:, 0], key mask [B, max_len] under the CoCa padding rule: key j is
  visible unless token j - 1 is padding). The first call, which creates the cache, sees position 0.
  """
  b, n = tokens.shape
  initialized = module.has_variable(attn_lib.CACHE, 'index')
  index = module.variable(attn_lib.CACHE, 'index', lambda: jnp.zeros((), jnp.int32))
  key_valid = module.variable(attn_lib.CACHE, 'key_valid', jnp.ones, (b, n), bool)
  last = module.variable(attn_lib.CACHE, 'last_token', jnp.zeros, (b,), tokens.dtype)
  if not initialized:
    return 0, jnp.concatenate([jnp.ones((b, 1), bool), tokens[:, :-1] != PAD_ID], axis=1)
  start = index.value
  previous = jnp.concatenate([last.value[:, None], tokens[:, :-1]], axis=1)
  valid = jnp.logical_or(start + jnp.arange(n) == 0, previous != PAD_ID)
  key_valid.value = jax.lax.dynamic_update_slice(key_valid.value, valid, (0, start))
  index.value, last.value = start + n, tokens[:, -1]
  return start, key_valid.value

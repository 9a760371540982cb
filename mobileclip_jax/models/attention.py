"""Multi-head self-attention (softmax or sigmoid) and the pre-norm transformer block.

Sigmoid attention (Ramapuram et al., ICLR 2025) replaces the row softmax with an elementwise
sigma(q.k / sqrt(d) + b), b = -log(n) for the actual number of keys n, so that at init a row
sums to about 1 like a softmax row. Masked positions get weight exactly zero. The paper pairs it
with LayerScale or hybrid-norm (a norm on the attention output) and optionally QK-norm; all
three are options of `TransformerBlock`.

Parameter names follow timm (`qkv`, `proj`, `norm1`, `mlp/fc1`, ...); `qkv` is one fused
projection whose output axis is ordered (3, heads, head_dim) like PyTorch's in_proj.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import layers

ATTENTION_KINDS = ('softmax', 'sigmoid')


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kind: str = 'softmax',
                          mask: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
  """Scaled dot-product attention with float32 logits.

  Args:
    q, k, v: [B, N, H, D] queries, keys and values.
    kind: 'softmax' or 'sigmoid' (sigma(q.k/sqrt(D) - log N_keys), no row normalization).
    mask: optional boolean, broadcastable to [B, H, N_q, N_k]; True means "attend".
    is_causal: additionally mask keys after the query position.

  Returns:
    [B, N, H, D] in v's dtype.
  """
  if kind == 'softmax':
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  if kind != 'sigmoid':
    raise ValueError(f'attention must be one of {ATTENTION_KINDS}, got {kind!r}.')
  n_q, n_k, head_dim = q.shape[1], k.shape[1], q.shape[-1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.sigmoid(logits / math.sqrt(head_dim) - math.log(n_k))
  if is_causal:
    causal = jnp.tril(jnp.ones((n_q, n_k), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, N, C] tokens -> [B, N, C]; kind and QK-norm from `opts`."""
  num_heads: int
  qkv_bias: bool = True
  is_causal: bool = False
  qkv_init: Any = layers.trunc_normal_02
  proj_init: Any = layers.trunc_normal_02
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by {self.num_heads} heads.')
    head_dim, dtype = c // self.num_heads, self.opts.dtype
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, kernel_init=self.qkv_init, dtype=dtype,
                   name='qkv')(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
    if self.opts.qk_norm:
      q = layers.LayerNorm(dtype=dtype, name='q_norm')(q)
      k = layers.LayerNorm(dtype=dtype, name='k_norm')(k)
    out = dot_product_attention(q, k, v, kind=self.opts.attention, mask=mask,
                                is_causal=self.is_causal)
    return nn.Dense(c, kernel_init=self.proj_init, dtype=dtype, name='proj')(out.reshape(b, n, c))


class TransformerBlock(nn.Module):
  """Pre-norm block: x + LS1(Norm?(Attn(Norm1(x)))); x + LS2(MLP(Norm2(x))). [B, N, C] -> [B, N, C].

  `layer_scale_init` (None = off) adds `ls_1`/`ls_2`; `hybrid_norm` adds `attn_norm` on the
  attention output; both are the sigmoid-attention paper's stabilizers.
  """
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  is_causal: bool = False
  layer_scale_init: Optional[float] = None
  hybrid_norm: bool = False
  act: str = 'gelu'
  norm_eps: float = 1e-5
  drop_path: float = 0.0
  qkv_init: Any = layers.trunc_normal_02
  proj_init: Any = layers.trunc_normal_02
  fc1_init: Any = layers.trunc_normal_02
  fc2_init: Any = layers.trunc_normal_02
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    dtype = self.opts.dtype
    norm = lambda name: layers.LayerNorm(epsilon=self.norm_eps, dtype=dtype, name=name)
    y = MultiHeadAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                           is_causal=self.is_causal, qkv_init=self.qkv_init,
                           proj_init=self.proj_init, opts=self.opts,
                           name='attn')(norm('norm1')(x), mask)
    if self.hybrid_norm:
      y = norm('attn_norm')(y)
    if self.layer_scale_init is not None:
      y = layers.LayerScale(init_value=self.layer_scale_init, name='ls_1')(y)
    x = x + layers.DropPath(rate=self.drop_path, name='drop_path1')(y, train)

    y = layers.Mlp(hidden=self.mlp_dim, act=self.act, fc1_init=self.fc1_init,
                   fc2_init=self.fc2_init, dtype=dtype, name='mlp')(norm('norm2')(x))
    if self.layer_scale_init is not None:
      y = layers.LayerScale(init_value=self.layer_scale_init, name='ls_2')(y)
    return x + layers.DropPath(rate=self.drop_path, name='drop_path2')(y, train)

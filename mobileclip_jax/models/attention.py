"""Multi-head self-attention (softmax or sigmoid) and the pre-norm transformer block.

Sigmoid attention (Ramapuram et al., ICLR 2025) replaces the row softmax with an elementwise
sigma(q.k / sqrt(d) + b), b = -log(n) for the actual number of keys n, so that at init a row
sums to about 1 like a softmax row. Masked positions get weight exactly zero. The paper pairs it
with LayerScale or hybrid-norm (a norm on the attention output) and optionally QK-norm; all
three are options of `TransformerBlock`.

Parameter names follow timm (`qkv`, `proj`, `norm1`, `mlp/fc1`, ...); `qkv` is one fused
projection whose output axis is ordered (3, heads, head_dim) like PyTorch's in_proj.

Cross-attention (a block's `cross_attention=True`, CoCa's multimodal decoder) takes queries from
the tokens and keys/values from a `memory` through the same fused `qkv` parameters, as PyTorch's
nn.MultiheadAttention does. Autoregressive decoding (`decode=True`) keeps keys/values in Flax
collections: 'cache' holds each self-attention's keys/values written so far (per sequence, so a
beam search reorders it), 'cross_cache' the memory's projected keys/values (per image, written
once when the memory is given, then only read).
"""
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import layers
from mobileclip_jax.models import lean_vjp

ATTENTION_KINDS = ('softmax', 'sigmoid')
CACHE = 'cache'
CROSS_CACHE = 'cross_cache'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kind: str = 'softmax',
                          mask: Optional[jax.Array] = None, is_causal: bool = False,
                          key_size: Optional[jax.Array] = None) -> jax.Array:
  """Scaled dot-product attention with float32 logits.

  Args:
    q, k, v: [B, N, H, D] queries, keys and values.
    kind: 'softmax' or 'sigmoid' (sigma(q.k/sqrt(D) - log N_keys), no row normalization).
    mask: optional boolean, broadcastable to [B, H, N_q, N_k]; True means "attend".
    is_causal: additionally mask keys after the query position.
    key_size: optional [B, N_k], how many tokens each key stands for after ToMe merging
      (proportional attention): softmax adds log(size) to the logits; sigmoid weighs each key
      by its size and takes N_keys = the sum of sizes. Either equals attention over the
      unmerged tokens when the merged tokens were identical.

  Returns:
    [B, N, H, D] in v's dtype.
  """
  if kind == 'softmax':
    bias = None if key_size is None else jnp.log(key_size)[:, None, None, :].astype(jnp.float32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)
  if kind != 'sigmoid':
    raise ValueError(f'attention must be one of {ATTENTION_KINDS}, got {kind!r}.')
  n_q, n_k, head_dim = q.shape[1], k.shape[1], q.shape[-1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if key_size is None:
    weights = jax.nn.sigmoid(logits / math.sqrt(head_dim) - math.log(n_k))
  else:
    log_n = jnp.log(key_size.sum(-1))[:, None, None, None]
    weights = jax.nn.sigmoid(logits / math.sqrt(head_dim) - log_n) * key_size[:, None, None, :]
  if is_causal:
    causal = jnp.tril(jnp.ones((n_q, n_k), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


class FusedQKV(nn.Module):
  """PyTorch's packed in-projection, kernel [C, 3C] ordered (q, k, v).

  Self-attention: x [B, N, C] -> [B, N, 3C]. Cross-attention (`cross`): the q columns project x
  and the k/v columns the memory [B_m, M, C] -> ([B, N, C], [B_m, M, 2C]); the memory may be
  None when its keys/values are cached -> ([B, N, C], None).
  """
  features: int
  use_bias: bool = True
  kernel_init: Any = layers.trunc_normal_02
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, memory: Optional[jax.Array] = None, cross: bool = False):
    c = self.features
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], 3 * c), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (3 * c,), jnp.float32)
            if self.use_bias else None)

    def project(inputs, cols):
      inputs, w, b = nn.dtypes.promote_dtype(inputs, kernel[:, cols],
                                             None if bias is None else bias[cols], dtype=self.dtype)
      return lean_vjp.dense(inputs, w, b)

    if not cross:
      return project(x, slice(None))
    return project(x, slice(0, c)), None if memory is None else project(memory, slice(c, 3 * c))


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, N, C] tokens -> [B, N, C]; kind and QK-norm from `opts`.

  With `cross=True`, queries [B, N, C] attend to a memory [B_m, M, C] instead, B a multiple of
  B_m (consecutive query rows share a memory row: the beams of one image).
  """
  num_heads: int
  qkv_bias: bool = True
  is_causal: bool = False
  qkv_init: Any = layers.trunc_normal_02
  proj_init: Any = layers.trunc_normal_02
  opts: layers.Options = layers.Options()
  cross: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, *,
               memory: Optional[jax.Array] = None, decode: bool = False,
               key_size: Optional[jax.Array] = None, with_qk: bool = False):
    """x [B, N, C] -> [B, N, C]; mask broadcastable to [B, H, N, N_keys] (True = attend).

    key_size, with_qk: reduced inference (models/reduce.py): the keys' merged sizes, and also
      return q and k [B, N, H, D] (after QK-norm).

    decode: self-attention appends this call's keys/values to the 'cache' collection and attends
      to every cached position up to its own (the first call, which creates the cache, sizes it
      from x: call it once with the full length, e.g. under jax.eval_shape); cross-attention
      stores the memory's keys/values in 'cross_cache' when `memory` is given and reads them
      from there when it is None.
    """
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by {self.num_heads} heads.')
    if decode and self.opts.attention != 'softmax':
      raise ValueError(f'decode=True supports softmax attention only, not {self.opts.attention!r}.')
    head_dim, dtype = c // self.num_heads, self.opts.dtype
    # jax.lax.split, not slices: its transpose concatenates dq, dk, dv into one [B, N, 3C]
    # cotangent, where slicing pads each to that shape before summing them (S0's step: 0.11 GB
    # more temporaries).
    heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, head_dim)
    split = lambda t, parts: [heads(u) for u in jax.lax.split(t, (c,) * parts, axis=-1)]
    proj = FusedQKV(features=c, use_bias=self.qkv_bias, kernel_init=self.qkv_init, dtype=dtype,
                    name='qkv')
    k = v = None
    if self.cross:
      q, kv = proj(x, memory, cross=True)
      q = heads(q)
      if kv is not None:
        k, v = split(kv, 2)
    else:
      q, k, v = split(proj(x), 3)
    if self.opts.qk_norm:
      q = layers.LayerNorm(dtype=dtype, name='q_norm')(q)
      if k is not None:
        k = layers.LayerNorm(dtype=dtype, name='k_norm')(k)

    cached = None  # Decoding: keys [B, H, N_k, D], values [B, H, D, N_k] and mask from a cache.
    if self.cross and k is None:
      cached = _cached_memory(self, decode)
    elif self.cross and decode:
      _cache_memory(self, k, v)
    elif decode:
      cached = _self_cache(self, k, v, mask)
    if cached is not None:
      out = _attend_to_cache(q, *cached)
    elif self.cross and k.shape[0] != b:  # Beams of one image share its memory row.
      out = dot_product_attention(q.reshape(k.shape[0], -1, *q.shape[2:]), k, v,
                                  kind=self.opts.attention).reshape(q.shape)
    else:
      out = dot_product_attention(q, k, v, kind=self.opts.attention, mask=mask,
                                  is_causal=self.is_causal, key_size=key_size)
    out = layers.Dense(c, kernel_init=self.proj_init, dtype=dtype, name='proj')(
        out.reshape(b, n, c))
    return (out, q, k) if with_qk else out


# Decoding caches hold keys as [B, H, N_k, D] and values as [B, H, D, N_k], the layouts XLA:CPU's
# batched dot reads without a copy: stored as [B, N_k, H, D], every step transposed all of them
# again (2/3 of coca_ViT-B-32's step at batch 8: 2.7 ms for each of the 24 memory tensors).
def _key_layout(k):
  return jnp.swapaxes(k, 1, 2)


def _value_layout(v):
  return jnp.transpose(v, (0, 2, 3, 1))


def _attend_to_cache(q, k, v, mask=None):
  """Softmax attention of q [B', N, H, D] to cached k [B, H, N_k, D], v [B, H, D, N_k].

  B' is a multiple of B (the beams of one image share its memory row); mask broadcastable to
  [B, H, N, N_k], True = attend. -> [B', N, H, D].
  """
  rows = q.reshape(k.shape[0], -1, *q.shape[2:])
  logits = jnp.einsum('bqhd,bhkd->bhqk', rows, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhdk->bqhd', weights, v).reshape(q.shape)


def _cache_memory(module: nn.Module, k, v):
  """Stores the memory's keys/values [B, N_mem, H, D] in 'cross_cache' (the layouts above)."""
  module.put_variable(CROSS_CACHE, 'key', _key_layout(k))
  module.put_variable(CROSS_CACHE, 'value', _value_layout(v))


def _cached_memory(module: nn.Module, decode: bool):
  """The cached memory's keys, values and (no) mask, for a call without a memory."""
  if not decode:
    raise ValueError('Cross-attention needs a memory (the image tokens).')
  if not module.has_variable(CROSS_CACHE, 'key'):
    raise ValueError(f'No cached memory: pass the memory on the first decoding call (with the '
                     f'{CROSS_CACHE!r} collection mutable).')
  return module.get_variable(CROSS_CACHE, 'key'), module.get_variable(CROSS_CACHE, 'value'), None


def _self_cache(module: nn.Module, k, v, mask):
  """Writes this call's keys/values [B, N, H, D] at the cache index -> (keys, values, mask).

  The first call creates a zero cache sized by k and returns None: it attends as without a cache.
  """
  initialized = module.has_variable(CACHE, 'cached_key')
  cached_k = module.variable(CACHE, 'cached_key', lambda: jnp.zeros_like(_key_layout(k)))
  cached_v = module.variable(CACHE, 'cached_value', lambda: jnp.zeros_like(_value_layout(v)))
  index = module.variable(CACHE, 'cache_index', lambda: jnp.zeros((), jnp.int32))
  if not initialized:
    return None
  n, length = k.shape[1], cached_k.value.shape[2]
  start = index.value
  dtype = cached_k.value.dtype
  cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, _key_layout(k).astype(dtype),
                                                (0, 0, start, 0))
  cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, _value_layout(v).astype(dtype),
                                                (0, 0, 0, start))
  index.value = start + n
  # Query i sits at position start + i and sees the keys up to its own position: the causal
  # mask over the cache (its unwritten slots lie beyond every query).
  visible = jnp.arange(length)[None, :] <= (start + jnp.arange(n))[:, None]
  visible = visible[None, None]
  return cached_k.value, cached_v.value, visible if mask is None else jnp.logical_and(mask, visible)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + LS1(Norm?(Attn(Norm1(x)))); x + LS2(MLP(Norm2(x))). [B, N, C] -> [B, N, C].

  `layer_scale_init` (None = off) adds `ls_1`/`ls_2`; `hybrid_norm` adds `attn_norm` on the
  attention output; both are the sigmoid-attention paper's stabilizers. `cross_attention`
  attends to `memory` (normalized by its own `norm1_kv`) instead of x itself, as open_clip's
  ResidualAttentionBlock(is_cross_attention=True).

  Reduced inference (models/reduce.py): given `tokens` (a reduce.Tokens), attention follows its
  masks and sizes, `hook(x, q, k, tokens)` may merge or prune rows between the attention and the
  MLP, and the block returns (x, tokens).
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
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, train: bool = False, *,
               memory: Optional[jax.Array] = None, decode: bool = False, tokens: Any = None,
               hook: Optional[Callable] = None):
    dtype = self.opts.dtype
    norm = lambda name: layers.LayerNorm(epsilon=self.norm_eps, dtype=dtype, name=name)
    if self.cross_attention and memory is not None:
      memory = norm('norm1_kv')(memory)
    is_causal, extra = self.is_causal, {}
    if tokens is not None:
      mask, is_causal = tokens.attention_mask(self.is_causal)
      extra = dict(key_size=tokens.size, with_qk=True)
    y = MultiHeadAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                           is_causal=is_causal, qkv_init=self.qkv_init,
                           proj_init=self.proj_init, opts=self.opts, cross=self.cross_attention,
                           name='attn')(norm('norm1')(x), mask, memory=memory, decode=decode,
                                        **extra)
    if tokens is not None:
      y, q, k = y
    if self.hybrid_norm:
      y = norm('attn_norm')(y)
    if self.layer_scale_init is not None:
      y = layers.LayerScale(init_value=self.layer_scale_init, name='ls_1')(y)
    x = x + layers.DropPath(rate=self.drop_path, name='drop_path1')(y, train)
    if hook is not None:
      x, tokens = hook(x, q, k, tokens)

    y = layers.Mlp(hidden=self.mlp_dim, act=self.act, fc1_init=self.fc1_init,
                   fc2_init=self.fc2_init, dtype=dtype, name='mlp')(norm('norm2')(x))
    if self.layer_scale_init is not None:
      y = layers.LayerScale(init_value=self.layer_scale_init, name='ls_2')(y)
    x = x + layers.DropPath(rate=self.drop_path, name='drop_path2')(y, train)
    return x if tokens is None else (x, tokens)


class AttentionalPooler(nn.Module):
  """open_clip's AttentionalPooler: learned queries attend to the tokens. [B, N, C] -> [B, Q, D].

  The queries [Q, D] go through LayerNorm `ln_q`, the tokens through `ln_k`; the attention is a
  nn.MultiheadAttention with kdim = vdim = C != D, whose q/k/v projections are separate bias-free
  matrices (`q_proj`, `k_proj`, `v_proj`) with one packed `in_proj_bias` [3D], then `out_proj`.
  """
  width: int
  num_heads: int
  num_queries: int
  norm_eps: float = 1e-5
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.width
    if d % self.num_heads:
      raise ValueError(f'pooler width {d} is not divisible by {self.num_heads} heads.')
    query = self.param('query', nn.initializers.normal(1.0), (self.num_queries, d), jnp.float32)
    x = layers.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_k')(x)
    q = layers.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='ln_q')(query)
    return _PoolerAttention(num_heads=self.num_heads, dtype=self.dtype, name='attn')(q, x)


class _PoolerAttention(nn.Module):
  """Shared queries [Q, D] attend to x [B, N, C] -> [B, Q, D] (nn.MultiheadAttention layout)."""
  num_heads: int
  dtype: Optional[layers.Dtype] = None

  @nn.compact
  def __call__(self, queries: jax.Array, x: jax.Array) -> jax.Array:
    (n_q, d), b = queries.shape, x.shape[0]
    dense = lambda name: nn.Dense(d, use_bias=False, kernel_init=nn.initializers.xavier_uniform(),
                                  dtype=self.dtype, name=name)
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * d,), jnp.float32)
    bias = bias.astype(self.dtype or jnp.float32)
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, d // self.num_heads)
    q = split(dense('q_proj')(queries) + bias[:d])
    k = split(dense('k_proj')(x) + bias[d:2 * d])
    v = split(dense('v_proj')(x) + bias[2 * d:])
    q = jnp.broadcast_to(q[None], (b,) + q.shape).astype(k.dtype)
    out = dot_product_attention(q, k, v).reshape(b, n_q, d)
    return nn.Dense(d, kernel_init=layers.trunc_normal_02, dtype=self.dtype, name='out_proj')(out)

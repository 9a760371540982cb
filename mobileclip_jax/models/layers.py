"""Convolutional building blocks shared by the MCi image towers and the MCt text tower (NHWC).

Module and parameter names mirror timm's FastViT (`conv_kxk_0` for `conv_kxk.0`, `identity`,
`conv_scale`, `layer_scale/gamma`, ...) so that conversion to PyTorch state_dicts is a table of
renames and transposes (see `mobileclip_jax.convert`). Every block has a train-time multi-branch
form and, with `reparameterized=True`, the single-conv inference form that
`mobileclip_jax.models.reparam` produces from the train-time parameters. The MobileOne /
RepMixer blocks themselves are in `mobileone.py`.
"""
import contextvars
import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import lean_vjp

Dtype = Any
KernelSize = Union[int, Tuple[int, int]]
# The platform that the function being traced will run on, when its caller knows it (for_platform).
_PLATFORM = contextvars.ContextVar('mobileclip_jax_platform', default=None)
PLAIN = 'plain'


def for_platform(fn, platform: str):
  """`fn`, whose layer forms (CPU or elsewhere) are chosen in Python for `platform` while it runs.

  Outside it each choice is a `lax.platform_dependent`: both forms are traced, differentiated and
  lowered, and XLA drops one. That was a third of tracing the S0 train step (15 -> 10 s, paid at
  every start and resume). Export keeps the choice in the graph (export/portable.py).
  platform: a JAX device's `platform` ('cpu', 'gpu', 'tpu'), or `PLAIN`: the form without the
    CPU's workarounds, for traces whose forward only gives shapes (`clip.init_variables`).
  """
  @functools.wraps(fn)
  def traced_for_platform(*args, **kwargs):
    token = _PLATFORM.set(platform)
    try:
      return fn(*args, **kwargs)
    finally:
      _PLATFORM.reset(token)
  return traced_for_platform


def per_platform(*args, cpu, default):
  """cpu(*args) on CPU, default(*args) elsewhere (see `for_platform`)."""
  platform = _PLATFORM.get()
  if platform is None:
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
  return (cpu if platform == 'cpu' else default)(*args)


@dataclasses.dataclass(frozen=True)
class Options:
  """What every block of a tower shares; one value per model (set from its ModelConfig).

  attention: 'softmax' | 'sigmoid' in every attention layer; qk_norm: LayerNorm on q and k;
  reparameterized: the single-conv inference form of the MobileOne/RepMixer blocks;
  bn_group_size: examples per BatchNorm statistics group (0 = the global batch);
  dtype: compute dtype (parameters stay float32).
  """
  attention: str = 'softmax'
  qk_norm: bool = False
  reparameterized: bool = False
  bn_group_size: int = 0
  dtype: Optional[Dtype] = None


# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
trunc_normal_02 = nn.initializers.truncated_normal(0.02)


gelu = lean_vjp.gelu  # Exact (erf) GELU, as PyTorch's nn.GELU; JAX's default is tanh's.


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': gelu, 'quick_gelu': quick_gelu}


def pair(k: KernelSize) -> Tuple[int, int]:
  return (k, k) if isinstance(k, int) else tuple(k)


def torch_padding(kernel_size: KernelSize, stride: int = 1) -> Tuple[Tuple[int, int], ...]:
  """timm's symmetric padding ((stride - 1) + (k - 1)) // 2 per side.

  Not the same as padding='SAME', which pads asymmetrically for stride 2 on even inputs.
  """
  return tuple(((stride - 1) + (k - 1)) // 2 for k in pair(kernel_size))


def make_divisible(v: float, divisor: int = 8) -> int:
  """timm's make_divisible with round_limit=0 (SE reduction widths)."""
  return max(divisor, int(v + divisor / 2) // divisor * divisor)


def _xla_conv(x, kernel, stride, pad, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(p, p) for p in pad],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def _window(x, di, dj, stride, out_hw):
  """x[:, di::stride, dj::stride] cropped to out_hw: the inputs that tap (di, dj) reads."""
  b, _, _, c = x.shape
  limit = (b, di + (out_hw[0] - 1) * stride + 1, dj + (out_hw[1] - 1) * stride + 1, c)
  return jax.lax.slice(x, (0, di, dj, 0), limit, (1, stride, stride, 1))


def _add_reduce(operands, dims):
  """Sums of several same-shaped arrays over `dims` in one variadic reduce (one pass)."""
  return jax.lax.reduce(tuple(operands), (jnp.float32(0),) * len(operands),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), dims)


def _pad_hw(x, pad):
  return jnp.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))


def _taps_sum(xp, taps, stride, out_hw):
  """sum_t window_t(xp) * taps[t] (float32): xp [b, H + 2 p, W + 2 p, C] padded, taps [kh, kw, C].

  Unrolled over the static taps: XLA fuses all kh * kw products into one loop over the output.
  """
  acc = 0
  for di in range(taps.shape[0]):
    for dj in range(taps.shape[1]):
      acc = acc + _window(xp, di, dj, stride, out_hw).astype(jnp.float32) * taps[di, dj]
  return acc


def _taps_input_grad(g, taps, x_shape, stride, pad):
  """d(sum of taps)/dx: g [b, H', W', C] -> [b, H, W, C] (float32), one phase at a time.

  Padded input position s * u + r (row phase r < s) was read by the taps r + s * k at output
  rows u - k, so each phase is a stride-1 sum over its own taps (no zeros interleaved into g,
  which XLA:CPU would hand to XNNPACK with every window materialized); the phases interleave.
  """
  kh, kw = taps.shape[:2]
  b, h, w, c = x_shape
  ho, wo = g.shape[1:3]
  u, v = -(-(h + 2 * pad[0]) // stride), -(-(w + 2 * pad[1]) // stride)
  rows = []
  for r in range(stride):
    cols = []
    for q in range(stride):
      ks, ls = range(r, kh, stride), range(q, kw, stride)
      if not ks or not ls:
        cols.append(jnp.zeros((b, u, v, c), jnp.float32))
        continue
      gp = jnp.pad(g, ((0, 0), (len(ks) - 1, u - ho), (len(ls) - 1, v - wo), (0, 0)))
      acc = 0
      for k, di in enumerate(ks):
        for l, dj in enumerate(ls):
          acc = acc + _window(gp, len(ks) - 1 - k, len(ls) - 1 - l, 1, (u, v)) * taps[di, dj]
      cols.append(acc)
    rows.append(jnp.stack(cols, axis=3) if stride > 1 else cols[0])
  dxp = jnp.stack(rows, axis=2).reshape(b, u * stride, v * stride, c) if stride > 1 else rows[0]
  return dxp[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w]


def _taps_kernel_grad(phases, g, taps_shape, stride):
  """dtaps[t] = sum over (b, h', w') of window_t(x) * g, float32 [kh, kw, C].

  phases[(r, q)] = xp[:, r::stride, q::stride]. Per phase, one variadic reduce over (b, h', w')
  reads x and g once for all of its taps (separate reductions would read them kh * kw times).
  Reducing over w' in it too, rather than in one small reduce per tap after it, matters at load:
  XLA:CPU made each of those a YNNPACK fusion (S0's step: 1,415 in its loop bodies, half of all)
  and rebuilds every one from the executable by a search over all of its instructions.
  """
  kh, kw = taps_shape[:2]
  sums = {}
  for (r, q), phase in phases.items():
    tap_list = [(di, dj) for di in range(r, kh, stride) for dj in range(q, kw, stride)]
    tap_sums = _add_reduce([_window(phase, di // stride, dj // stride, 1, g.shape[1:3])
                            .astype(jnp.float32) * g for di, dj in tap_list], (0, 1, 2))
    sums.update(zip(tap_list, tap_sums))
  return jnp.stack([sums[(di, dj)] for di in range(kh) for dj in range(kw)]).reshape(taps_shape)


def _per_example(fn, *arrays):
  """fn(*[1, ...] slices) for each example, stacked: a loop whose operands are buffers.

  XLA:CPU fuses cheap producers into every consumer, recomputing them: fused into the taps'
  loops, a producer of x or of the cotangent (a BatchNorm's backward, the forward taps sum
  itself) would be recomputed kh * kw times per element. Loop operands are computed once; one
  example per iteration also keeps the working set in cache. The optimization barrier keeps them
  buffers when the batch is 1 and XLA removes the one-iteration loop.
  """
  arrays = jax.lax.optimization_barrier(arrays)
  return jax.lax.map(lambda a: fn(*[v[None] for v in a]), arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sum_of_taps(x, taps, stride, pad, out_hw):
  """sum_t window_t(pad(x)) * taps[t]: x [B, H, W, C], taps [kh, kw, C] float32. [B, H', W', C].

  Not differentiated (inference), the whole batch is one fusion over a buffer of x: the
  reparameterized S0 image tower at batch 8 took 481 ms (median, interleaved) instead of 697
  ms per example. Differentiated, `_taps_fwd` stays per example: in the S0 train step the whole
  batch gained nothing (6.3 vs 6.3 s and 6.3 vs 5.5 s median in two interleaved runs). The VJP
  keeps only x and taps (not every tap's window).
  """
  xp = jax.lax.optimization_barrier(_pad_hw(x, pad))
  return _taps_sum(xp, taps, stride, out_hw).astype(x.dtype)


def _taps_fwd(x, taps, stride, pad, out_hw):
  # Padded per example, in the loop: a padded batch would be the same computation as the
  # backward's pad of x, which XLA's CSE (after optimization barriers are gone) would merge into
  # it, keeping the padded batch from forward to backward (S0's step: 0.13 GB more temporaries).
  y = _per_example(lambda x: _taps_sum(_pad_hw(x, pad), taps, stride, out_hw)[0], x)
  return y.astype(x.dtype), (x, taps)


def _taps_bwd(stride, pad, out_hw, residuals, grad):
  x, taps = residuals
  kh, kw = taps.shape[:2]
  xp = _pad_hw(x, pad)
  # Stride phases of x as separate loop operands: unstrided reads in the kernel-gradient reduce.
  keys = [(r, q) for r in range(min(stride, kh)) for q in range(min(stride, kw))]
  phases = [xp[:, r::stride, q::stride] for r, q in keys] if stride > 1 else [xp]

  def example(g, *phases):
    dx = _taps_input_grad(g, taps, (1,) + x.shape[1:], stride, pad)[0]
    return dx, _taps_kernel_grad(dict(zip(keys, phases)), g, taps.shape, stride)

  dx, dtaps = _per_example(example, grad.astype(jnp.float32), *phases)
  return dx.astype(x.dtype), dtaps.sum(0).astype(taps.dtype)


_sum_of_taps.defvjp(_taps_fwd, _taps_bwd)


def _shift_depthwise_conv(x, kernel, stride, pad):
  """Depthwise conv as a sum over taps of shifted, strided windows times per-channel weights.

  XLA:CPU lowers grouped convolutions to a slow generic loop (3-4x slower than this forward,
  10-20x slower forward + backward, 300x+ for the strided, channel-multiplied ones of MCi's
  downsampling).
  """
  kh, kw, _, c_out = kernel.shape
  b, h, w, c_in = x.shape
  if c_out != c_in:  # Channel multiplier: output channel o reads input channel o // m.
    x = jnp.repeat(x, c_out // c_in, axis=-1)
  out_hw = ((h + 2 * pad[0] - kh) // stride + 1, (w + 2 * pad[1] - kw) // stride + 1)
  # jnp, not numpy: converted weights may arrive as numpy arrays.
  taps = jnp.asarray(kernel).reshape(kh, kw, c_out).astype(jnp.float32)
  return _sum_of_taps(x, taps, stride, tuple(pad), out_hw)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: Sequence[int]) -> jax.Array:
  """Grouped conv with one group per input channel: x [B, H, W, C], kernel [kh, kw, 1, C * m].

  The shifted-slice form on CPU, XLA's native convolution (cuDNN, TPU) elsewhere.
  """
  return per_platform(
      x, kernel, cpu=lambda x, k: _shift_depthwise_conv(x, k, stride, pad),
      default=lambda x, k: _xla_conv(x, k, stride, pad, x.shape[-1]))


def _pointwise_matmul(x, kernel, stride):
  """1x1 convolution as one [B * H * W, C_in] @ [C_in, C_out] matmul."""
  x = x[:, ::stride, ::stride]
  y = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[-2:])
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Unpadded 1x1 conv, x [B, H, W, C_in], kernel [1, 1, C_in, C_out].

  A 2-D matmul on CPU: XLA:CPU runs the convolution's weight gradient as a spatial convolution
  with transposed copies of both operands, 3-4x slower than the matmul's forward + backward.
  XLA's convolution elsewhere.
  """
  return per_platform(
      x, kernel, cpu=lambda x, k: _pointwise_matmul(x, k, stride),
      default=lambda x, k: _xla_conv(x, k, stride, (0, 0), 1))


def materialize_on_cpu(x: jax.Array) -> jax.Array:
  """x, computed into its own buffer on CPU (an optimization barrier); x itself elsewhere.

  XLA:CPU fuses elementwise producers into every consumer, even when that recomputes them: in a
  transformer's backward pass it rebuilt each block's residual stream from all earlier branch
  outputs for every weight gradient, quadratic in depth (half of the text tower's step time).
  """
  return per_platform(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def conv(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None, stride: int = 1,
         groups: int = 1, padding: Optional[Sequence[int]] = None,
         dtype: Optional[Dtype] = None) -> jax.Array:
  """`Conv`'s computation on given parameters: x [B, H, W, C_in], kernel HWIO, in `dtype`.

  padding: per spatial dim, symmetric; None = timm's rule for the kernel size and stride.
  """
  kh, kw = kernel.shape[:2]
  dtype = dtype or x.dtype
  pad = padding if padding is not None else torch_padding((kh, kw), stride)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if groups == x.shape[-1] and groups > 1:
    y = depthwise_conv(x, kernel, stride, pad)
  elif (kh, kw) == (1, 1) and groups == 1 and not any(pad):
    y = pointwise_conv(x, kernel, stride)
  else:
    y = _xla_conv(x, kernel, stride, pad, groups)
  return y if bias is None else y + bias.astype(dtype)


class Conv(nn.Module):
  """2-D convolution with PyTorch padding. x: [B, H, W, C_in] -> [B, H', W', features].

  Parameters: `kernel` [kh, kw, C_in / groups, features] (HWIO) and optional `bias` [features].
  """
  features: int
  kernel_size: KernelSize
  stride: int = 1
  groups: int = 1
  use_bias: bool = True
  padding: Optional[Sequence[int]] = None  # per spatial dim, symmetric; None = timm's rule.
  kernel_init: Any = torch_conv_init
  dtype: Optional[Dtype] = None
  gelu_input: bool = False  # conv(gelu(x)), gelu(x) recomputed in the backward (1x1 only).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = pair(self.kernel_size)
    c_in = x.shape[-1]
    if c_in % self.groups:
      raise ValueError(f'{self.name}: {c_in} input channels are not divisible by {self.groups} groups.')
    kernel = self.param('kernel', self.kernel_init, (kh, kw, c_in // self.groups, self.features),
                        jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    if not self.gelu_input:
      return conv(x, kernel, bias, self.stride, self.groups, self.padding, self.dtype)
    dtype = self.dtype or x.dtype
    if (kh, kw, self.stride, self.groups) != (1, 1, 1, 1) or (self.padding and any(self.padding)):
      raise ValueError(f'{self.name}: gelu_input needs an unpadded 1x1 conv, stride 1, 1 group.')
    return lean_vjp.gelu_dense(x.astype(dtype), kernel.reshape(kernel.shape[-2:]).astype(dtype),
                               None if bias is None else bias.astype(dtype))


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch semantics over the last axis.

  Running statistics use momentum 0.1 and the unbiased batch variance, as torch.nn.BatchNorm2d,
  so that statistics converted to and from PyTorch mean the same thing. Statistics are always
  computed in float32.

  Under a sharded batch the mean is over the *global* batch (XLA inserts the cross-device
  reduction) unless `group_size` > 0: then each consecutive group of `group_size` examples is
  normalized with its own statistics, like the reference's per-GPU BatchNorm. With groups aligned
  to the per-device batch this needs no communication in the forward pass. Running statistics
  are updated with the mean of the group statistics.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  group_size: int = 0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    dtype = self.dtype or x.dtype
    if not train:
      mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      add = bias - ra_mean.value * mul
      return (x.astype(jnp.float32) * mul + add).astype(dtype)

    batch = x.shape[0]
    group = self.group_size or batch
    if batch % group:
      raise ValueError(f'BatchNorm group_size={group} does not divide the batch of {batch}.')
    xg = x.reshape((batch // group, group) + x.shape[1:])
    y, mean, var = lean_vjp.normalize(xg, scale, bias, tuple(range(1, xg.ndim - 1)), self.epsilon)
    if not self.is_initializing():
      n = xg.size // (xg.shape[0] * c)
      unbiased = var.mean(0).reshape(c) * (n / max(n - 1, 1))
      ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean.mean(0).reshape(c)
      ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    return y.reshape(x.shape).astype(dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with `scale`/`bias`, statistics in float32."""
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y, _, _ = lean_vjp.normalize(materialize_on_cpu(x), scale, bias, (-1,), self.epsilon)
    return y.astype(self.dtype or x.dtype)


class ConvBN(nn.Module):
  """timm ConvNormAct without activation: bias-free conv followed by BatchNorm."""
  features: int
  kernel_size: KernelSize
  stride: int = 1
  groups: int = 1
  padding: Optional[Sequence[int]] = None
  opts: Options = Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Conv(features=self.features, kernel_size=self.kernel_size, stride=self.stride,
             groups=self.groups, use_bias=False, padding=self.padding, dtype=self.opts.dtype,
             name='conv')(x)
    return BatchNorm(group_size=self.opts.bn_group_size, dtype=self.opts.dtype, name='bn')(x, train)


class LayerScale(nn.Module):
  """Per-channel residual-branch scale `gamma` (init 1e-5 in MobileCLIP), on the last axis."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class SqueezeExcite(nn.Module):
  """timm SEModule: spatial mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""
  rd_ratio: float = 1 / 16
  rd_divisor: int = 8
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    rd = make_divisible(c * self.rd_ratio, self.rd_divisor)
    s = x.astype(jnp.float32).mean((1, 2), keepdims=True).astype(x.dtype)
    s = nn.relu(Conv(features=rd, kernel_size=1, dtype=self.dtype, name='fc1')(s))
    s = Conv(features=c, kernel_size=1, dtype=self.dtype, name='fc2')(s)
    return x * jax.nn.sigmoid(s)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [C_in, features], bias [features]) through `lean_vjp.dense`;
  with `gelu_input`, of gelu(x) through `lean_vjp.gelu_dense` (x kept, gelu(x) recomputed)."""
  features: int
  use_bias: bool = True
  kernel_init: Any = trunc_normal_02
  dtype: Optional[Dtype] = None
  gelu_input: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    fn = lean_vjp.gelu_dense if self.gelu_input else lean_vjp.dense
    return fn(*nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype))


class Mlp(nn.Module):
  """Transformer MLP: Dense(hidden) -> act -> Dense(C). [..., C] -> [..., C]."""
  hidden: int
  act: str = 'gelu'
  fc1_init: Any = trunc_normal_02
  fc2_init: Any = trunc_normal_02
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(Dense, dtype=self.dtype)
    y = dense(self.hidden, kernel_init=self.fc1_init, name='fc1')(x)
    if self.act == 'gelu':
      return dense(x.shape[-1], kernel_init=self.fc2_init, gelu_input=True, name='fc2')(y)
    return dense(x.shape[-1], kernel_init=self.fc2_init, name='fc2')(ACTIVATIONS[self.act](y))


class DropPath(nn.Module):
  """Stochastic depth per example (timm DropPath); needs the 'dropout' rng when active."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)

"""The reparameterizable blocks of the MCi image towers and the MCt text tower (NHWC).

MobileOne blocks, RepMixer and the FastViT ConvFFN, with timm's module and parameter names. Each
has a train-time multi-branch form and, with `reparameterized=True`, the single-conv inference
form that `mobileclip_jax.models.reparam` produces from the train-time parameters; in eval mode
the train-time form folds its branches the same way on the fly (`folded`).
"""
import contextlib
import contextvars
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileclip_jax.models import layers
from mobileclip_jax.models import reparam

_BRANCHES_IN_EVAL = contextvars.ContextVar('mobileclip_jax_branches_in_eval', default=False)


def _computed_once(a: jax.Array) -> jax.Array:
  """a, computed into its own buffer on CPU (a reduction); a itself elsewhere.

  XLA:CPU fuses cheap elementwise producers into every consumer, and its optimization barriers
  are gone before fusion: a folded kernel was recomputed for every output pixel of the taps
  (S0's train-time eval forward at batch 1, 256 px: 27.7 ms, the reparameterized tower 22.2). A
  reduction is not fused into its consumers (25.7 against 21.9 ms); the sum with zeros is exact.
  """
  return layers.per_platform(a, cpu=lambda a: jnp.stack([a, jnp.zeros_like(a)]).sum(0),
                             default=lambda a: a)


@contextlib.contextmanager
def branches_in_eval():
  """While active (tracing), train-time blocks run their branch modules in eval mode too.

  For code that acts on those modules' calls (the inheritance masks' method interceptor gates
  the inputs of branch convs): `folded` would skip them.
  """
  token = _BRANCHES_IN_EVAL.set(True)
  try:
    yield
  finally:
    _BRANCHES_IN_EVAL.reset(token)


def folded(module: nn.Module, train: bool) -> Optional[dict]:
  """A reparameterizable block's inference-form params, folded from its own train-time variables.

  In eval mode only (`reparam.fold_block`, with the BatchNorm running statistics): the train-time
  model then evaluates (zero-shot evaluation during training, train-time checkpoints) with one
  conv per block, at the reparameterized model's cost, instead of one per branch. None while
  training (batch statistics), at init (the branches create the variables), in the
  reparameterized form (nothing to fold) and under `branches_in_eval`.
  """
  if (train or module.is_initializing() or module.opts.reparameterized
      or _BRANCHES_IN_EVAL.get()):
    return None
  variables = module.variables
  fold = reparam.fold_block(dict(variables['params']), dict(variables.get('batch_stats', {})))
  return jax.tree.map(_computed_once, fold)


class MobileOneBlock(nn.Module):
  """MobileOne block: act(SE(sum of branches)).

  Train-time branches: `conv_kxk_{i}` (k x k conv+BN, `num_conv_branches` of them), `conv_scale`
  (1x1 conv+BN, when the kernel is larger than 1 and `use_scale_branch`), `identity` (BN only,
  when shapes are preserved). Inference form: one `reparam_conv` with bias.
  x: [B, H, W, C_in] -> [B, H/stride, W/stride, features].
  """
  features: int
  kernel_size: layers.KernelSize
  stride: int = 1
  groups: int = 1
  use_se: bool = False
  use_act: bool = True
  use_scale_branch: bool = True
  num_conv_branches: int = 1
  padding: Optional[Sequence[int]] = None
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    spec = dict(features=self.features, kernel_size=self.kernel_size, stride=self.stride,
                groups=self.groups, padding=self.padding)
    fold = folded(self, train)
    if self.opts.reparameterized:
      out = layers.Conv(use_bias=True, dtype=self.opts.dtype, name='reparam_conv', **spec)(x)
    elif fold:  # Eval: the branches' sum as one conv.
      out = layers.conv(x, **fold['reparam_conv'], stride=self.stride, groups=self.groups,
                 padding=self.padding, dtype=self.opts.dtype)
    else:
      out = 0
      if self.features == x.shape[-1] and self.stride == 1:
        out = layers.BatchNorm(group_size=self.opts.bn_group_size, dtype=self.opts.dtype,
                        name='identity')(x, train)
      if max(layers.pair(self.kernel_size)) > 1 and self.use_scale_branch:
        scale = dict(spec, kernel_size=1, padding=None)
        out = out + layers.ConvBN(opts=self.opts, name='conv_scale', **scale)(x, train)
      for i in range(self.num_conv_branches):
        out = out + layers.ConvBN(opts=self.opts, name=f'conv_kxk_{i}', **spec)(x, train)
    if self.use_se:
      out = layers.SqueezeExcite(rd_divisor=1, dtype=self.opts.dtype, name='se')(out)
    return layers.gelu(out) if self.use_act else out


class RepMixer(nn.Module):
  """FastViT token mixer: x + gamma * (MobileOne_dw(x) - BN(x)); inference form: one dw conv.

  `kernel_size` is 3 (3x3) in MCi and (1, 11) in MCt, which runs it on [B, 1, L, D].
  The text variant of Apple's code has no 1x1 scale branch (`use_scale_branch=False`).
  """
  kernel_size: layers.KernelSize = 3
  use_scale_branch: bool = True
  layer_scale_init: float = 1e-5
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    pad = tuple(k // 2 for k in layers.pair(self.kernel_size))
    if self.opts.reparameterized:
      return layers.Conv(features=c, kernel_size=self.kernel_size, groups=c, padding=pad,
                         dtype=self.opts.dtype, name='reparam_conv')(x)
    fold = folded(self, train)
    if fold:  # Eval: x + gamma * (mixer - norm) as one conv.
      return layers.conv(x, **fold['reparam_conv'], groups=c, padding=pad, dtype=self.opts.dtype)
    common = dict(features=c, kernel_size=self.kernel_size, groups=c, use_act=False, padding=pad,
                  opts=self.opts)
    mixed = MobileOneBlock(use_scale_branch=self.use_scale_branch, name='mixer', **common)(x, train)
    normed = MobileOneBlock(use_scale_branch=False, num_conv_branches=0, name='norm',
                            **common)(x, train)
    return x + layers.LayerScale(init_value=self.layer_scale_init, name='layer_scale')(mixed - normed)


class ConvMlp(nn.Module):
  """FastViT ConvFFN: dw conv+BN -> 1x1 conv (ratio x) -> GELU -> 1x1 conv. No pre-norm."""
  hidden: int
  kernel_size: layers.KernelSize = 7
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    pad = tuple(k // 2 for k in layers.pair(self.kernel_size))
    x = layers.ConvBN(features=c, kernel_size=self.kernel_size, groups=c, padding=pad,
                      opts=self.opts, name='conv')(x, train)
    dense = dict(kernel_size=1, kernel_init=layers.trunc_normal_02, dtype=self.opts.dtype)
    x = layers.Conv(features=self.hidden, name='fc1', **dense)(x)
    return layers.Conv(features=c, gelu_input=True, name='fc2', **dense)(x)


class RepMixerBlock(nn.Module):
  """MetaFormer block with RepMixer: x = RepMixer(x); x = x + gamma * ConvMlp(x)."""
  mlp_ratio: float = 3.0
  kernel_size: layers.KernelSize = 3
  mlp_kernel_size: layers.KernelSize = 7
  use_scale_branch: bool = True
  layer_scale_init: float = 1e-5
  opts: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = RepMixer(kernel_size=self.kernel_size, use_scale_branch=self.use_scale_branch,
                 layer_scale_init=self.layer_scale_init, opts=self.opts,
                 name='token_mixer')(x, train)
    y = ConvMlp(hidden=int(x.shape[-1] * self.mlp_ratio), kernel_size=self.mlp_kernel_size,
                opts=self.opts, name='mlp')(x, train)
    return x + layers.LayerScale(init_value=self.layer_scale_init, name='layer_scale')(y)

"""Structural reparameterization: train-time variables -> inference-form variables.

A pure function over parameter trees: every MobileOne block, RepMixer, large-kernel downsample
and RepCPE (image towers and the MCt text tower) is folded into a single conv `reparam_conv` with
bias, exactly as timm's / Apple's `reparameterize()` methods do, using the BatchNorm running
statistics. The result is the variable tree of the same model built with
`reparameterized=True`. Blocks are recognized by their parameter names (`conv_kxk_0`,
`identity`, `mixer`/`norm`, `large_conv`, `pos_enc`).
"""
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

Tree = Dict[str, Any]
BN_EPS = 1e-5


def _bn_affine(bn: Tree, stats: Tree):
  """Eval-mode BN as y = x * t + shift (per output channel)."""
  t = bn['scale'] / jnp.sqrt(stats['var'] + BN_EPS)
  return t, bn['bias'] - stats['mean'] * t


def _fuse_conv_bn(conv_bn: Tree, stats: Tree):
  """Folds a ConvBN's BN into its conv (HWIO kernel): (kernel, bias)."""
  t, shift = _bn_affine(conv_bn['bn'], stats['bn'])
  return conv_bn['conv']['kernel'] * t, shift


def _identity_kernel(kh: int, kw: int, in_per_group: int, channels: int) -> jnp.ndarray:
  """HWIO kernel of a grouped conv that maps x to x (one-hot at the centre tap)."""
  k = np.zeros((kh, kw, in_per_group, channels), np.float32)
  k[kh // 2, kw // 2, np.arange(channels) % in_per_group, np.arange(channels)] = 1.0
  return jnp.asarray(k)


def _pad_to(kernel: jnp.ndarray, kh: int, kw: int) -> jnp.ndarray:
  ph, pw = (kh - kernel.shape[0]) // 2, (kw - kernel.shape[1]) // 2
  return jnp.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def _mobileone_kernel_bias(p: Tree, s: Tree, shape: Tuple[int, int, int, int]):
  """Sum of a MobileOne block's branches as one (kernel, bias); shape = (kh, kw, in/g, out)."""
  kh, kw, in_per_group, out = shape
  kernel, bias = jnp.zeros(shape, jnp.float32), jnp.zeros((out,), jnp.float32)
  for name in p:
    if name.startswith('conv_kxk_') or name == 'conv_scale':
      k, b = _fuse_conv_bn(p[name], s[name])
      kernel, bias = kernel + _pad_to(k, kh, kw), bias + b
  if 'identity' in p:
    t, b = _bn_affine(p['identity'], s['identity'])
    kernel = kernel + _identity_kernel(kh, kw, in_per_group, out) * t
    bias = bias + b
  return kernel, bias


def fold_block(p: Tree, s: Tree) -> Optional[Tree]:
  """The inference-form params of one reparameterizable block, or None if `p` is not one.

  p, s: the block's train-time params and running statistics (its own subtrees).
  """
  if 'mixer' in p and 'norm' in p and 'layer_scale' in p:  # RepMixer.
    shape = p['mixer']['conv_kxk_0']['conv']['kernel'].shape
    wm, bm = _mobileone_kernel_bias(p['mixer'], s['mixer'], shape)
    wn, bn = _mobileone_kernel_bias(p['norm'], s['norm'], shape)
    gamma = p['layer_scale']['gamma']
    kernel = _identity_kernel(*shape) + gamma * (wm - wn)
    return {'reparam_conv': {'kernel': kernel, 'bias': gamma * (bm - bn)}}
  if 'large_conv' in p:  # ReparamLargeKernelConv.
    k, b = _fuse_conv_bn(p['large_conv'], s['large_conv'])
    ks, bs = _fuse_conv_bn(p['small_conv'], s['small_conv'])
    out = {'reparam_conv': {'kernel': k + _pad_to(ks, *k.shape[:2]), 'bias': b + bs}}
  elif 'pos_enc' in p:  # RepCPE.
    k = p['pos_enc']['kernel']
    return {'reparam_conv': {'kernel': k + _identity_kernel(*k.shape), 'bias': p['pos_enc']['bias']}}
  elif 'conv_kxk_0' in p:  # MobileOne block.
    kernel_shape = p['conv_kxk_0']['conv']['kernel'].shape
    k, b = _mobileone_kernel_bias(p, s, kernel_shape)
    out = {'reparam_conv': {'kernel': k, 'bias': b}}
  else:
    return None
  if 'se' in p:
    out['se'] = p['se']
  return out


def _walk(p: Tree, s: Tree) -> Tuple[Tree, Tree]:
  fused = fold_block(p, s)
  if fused is not None:
    return fused, {}
  params, stats = {}, {}
  for name, child in p.items():
    if isinstance(child, dict):
      params[name], child_stats = _walk(child, s.get(name, {}))
      if child_stats:
        stats[name] = child_stats
    else:
      params[name] = child
  # The running statistics of BatchNorms outside fused blocks stay.
  stats.update({k: v for k, v in s.items() if not isinstance(v, dict)})
  return params, stats


def is_reparameterized(variables: Tree) -> bool:
  """Whether variables are in the inference form (hold a fused `reparam_conv`)."""
  def walk(tree) -> bool:
    return isinstance(tree, dict) and ('reparam_conv' in tree or any(
        walk(child) for child in tree.values()))
  return walk(dict(variables.get('params', {})))


def reparameterize(variables: Tree) -> Tree:
  """Train-time {'params', 'batch_stats'} -> the inference form's {'params', 'batch_stats'}.

  Folds with the running statistics, so the result equals the train-time model in eval mode
  (up to float rounding). Pure: the input is not modified.
  """
  params, stats = _walk(dict(variables['params']), dict(variables.get('batch_stats', {})))
  out = {'params': params}
  if stats:
    out['batch_stats'] = stats
  return out

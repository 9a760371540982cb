"""The PyTorch reference models (open_clip + timm) with non-trivial weights, for parity tests.

With the default init BatchNorm is the identity and layer scales are 1e-5, so the residual
branches barely contribute and a buggy port could still match; `perturb_` makes every BN
statistic/affine, LayerNorm affine and layer scale non-trivial from a seeded generator.
"""
import copy
from typing import Dict, Tuple

import numpy as np
import pytest

torch = pytest.importorskip('torch')
from mobileclip_jax import torch_compat  # noqa: E402

open_clip = torch_compat.import_open_clip()
timm = torch_compat.import_timm()


def perturb_(model, gen) -> None:
  """Seeded non-trivial BN stats/affines, LayerNorm affines and layer-scale gammas (in place)."""
  def uniform(t, lo, hi):
    return torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.running_mean.copy_(uniform(module.running_mean, -0.1, 0.1))
        module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
        module.weight.copy_(uniform(module.weight, 0.5, 1.5))
        module.bias.copy_(uniform(module.bias, -0.1, 0.1))
      elif isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == 'LayerNorm2d':
        module.weight.copy_(uniform(module.weight, 0.5, 1.5))
        module.bias.copy_(uniform(module.bias, -0.1, 0.1))
    for name, p in model.named_parameters():
      if name.endswith('.gamma'):
        p.copy_(uniform(p, 0.1, 0.5))


def reference_model(name: str, seed: int = 0):
  """open_clip `name` with random, perturbed weights in eval mode, and its generator."""
  torch.manual_seed(seed)
  model = open_clip.create_model(name, pretrained=None)
  gen = torch.Generator().manual_seed(seed + 1)
  perturb_(model, gen)
  return model.eval(), gen


def state_dict_numpy(module) -> Dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def reference_inputs(name: str, model, gen, batch: int = 2) -> Tuple[np.ndarray, np.ndarray]:
  """Random normalized images NCHW float32 and open_clip tokens [B, 77] for `model`."""
  size = model.visual.image_size
  size = size[0] if isinstance(size, (tuple, list)) else size
  images = torch.randn(batch, 3, size, size, generator=gen)
  texts = ['a photo of a cat', 'two dogs playing in the snow', 'a diagram on a whiteboard',
           'an empty street at night'] * batch
  tokens = open_clip.get_tokenizer(name)(texts[:batch])
  return images.numpy(), tokens.numpy().astype(np.int32)


def train_mode_copy(model):
  return copy.deepcopy(model).train()


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(images_nchw: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))

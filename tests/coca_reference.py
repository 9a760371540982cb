"""open_clip CoCa models with random, non-trivial weights for the CoCa and decoding parity tests.

open_clip leaves the decoder's output projection uninitialized (torch.empty: near-zero memory
garbage) and all attention biases at zero; `randomize_` draws every weight, so that a port with
a misplaced bias, a swapped projection or a wrong mask cannot match, and so that greedy decoding
of a tiny model changes token from step to step and sometimes ends early.
"""
import math

import numpy as np

import torch_reference as tr

torch = tr.torch
open_clip = tr.open_clip

# A tiny CoCa (vocabulary of 64: SOT 62, EOT 63, pad 0), as open_clip's constructor arguments and
# as mobileclip_jax overrides of coca_ViT-B-32.
TINY_OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=16,
                    attentional_pool=True, attn_pooler_queries=9, attn_pooler_heads=4,
                    output_tokens=True),
    text_cfg=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2, embed_cls=True,
                  output_tokens=True),
    multimodal_cfg=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2))
TINY = dict(embed_dim=32, image_size=32,
            image=dict(width=48, depth=2, heads=3, patch_size=8, attn_pool_queries=9,
                       attn_pool_heads=4),
            text=dict(context_length=12, vocab_size=64, width=32, heads=4, layers=2),
            decoder=dict(context_length=12, width=32, heads=4, layers=2))
BASE = 'coca_ViT-B-32'
SOT, EOT = 62, 63


def randomize_(model, gen, logit_scale: float = 4.0) -> None:
  """Every parameter drawn from `gen`: matrices N(0, 1/fan_in) (output projections x logit_scale),
  embeddings and queries N(0, 1), LayerNorm scales U(0.5, 1.5), biases N(0, 0.1)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(('text_projection', 'visual.proj')):  # Raw [in, out] matrices.
        p.copy_(torch.randn(p.shape, generator=gen) * logit_scale / math.sqrt(p.shape[0]))
      elif 'embedding' in name or name.endswith(('cls_emb', 'query')):
        p.copy_(torch.randn(p.shape, generator=gen))
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
      elif name.endswith('weight'):  # LayerNorm scales.
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def tiny_coca(seed: int, eot_scale: float = 2.0):
  """(open_clip tiny CoCa with random weights in eval mode, its generator).

  The decoder's EOT column is scaled by `eot_scale` so that greedy and beam decoding end at
  varied lengths rather than almost always at the forced last position.
  """
  torch.manual_seed(seed)
  model = open_clip.CoCa(**TINY_OPEN_CLIP)
  gen = torch.Generator().manual_seed(seed + 1)
  randomize_(model, gen)
  with torch.no_grad():
    model.text_decoder.text_projection[:, EOT] *= eot_scale
  return model.eval(), gen


def tiny_tokens(gen, batch: int = 4, context: int = 12) -> np.ndarray:
  """Token rows [B, context] of the tiny vocabulary: SOT, ids, EOT at varied places, padding."""
  tokens = torch.randint(1, SOT, (batch, context), generator=gen)
  tokens[:, 0] = SOT
  for row in range(batch):
    end = 3 + (row * 4) % (context - 3)
    tokens[row, end] = EOT
    tokens[row, end + 1:] = 0
  return tokens.numpy().astype(np.int32)


def images(gen, batch: int, size: int) -> np.ndarray:
  """Random normalized images, NCHW float32."""
  return torch.randn(batch, 3, size, size, generator=gen).numpy()

"""The PyTorch side of `launch/benchmark.py train`: the same DR step in open_clip + timm.

The reference loss (`torch_dr_loss`) is written from the formulas of `mobileclip_jax.losses`;
`measure_torch` builds the model, writes the weights and batch that the JAX side loads, and times
the step (see benchmark/train.py for the method). Runs in its own process.
"""
import math
import os
import time
from typing import Any, Dict, Sequence

import numpy as np

from mobileclip_jax.benchmark import common
from mobileclip_jax.benchmark import train as train_benchmark
# pylint: disable=protected-access
_randomize_normalization_ = train_benchmark._randomize_normalization_
_timed_steps = train_benchmark._timed_steps
_weights_path, _batch_path = train_benchmark._weights_path, train_benchmark._batch_path
# pylint: enable=protected-access
TEACHER_DIMS, LOSS_TERMS = train_benchmark.TEACHER_DIMS, train_benchmark.LOSS_TERMS
DEFAULT_VARIANTS = train_benchmark.DEFAULTS['accelerator']['variants']
_CAPTIONS = ('a photo of a cat', 'two dogs playing in the snow on a sunny winter morning',
             'a diagram on a whiteboard', 'an empty street at night, wet with rain',
             'a bowl of fruit', 'a red bicycle leaning against a brick wall next to a door',
             'mountains', 'a close-up of a hand holding a small green frog')
_SYN_CAPTIONS = ('a tabby cat sitting on a wooden floor next to a window',
                 'two dogs running through deep snow', 'a whiteboard with a hand-drawn diagram',
                 'a city street at night with wet pavement reflecting lights',
                 'a white bowl filled with apples, bananas and oranges',
                 'a red bike parked against a brick wall', 'snow-capped mountains under a blue sky',
                 'a person holding a tiny green frog in the palm of a hand')


# ---------------------------------------------------------------- the PyTorch reference loss


def torch_dr_loss(image_emb, text_emb, syn_text_emb, teacher_image_emb, teacher_text_emb,
                  teacher_syn_text_emb, logit_scale, *, teacher_scales: Sequence[float],
                  teacher_dims: Sequence[int], clip_weight: float, distill_weight: float,
                  gt_weight: float, syn_weight: float):
  """The DR objective in PyTorch (softmax kind, teachers averaged after softmax).

  Written from the formulas of `mobileclip_jax.losses` (Apple's `DRClipLoss`): per caption kind,
  clip_weight * CLIP + distill_weight * KD, summed over kinds with their weights.
  CLIP = (CE(s U V^T, I) + CE(s V U^T, I)) / 2 with U, V the L2-normalized student image / text
  rows and s = exp(logit_scale) (the parameter is clamped to [0, log 100] after every step).
  KD = half the sum over directions of -mean_i sum_j P_ij log softmax_j(student logits)_ij, with
  P = (1/K) sum_k softmax_j(tau_k T^k_a T^k_b^T) from each teacher's L2-normalized slice.

  Args:
    image_emb: [B, E] float32 student image embeddings, not normalized.
    text_emb: [B, E] student embeddings of the ground-truth captions.
    syn_text_emb: [B, E] student embeddings of the synthetic captions.
    teacher_image_emb: [B, sum(teacher_dims)] concatenated teacher image embeddings.
    teacher_text_emb: [B, sum(teacher_dims)] teacher embeddings of the ground-truth captions.
    teacher_syn_text_emb: [B, sum(teacher_dims)] teacher embeddings of the synthetic captions.
    logit_scale: [] learned log logit scale.
    teacher_scales: K teacher logit scales tau_k (not logs).
    teacher_dims: K teacher embedding widths.
    clip_weight, distill_weight: weights of the two terms in each caption kind's loss.
    gt_weight, syn_weight: weights of the caption kinds in the total.

  Returns:
    (total [] tensor, {'gt/clip', 'gt/distill', 'syn/clip', 'syn/distill': [] tensors}).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def teacher_slices(x):
    return [F.normalize(s, dim=-1) for s in torch.split(x, list(teacher_dims), dim=-1)]

  def soft_cross_entropy(targets, logits):
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

  scale = logit_scale.exp()
  image = F.normalize(image_emb, dim=-1)
  teacher_image = teacher_slices(teacher_image_emb)
  labels = torch.arange(image.shape[0], device=image.device)
  total, terms = 0.0, {}
  kinds = (('gt', text_emb, teacher_text_emb, gt_weight),
           ('syn', syn_text_emb, teacher_syn_text_emb, syn_weight))
  for kind, text_emb_k, teacher_text_k, kind_weight in kinds:
    logits_per_image = scale * image @ F.normalize(text_emb_k, dim=-1).T
    logits_per_text = logits_per_image.T
    clip = (F.cross_entropy(logits_per_image, labels) +
            F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():  # The stored teacher embeddings are data.
      teacher_logits = [tau * a @ b.T for tau, a, b in
                        zip(teacher_scales, teacher_image, teacher_slices(teacher_text_k))]
      probs_per_image = sum(F.softmax(t, dim=1) for t in teacher_logits) / len(teacher_logits)
      probs_per_text = sum(F.softmax(t.T, dim=1) for t in teacher_logits) / len(teacher_logits)
    distill = (soft_cross_entropy(probs_per_image, logits_per_image) +
               soft_cross_entropy(probs_per_text, logits_per_text)) / 2
    terms[f'{kind}/clip'], terms[f'{kind}/distill'] = clip, distill
    total = total + kind_weight * (clip_weight * clip + distill_weight * distill)
  return total, terms


# ---------------------------------------------------------------- torch side (own processes)


def _torch_model(variant: str, overrides: Dict[str, Any]):
  """`open_clip.create_model(variant)` (random init) with `overrides` in open_clip's terms."""
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  cfg = open_clip.get_model_config(variant)
  if cfg is None:
    raise ValueError(f'open_clip has no model config {variant!r}; the train benchmark compares '
                     f'variants both frameworks build, e.g. {", ".join(DEFAULT_VARIANTS)}.')
  vision_cfg = dict(cfg['vision_cfg'])
  if 'image_size' in overrides:
    vision_cfg['image_size'] = overrides['image_size']
  vit = overrides.get('image', {})
  if vit:
    vision_cfg.update({k: vit[j] for j, k in (('width', 'width'), ('depth', 'layers'),
                                              ('patch_size', 'patch_size')) if j in vit})
    if 'heads' in vit:
      vision_cfg['head_width'] = vision_cfg['width'] // vit['heads']
  kwargs = dict(vision_cfg=vision_cfg, text_cfg=dict(cfg['text_cfg'], **overrides.get('text', {})))
  if 'embed_dim' in overrides:
    kwargs['embed_dim'] = overrides['embed_dim']
  return open_clip.create_model(variant, pretrained=None, **kwargs)


def _write_reference(model, variant: str, batch: int, image_size: int, workdir: str,
                     seed: int) -> None:
  """Gives `model` seeded non-trivial normalization; writes `weights.npz` and `batch.npz`.

  weights.npz: the whole model's state_dict. batch.npz: image uint8 [batch, S, S, 3]; text,
  syn_text int32 [batch, L] (open_clip's tokenizer); teacher_image_emb, teacher_text_emb,
  teacher_syn_text_emb float32 [batch, sum(TEACHER_DIMS)], each teacher's slice a unit vector.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  _randomize_normalization_(model, torch.Generator().manual_seed(seed + 1))
  np.savez(_weights_path(workdir), **{k: v.numpy() for k, v in model.state_dict().items()})
  rng = np.random.default_rng(seed)
  tokenizer = open_clip.get_tokenizer(variant)

  def tokens(captions):
    return tokenizer([captions[i % len(captions)] for i in range(batch)]).numpy().astype(np.int32)

  def unit_slices(x):
    parts = np.split(x, np.cumsum(TEACHER_DIMS)[:-1], axis=-1)
    return np.concatenate([p / np.linalg.norm(p, axis=-1, keepdims=True) for p in parts], -1)

  # Caption embeddings near their image's, so that the teacher targets peak like real ones.
  teacher_image = unit_slices(rng.standard_normal((batch, sum(TEACHER_DIMS))))
  near_image = lambda: unit_slices(teacher_image + rng.standard_normal(teacher_image.shape))
  np.savez(_batch_path(workdir),
           image=rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
           text=tokens(_CAPTIONS), syn_text=tokens(_SYN_CAPTIONS),
           teacher_image_emb=teacher_image.astype(np.float32),
           teacher_text_emb=near_image().astype(np.float32),
           teacher_syn_text_emb=near_image().astype(np.float32))


def measure_torch(variant: str, overrides: Dict[str, Any], batch: int, image_size: int,
                  recipe: Dict[str, Any], mean: Sequence[float], std: Sequence[float],
                  workdir: str, seed: int, warmup: int, repeats: int, max_others_cpu: float,
                  attempts: int, mode: str, dtype: str, write_reference: bool) -> Dict[str, Any]:
  """Builds the model, runs the DR step in PyTorch; returns first-step values, timings, memory.

  write_reference: write the weights and batch (`_write_reference`); else read them from there.
  mode: 'eager', or 'compile' (`torch.compile(model)`, as open_clip_train's --torchcompile; the
  first step, which compiles, is timed as `compile_s`). dtype 'bfloat16': the forward pass and
  the loss under `torch.autocast` (open_clip_train's --precision amp_bf16).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  torch_compat.import_open_clip()  # Makes open_clip_train importable.
  from open_clip_train import scheduler as scheduler_lib  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':  # As open_clip_train's main() sets them.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  torch.manual_seed(seed)
  model = _torch_model(variant, overrides)
  if write_reference:
    _write_reference(model, variant, batch, image_size, workdir, seed)
  else:
    with np.load(_weights_path(workdir)) as weights:
      model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
  parameters = sum(p.numel() for p in model.parameters())
  model = model.to(device).train()
  forward = torch.compile(model) if mode == 'compile' else model
  autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=dtype == 'bfloat16')
  with np.load(_batch_path(workdir)) as data:
    inputs = {k: torch.from_numpy(data[k]).to(device) for k in data.files}
  num_examples = inputs['image'].shape[0]
  tokens = torch.cat([inputs['text'], inputs['syn_text']]).long()  # [gt; syn]: one text pass.
  mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
  std = torch.tensor(std, device=device).view(1, 3, 1, 1)

  # open_clip_train main(): no weight decay for gains, biases and the logit scale.
  exclude = lambda n, p: p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n or 'logit_scale' in n
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
      [{'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0},
       {'params': [p for n, p in named if not exclude(n, p)],
        'weight_decay': recipe['weight_decay']}],
      lr=recipe['lr'], betas=(recipe['b1'], recipe['b2']), eps=recipe['eps'])
  schedule = scheduler_lib.cosine_lr(optimizer, recipe['lr'], recipe['warmup_steps'],
                                     recipe['total_steps'])
  count = [0]

  def train_step():
    schedule(count[0])
    optimizer.zero_grad()
    # NCHW contiguous, as open_clip's data pipeline hands them over (torch's CPU backward of
    # these convolutions crashes on the channels-last strides that the permute leaves).
    images = (inputs['image'].permute(0, 3, 1, 2).contiguous().float() / 255 - mean) / std
    with autocast():
      # open_clip's forward (what torch.compile compiles): unit embeddings of both towers.
      image_emb, text_emb = forward(images, tokens)[:2]
      gt_emb, syn_emb = text_emb.split(num_examples)
      loss, terms = torch_dr_loss(
          image_emb, gt_emb, syn_emb, inputs['teacher_image_emb'], inputs['teacher_text_emb'],
          inputs['teacher_syn_text_emb'], model.logit_scale, teacher_dims=TEACHER_DIMS,
          **recipe['loss'])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe['grad_clip'])
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    if device.type == 'cuda':
      torch.cuda.synchronize()
    count[0] += 1
    return loss, terms, grad_norm

  start = time.perf_counter()
  loss, terms, grad_norm = train_step()
  first_step_s = time.perf_counter() - start
  first = {'loss': loss.item(), 'grad_norm': grad_norm.item(),
           **{k: v.item() for k, v in terms.items()}}
  result = _timed_steps(train_step, warmup, repeats, max_others_cpu, attempts)
  result['first_step'] = first
  if mode == 'compile':
    result['compile_s'] = round(first_step_s, 3)
  result['parameters'] = parameters
  result.update(common.torch_process_fields(device))
  return result



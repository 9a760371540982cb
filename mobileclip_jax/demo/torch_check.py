"""The demo's export: the DR student in open_clip's names, loaded by open_clip and compared.

The JAX side runs the exported checkpoint; the PyTorch side is open_clip's own model (timm trunk
at the student's sizes) with the exported state_dict loaded strictly, fed by open_clip's own eval
transform and tokenizer.
"""
import json
import os
from typing import Any, Dict

import numpy as np

from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import utils
from mobileclip_jax.demo import captions
from mobileclip_jax.demo import samples


def timm_fastvit_kwargs(image: Any) -> Dict[str, Any]:
  """Keyword arguments of timm's `fastvit_mci0` that build the MCi tower `image` at its sizes.

  open_clip builds timm towers by registered name only (`fastvit_mci0..4` are the released
  sizes), so a reduced MCi is built as `timm.create_model('fastvit_mci0', **these)`: timm's own
  FastVit with the depths, widths and blocks of `image`.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  fastvit = torch_compat.import_timm().models.fastvit
  if image.attn_norm != 'batchnorm' or image.head_dim != 32:
    raise ValueError('timm_fastvit_kwargs covers MCi0-2 style towers (BatchNorm before attention, '
                     f'32-wide heads); got attn_norm={image.attn_norm!r}, '
                     f'head_dim={image.head_dim}.')
  n = len(image.depths)
  cpe = functools.partial(fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
  return dict(layers=tuple(image.depths), embed_dims=tuple(image.widths),
              # timm downsamples stage i if downsamples[i] or the width changes; the Flax MCi
              # only if the width changes.
              mlp_ratios=(image.mlp_ratio,) * n, downsamples=(False,) * n,
              se_downsamples=tuple(image.se_downsample), token_mixers=tuple(image.token_mixers),
              pos_embs=tuple(cpe if p else None for p in image.pos_emb), lkc_use_act=True,
              stem_use_scale_branch=image.stem_scale_branch, cls_ratio=image.final_ratio,
              layer_scale_init_value=image.layer_scale_init)


def check_open_clip(weights: str, checkpoint_dir: str, num_images: int = 16) -> Dict[str, Any]:
  """Loads an open_clip export of a reduced MobileCLIP2-S0 in open_clip; compares with JAX.

  JAX runs the weights of `checkpoint_dir` (what was exported), PyTorch those of `weights`.

  The PyTorch model is open_clip's `CustomTextCLIP` (as for MobileCLIP2-S0) whose timm trunk is
  `fastvit_mci0` built at the export's sizes (`timm_fastvit_kwargs`); the state_dict loads with
  strict=True. Images are demo-world 'val' renders through open_clip's own eval transform (from
  the export's `preprocess_cfg`), captions are tokenized by open_clip's tokenizer.

  Returns:
    {'library', 'image_rel_l2', 'text_rel_l2', 'tokens_equal', 'num_images'}: relative L2
    distances of the unnormalized embeddings, JAX against PyTorch.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  from mobileclip_jax import torch_compat
  from mobileclip_jax.convert import files
  from mobileclip_jax.data import preprocess
  from mobileclip_jax.data import tokenizer as tokenizer_lib
  from mobileclip_jax.models import clip as clip_lib
  # pylint: enable=g-import-not-at-top
  open_clip, timm = torch_compat.import_open_clip(), torch_compat.import_timm()
  config = files.model_config_beside(weights)
  with open(files.sidecar_path(weights, 'open_clip'), encoding='utf-8') as f:
    preprocess_cfg = json.load(f)['preprocess_cfg']
  t = config.text
  model = open_clip.CustomTextCLIP(
      config.embed_dim,
      vision_cfg=dict(timm_model_name='fastvit_mci0', timm_model_pretrained=False,
                      timm_pool='avg', timm_proj=None, image_size=config.image_size),
      text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                    heads=t.heads, layers=t.layers, no_causal_mask=not t.causal))
  model.visual.trunk = timm.create_model('fastvit_mci0', pretrained=False,
                                         num_classes=config.embed_dim, global_pool='avg',
                                         **timm_fastvit_kwargs(config.image))
  state = {k: torch.from_numpy(np.array(v)) for k, v in files.read_state_dict(weights).items()}
  model.load_state_dict(state, strict=True)
  model.eval()

  scenes = [samples.make_sample('val', i, config.image_size, 0) for i in range(num_images)]
  images = [s['image'] for s in scenes]
  captioner, rng = captions.DemoCaptioner(), np.random.default_rng(0)
  texts = [captioner.caption(s['labels'], rng) for s in scenes]
  transform = open_clip.image_transform(
      preprocess_cfg['size'], is_train=False, mean=preprocess_cfg['mean'],
      std=preprocess_cfg['std'], resize_mode=preprocess_cfg['resize_mode'],
      interpolation=preprocess_cfg['interpolation'], fill_color=preprocess_cfg['fill_color'])
  torch_tokens = open_clip.tokenize(texts, context_length=t.context_length)
  with torch.no_grad():
    torch_image = model.encode_image(torch.stack([transform(im) for im in images])).numpy()
    torch_text = model.encode_text(torch_tokens).numpy()

  variables, _ = checkpoint_lib.load_variables(checkpoint_dir)
  jax_model = clip_lib.CLIP(config)
  pixels = preprocess.normalize(
      np.stack([preprocess.resize_center_crop(im, config.image_size, config.interpolation)
                for im in images]), config.mean, config.std)
  tokens = tokenizer_lib.get_tokenizer(config.tokenizer)(texts, t.context_length)
  jax_image = np.asarray(jax.jit(lambda v, x: jax_model.apply(
      v, x, method=jax_model.encode_image))(variables, pixels))
  jax_text = np.asarray(jax.jit(lambda v, x: jax_model.apply(
      v, x, method=jax_model.encode_text))(variables, tokens))
  return {'library': f'open_clip {open_clip.__version__} + timm {timm.__version__}',
          'image_rel_l2': utils.rel_l2(jax_image, torch_image),
          'text_rel_l2': utils.rel_l2(jax_text, torch_text),
          'tokens_equal': bool(np.array_equal(tokens, torch_tokens.numpy())),
          'num_images': num_images}


def export(workdir: str, source: str) -> Dict[str, Any]:
  """The training run `source` in open_clip's names under <workdir>/export, and the PyTorch
  check (cached in export/check.json)."""
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.convert import files
  # pylint: enable=g-import-not-at-top
  directory = os.path.join(workdir, 'export')
  check_path = os.path.join(directory, 'check.json')
  if os.path.exists(check_path):
    with open(check_path, encoding='utf-8') as f:
      return json.load(f)
  weights = os.path.join(directory, 'open_clip_model.safetensors')
  written = files.export_checkpoint(source, weights, fmt='open_clip', overwrite=True)
  result = {'format': 'open_clip', **written}
  try:
    result['check'] = check_open_clip(weights, source)
  except ImportError as e:
    result['check'] = {'skipped': f'PyTorch, open_clip or timm is not installed ({e}).'}
  utils.write_json_atomic(check_path, result)
  return result

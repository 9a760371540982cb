"""Apple's native MobileCLIP v1 checkpoints (`mobileclip_{s0,s1,s2,b}.pt`) <-> Flax variables.

Apple's `ml-mobileclip` names its modules differently from timm / open_clip
(`image_encoder.model.network.{k}` vs `stages.{i}`, `rbr_conv` vs `conv_kxk`, `pre_norm_mha` vs
`ln_1`/`attn`, ...). The table here is the open_clip table of `convert.open_clip` with every
PyTorch key renamed to Apple's and the layout changes composed on top, so it covers exactly the
Flax leaves of the model. It is the inverse of timm's `fastvit.checkpoint_filter_fn` /
`vision_transformer_hybrid._convert_mobileclip` and open_clip's `convert_mobile_clip_state_dict`
(the tests check it against them), extended to S0's MCt text tower and to both directions.

One semantic difference: Apple's image projection (`GlobalPool2D.proj` for MCi,
`SimpleImageProjectionHead.proj` for the ViT) is a bias-free `[in, out]` matrix, while timm's
head is a Linear with bias. Reading sets the bias to zero (as open_clip and timm do); writing
requires it to be zero, because Apple's format cannot hold it.

Only the train-time form exists in Apple's checkpoints (Apple's code reparameterizes after
loading), so reparameterized variables are refused.

MobileCLIP-B: Apple's ViT-B (`mobileclip/models/vit.py`) is not quite timm's `vit_base_mci_224`,
which open_clip's MobileCLIP-B implements: Apple's first 4x4/4 stem conv pads by 1 pixel (timm: 0)
and its LayerNorms use eps 1e-5 (timm: 1e-6); with random weights the two functions differ by a
relative L2 of 0.17 on image embeddings. The weights map one to one; `apple_semantics` gives the
config that computes Apple's function, and importing an Apple checkpoint records it. All four
variants match Apple's own code to 1e-6.
"""
import dataclasses
import functools
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from mobileclip_jax.convert import open_clip as open_clip_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import mci
from mobileclip_jax.models import reparam as reparam_lib


IMAGE_PREFIX = 'image_encoder.model.'
TEXT_PREFIX = 'text_encoder.'
# Apple's model names (`create_model_and_transforms(model_name)`) -> this project's variants.
APPLE_V1_MODELS = {'mobileclip_s0': 'MobileCLIP-S0', 'mobileclip_s1': 'MobileCLIP-S1',
                   'mobileclip_s2': 'MobileCLIP-S2', 'mobileclip_b': 'MobileCLIP-B'}

Rules = List[Tuple[str, str]]

# Pre-norm transformer blocks (Apple's `TransformerEncoder`), from timm's ViT names and from
# open_clip's text-transformer names.
_TIMM_VIT_RULES: Rules = [
    (r'^blocks\.(\d+)\.', r'transformer.\1.'), (r'\.norm1\.', '.pre_norm_mha.0.'),
    (r'\.attn\.qkv\.', '.pre_norm_mha.1.qkv_proj.'),
    (r'\.attn\.proj\.', '.pre_norm_mha.1.out_proj.'),
    (r'\.norm2\.', '.pre_norm_ffn.0.'), (r'\.mlp\.fc1\.', '.pre_norm_ffn.1.'),
    (r'\.mlp\.fc2\.', '.pre_norm_ffn.4.'),
    (r'^patch_embed\.backbone\.(\d)\.bn\.', r'patch_emb.\1.block.norm.'),
    (r'^patch_embed\.backbone\.(\d)\.conv\.', r'patch_emb.\1.block.conv.'),
    (r'^norm\.', 'post_transformer_norm.'), (r'^pos_embed$', 'pos_embed.pos_embed.pos_embed'),
    (r'^head\.weight$', 'classifier.proj'),
]
_OPEN_CLIP_TEXT_RULES: Rules = [
    (r'^transformer\.resblocks\.(\d+)\.', r'transformer.\1.'), (r'\.ln_1\.', '.pre_norm_mha.0.'),
    (r'\.attn\.in_proj_(weight|bias)$', r'.pre_norm_mha.1.qkv_proj.\1'),
    (r'\.attn\.out_proj\.', '.pre_norm_mha.1.out_proj.'), (r'\.ln_2\.', '.pre_norm_ffn.0.'),
    (r'\.mlp\.c_fc\.', '.pre_norm_ffn.1.'), (r'\.mlp\.c_proj\.', '.pre_norm_ffn.4.'),
    (r'^token_embedding\.', 'embedding_layer.'), (r'^ln_final\.', 'final_layer_norm.'),
    (r'^text_projection$', 'projection_layer'),
    (r'^positional_embedding$', 'positional_embedding.pos_embed.pos_embed'),
]
# FastViT (MCi) modules, after the stage -> flat `network` index renames.
_MCI_RULES: Rules = [
    (r'^stem\.', 'patch_embed.'), (r'^final_conv\.se\.fc1\.', 'conv_exp.se.reduce.'),
    (r'^final_conv\.se\.fc2\.', 'conv_exp.se.expand.'), (r'^final_conv\.', 'conv_exp.'),
    (r'\.conv_kxk\.', '.rbr_conv.'), (r'\.conv_scale\.', '.rbr_scale.'),
    (r'\.identity\.', '.rbr_skip.'), (r'\.large_conv\.', '.lkb_origin.'), (r'\.mlp\.', '.convffn.'),
    (r'\.pos_emb\.pos_enc\.', '.pe.'),
    (r'\.downsample\.proj\.', '.proj.'), (r'(layer_scale(?:_\d)?)\.gamma$', r'\1'),
    (r'^head\.fc\.weight$', 'head.proj'),
]
# Keys of timm's image heads that Apple's bias-free projections do not have.
_HEAD_BIASES = ('head.fc.bias', 'head.bias')


def _apply(rules: Rules, key: str) -> str:
  for pattern, replacement in rules:
    key = re.sub(pattern, replacement, key)
  return key


def _mci_network_indices(image: mci.MCiConfig) -> Dict[Tuple[int, str], int]:
  """(stage, part) -> index in Apple's flat `network` list (part: downsample, pos_emb, blocks).

  Apple's FastViT appends per stage: RepCPE (if any), the blocks, then the next stage's
  PatchEmbed; so a stage's downsample precedes its RepCPE and its blocks.
  """
  indices, k = {}, 0
  for i in range(len(image.depths)):
    parts = (['downsample'] if i > 0 and image.widths[i] != image.widths[i - 1] else [])
    parts += (['pos_emb'] if image.pos_emb[i] else []) + ['blocks']
    for part in parts:
      indices[(i, part)] = k
      k += 1
  return indices


def _mci_key(key: str, indices: Dict[Tuple[int, str], int]) -> str:
  def network(m):
    stage, part = int(m.group(1)), m.group(2)
    index = indices[(stage, part)]
    return f'network.{index}.' if part == 'blocks' else f'network.{index}.{part}.'
  key = re.sub(r'^stages\.(\d+)\.(downsample|pos_emb|blocks)\.', network, key)
  return _apply(_MCI_RULES, key)


Transform = Callable[[np.ndarray], np.ndarray]
_TRANSPOSE = (lambda x: x.T, lambda x: x.T)


def _extra_layout(open_clip_key: str, open_clip_shape: Tuple[int, ...]
                  ) -> Optional[Tuple[Transform, Transform]]:
  """Layout change from the open_clip tensor to Apple's (to_apple, to_open_clip), if any."""
  if open_clip_key in ('visual.trunk.head.fc.weight', 'visual.trunk.head.weight'):
    return _TRANSPOSE  # (out, in) Linear weight -> Apple's (in, out) projection matrix.
  if open_clip_key in ('visual.trunk.pos_embed', 'text.positional_embedding'):
    return (lambda x: x.reshape((1, 1) + x.shape[-2:]),  # Apple: [1, 1, N, C].
            lambda x: x.reshape(open_clip_shape))
  return None


def _compose(entry: open_clip_lib.Entry, extra) -> Tuple[Transform, Transform]:
  if extra is None:
    return entry.to_torch, entry.to_flax
  to_apple, from_apple = extra
  return (lambda x: to_apple(entry.to_torch(x)), lambda x: entry.to_flax(from_apple(x)))


def _check_supported(config: clip_lib.ModelConfig) -> None:
  """Raises unless `config` is a model Apple's v1 code can express (train-time)."""
  if config.reparameterized:
    raise ValueError(
        "Apple's v1 checkpoints hold the train-time form (Apple's code reparameterizes after "
        'loading); convert the train-time variables, not the reparameterized ones.')
  image, text = config.image, config.text
  if isinstance(image, mci.MCiConfig):
    image_ok = len(image.depths) == 4 and image.attn_norm == 'batchnorm' and image.stem_scale_branch
  else:
    image_ok = image.stem == 'mci_conv' and not image.embed_class and not image.norm_pre
  text_ok = (config.text_layout in ('open_clip_custom', 'apple_mct') and not text.hybrid_norm
             and text.layer_scale_init is None)
  if not (image_ok and text_ok and config.image_layout == 'timm' and config.attention == 'softmax'
          and not config.qk_norm and config.init_logit_bias is None):
    raise ValueError(
        f"{config.name} (with its overrides) has no counterpart in Apple's v1 code, which has "
        'the towers of MobileCLIP-S0/S1/S2/B (4-stage MCi or the conv-stem ViT; the base or MCt '
        'text transformer) with softmax attention and no QK-norm, text layer scale, hybrid norm '
        'or logit bias.')


def _apple_key(entry: open_clip_lib.Entry, config: clip_lib.ModelConfig, indices) -> Optional[str]:
  """Apple's key for one open_clip entry; None for the image-head bias Apple does not store."""
  key = entry.torch_key
  if key.startswith('visual.trunk.'):
    key = key[len('visual.trunk.'):]
    if key in _HEAD_BIASES:
      return None
    if isinstance(config.image, mci.MCiConfig):
      return IMAGE_PREFIX + _mci_key(key, indices)
    return IMAGE_PREFIX + _apply(_TIMM_VIT_RULES, key)
  if key.startswith('text.'):
    key = key[len('text.'):]
    if config.text_layout == 'apple_mct':  # Already Apple's names (see open_clip._apple_mct).
      return TEXT_PREFIX + key
    return TEXT_PREFIX + _apply(_OPEN_CLIP_TEXT_RULES, key)
  return key  # logit_scale


def _apple_shape(open_clip_shape: Tuple[int, ...], extra) -> Tuple[int, ...]:
  if extra is None:
    return open_clip_shape
  return tuple(jax.eval_shape(extra[0], jax.ShapeDtypeStruct(open_clip_shape, np.float32)).shape)


@dataclasses.dataclass(frozen=True)
class AppleTable:
  """Apple-named entries for every Flax leaf but one: the image-head bias Apple does not store.

  `open_clip_keys[i]` is the open_clip key of `entries[i]` (the same tensor in open_clip's names).
  """
  entries: Tuple[open_clip_lib.Entry, ...]
  open_clip_keys: Tuple[str, ...]
  head_bias: open_clip_lib.Entry


@functools.lru_cache(maxsize=8)
def apple_v1_table(config: clip_lib.ModelConfig) -> AppleTable:
  """The conversion table between Flax variables and Apple's v1 state_dict keys for `config`.

  Entries are those of `convert.open_clip.conversion_table` with Apple's key, shape and the
  composed layout transforms; `head_bias` is the timm head bias that Apple's format lacks.
  """
  _check_supported(config)
  indices = _mci_network_indices(config.image) if isinstance(config.image, mci.MCiConfig) else None
  entries, open_clip_keys, head_bias = [], [], None
  for entry in open_clip_lib.conversion_table(config):
    key = _apple_key(entry, config, indices)
    if key is None:
      head_bias = entry
      continue
    open_clip_keys.append(entry.torch_key)
    extra = _extra_layout(entry.torch_key, entry.torch_shape)
    to_apple, to_flax = _compose(entry, extra)
    entries.append(dataclasses.replace(entry, torch_key=key,
                                       torch_shape=_apple_shape(entry.torch_shape, extra),
                                       to_torch=to_apple, to_flax=to_flax))
  return AppleTable(tuple(entries), tuple(open_clip_keys), head_bias)


def is_apple_v1(keys) -> bool:
  """Whether state_dict keys are in Apple's native layout (`image_encoder.` / `text_encoder.`)."""
  return any(k.startswith((IMAGE_PREFIX, TEXT_PREFIX)) for k in keys)


def _resolve(name, overrides) -> clip_lib.ModelConfig:
  if isinstance(name, clip_lib.ModelConfig):
    if overrides:
      raise ValueError('Pass either a ModelConfig or a name with overrides, not both.')
    return name
  return clip_lib.get_config(name, **overrides)


def to_apple_v1(variables: Mapping, name, **overrides) -> Dict[str, np.ndarray]:
  """Flax variables (train-time) -> Apple's v1 state_dict (key -> numpy array).

  `name` is a variant name (with `create_model` overrides) or a ModelConfig. BatchNorms get a
  `num_batches_tracked` of 0, as Apple's checkpoints have. Raises ValueError for reparameterized
  variables and for a non-zero image-projection bias, which Apple's format cannot hold.
  """
  config = _resolve(name, overrides)
  if reparam_lib.is_reparameterized(variables):
    config = dataclasses.replace(config, reparameterized=True)
  table = apple_v1_table(config)
  bias_path = table.head_bias.collection + '/' + '/'.join(table.head_bias.path)
  try:
    bias = np.asarray(open_clip_lib.nested_get(variables[table.head_bias.collection], table.head_bias.path))
  except KeyError as err:
    raise ValueError(f'The variables have no {bias_path} (expected for {config.name}); were they '
                     'made for another variant or with other overrides?') from err
  if np.any(bias != 0):
    raise ValueError(
        f'The image projection bias {bias_path} is non-zero (max |b| = {np.abs(bias).max():.3g}), '
        "but Apple's v1 projection has no bias, so the model cannot be written in Apple's format "
        'without changing it. Export it in open_clip format instead.')
  return open_clip_lib.state_from_table(variables, table.entries, f"Apple's v1 {config.name}")


def from_apple_v1(state_dict: Mapping[str, np.ndarray], name, **overrides) -> Dict[str, dict]:
  """Apple's v1 state_dict (key -> numpy array) -> Flax variables {'params', 'batch_stats'}.

  The image-projection bias, absent from Apple's format, is set to zero. Raises ValueError
  naming every missing key, unexpected key and shape mismatch.
  """
  config = _resolve(name, overrides)
  table = apple_v1_table(config)
  variables = open_clip_lib.variables_from_table(
      state_dict, table.entries, f"Apple's v1 {config.name}",
      'Check the variant name (MobileCLIP-S0, -S1, -S2 or -B) and whether the file is complete.')
  bias = table.head_bias
  open_clip_lib.nested_set(variables[bias.collection], bias.path, np.zeros(bias.torch_shape, np.float32))
  return variables


def apple_semantics(config: clip_lib.ModelConfig) -> clip_lib.ModelConfig:
  """The config that computes what Apple's own code computes for its v1 weights.

  Apple's ViT-B pads its first stem conv by 1 and uses LayerNorm eps 1e-5, where timm's
  vit_base_mci_224 (open_clip's MobileCLIP-B, and MobileCLIP2-B's training code) pads 0 and uses
  eps 1e-6. The weights are the same tensors either way; only the forward differs.
  """
  if isinstance(config.image, mci.MCiConfig):
    return config
  return dataclasses.replace(config, image=dataclasses.replace(config.image, stem_padding=1,
                                                               norm_eps=1e-5))


def match_apple_v1_model(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[str]:
  """The variant (e.g. 'MobileCLIP-S0') whose Apple v1 keys and shapes equal `shapes`, if any.

  `shapes` maps keys to shapes (`num_batches_tracked` entries are ignored).
  """
  wanted = {k: tuple(v) for k, v in shapes.items() if not k.endswith('num_batches_tracked')}
  for name in APPLE_V1_MODELS.values():
    table = apple_v1_table(clip_lib.get_config(name))
    if {e.torch_key: e.torch_shape for e in table.entries} == wanted:
      return name
  return None

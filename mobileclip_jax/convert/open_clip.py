"""open_clip / timm / Apple state_dicts <-> Flax variables, as a table of renames and transposes.

The table is generated from the Flax variable tree of the model (via `jax.eval_shape`, no
memory): each Flax leaf gets its PyTorch key and a layout transform. `to_open_clip` walks the
table forwards; `from_open_clip` reads every expected key from the state_dict, checks shapes and
reports missing, unexpected and mismatched tensors by name. The reparameterized forms use the
same table (timm names the fused convs `reparam_conv`, as the Flax modules do).

Layouts: image towers in timm's layout under `visual.trunk.` (MCi, timm ViTs) or open_clip's
VisionTransformer under `visual.` (CLIP teachers); text towers in open_clip's TextTransformer
layout under `text.` (custom-text models) or at the top level (standard CLIP), or Apple's MCt.
CoCa: open_clip's VisionTransformer with its attentional pooler under `visual.`, the text tower
under `text.` and the multimodal decoder under `text_decoder.` (`resblocks.i`, `cross_attn.i`).
"""
import dataclasses
import functools
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import coca as coca_lib
from mobileclip_jax.models import mci
from mobileclip_jax.models import reparam as reparam_lib

Array = np.ndarray
Transform = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its PyTorch key, its place in the Flax variables and the layout change."""
  torch_key: str
  collection: str               # 'params' or 'batch_stats'.
  path: Tuple[str, ...]         # Path inside the collection.
  torch_shape: Tuple[int, ...]
  to_torch: Transform
  to_flax: Transform


def _identity(x):
  return x


_CONV = (lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0))  # HWIO <-> OIHW.
_DENSE = (lambda x: x.T, lambda x: x.T)                                          # (in,out) <-> (out,in).
_SAME = (_identity, _identity)

# Flax list-style names `stages_3` are PyTorch container indices `stages.3`.
_CONTAINERS = re.compile(r'(^|/)(stem|stages|blocks|conv_kxk|proj|backbone)_(\d+)(?=/|$)')


def _generic_module_path(path: str) -> str:
  return _CONTAINERS.sub(r'\1\2.\3', path).replace('/', '.')


# Renames of the pre-norm transformer block per layout: (Flax sub-path, PyTorch sub-path).
_OPEN_CLIP_BLOCK = [('norm1', 'ln_1'), ('norm1_kv', 'ln_1_kv'), ('norm2', 'ln_2'),
                    ('attn/qkv', 'attn.in_proj'),
                    ('attn/proj', 'attn.out_proj'), ('mlp/fc1', 'mlp.c_fc'),
                    ('mlp/fc2', 'mlp.c_proj'), ('ls_1', 'ls_1'), ('ls_2', 'ls_2')]
_TIMM_BLOCK = [('ls_1', 'ls1'), ('ls_2', 'ls2')]
_APPLE_BLOCK = [('norm1', 'pre_norm_mha.0'), ('attn/qkv', 'pre_norm_mha.1.qkv_proj'),
                ('attn/proj', 'pre_norm_mha.1.out_proj'), ('norm2', 'pre_norm_ffn.0'),
                ('mlp/fc1', 'pre_norm_ffn.1'), ('mlp/fc2', 'pre_norm_ffn.4')]
_APPLE_MOBILEONE = [('identity', 'rbr_skip'), ('conv_kxk_0', 'rbr_conv.0'),
                    ('conv_scale', 'rbr_scale'), ('mlp', 'convffn')]


def _rename_parts(path: str, renames: Sequence[Tuple[str, str]]) -> str:
  """Applies whole-segment renames (Flax '/' sub-paths -> PyTorch '.' sub-paths)."""
  for flax_part, torch_part in renames:
    path = re.sub(rf'(^|/){re.escape(flax_part)}(?=/|$)', rf'\g<1>{torch_part.replace(".", "/")}',
                  path)
  return path


def _leaf(collection: str, module: str, leaf: str, ndim: int) -> Tuple[str, Tuple[Transform, Transform]]:
  """Generic leaf names: conv/dense kernels transpose, norms rename, raw params stay."""
  if collection == 'batch_stats':
    return {'mean': 'running_mean', 'var': 'running_var'}[leaf], _SAME
  if leaf == 'kernel':
    return 'weight', (_CONV if ndim == 4 else _DENSE)
  if leaf in ('scale', 'embedding'):
    return 'weight', _SAME
  return leaf, _SAME


class _TowerLayout:
  """Maps one tower's Flax leaves to PyTorch keys (relative to the tower prefix)."""

  def __init__(self, kind: str, config):
    self.kind, self.config = kind, config

  def key(self, collection: str, path: Tuple[str, ...], shape) -> Tuple[str, Tuple[int, ...],
                                                                       Tuple[Transform, Transform]]:
    module, leaf = '/'.join(path[:-1]), path[-1]
    method = getattr(self, f'_{self.kind}')
    return method(collection, module, leaf, tuple(shape))

  # ---- image towers ----
  def _timm(self, collection, module, leaf, shape):
    is_mci = isinstance(self.config.image, mci.MCiConfig)
    if module == 'head' and is_mci:
      module = 'head/fc'
    elif module == 'patch_embed':  # A single patchify conv (not the MobileCLIP-B conv stem).
      module = 'patch_embed/proj'
    elif module == 'patch_embed/backbone_2':  # timm: a ConvNormAct whose norm is an Identity.
      module = 'patch_embed/backbone_2/conv'
    module = _rename_parts(module, _TIMM_BLOCK)
    name, fns = _leaf(collection, module, leaf, len(shape))
    torch_shape = _torch_shape(shape, fns)
    if leaf == 'gamma' and is_mci:  # timm LayerScale2d stores (C, 1, 1).
      torch_shape = (shape[0], 1, 1)
      fns = (lambda x: x.reshape(-1, 1, 1), lambda x: x.reshape(-1))
    return _join(module, name), torch_shape, fns

  def _open_clip_vit(self, collection, module, leaf, shape):
    if module == '' and leaf == 'cls_token':
      return 'class_embedding', shape[-1:], (lambda x: x.reshape(-1), lambda x: x.reshape(1, 1, -1))
    if module == '' and leaf == 'pos_embed':
      return ('positional_embedding', shape[1:],
              (lambda x: x.reshape(x.shape[1:]), lambda x: x[None]))
    if module == 'head':
      return 'proj', shape, _SAME  # A raw (width, embed) parameter used as x @ proj.
    module = {'patch_embed': 'conv1', 'norm_pre': 'ln_pre', 'norm': 'ln_post'}.get(module, module)
    return self._open_clip_text(collection, module, leaf, shape)

  # ---- text towers ----
  def _open_clip_text(self, collection, module, leaf, shape):
    module = re.sub(r'^blocks_(\d+)', r'transformer/resblocks/\1', module)
    return self._open_clip_blocks(collection, module, leaf, shape)

  def _open_clip_decoder(self, collection, module, leaf, shape):
    module = re.sub(r'^blocks_(\d+)', r'resblocks/\1', module)
    module = re.sub(r'^cross_(\d+)', r'cross_attn/\1', module)
    return self._open_clip_blocks(collection, module, leaf, shape)

  def _open_clip_blocks(self, collection, module, leaf, shape):
    module = _rename_parts(module, _OPEN_CLIP_BLOCK)
    name, fns = _leaf(collection, module, leaf, len(shape))
    # nn.MultiheadAttention's own parameters: in_proj_weight / in_proj_bias, and with kdim != dim
    # (CoCa's pooler) q_proj_weight, k_proj_weight, v_proj_weight.
    if re.search(r'attn/(in|q|k|v)_proj$', module):
      return (_generic_module_path(module) + '_' + name), _torch_shape(shape, fns), fns
    return _join(module, name), _torch_shape(shape, fns), fns

  def _apple_mct(self, collection, module, leaf, shape):
    if module == '' and leaf == 'positional_embedding':
      torch_shape = (1, 1) + shape
      return ('positional_embedding.pos_embed.pos_embed', torch_shape,
              (lambda x: x.reshape((1, 1) + x.shape), lambda x: x.reshape(x.shape[2:])))
    if module == '' and leaf == 'text_projection':
      return 'projection_layer', shape, _SAME
    module = {'token_embedding': 'embedding_layer', 'ln_final': 'final_layer_norm'}.get(module, module)
    block = re.match(r'blocks_(\d+)(/|$)', module)
    if block:
      i = int(block.group(1))
      is_repmixer = i in (0, self.config.text.layers + 1)
      module = re.sub(r'^blocks_(\d+)', r'transformer/\1', module)
      module = _rename_parts(module, _APPLE_MOBILEONE if is_repmixer else _APPLE_BLOCK)
    if leaf == 'gamma':  # Apple's layer scales are raw (C, 1, 1) parameters.
      return (_generic_module_path(module.rsplit('/', 1)[0]) + '.layer_scale', (shape[0], 1, 1),
              (lambda x: x.reshape(-1, 1, 1), lambda x: x.reshape(-1)))
    name, fns = _leaf(collection, module, leaf, len(shape))
    return _join(module, name), _torch_shape(shape, fns), fns


def _torch_shape(shape, fns) -> Tuple[int, ...]:
  # A zero-stride view: transposes and reshapes of it cost nothing.
  return tuple(fns[0](np.broadcast_to(np.zeros((), np.bool_), shape)).shape)


def _join(module: str, leaf: str) -> str:
  module = _generic_module_path(module)
  return f'{module}.{leaf}' if module else leaf


def _tower_layouts(config) -> Dict[str, Tuple[str, _TowerLayout]]:
  if isinstance(config, coca_lib.CoCaConfig):
    return {'visual': ('visual.', _TowerLayout('open_clip_vit', config)),
            'text': ('text.', _TowerLayout('open_clip_text', config)),
            'text_decoder': ('text_decoder.', _TowerLayout('open_clip_decoder', config))}
  image_prefix, image_kind = {'timm': ('visual.trunk.', 'timm'),
                              'open_clip': ('visual.', 'open_clip_vit')}[config.image_layout]
  text_prefix, text_kind = {'open_clip_custom': ('text.', 'open_clip_text'),
                            'open_clip': ('', 'open_clip_text'),
                            'apple_mct': ('text.', 'apple_mct')}[config.text_layout]
  return {'visual': (image_prefix, _TowerLayout(image_kind, config)),
          'text': (text_prefix, _TowerLayout(text_kind, config))}


@functools.lru_cache(maxsize=32)
def conversion_table(config, tower: Optional[str] = None) -> Tuple[Entry, ...]:
  """One Entry per Flax leaf of the model, in a deterministic order (cached per config).

  With `tower` ('visual' or 'text', and 'text_decoder' for CoCa) only that tower's entries, with
  keys relative to the tower (timm's own names for `visual` of timm towers, e.g.
  `stem.0.conv_kxk.0.conv.weight`).
  """
  layouts = _tower_layouts(config)
  if tower is not None and tower not in layouts:
    raise ValueError(f'tower must be one of {tuple(layouts)} or None, got {tower!r}.')
  entries = []
  for collection, tree in clip_lib.abstract_variables(config).items():
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      path = tuple(k.key for k in key_path)
      if tower is not None and path[0] != tower:
        continue
      if path[0] in layouts:
        prefix, layout = layouts[path[0]]
        key, torch_shape, (to_torch, to_flax) = layout.key(collection, path[1:], leaf.shape)
        key = key if tower else prefix + key
      else:  # logit_scale / logit_bias.
        key, torch_shape, (to_torch, to_flax) = path[-1], tuple(leaf.shape), _SAME
      entries.append(Entry(key, collection, path, torch_shape, to_torch, to_flax))
  return tuple(entries)


def batchnorm_modules(table: Sequence[Entry]) -> List[str]:
  """PyTorch module names of the table's BatchNorms (they also own a `num_batches_tracked`)."""
  return sorted({e.torch_key.rsplit('.', 1)[0] for e in table
                 if e.torch_key.endswith('.running_mean')})


def nested_set(tree: dict, path: Tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def nested_get(tree: Mapping, path: Tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def state_from_table(variables: Mapping, table: Sequence[Entry], what: str) -> Dict[str, np.ndarray]:
  """Flax variables -> {PyTorch key: array} per `table`; BatchNorms get num_batches_tracked = 0.

  `what` names the target in errors (e.g. 'MobileCLIP2-S0').
  """
  state = {}
  for e in table:
    try:
      value = np.asarray(nested_get(variables[e.collection], e.path))
    except KeyError as err:
      raise ValueError(f'The variables have no {e.collection}/{"/".join(e.path)} (expected for '
                       f'{what}, PyTorch key {e.torch_key}); were they made for another variant '
                       'or with other overrides?') from err
    state[e.torch_key] = np.array(e.to_torch(value), order='C')
  for module in batchnorm_modules(table):
    state[f'{module}.num_batches_tracked'] = np.zeros((), np.int64)
  return state


# Tensors that PyTorch models keep in their state_dict without a Flax counterpart.
_IGNORED_SUFFIXES = ('num_batches_tracked', 'attn_mask')


def variables_from_table(state_dict: Mapping[str, np.ndarray], table: Sequence[Entry], what: str,
                         hint: str) -> Dict[str, dict]:
  """{PyTorch key: array} -> Flax variables per `table`, float32.

  Raises ValueError naming every missing key, unexpected key and shape mismatch (with `what`
  naming the expected model and `hint` saying what to check).
  """
  variables: Dict[str, dict] = {}
  missing, mismatched = [], []
  for e in table:
    if e.torch_key not in state_dict:
      missing.append(e.torch_key)
      continue
    value = np.asarray(state_dict[e.torch_key])
    if tuple(value.shape) != e.torch_shape:
      mismatched.append(f'{e.torch_key}: expected {e.torch_shape}, got {tuple(value.shape)}')
      continue
    nested_set(variables.setdefault(e.collection, {}), e.path,
               np.array(e.to_flax(value), dtype=np.float32, order='C'))
  known = {e.torch_key for e in table}
  unexpected = sorted(k for k in state_dict if k not in known and not k.endswith(_IGNORED_SUFFIXES))
  if missing or mismatched or unexpected:
    lines = [f'The state_dict does not match {what}:']
    for title, items in (('missing', missing), ('shape mismatch', mismatched),
                         ('unexpected', unexpected)):
      if items:
        shown = ', '.join(items[:8]) + (f', ... ({len(items) - 8} more)' if len(items) > 8 else '')
        lines.append(f'  {len(items)} {title}: {shown}')
    lines.append(hint)
    raise ValueError('\n'.join(lines))
  return variables


def _has_reparam_keys(keys) -> bool:
  return any('reparam_conv' in k for k in keys)


def _config_for(name_or_config, reparameterized: Optional[bool], overrides):
  if isinstance(name_or_config, (clip_lib.ModelConfig, coca_lib.CoCaConfig)):
    config = name_or_config
    if overrides:
      raise ValueError('Pass either a ModelConfig or a name with overrides, not both.')
  else:
    config = clip_lib.get_config(name_or_config, **overrides)
  if reparameterized is not None and reparameterized != getattr(config, 'reparameterized', False):
    config = dataclasses.replace(config, reparameterized=reparameterized)
  return config


def _describe(config) -> str:
  return f'{config.name}{" (reparameterized)" if getattr(config, "reparameterized", False) else ""}'


def to_open_clip(variables: Mapping, name, tower: Optional[str] = None,
                 **overrides) -> Dict[str, np.ndarray]:
  """Flax variables -> open_clip state_dict as numpy arrays (open_clip key -> array).

  `name` is a variant name (with `create_model` overrides) or a ModelConfig. Reparameterized
  variables (from `reparameterize`) give timm's reparameterized key names. BatchNorms get a
  `num_batches_tracked` of 0, as torch expects. With `tower`, only that tower, keys relative to
  it (for timm towers: a timm model's own state_dict).
  """
  config = _config_for(name, reparam_lib.is_reparameterized(variables), overrides)
  return state_from_table(variables, conversion_table(config, tower), _describe(config))


def from_open_clip(state_dict: Mapping[str, np.ndarray], name, tower: Optional[str] = None,
                   **overrides) -> Dict[str, dict]:
  """open_clip state_dict (key -> numpy array, train-time or reparameterized) -> Flax variables.

  With `tower`, the state_dict holds only that tower with keys relative to it, and only that
  tower's variables are returned. Raises ValueError naming every missing key, unexpected key
  and shape mismatch, so that a checkpoint of another variant or a truncated file is reported
  precisely.
  """
  config = _config_for(name, _has_reparam_keys(state_dict.keys()), overrides)
  return variables_from_table(
      state_dict, conversion_table(config, tower), _describe(config),
      'Check the variant name and overrides (or whether the file is complete).')

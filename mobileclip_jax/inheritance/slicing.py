"""Manual inheritance: the keep spec -> the child's config, the kept units, the sliced variables.

`inherit(variables, parent_config, keep)` (exported as `mobileclip_jax.inherit`). Keys of `keep`
(every key optional; a tower without keys is copied whole):

  text.layers      int k (k of L blocks, uniformly spaced; learned gates with select='masks') or
                   a list of block indices. MCt: its transformer layers; the two RepMixer blocks
                   always stay.
  text.heads       int (heads per layer, chosen per layer) or a list of head indices (every layer).
  text.width       the residual width (shared by every layer, the embeddings and the projection).
                   width = heads x head_dim, and head_dim can only shrink, so fewer heads need
                   width <= heads x parent head_dim. A smaller head_dim keeps the chosen q/k
                   dimensions and rescales q by sqrt(head_dim'/head_dim): attention logits are
                   those of the parent with the other dimensions zeroed.
  text.mlp_ratio   MLP hidden = width x ratio (MCt: rounded up to a multiple of 16, as the model).
  image.depths     MCi: per stage, a block count (uniformly spaced) or a list of block indices.
  image.widths     MCi: per stage widths. A stage's downsample is a grouped conv (one group per
                   input channel), so width_i / width_(i-1) must be an integer m' <= the parent's
                   m, and stays > 1 where the parent downsamples; attention stages keep width a
                   multiple of head_dim (heads = width / head_dim, chosen by importance).
  image.mlp_ratio  MCi ConvFFN hidden = width x ratio per stage; ViT MLP hidden = width x ratio.
  image.depth      ViT: int or list of block indices.
  image.heads      ViT: as text.heads.
  image.width      ViT: as text.width (MobileCLIP-B's conv stem keeps width / 4 middle channels).
  select           'first' | 'magnitude' (default) | 'masks': how units are chosen
                   (importance.py).

Exactness (tests/test_inheritance.py): keeping everything returns the parent's variables; removing
blocks, heads, MLP/ConvFFN neurons, head dimensions or MCi channels gives the parent's outputs
with those units zeroed (their reading weights set to zero), in train and eval mode, since every
normalization they pass through is per channel (BatchNorm) or untouched. A smaller text/ViT
width passes through LayerNorms, whose statistics then cover the kept channels only: the child
equals the parent with the other channels zeroed *and* LayerNorm statistics over the kept ones
(masks.py's masked LayerNorm), not the parent itself. BatchNorm running statistics are sliced;
where a normalized tensor lost inputs upstream they are stale until `batchnorm.reestimate`.
"""
import dataclasses
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from mobileclip_jax import keys
from mobileclip_jax import utils
from mobileclip_jax.inheritance import importance
from mobileclip_jax.inheritance import units
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import mci

TEXT_KEYS = ('text.layers', 'text.heads', 'text.width', 'text.mlp_ratio')
MCI_KEYS = ('image.depths', 'image.widths', 'image.mlp_ratio')
VIT_KEYS = ('image.depth', 'image.heads', 'image.width', 'image.mlp_ratio')
KEYS = TEXT_KEYS + MCI_KEYS + VIT_KEYS[:3] + ('select',)
DEFAULT_SELECT = 'magnitude'


def _count(value, n: int, what: str) -> Tuple[int, Optional[List[int]]]:
  """An int count or a list of indices of n units -> (count, indices or None)."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if not 0 < value <= n:
      raise ValueError(f'keep {what}={value}: must be between 1 and {n}.')
    return int(value), None
  try:
    indices = [int(i) for i in value]
  except (TypeError, ValueError):
    raise ValueError(f'keep {what}={value!r}: give a count or a list of indices.') from None
  if not indices or len(set(indices)) != len(indices) or not all(0 <= i < n for i in indices):
    raise ValueError(f'keep {what}={value!r}: indices must be distinct, in 0..{n - 1}.')
  return len(indices), sorted(indices)


def _width_heads(keep, prefix: str, width: int, heads: int) -> Tuple[int, int, Optional[list]]:
  """(width', heads', head indices) of a transformer tower, checked against head_dim."""
  head_dim = width // heads
  n_heads, head_idx = _count(keep.get(f'{prefix}.heads', heads), heads, f'{prefix}.heads')
  new_width = int(keep.get(f'{prefix}.width', width if n_heads == heads else 0))
  if new_width == 0:
    raise ValueError(f'keep {prefix}.heads={n_heads} of {heads}: the width (heads x head_dim) must '
                     f'shrink too; add {prefix}.width <= {n_heads * head_dim}.')
  if not 0 < new_width <= width or new_width % n_heads or new_width // n_heads > head_dim:
    raise ValueError(f'keep {prefix}.width={new_width} with {n_heads} heads: the width must be a '
                     f'multiple of the heads, at most heads x {head_dim} (the parent head_dim) '
                     f'and at most {width}.')
  return new_width, n_heads, head_idx


def _mlp_ratio(keep, key: str, parent: float, hidden: Callable[[float], Sequence[int]]) -> float:
  """The kept ratio; every MLP it sizes must have 1..(the parent's hidden width) neurons."""
  ratio = float(keep.get(key, parent))
  if not all(0 < h <= p for h, p in zip(hidden(ratio), hidden(parent, True))):
    raise ValueError(f'keep {key}={ratio}: gives MLPs of {list(hidden(ratio))} neurons; each '
                     f'must have 1 to its parent\'s {list(hidden(parent, True))}.')
  return ratio


def child_config(parent: clip_lib.ModelConfig, keep: Mapping[str, Any]
                 ) -> Tuple[clip_lib.ModelConfig, Dict[str, List[int]]]:
  """(the child's ModelConfig, explicitly given indices per keep key); validates `keep`."""
  is_mci = isinstance(parent.image, mci.MCiConfig)
  valid = TEXT_KEYS + (MCI_KEYS if is_mci else VIT_KEYS) + ('select',)
  for key in keep:
    if key not in valid:
      other = ' (that key is for the other image tower kind)' if key in KEYS + VIT_KEYS else ''
      raise ValueError(f'Unknown keep key {key!r} for {parent.name}{other}; keys: '
                       f'{", ".join(valid)}.{utils.did_you_mean(key, valid)}')
  if keep.get('select', DEFAULT_SELECT) not in importance.SELECT:
    raise ValueError(f"keep select={keep['select']!r}: one of {importance.SELECT}.")
  explicit = {}
  t = parent.text
  n_layers, explicit['text.layers'] = _count(keep.get('text.layers', t.layers), t.layers,
                                             'text.layers')
  width, heads, explicit['text.heads'] = _width_heads(keep, 'text', t.width, t.heads)
  text_hidden = lambda r, parent=False: units.text_mlp_hidden(t.width if parent else width, r,
                                                              t.variant)
  text = dataclasses.replace(t, layers=n_layers, width=width, heads=heads,
                             mlp_ratio=_mlp_ratio(keep, 'text.mlp_ratio', t.mlp_ratio,
                                                  text_hidden))
  image = parent.image
  if is_mci:
    depths = keep.get('image.depths', image.depths)
    widths = tuple(int(w) for w in keep.get('image.widths', image.widths))
    if len(depths) != len(image.depths) or len(widths) != len(image.widths):
      raise ValueError(f'keep image.depths / image.widths need one entry per stage '
                       f'({len(image.depths)}).')
    counts = []
    for i, (d, n) in enumerate(zip(depths, image.depths)):
      if isinstance(d, (int, np.integer)) and d == 0:
        counts.append(0)
        explicit[f'image.depths.{i}'] = []
        continue
      count, explicit[f'image.depths.{i}'] = _count(d, n, f'image.depths[{i}]')
      counts.append(count)
    _check_mci_widths(image, widths)
    hidden = lambda r, parent=False, pw=image.widths: [
        int(w * r) for w in (pw if parent else widths)]
    image = dataclasses.replace(image, depths=tuple(counts), widths=widths,
                                mlp_ratio=_mlp_ratio(keep, 'image.mlp_ratio', image.mlp_ratio,
                                                     hidden))
  else:
    depth, explicit['image.depth'] = _count(keep.get('image.depth', image.depth), image.depth,
                                            'image.depth')
    width, heads, explicit['image.heads'] = _width_heads(keep, 'image', image.width, image.heads)
    if image.stem == 'mci_conv' and width % 4:
      raise ValueError(f'keep image.width={width}: the conv stem needs a multiple of 4.')
    hidden = lambda r, parent=False, pw=image.width: [int((pw if parent else width) * r)]
    image = dataclasses.replace(image, depth=depth, width=width, heads=heads,
                                mlp_ratio=_mlp_ratio(keep, 'image.mlp_ratio', image.mlp_ratio,
                                                     hidden))
  config = dataclasses.replace(parent, text=text, image=image)
  return config, {k: v for k, v in explicit.items() if v is not None}


def _check_mci_widths(parent: mci.MCiConfig, widths: Sequence[int]) -> None:
  for i, (w, pw) in enumerate(zip(widths, parent.widths)):
    if not 0 < w <= pw:
      raise ValueError(f'keep image.widths[{i}]={w}: must be in 1..{pw}.')
    if parent.token_mixers[i] == 'attention' and w % parent.head_dim:
      raise ValueError(f'keep image.widths[{i}]={w}: an attention stage needs a multiple of '
                       f'head_dim={parent.head_dim}.')
    if i == 0:
      continue
    m, ratio = pw // parent.widths[i - 1], w / widths[i - 1]
    if m == 1 and ratio != 1:
      raise ValueError(f'keep image.widths: stage {i} has no downsample in the parent, so its '
                       f'width must equal stage {i - 1}\'s ({widths[i - 1]}).')
    if m > 1 and (ratio != int(ratio) or not 1 < ratio <= m):
      raise ValueError(f'keep image.widths: stage {i} downsamples with a grouped conv (one group '
                       f'per input channel, {m} outputs each), so widths[{i}] / widths[{i - 1}] '
                       f'must be an integer in 2..{m}; got {w} / {widths[i - 1]}.')


# ----------------------------------------------------------------------------------------------
# Choosing units.


def _mask_scores(params: Mapping, layout: units.Layout) -> Dict[str, np.ndarray]:
  from mobileclip_jax.inheritance import masks  # pylint: disable=g-import-not-at-top
  if keys.MASKS not in params:
    raise ValueError("keep select='masks' needs the variables of a masked run (learned "
                     'inheritance: params/masks); these have none.')
  return {f: np.asarray(v) for f, v in masks.log_alphas(params[keys.MASKS], layout).items()}


def select_units(variables: Mapping, parent: units.Layout, child: units.Layout,
                 keep: Mapping[str, Any], explicit: Mapping[str, List[int]]
                 ) -> Dict[str, np.ndarray]:
  """{family: kept unit indices, ascending} for every family of the parent."""
  method = keep.get('select', DEFAULT_SELECT)
  scores = importance.magnitude_scores(variables['params'], parent)
  if method == 'masks':
    scores.update(_mask_scores(variables['params'], parent))
  masked = set(_mask_scores(variables['params'], parent)) if method == 'masks' else set()
  kept: Dict[str, np.ndarray] = {}
  fams = parent.families

  def given(fam: units.Family) -> Optional[List[int]]:
    if fam.name == 'text/layers':
      return explicit.get('text.layers')
    if fam.name == 'visual/layers':
      return explicit.get('image.depth')
    if fam.kind == 'layers':  # visual/stages_i/blocks
      return explicit.get(f'image.depths.{int(fam.name.split("/")[1].split("_")[1])}')
    if fam.kind == 'heads' and fam.tie is None:
      return explicit.get(f'{"image" if fam.tower == "visual" else "text"}.heads')
    return None

  # Blocks first (a removed block's per-block families need no choice).
  for fam in fams.values():
    if fam.kind != 'layers':
      continue
    k = child.role_size(fam.role) if any(f.role == fam.role for f in child.families.values()) \
        else 0
    indices = given(fam)
    if indices is None:
      indices = (importance.top_k(scores[fam.name], k) if fam.name in masked
                 else importance.uniform(fam.size, k))
    kept[fam.name] = np.asarray(indices, np.int64)
  alive = lambda fam: _block_alive(fam.name, parent, kept)

  # Channel chains root-first (their group structure), then everything else.
  chain_scores = _chain_scores(scores, parent) if method == 'magnitude' else scores
  for fam in sorted(fams.values(), key=lambda f: _depth(f, fams)):
    if fam.kind == 'layers' or not alive(fam):
      continue
    k = child.role_size(fam.role)
    indices = given(fam)
    if indices is not None:
      kept[fam.name] = np.asarray(indices, np.int64)
    elif fam.group is not None:
      kept[fam.name] = _choose_in_groups(fam, kept[fam.group[0]], k, method, scores[fam.name])
    else:
      s = chain_scores.get(fam.name) if method != 'first' else None
      kept[fam.name] = importance.choose(fam.size, k, method, s)
  return kept


def _depth(fam: units.Family, fams: Mapping[str, units.Family]) -> int:
  depth = 0
  while fam.group is not None:
    fam, depth = fams[fam.group[0]], depth + 1
  return depth


def _chain_scores(scores: Mapping[str, np.ndarray], layout: units.Layout) -> Dict[str, np.ndarray]:
  """Root channel scores that include their descendants' (each family normalized to sum 1):
  keeping a stage-0 channel keeps its groups in every later stage."""
  out = dict(scores)
  fams = layout.families
  for fam in sorted(fams.values(), key=lambda f: -_depth(f, fams)):
    if fam.group is None:
      continue
    parent, m = fam.group
    own = out[fam.name] / max(out[fam.name].sum(), 1e-30)
    out[parent] = out[parent] / max(out[parent].sum(), 1e-30) + own.reshape(-1, m).sum(1)
  return out


def _choose_in_groups(fam: units.Family, parent_kept: np.ndarray, k: int, method: str,
                      scores: np.ndarray) -> np.ndarray:
  """k units of a grouped family: k / len(parent_kept) of each kept group, in group order."""
  m = fam.group[1]
  per_group = k // len(parent_kept)
  if per_group * len(parent_kept) != k or per_group > m:
    raise ValueError(f'{fam.name}: {k} units do not split into {len(parent_kept)} kept groups of '
                     f'at most {m}.')
  out = []
  for g in parent_kept:
    members = np.arange(g * m, (g + 1) * m)
    chosen = importance.choose(m, per_group, 'first' if method == 'first' else 'score',
                               scores[members])
    out.extend(members[chosen])
  return np.asarray(out, np.int64)


def _block_alive(name: str, layout: units.Layout, kept: Mapping[str, np.ndarray]) -> bool:
  """Whether a family's block (if it lies in one) is kept."""
  block = layout.block_of(tuple(name.split('/')))
  if block is None:
    return True
  fam, unit = layout.blocks[block]
  return unit in set(kept[fam].tolist())


# ----------------------------------------------------------------------------------------------
# Slicing.


def _renames(layout: units.Layout, kept: Mapping[str, np.ndarray]) -> Dict[str, str]:
  """Parent block path -> child block path for every kept (or fixed tail) block."""
  out = {}
  for fam in layout.families.values():
    if fam.kind != 'layers':
      continue
    for position, unit in enumerate(kept[fam.name].tolist()):
      out[fam.container.format(fam.offset + unit)] = fam.container.format(fam.offset + position)
    if fam.tail is not None:
      out[fam.container.format(fam.tail)] = fam.container.format(
          fam.offset + len(kept[fam.name]))
  return out


def axis_index(axis: units.Axis, kept: Mapping[str, np.ndarray]) -> np.ndarray:
  """Flat indices kept along one (possibly composite, row-major) axis."""
  index = np.zeros((), np.int64)
  for size, fam in axis:
    sub = np.arange(size) if fam is None else kept[fam]
    index = (index[..., None] * size + sub).reshape(-1)
  return index


def slice_variables(variables: Mapping, layout: units.Layout, kept: Mapping[str, np.ndarray]
                    ) -> Dict[str, Any]:
  """The parent's variables restricted to the kept units, blocks renumbered, queries rescaled
  where head_dim shrank (numpy)."""
  renames = _renames(layout, kept)
  out: Dict[str, Any] = {}
  for (collection, path), axes in layout.axes.items():
    block = layout.block_of(path)
    if block is not None and block not in renames:
      continue
    tail = next((p for p in renames if '/'.join(path).startswith(p + '/')), None)
    value = np.asarray(_get(variables[collection], path))
    for dim, axis in enumerate(axes):
      if any(f is not None for _, f in axis):
        value = np.take(value, axis_index(axis, kept), axis=dim)
    new_path = path
    if tail is not None:
      new_path = tuple(renames[tail].split('/')) + path[len(tail.split('/')):]
    _set(out.setdefault(collection, {}), new_path, value)
  _rescale_queries(out, layout, kept, renames)
  return out


def _rescale_queries(out: Dict[str, Any], layout: units.Layout, kept, renames) -> None:
  """q * sqrt(hd'/hd) where head_dim shrank: logits = q_S . k_S / sqrt(hd), the parent's with
  the dropped dimensions zeroed."""
  for module, hd_family in layout.attention.items():
    if hd_family is None:
      continue
    factor = math.sqrt(len(kept[hd_family]) / layout.families[hd_family].size)
    if factor == 1.0:
      continue
    block = layout.block_of(tuple(module.split('/')))
    if block not in renames:
      continue
    attn = _get(out['params'], tuple((renames[block] + module[len(block):]).split('/')))
    if 'q_norm' in attn:
      attn['q_norm'] = {k: v * factor for k, v in attn['q_norm'].items()}
      continue
    third = attn['qkv']['kernel'].shape[-1] // 3
    for leaf in ('kernel', 'bias'):
      if leaf in attn['qkv']:
        value = attn['qkv'][leaf].copy()
        value[..., :third] *= factor
        attn['qkv'][leaf] = value


def inherit(variables: Mapping, parent_config: Union[clip_lib.ModelConfig, str],
            keep: Mapping[str, Any]) -> Tuple[Dict[str, Any], clip_lib.ModelConfig]:
  """A smaller model that inherits `variables` of `parent_config` (module docstring: `keep`).

  Args:
    variables: {'params', 'batch_stats'} of the parent (train-time or reparameterized form;
      a masked run's `params/masks` are read by select='masks' and not carried over).
    parent_config: a ModelConfig or a variant name.
    keep: what to keep (see the module docstring).

  Returns:
    (the child's variables as numpy arrays, the child's ModelConfig); `CLIP(child_config)` runs
    them. The config keeps the parent's name; its towers carry the reduced sizes.
  """
  out, config, _ = inherit_units(variables, parent_config, keep)
  return out, config


def inherit_units(variables: Mapping, parent_config: Union[clip_lib.ModelConfig, str],
                  keep: Mapping[str, Any]
                  ) -> Tuple[Dict[str, Any], clip_lib.ModelConfig, Dict[str, np.ndarray]]:
  """`inherit`, also returning the kept unit indices per family of the parent."""
  if isinstance(parent_config, str):
    parent_config = clip_lib.get_config(parent_config)
  config, explicit = child_config(parent_config, keep)
  parent = units.layout(parent_config)
  _check_fits(variables, parent)
  child = units.layout(config)
  kept = select_units(variables, parent, child, keep, explicit)
  out = slice_variables(variables, parent, kept)
  _check_child(out, child)
  return out, config, kept


def _check_fits(variables: Mapping, layout: units.Layout) -> None:
  bad = []
  for (collection, path), shape in layout.shapes.items():
    try:
      got = tuple(np.shape(_get(variables[collection], path)))
    except KeyError:
      got = None
    if got != shape:
      bad.append(f'{collection}/{"/".join(path)}: expected {shape}, got {got}')
  if bad:
    raise ValueError(f'The variables do not fit {layout.config.name} with these overrides '
                     f'({len(bad)} differ, e.g. {bad[0]}); pass the config they were trained with '
                     '(a checkpoint records it).')


def _check_child(out: Mapping, child: units.Layout) -> None:
  got = {(c, tuple(p.split('/'))): tuple(np.shape(v)) for c, tree in out.items()
         for p, v in _flat(tree)}
  if got != child.shapes:
    diff = sorted(set(got.items()) ^ set(child.shapes.items()))[:4]
    raise AssertionError(f'Inherited variables do not match the child config: {diff}')


def _flat(tree, prefix=''):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flat(v, f'{prefix}{k}/')
    else:
      yield f'{prefix}{k}', v


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def param_count(variables: Mapping) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(dict(variables['params']))))

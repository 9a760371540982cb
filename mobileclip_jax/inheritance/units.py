"""Unit families: which axes of which tensors each removable unit of a model owns.

A *family* is an index space of units that are kept or removed together:

  embed      the residual-stream channels of a text or ViT tower (shared by every layer)
  channels   the channels of one MCi stage (stem and stage 0 share one family; a stage without
             a downsample shares its predecessor's); `final_conv`'s outputs are a family too
  heads      the heads of one attention layer
  head_dim   the dimensions inside every head of a text or ViT tower (shared by its layers)
  mlp        the hidden neurons of one MLP / ConvFFN
  se         the hidden units of one squeeze-excite
  stem       the middle channels of MobileCLIP-B's conv stem
  layers     the blocks of a tower (text, ViT) or of an MCi stage

For every variable leaf `Layout.axes[(collection, path)]` lists, per array dimension, the
sub-axes that dimension is the flattened (row-major) product of, each `(size, family or None)`:
a kernel [W, 3W] of fused qkv is ((W, embed),), ((3, None), (H, heads), (hd, head_dim)).
Everything under a removable block belongs to that block (`Layout.blocks`).

MCi's stage downsample (and `final_conv`) is a grouped conv with one group per input channel:
output channel o reads input channel o // m. A stage's channels are therefore grouped by the
previous stage's (`Family.group`): a kept output needs its input channel kept, and a child keeps
m' <= m outputs of every kept group. MCi attention heads are tied to the width (heads = width /
head_dim), so their count follows the channels (`Family.tie`).

Slicing (slicing.py), importance scores (importance.py) and the learned masks with their
expected parameter count (masks.py) all read this one table; every leaf of the model must be
claimed by a rule here, so a model change that adds a tensor fails loudly instead of being
sliced wrong.
"""
import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import jax

from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers as layers_lib
from mobileclip_jax.models import mci
from mobileclip_jax.rules import path_str

SubAxis = Tuple[int, Optional[str]]
Axis = Tuple[SubAxis, ...]
Leaf = Tuple[str, Tuple[str, ...]]  # (collection, path inside it)


@dataclasses.dataclass(frozen=True)
class Family:
  """An index space of units.

  Attributes:
    name: unique, e.g. 'text/blocks_3/heads'.
    kind: 'embed' | 'channels' | 'heads' | 'head_dim' | 'mlp' | 'se' | 'stem' | 'layers'.
    size: number of units.
    role: families with one role have one size in any config (e.g. every text layer's heads):
      a child's size of a family is its layout's size for the role.
    tower: 'text' or 'visual'.
    group: (parent family, units per group): unit u belongs to the parent's unit u // m.
    tie: a family whose kept fraction this one follows (MCi heads and squeeze-excite widths
      follow the stage width, the conv stem of MobileCLIP-B the ViT width).
    container: for kind 'layers', the template of the block paths ('text/blocks_{}').
    offset: for kind 'layers', the index of the first removable block.
    tail: for kind 'layers', the index of a fixed block after the removable ones (MCt), or None.
  """
  name: str
  kind: str
  size: int
  role: str
  tower: str
  group: Optional[Tuple[str, int]] = None
  tie: Optional[str] = None
  container: Optional[str] = None
  offset: int = 0
  tail: Optional[int] = None


@dataclasses.dataclass
class Layout:
  """Families, per-leaf axes and removable blocks of one model config."""
  config: clip_lib.ModelConfig
  families: Dict[str, Family]
  axes: Dict[Leaf, Tuple[Axis, ...]]
  shapes: Dict[Leaf, Tuple[int, ...]]
  blocks: Dict[str, Tuple[str, int]]  # block path ('text/blocks_3') -> (layers family, unit)
  # Attention modules whose head_dim may shrink: module path -> (head_dim family, qk_norm).
  attention: Dict[str, str]
  layer_norms: Dict[str, str]  # LayerNorm module path -> the family of its channels.

  def role_size(self, role: str) -> int:
    sizes = {f.size for f in self.families.values() if f.role == role}
    if len(sizes) != 1:
      raise KeyError(f'No single size for role {role!r}: {sizes}.')
    return sizes.pop()

  def block_of(self, path: Tuple[str, ...]) -> Optional[str]:
    """The removable block a leaf path lies in, or None."""
    for n in range(len(path) - 1, 0, -1):
      prefix = '/'.join(path[:n])
      if prefix in self.blocks:
        return prefix
    return None

  def readers(self) -> Dict[str, Axis]:
    """Module path -> its input axis, for every kernel whose input axis has a family.

    Dense kernels [in, out] read axis 0, conv kernels [kh, kw, in, out] axis 2: these are the
    modules through which a channel, neuron or head reaches the rest of the network.
    """
    out = {}
    for (collection, path), axes in self.axes.items():
      if collection != 'params' or path[-1] != 'kernel':
        continue
      axis = axes[0] if len(axes) == 2 else axes[2]
      if any(f is not None for _, f in axis):
        out['/'.join(path[:-1])] = axis
    return out


class _Builder:
  """Claims leaves of the abstract variables with axes, in order (the first claim wins)."""

  def __init__(self, config: clip_lib.ModelConfig):
    self.config = config
    abstract = clip_lib.abstract_variables(config)
    self.shapes: Dict[Leaf, Tuple[int, ...]] = {}
    for collection, tree in abstract.items():
      for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        self.shapes[(collection, tuple(path_str(key_path).split('/')))] = tuple(leaf.shape)
    self.axes: Dict[Leaf, Tuple[Axis, ...]] = {}
    self.families: Dict[str, Family] = {}
    self.blocks: Dict[str, Tuple[str, int]] = {}
    self.attention: Dict[str, str] = {}
    self.layer_norms: Dict[str, str] = {}

  def family(self, name: str, kind: str, size: int, role: Optional[str] = None, **kw) -> str:
    self.families[name] = Family(name=name, kind=kind, size=size, role=role or name,
                                 tower=name.split('/')[0], **kw)
    return name

  def leaves(self, prefix: str):
    parts = tuple(prefix.split('/'))
    return [leaf for leaf in self.shapes
            if leaf[1][:len(parts)] == parts and leaf not in self.axes]

  def claim(self, prefix: str, rule: Callable[[str, str, Tuple[int, ...]], Optional[tuple]]):
    """rule(path relative to prefix, leaf name, shape) -> axes (tuple of Axis) or None."""
    for leaf in self.leaves(prefix):
      rel = '/'.join(leaf[1][len(prefix.split('/')):])
      axes = rule(rel, leaf[1][-1], self.shapes[leaf])
      if axes is not None:
        self.axes[leaf] = tuple(tuple(a) if isinstance(a[0], tuple) else (a,) for a in axes)

  def module(self, prefix: str, fam_in: Optional[str], fam_out: Optional[str]):
    """Every leaf under `prefix` as a conv/dense/norm module mapping fam_in to fam_out.

    Conv kernels whose input-per-group is 1 (depthwise, grouped downsampling) have no input
    family on that axis; the grouping is expressed by the output family's `group`.
    """
    def rule(rel, name, shape):
      if name == 'kernel' and len(shape) == 4:
        return ((shape[0], None), (shape[1], None),
                (shape[2], fam_in if shape[2] > 1 else None), (shape[3], fam_out))
      if name == 'kernel' and len(shape) == 2:
        return ((shape[0], fam_in), (shape[1], fam_out))
      if len(shape) == 1:
        return ((shape[0], fam_out),)
      return None
    self.claim(prefix, rule)

  def norm(self, prefix: str, fam: str):
    """A LayerNorm (its statistics mix channels: masks.py weights them) or a BatchNorm."""
    if any(leaf[1][-1] == 'scale' for leaf in self.leaves(prefix)) and not any(
        c == 'batch_stats' for c, p in self.shapes if '/'.join(p).startswith(prefix + '/')):
      self.layer_norms[prefix] = fam
    self.module(prefix, None, fam)

  def done(self) -> Layout:
    missing = [f'{c}/{"/".join(p)}' for c, p in self.shapes if (c, p) not in self.axes]
    if missing:
      raise ValueError(f'Weight inheritance does not know these variables of {self.config.name}: '
                       f'{missing[:6]}; the unit table (inheritance/units.py) needs a rule.')
    return Layout(self.config, self.families, self.axes, self.shapes, self.blocks,
                  self.attention, self.layer_norms)


def _transformer_block(b: _Builder, prefix: str, embed: str, heads: int, head_dim: int,
                       hd_family: Optional[str], mlp: int, role: str):
  """A pre-norm TransformerBlock (attention.py) at `prefix` on the residual family `embed`."""
  fam_heads = b.family(f'{prefix}/heads', 'heads', heads, role=f'{role}/heads')
  fam_mlp = b.family(f'{prefix}/mlp', 'mlp', mlp, role=f'{role}/mlp')
  qkv = ((3, None), (heads, fam_heads), (head_dim, hd_family))
  inner = ((heads, fam_heads), (head_dim, hd_family))

  def rule(rel, name, shape):
    if rel == 'attn/qkv/kernel':
      return ((shape[0], embed), qkv)
    if rel == 'attn/qkv/bias':
      return (qkv,)
    if rel.startswith(('attn/q_norm/', 'attn/k_norm/')):
      return ((head_dim, hd_family),)
    if rel == 'attn/proj/kernel':
      return (inner, (shape[1], embed))
    return None
  b.claim(prefix, rule)
  b.attention[f'{prefix}/attn'] = hd_family
  b.module(f'{prefix}/mlp/fc1', embed, fam_mlp)
  b.module(f'{prefix}/mlp/fc2', fam_mlp, embed)
  for name in ('norm1', 'norm2', 'attn_norm'):
    b.norm(f'{prefix}/{name}', embed)
  b.module(prefix, None, embed)  # attn/proj bias, ls_1, ls_2.


def _conv_mlp(b: _Builder, prefix: str, channels: str, hidden: int, role: str):
  """ConvMlp (layers.py): dw conv+BN on `channels`, fc1 -> hidden family, fc2 back."""
  fam_mlp = b.family(f'{prefix}/mlp', 'mlp', hidden, role=role)
  b.module(f'{prefix}/mlp/fc1', channels, fam_mlp)
  b.module(f'{prefix}/mlp/fc2', fam_mlp, channels)
  b.module(f'{prefix}/mlp/conv', None, channels)


def text_mlp_hidden(width: int, ratio: float, variant: str) -> List[int]:
  """Hidden widths of a text tower's MLPs as text.py sizes them: the transformer layers' (MCt:
  rounded up to a multiple of 16), then MCt's RepMixer ConvFFNs'."""
  if variant == 'base':
    return [int(width * ratio)]
  return [int(math.ceil(width * ratio / 16.0) * 16), int(width * ratio)]


def _text(b: _Builder, cfg):
  t = 'text'
  heads, width = cfg.heads, cfg.width
  embed = b.family(f'{t}/embed', 'embed', width)
  head_dim = b.family(f'{t}/head_dim', 'head_dim', width // heads)
  offset = 0 if cfg.variant == 'base' else 1
  layers = b.family(f'{t}/layers', 'layers', cfg.layers, container=f'{t}/blocks_{{}}',
                    offset=offset, tail=None if cfg.variant == 'base' else cfg.layers + 1)
  mlp = text_mlp_hidden(width, cfg.mlp_ratio, cfg.variant)[0]
  if cfg.variant == 'mct':
    for i in (0, cfg.layers + 1):  # The RepMixer blocks (per-channel, plus their ConvFFN).
      _conv_mlp(b, f'{t}/blocks_{i}', embed, int(width * cfg.mlp_ratio), f'{t}/repmixer_mlp')
      b.module(f'{t}/blocks_{i}', None, embed)
  for i in range(cfg.layers):
    block = f'{t}/blocks_{i + offset}'
    b.blocks[block] = (layers, i)
    _transformer_block(b, block, embed, heads, width // heads, head_dim, mlp, t)
  def rule(rel, name, shape):
    if rel in ('token_embedding/embedding', 'positional_embedding'):
      return ((shape[0], None), (shape[1], embed))
    if rel == 'text_projection':
      return ((shape[0], embed), (shape[1], None))
    return None
  b.claim(t, rule)
  b.norm(f'{t}/ln_final', embed)


def _vit(b: _Builder, cfg):
  v = 'visual'
  embed = b.family(f'{v}/embed', 'embed', cfg.width)
  head_dim = b.family(f'{v}/head_dim', 'head_dim', cfg.width // cfg.heads)
  layers = b.family(f'{v}/layers', 'layers', cfg.depth, container=f'{v}/blocks_{{}}')
  if cfg.stem == 'mci_conv':
    stem = b.family(f'{v}/patch_embed/channels', 'stem', cfg.width // 4, tie=embed)
    b.module(f'{v}/patch_embed/backbone_0', None, stem)
    b.module(f'{v}/patch_embed/backbone_1', stem, stem)
    b.module(f'{v}/patch_embed/backbone_2', stem, embed)
  else:
    b.module(f'{v}/patch_embed', None, embed)
  for i in range(cfg.depth):
    block = f'{v}/blocks_{i}'
    b.blocks[block] = (layers, i)
    _transformer_block(b, block, embed, cfg.heads, cfg.width // cfg.heads, head_dim,
                       int(cfg.width * cfg.mlp_ratio), v)
  def rule(rel, name, shape):
    if rel in ('cls_token', 'pos_embed'):
      return ((shape[0], None), (shape[1], None), (shape[2], embed))
    return None
  b.claim(v, rule)
  for name in ('norm_pre', 'norm'):
    b.norm(f'{v}/{name}', embed)
  b.module(f'{v}/head', embed, None)


def _mci(b: _Builder, cfg: mci.MCiConfig):
  v = 'visual'
  widths = cfg.widths
  chan = []
  for i, width in enumerate(widths):
    previous = chan[-1] if chan else None
    if i > 0 and width == widths[i - 1]:  # No downsample: the same residual stream.
      chan.append(previous)
      continue
    group = (previous, width // widths[i - 1]) if i > 0 else None
    if group and width % widths[i - 1]:
      raise ValueError(f'MCi stage {i} width {width} is not a multiple of {widths[i - 1]}.')
    chan.append(b.family(f'{v}/stages_{i}/channels', 'channels', width,
                         role=f'{v}/stages_{i}/channels', group=group))
  c0 = chan[0]
  b.module(f'{v}/stem_0', None, c0)
  b.module(f'{v}/stem_1', c0, c0)
  b.module(f'{v}/stem_2', c0, c0)
  for i, width in enumerate(widths):
    stage, c = f'{v}/stages_{i}', chan[i]
    if i > 0 and width != widths[i - 1]:
      down = f'{stage}/downsample'
      if cfg.se_downsample[i]:
        se = b.family(f'{down}/proj_0/se', 'se', layers_lib.make_divisible(width * 0.25, 8),
                      role=f'{stage}/se', tie=c)
        b.module(f'{down}/proj_0/se/fc1', c, se)
        b.module(f'{down}/proj_0/se/fc2', se, c)
      b.module(f'{down}/proj_0', None, c)
      b.module(f'{down}/proj_1', c, c)
    b.module(f'{stage}/pos_emb', None, c)
    blocks = b.family(f'{stage}/blocks', 'layers', cfg.depths[i],
                      container=f'{stage}/blocks_{{}}')
    for j in range(cfg.depths[i]):
      block = f'{stage}/blocks_{j}'
      b.blocks[block] = (blocks, j)
      _conv_mlp(b, block, c, int(width * cfg.mlp_ratio), f'{stage}/mlp')
      if cfg.token_mixers[i] == 'attention':
        _mci_attention(b, block, c, width // cfg.head_dim, cfg.head_dim, f'{stage}/heads')
      b.module(block, c, c)
  final = b.family(f'{v}/final_conv/channels', 'channels', int(widths[-1] * cfg.final_ratio),
                   role=f'{v}/final_conv/channels', group=(chan[-1], int(cfg.final_ratio)))
  se = b.family(f'{v}/final_conv/se', 'se',
                layers_lib.make_divisible(int(widths[-1] * cfg.final_ratio) / 16, 1), tie=final)
  b.module(f'{v}/final_conv/se/fc1', final, se)
  b.module(f'{v}/final_conv/se/fc2', se, final)
  b.module(f'{v}/final_conv', None, final)
  b.module(f'{v}/head', final, None)


def _mci_attention(b: _Builder, block: str, c: str, heads: int, head_dim: int, role: str):
  """MCi AttentionBlock: heads of a fixed head_dim, tied to the width (heads = width / head_dim)."""
  fam = b.family(f'{block}/heads', 'heads', heads, role=role, tie=c)
  inner = ((heads, fam), (head_dim, None))

  def rule(rel, name, shape):
    if rel == 'token_mixer/qkv/kernel':
      return ((shape[0], c), ((3, None),) + inner)
    if rel == 'token_mixer/proj/kernel':
      return (inner, (shape[1], c))
    if rel.startswith(('token_mixer/q_norm/', 'token_mixer/k_norm/')):
      return ((head_dim, None),)
    return None
  b.claim(block, rule)
  b.norm(f'{block}/norm', c)


@functools.lru_cache(maxsize=64)
def layout(config: clip_lib.ModelConfig) -> Layout:
  """The unit table of `config` (train-time or reparameterized variables alike; cached: do not
  modify the result)."""
  b = _Builder(config)
  _text(b, config.text)
  if isinstance(config.image, mci.MCiConfig):
    _mci(b, config.image)
  else:
    _vit(b, config.image)
  b.claim('logit_scale', lambda rel, name, shape: ())
  b.claim('logit_bias', lambda rel, name, shape: ())
  return b.done()


def leaf_count(shape: Tuple[int, ...]) -> int:
  n = 1
  for s in shape:
    n *= s
  return n


def families_of(axes: Tuple[Axis, ...]) -> List[str]:
  return [f for axis in axes for _, f in axis if f is not None]

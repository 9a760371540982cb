"""Learned inheritance: L0 masks over units, trained with the model by the one trainer.

TinyCLIP (Wu et al., ICCV 2023) learns which heads, MLP neurons, embedding dimensions and
layers to inherit: hard-concrete gates (Louizos et al. 2018, as CoFi's L0 module) multiply the
units while the model trains on its usual objective plus the constraint
lambda_1 (p - q) + lambda_2 (p - q)^2, where p is the expected kept fraction of parameters, q
is ramped linearly from 1 to the target, and lambda_1, lambda_2 are learned by gradient *ascent*
(a max-min game: the multipliers grow while p misses q). After N steps the gates are read
(`keep_from_masks`) and the model is sliced (slicing.py) to the child architecture.

Design, and why:
- One model, one trainer. `MaskedCLIP` is the parent's CLIP with its parameters at the same
  paths (flax `share_scope`) plus `params/masks`: the log-alphas of each masked family
  (`masks/text.blocks_3.heads`, `masks/visual.stages_0.channels`, ...) and the multipliers
  (`masks/text.lambda_1`, ...). `config.inherit.masks` makes train/setup.py build it, and the
  constraint is the step's `regularizer` (its gradient added to the loss's), so a mask-learning
  stage is an ordinary run of launch/train.py: the same data, loss, optimizer rules (give masks
  their own lr with `optim.lr_rules`; `rules.DEFAULT_WD_RULES` does not decay them),
  checkpoints and evaluators. Ascent on the multipliers is a gradient reversal, so no optimizer
  rule can turn it into descent by accident.
- Masks act on the train-time (un-reparameterized) modules without editing them (in eval mode
  too, whose blocks would otherwise fold their branches: `mobileone.branches_in_eval`): a flax
  method interceptor multiplies the *input* of every module that reads a masked unit (the table of
  readers comes from units.py: qkv / fc1 / 1x1 convs / SE / head read channels, attention `proj`
  reads heads, `fc2` reads neurons), gates each block's residual update
  (x + z (block(x) - x)), and computes the LayerNorms over a masked residual stream with
  z-weighted statistics. With 0/1 gates this is exactly the parent with those units removed,
  i.e. the sliced child (tests/test_inheritance.py), and BatchNorms stay per channel.
- An MCi tower has one residual stream per stage, linked by grouped downsampling convs (output
  channel o reads input o // m): its embedding mask is one gate per stage-0 channel, repeated
  over that channel's groups in every later stage and in `final_conv`. MCi heads and
  squeeze-excite hidden units have gates too, but their number follows the width (heads =
  width / 32, SE = width / 4 or / 16): in p they count as the width's fraction, and the child
  keeps the width's number of them, the highest-gated ones (likewise the middle channels of
  MobileCLIP-B's conv stem, width / 4).
- p is per tower (the text tower's token embedding would otherwise decide everything), over the
  structure the gates define: expected parameters (P(gate != 0) per unit, products along each
  tensor's axes, times its block's gate) over the parent's. The child rounds this structure to
  a uniform architecture (one head count, MLP ratio and width per tower; one width per MCi
  stage), so its real fraction is reported after slicing.
- Gates at evaluation are deterministic (clip(sigmoid(log_alpha) (r - l) + l, 0, 1)); a unit is
  kept by `keep_from_masks` if it ranks among the round(sum P(gate != 0)) highest log-alphas.
- BatchNorm statistics of the masked run describe the soft-masked network: re-estimate them on
  the sliced child (batchnorm.py, `launch/inherit.py --bn_batches`).
"""
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobileclip_jax import keys
from mobileclip_jax.inheritance import units
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import mobileone

KINDS = ('heads', 'mlp', 'embed', 'layers')
TOWERS = {'text': 'text', 'image': 'visual'}
BETA, LIMIT_L, LIMIT_R = 2.0 / 3.0, -0.1, 1.1  # Hard-concrete temperature and stretch (CoFi).
_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Which families are masked, and the names of their parameters.


def parse_kinds(kinds: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
  """('heads', 'text.layers') -> (('text', 'heads'), ('visual', 'heads'), ('text', 'layers'))."""
  out = []
  for entry in kinds:
    tower, _, kind = entry.rpartition('.')
    if kind not in KINDS or (tower and tower not in TOWERS):
      raise ValueError(f'inherit.masks entry {entry!r}: use one of {KINDS}, optionally prefixed '
                       f'by a tower ({", ".join(t + "." for t in TOWERS)}), e.g. text.layers.')
    for t in ([TOWERS[tower]] if tower else TOWERS.values()):
      if (t, kind) not in out:
        out.append((t, kind))
  return tuple(out)


def masked_families(layout: units.Layout, kinds: Sequence[str]) -> Tuple[str, ...]:
  """Names of the families that get a gate (MCi: 'embed' is the stage-0 channel family)."""
  wanted = parse_kinds(kinds)
  out = []
  for fam in layout.families.values():
    kind = fam.kind
    if kind == 'channels':
      kind = 'embed' if fam.group is None else None
    elif kind in ('se', 'stem'):  # Their widths follow the channels; their gates rank units.
      kind = 'embed'
    if kind is not None and (fam.tower, kind) in wanted:
      out.append(fam.name)
  return tuple(out)


def param_name(family: str) -> str:
  return family.replace('/', '.')


def log_alphas(masks: Mapping, layout: units.Layout) -> Dict[str, Any]:
  """{family: log_alpha} from a masked run's `params['masks']`."""
  return {f: masks[param_name(f)] for f in layout.families if param_name(f) in masks}


def multiplier_names(tower: str) -> Tuple[str, str]:
  return f'{tower}.lambda_1', f'{tower}.lambda_2'


# ----------------------------------------------------------------------------------------------
# Hard-concrete gates.


def keep_probability(log_alpha):
  """P(gate != 0) of a hard-concrete gate."""
  return jax.nn.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def deterministic_gate(log_alpha):
  return jnp.clip(jax.nn.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


def sample_gate(log_alpha, rng):
  u = jax.random.uniform(rng, jnp.shape(log_alpha), minval=_EPS, maxval=1 - _EPS)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
  return jnp.clip(s * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


@jax.custom_vjp
def _reverse_gradient(x):
  return x


_reverse_gradient.defvjp(lambda x: (x, None), lambda _, g: (-g,))


# ----------------------------------------------------------------------------------------------
# Expanding gates onto axes.


def _root(fam: units.Family, fams: Mapping[str, units.Family]) -> Tuple[str, int]:
  """(the family at the top of fam's group chain, units of fam per root unit)."""
  per = 1
  while fam.group is not None:
    per *= fam.group[1]
    fam = fams[fam.group[0]]
  return fam.name, per


def family_gate(name: str, gates: Mapping[str, jax.Array], layout: units.Layout
                ) -> Optional[jax.Array]:
  """The gate vector of a family: its own, or its group chain's root gate repeated."""
  root, per = _root(layout.families[name], layout.families)
  if root not in gates:
    return None
  return gates[root] if per == 1 else jnp.repeat(gates[root], per)


def axis_gate(axis: units.Axis, gates, layout) -> Optional[jax.Array]:
  """The gate of a (composite, row-major) axis, or None when nothing on it is gated."""
  parts = [(n, None if f is None else family_gate(f, gates, layout)) for n, f in axis]
  if all(g is None for _, g in parts):
    return None
  out = jnp.ones((), jnp.float32)
  for n, g in parts:
    out = jnp.outer(out, jnp.ones(n) if g is None else g).reshape(-1)
  return out


def masked_layer_norm(x, scale, bias, gate, epsilon):
  """LayerNorm whose statistics are weighted by `gate` (0/1: over the kept channels only)."""
  xf, w = x.astype(jnp.float32), gate.astype(jnp.float32)
  total = jnp.maximum(w.sum(), _EPS)
  mean = (xf * w).sum(-1, keepdims=True) / total
  var = (jnp.square(xf - mean) * w).sum(-1, keepdims=True) / total
  return ((xf - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)


def _interceptor(gates: Mapping[str, jax.Array], layout: units.Layout, tower: str):
  """Flax method interceptor applying `gates` to the modules of one tower (module docstring)."""
  readers = {p: axis_gate(a, gates, layout) for p, a in layout.readers().items()
             if p.startswith(tower + '/')}
  readers = {p: g for p, g in readers.items() if g is not None}
  norms = {p: family_gate(f, gates, layout) for p, f in layout.layer_norms.items()
           if p.startswith(tower + '/')}
  norms = {p: g for p, g in norms.items() if g is not None}
  block_gates = {}
  for block, (fam, unit) in layout.blocks.items():
    if block.startswith(tower + '/') and fam in gates:
      block_gates[block] = gates[fam][unit]

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    path = '/'.join(module.path)
    if context.method_name != '__call__' or module.is_initializing():
      return next_fun(*args, **kwargs)
    if path in readers:
      x = args[0]
      return next_fun((x * readers[path].astype(x.dtype)), *args[1:], **kwargs)
    if path in norms:
      p = module.variables['params']
      y = masked_layer_norm(args[0], p['scale'], p['bias'], norms[path], module.epsilon)
      # text_projection is a bare parameter, not a module: ln_final's output is its input.
      return y * norms[path].astype(y.dtype) if path == 'text/ln_final' else y
    if path in block_gates:
      x = args[0]
      y = next_fun(*args, **kwargs)
      return x + block_gates[path].astype(y.dtype) * (y - x)
    return next_fun(*args, **kwargs)

  return intercept


# ----------------------------------------------------------------------------------------------
# The masked model.


class Masks(nn.Module):
  """The log-alphas of the masked families and each tower's two multipliers."""
  sizes: Tuple[Tuple[str, int], ...]
  towers: Tuple[str, ...]
  init_log_alpha: float = 3.0

  @nn.compact
  def __call__(self) -> Dict[str, jax.Array]:
    init = lambda rng, shape, dtype: (self.init_log_alpha
                                      + 0.01 * jax.random.normal(rng, shape, dtype))
    out = {name: self.param(name, init, (size,), jnp.float32) for name, size in self.sizes}
    for tower in self.towers:
      for name in multiplier_names(tower):
        out[name] = self.param(name, nn.initializers.zeros, (), jnp.float32)
    return out


class MaskedCLIP(nn.Module):
  """CLIP (same parameter paths) with learned gates over `kinds` of units (module docstring).

  Train mode samples the gates (rng 'dropout', which the train step provides); eval mode uses
  the deterministic gates. `config` is the parent's ModelConfig.
  """
  config: clip_lib.ModelConfig
  kinds: Tuple[str, ...]
  init_log_alpha: float = 3.0

  def setup(self):
    if self.config.reparameterized:
      raise ValueError('Learned inheritance masks the train-time branches; use '
                       'reparameterized=False.')
    self.clip = clip_lib.CLIP(self.config)
    nn.share_scope(self, self.clip)
    layout = units.layout(self.config)
    fams = masked_families(layout, self.kinds)
    if not fams:
      raise ValueError(f'inherit.masks={self.kinds} selects no unit of {self.config.name}.')
    towers = tuple(sorted({layout.families[f].tower for f in fams}))
    self.masks = Masks(sizes=tuple((param_name(f), layout.families[f].size) for f in fams),
                       towers=towers, init_log_alpha=self.init_log_alpha)

  def _gates(self, train: bool, tower: str) -> Dict[str, jax.Array]:
    layout = units.layout(self.config)
    values = log_alphas(self.masks(), layout)
    out = {}
    for i, (fam, log_alpha) in enumerate(sorted(values.items())):
      if layout.families[fam].tower != tower:
        continue
      out[fam] = (sample_gate(log_alpha, jax.random.fold_in(self.make_rng('dropout'), i))
                  if train else deterministic_gate(log_alpha))
    return out

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    gates = self._gates(train, 'visual')
    with nn.intercept_methods(_interceptor(gates, units.layout(self.config), 'visual')), \
        mobileone.branches_in_eval():
      return self.clip.encode_image(images, train)

  def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    gates = self._gates(train, 'text')
    with nn.intercept_methods(_interceptor(gates, units.layout(self.config), 'text')), \
        mobileone.branches_in_eval():
      return self.clip.encode_text(tokens, train)

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
    return self.encode_image(images, train), self.encode_text(tokens, train)


# ----------------------------------------------------------------------------------------------
# The expected parameter fraction and the constraint.


def expected_params(masks: Mapping, layout: units.Layout, tower: str) -> jax.Array:
  """E[parameters of `tower`] under the gates' keep probabilities (module docstring)."""
  probs = {f: keep_probability(a) for f, a in log_alphas(masks, layout).items()}
  fams = layout.families

  def expected(name: Optional[str], size: int):
    if name is None:
      return size
    fam = fams[name]
    if fam.tie is not None:
      return size * expected(fam.tie, fams[fam.tie].size) / fams[fam.tie].size
    root, per = _root(fam, fams)
    return per * probs[root].sum() if root in probs else size

  total = 0.0
  for (collection, path), axes in layout.axes.items():
    if collection != 'params' or path[0] != tower:
      continue
    count = 1.0
    for axis in axes:
      for size, fam in axis:
        count = count * expected(fam, size)
    block = layout.block_of(path)
    if block is not None and layout.blocks[block][0] in probs:
      fam, unit = layout.blocks[block]
      count = count * probs[fam][unit]
    total = total + count
  return total


def tower_params(layout: units.Layout, tower: str) -> int:
  return sum(units.leaf_count(shape) for (c, path), shape in layout.shapes.items()
             if c == 'params' and path[0] == tower)


def target_at(step, target: float, ramp_steps: int):
  """q: 1 at step 0, linearly to `target` at `ramp_steps`, then constant."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(ramp_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - target) * progress


def sparsity_regularizer(config: clip_lib.ModelConfig, kinds: Sequence[str], target: float,
                         ramp_steps: int):
  """(params, step) -> (constraint, metrics): sum over masked towers of
  lambda_1 (p - q) + lambda_2 (p - q)^2, with the gradient to the lambdas reversed."""
  if not 0 < target <= 1:
    raise ValueError(f'inherit.target={target}: the kept fraction of parameters, in (0, 1].')
  layout = units.layout(config)
  fams = masked_families(layout, kinds)
  towers = sorted({layout.families[f].tower for f in fams})
  sizes = {t: tower_params(layout, t) for t in towers}

  def regularizer(params, step):
    masks = params[keys.MASKS]
    q = target_at(step, target, ramp_steps)
    loss, metrics = 0.0, {'masks/q': q}
    for t in towers:
      p = expected_params(masks, layout, t) / sizes[t]
      l1, l2 = (_reverse_gradient(masks[n]) for n in multiplier_names(t))
      loss = loss + l1 * (p - q) + l2 * jnp.square(p - q)
      metrics.update({f'masks/{t}/p': p, f'masks/{t}/lambda_1': masks[multiplier_names(t)[0]],
                      f'masks/{t}/lambda_2': masks[multiplier_names(t)[1]]})
    metrics['masks/constraint'] = loss
    return loss, metrics

  return regularizer


# ----------------------------------------------------------------------------------------------
# Reading the learned masks: the keep spec of the child.


def keep_from_masks(variables: Mapping, config: clip_lib.ModelConfig) -> Dict[str, Any]:
  """The `keep` spec (slicing.py) the learned gates of a masked run choose, select='masks'.

  Per family the kept count is round(sum of P(gate != 0)); counts that the architecture makes
  uniform (heads and MLP width per tower, the MCi mlp_ratio) are averaged over the kept blocks;
  widths are rounded to what the architecture allows (multiples of the heads / head_dim).
  """
  layout = units.layout(config)
  if keys.MASKS not in variables['params']:
    raise ValueError('These variables hold no learned masks (train with --config.inherit.masks '
                     'first, or give a manual keep spec).')
  probs = {f: np.asarray(keep_probability(jnp.asarray(a)))
           for f, a in log_alphas(variables['params'][keys.MASKS], layout).items()}
  count = lambda fam: int(round(float(probs[fam].sum())))
  keep: Dict[str, Any] = {'select': 'masks'}
  fams = layout.families

  def kept_blocks(name: str) -> list:
    fam = fams[name]
    if name not in probs:
      return list(range(fam.size))
    k = max(count(name), 1 if name.endswith('/layers') else 0)
    return sorted(np.argsort(-probs[name], kind='stable')[:k].tolist())

  def mean_count(kind: str, tower: str, blocks: Sequence[str]) -> Optional[float]:
    names = [f'{b}/{kind}' for b in blocks if f'{b}/{kind}' in probs]
    return float(np.mean([probs[n].sum() for n in names])) if names else None

  text = config.text
  layers = kept_blocks('text/layers')
  blocks = [fams['text/layers'].container.format(fams['text/layers'].offset + i) for i in layers]
  keep['text.layers'] = len(layers)
  heads = mean_count('heads', 'text', blocks)
  n_heads = text.heads if heads is None else min(max(int(round(heads)), 1), text.heads)
  keep.update(_width(probs, 'text/embed', text.width, text.heads, n_heads, 'text'))
  mlp = mean_count('mlp', 'text', blocks)
  if mlp is not None:
    keep['text.mlp_ratio'] = _ratio(mlp, keep['text.width'], text.variant)
  if isinstance(config.image, clip_lib.mci.MCiConfig):
    keep.update(_mci_keep(probs, config.image, fams, kept_blocks))
  else:
    image = config.image
    depth = kept_blocks('visual/layers')
    keep['image.depth'] = len(depth)
    blocks = [f'visual/blocks_{i}' for i in depth]
    heads = mean_count('heads', 'visual', blocks)
    n_heads = image.heads if heads is None else min(max(int(round(heads)), 1), image.heads)
    keep.update(_width(probs, 'visual/embed', image.width, image.heads, n_heads, 'image'))
    mlp = mean_count('mlp', 'visual', blocks)
    if mlp is not None:
      keep['image.mlp_ratio'] = _ratio(mlp, keep['image.width'], 'base')
  return keep


def _ratio(mean_kept: float, width: int, variant: str) -> float:
  """The mlp_ratio whose hidden width (int(width * ratio); MCt: rounded up to 16) is the
  rounded mean kept count (at least one neuron; MCt: 16)."""
  hidden = max(int(round(mean_kept)), 1)
  if variant == 'mct':
    hidden = max(int(round(hidden / 16)), 1) * 16
  ratio = hidden / width
  return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _width(probs, family: str, width: int, heads: int, n_heads: int, prefix: str) -> dict:
  head_dim = width // heads
  new = width if family not in probs else int(round(float(probs[family].sum())))
  new = min(new, n_heads * head_dim)
  new = max(new // n_heads, 1) * n_heads
  out = {f'{prefix}.width': new}
  if n_heads != heads:
    out[f'{prefix}.heads'] = n_heads
  return out


def _mci_keep(probs, image, fams, kept_blocks) -> dict:
  out = {}
  depths = [len(kept_blocks(f'visual/stages_{i}/blocks')) for i in range(len(image.depths))]
  out['image.depths'] = tuple(depths)
  root = 'visual/stages_0/channels'
  if root in probs:
    c0 = float(probs[root].sum())
    ratios = [w // image.widths[0] for w in image.widths]
    valid = [c for c in range(1, image.widths[0] + 1)
             if all(image.token_mixers[i] != 'attention' or (c * r) % image.head_dim == 0
                    for i, r in enumerate(ratios))]
    if not valid:
      raise ValueError('No MCi width fits the attention stages\' head_dim.')
    best = min(valid, key=lambda c: abs(c - c0))
    out['image.widths'] = tuple(best * r for r in ratios)
  widths = out.get('image.widths', image.widths)
  ratios = []  # Kept neurons per kept channel, over the kept blocks (one ratio for the tower).
  for i, d in enumerate(image.depths):
    for j in kept_blocks(f'visual/stages_{i}/blocks'):
      name = f'visual/stages_{i}/blocks_{j}/mlp'
      if name in probs:
        ratios.append((max(round(float(probs[name].sum())), 1), widths[i]))
  if ratios:
    ratio = float(np.mean([h / w for h, w in ratios]))
    if not all(int(w * ratio) == h for h, w in ratios):  # Not exact: round, and guard floors.
      ratio = round(ratio, 4) + 1e-6
    out['image.mlp_ratio'] = min(ratio, min(int(w * image.mlp_ratio) / nw
                                            for w, nw in zip(image.widths, widths)))
  return out

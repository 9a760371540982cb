"""Keep specs for named targets and parameter fractions; a child's training-config overrides;
the progressive schedule (stages of inherit -> train, each from the previous stage's result).

A training config names a reduced architecture the way it names any other: as overrides of the
variant (`model.name`) in `model.*` (`config_overrides`). launch/inherit.py writes them with
`model.init_from` into `<out>/train.flags`, so a child trains with

  python launch/train.py --config=RECIPE --flagfile=<out>/train.flags --workdir=...

and its config.json says what it trained. `setup.model_config` stays the one place a model
config is built, and a mismatch between `model.init_from` and the configured model is an error
that lists the missing flags (`init_from_hint`).
"""
import dataclasses
import itertools
import json
import logging
from typing import Any, Dict, List, Mapping, Sequence

import ml_collections
import numpy as np

from mobileclip_jax import config as config_lib
from mobileclip_jax import keys
from mobileclip_jax.inheritance import slicing
from mobileclip_jax.inheritance import units
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import mci

log = logging.getLogger('mobileclip_jax')
RUN_OPTIONS = ('attention', 'qk_norm', 'dtype', 'bn_group_size', 'reparameterized')


# ----------------------------------------------------------------------------------------------
# A model config as training-config overrides.


def config_overrides(config: clip_lib.ModelConfig) -> Dict[str, Any]:
  """{'model.name': ..., 'model.text.layers': ...}: the training-config keys that build `config`.

  Raises ValueError if `config` differs from its variant in a field a training config cannot set.
  """
  base, model_keys = clip_lib.get_config(config.name), config_lib.base_config().model
  out: Dict[str, Any] = {'model.name': config.name}
  unset = []
  for field in dataclasses.fields(config):
    name, value = field.name, getattr(config, field.name)
    if name in ('image', 'text', 'decoder'):
      if type(value) is not type(getattr(base, name)):  # pylint: disable=unidiomatic-typecheck
        unset.append(name)
        continue
      for sub in dataclasses.fields(value):
        v = getattr(value, sub.name)
        if v != getattr(getattr(base, name), sub.name):
          if sub.name in model_keys[name]:
            out[f'model.{name}.{sub.name}'] = v
          else:
            unset.append(f'{name}.{sub.name}')
    elif name not in RUN_OPTIONS and name != 'name' and value != getattr(base, name):
      if name in model_keys:
        out[f'model.{name}'] = value
      else:
        unset.append(name)
  if unset:
    raise ValueError(f'{config.name} with these sizes cannot be named by a training config: '
                     f'{", ".join(unset)} differ from the variant and have no model.* key.')
  return out


def flag_lines(overrides: Mapping[str, Any]) -> List[str]:
  """`--config.KEY=VALUE` lines (absl flagfile syntax; tuples as Python literals)."""
  return [f'--config.{k}={v!r}' if isinstance(v, str) and not k.endswith(('name', 'init_from'))
          else f'--config.{k}={v}' for k, v in overrides.items()]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys of `config` (the same keys as `config_overrides` returns)."""
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split('.')
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise ValueError(f'Unknown config key {key!r}.')
      node[leaf] = value


def init_from_hint(source: clip_lib.ModelConfig, configured: clip_lib.ModelConfig,
                   variables: Mapping) -> str:
  """What to change when `model.init_from` holds other shapes than the configured model."""
  if keys.MASKS in variables.get('params', {}):
    return ('It is a learned-inheritance run (params/masks): apply its masks first, e.g. '
            'python launch/inherit.py --checkpoint=RUN --keep=masks --out=DIR.')
  try:
    want, have = config_overrides(source), config_overrides(configured)
  except ValueError as e:
    return str(e)
  missing = {k: v for k, v in want.items() if have.get(k) != v}
  extra = [k for k in have if k not in want]
  if not missing and not extra:
    return 'Check its reparameterized form and tower layouts.'
  return ('To train that architecture (e.g. one written by launch/inherit.py), pass its '
          f'--flagfile=<dir>/train.flags, or: {" ".join(flag_lines(missing))}'
          + (f' (and drop {", ".join(extra)})' if extra else '') + '.')


# ----------------------------------------------------------------------------------------------
# Keep specs for targets.


def target_keep(parent: clip_lib.ModelConfig, target: clip_lib.ModelConfig) -> Dict[str, Any]:
  """The keep spec from `parent` to the smaller `target` (e.g. MobileCLIP2-S2 -> S0).

  Blocks are kept uniformly spaced; the child must then equal `target` in every field (the
  same tower kinds, blocks, heads' size, ...), else ValueError names what differs.
  """
  keep: Dict[str, Any] = {}
  tt = target.text
  keep.update({'text.layers': tt.layers, 'text.width': tt.width, 'text.heads': tt.heads,
               'text.mlp_ratio': tt.mlp_ratio})
  if isinstance(parent.image, mci.MCiConfig) and isinstance(target.image, mci.MCiConfig):
    keep.update({'image.depths': tuple(target.image.depths),
                 'image.widths': tuple(target.image.widths),
                 'image.mlp_ratio': target.image.mlp_ratio})
  elif not isinstance(parent.image, mci.MCiConfig) and not isinstance(target.image,
                                                                       mci.MCiConfig):
    i = target.image
    keep.update({'image.depth': i.depth, 'image.width': i.width, 'image.heads': i.heads,
                 'image.mlp_ratio': i.mlp_ratio})
  else:
    raise ValueError(f'{parent.name} and {target.name} have different image tower kinds.')
  try:
    child, _ = slicing.child_config(parent, keep)
  except ValueError as e:
    raise ValueError(f'{target.name} is not a reduction of {parent.name}: {e}') from None
  child = dataclasses.replace(child, name=target.name)
  options = {k: getattr(parent, k) for k in RUN_OPTIONS}
  if child != dataclasses.replace(target, **options):
    diff = [f.name for f in dataclasses.fields(child)
            if getattr(child, f.name) != getattr(dataclasses.replace(target, **options), f.name)]
    raise ValueError(f'{target.name} is not a reduction of {parent.name}: {", ".join(diff)} '
                     'differ beyond what inheritance changes.')
  return keep


def param_fraction(parent: clip_lib.ModelConfig, child: clip_lib.ModelConfig, tower: str) -> float:
  """Parameters of a tower ('visual' or 'text') of `child` over `parent`'s."""
  count = lambda c: sum(units.leaf_count(s) for (coll, p), s in units.layout(c).shapes.items()
                        if coll == 'params' and p[0] == tower)
  return count(child) / count(parent)


def _text_candidates(t) -> List[Dict[str, Any]]:
  head_dim = t.width // t.heads
  out = []
  for layers in range(t.layers, 0, -1):
    for width in range(t.width, 0, -8 if t.width > 8 else -1):
      heads = max(1, min(t.heads, width // head_dim)) if width % head_dim == 0 else t.heads
      if width % heads or width // heads > head_dim:
        continue
      out.append({'text.layers': layers, 'text.width': width, 'text.heads': heads})
  return out


def _mci_candidates(image: mci.MCiConfig) -> List[Dict[str, Any]]:
  ratios = [w // image.widths[0] for w in image.widths]
  widths = [tuple(c * r for r in ratios) for c in range(image.widths[0], 0, -1)
            if all(image.token_mixers[i] != 'attention' or (c * r) % image.head_dim == 0
                   for i, r in enumerate(ratios))]
  out = []
  for w, s in itertools.product(widths, (1.0, 0.75, 0.5, 0.25)):
    depths = tuple(max(1, int(round(d * s))) for d in image.depths)
    out.append({'image.widths': w, 'image.depths': depths})
  return out


def _vit_candidates(image) -> List[Dict[str, Any]]:
  head_dim = image.width // image.heads
  out = []
  for depth in range(image.depth, 0, -1):
    for heads in range(image.heads, 0, -1):
      out.append({'image.depth': depth, 'image.width': heads * head_dim, 'image.heads': heads})
  return out


def fraction_keep(parent: clip_lib.ModelConfig, fraction: float,
                  towers: Sequence[str] = ('visual', 'text')) -> Dict[str, Any]:
  """A keep spec whose towers hold about `fraction` of the parent's parameters each.

  TinyCLIP's manual policy where it can: the image tower loses width first (first-k channels
  hold most of its capacity), the text tower depth (text is redundant in depth); ties go to the
  candidate closest in parameters. Candidates: MCi widths (in steps the grouped downsampling and
  head_dim allow) x depths scaled by 1, 3/4, 1/2, 1/4; ViT/text: layers x width (head_dim kept
  where the width allows).
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction={fraction}: must be in (0, 1].')
  keep: Dict[str, Any] = {}
  if 'text' in towers:
    keep.update(_closest(parent, _text_candidates(parent.text), fraction, 'text'))
  if 'visual' in towers:
    candidates = (_mci_candidates(parent.image) if isinstance(parent.image, mci.MCiConfig)
                  else _vit_candidates(parent.image))
    keep.update(_closest(parent, candidates, fraction, 'visual'))
  return keep


def _closest(parent, candidates, fraction, tower) -> Dict[str, Any]:
  best, best_err = None, None
  for keep in candidates:  # Ordered: more layers / width first, so ties keep those.
    try:
      child, _ = slicing.child_config(parent, keep)
    except ValueError:
      continue
    err = abs(param_fraction(parent, child, tower) - fraction)
    if best_err is None or err < best_err - 1e-3:
      best, best_err = keep, err
  if best is None:
    raise ValueError(f'No {tower} reduction of {parent.name} fits.')
  return best


# ----------------------------------------------------------------------------------------------
# Reading and writing keep specs.


def parse_keep(text: str) -> Dict[str, Any]:
  """'--keep' text: a JSON object, or 'key=value;key=value' with Python-literal values
  ('text.layers=6;image.widths=(32,64,128,256)'; a bare comma list is a tuple)."""
  text = text.strip()
  if text.startswith('{'):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'--keep is not valid JSON: {e}') from None
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for item in filter(None, (p.strip() for p in text.split(';'))):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--keep entry {item!r}: use key=value (e.g. text.layers=6).')
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def to_json(keep: Mapping[str, Any]) -> Dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in keep.items()}


def describe(kept: Mapping[str, np.ndarray], layout: units.Layout) -> Dict[str, Any]:
  """JSON-able summary of the kept units per family that lost some."""
  return {name: np.asarray(idx).tolist() for name, idx in kept.items()
          if len(idx) != layout.families[name].size}

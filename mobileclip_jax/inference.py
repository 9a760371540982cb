"""Cheaper inference: what evaluation and the embedding engine may reduce, and the learned parts.

`Inference` says what to do; every field's default reduces nothing:

  text.*, image.*   a models.reduce.TokenReduction per tower: ToMe merging (merge, merge_layers),
                    pruning (prune=learned|random|attention, keep, prune_layers), text
                    cut_padding
  image_size        encode every image at this side (0 = the model's), resized on the device
  cascade_size      zero-shot only: encode at this side first, and again at the model's side
  cascade_tau       when an image's top-1 minus top-2 cosine (any task) is below tau
  selector_tau      > 0: the learned resolution selector gives each image the smallest side
                    whose predicted cosine to its full-size embedding is >= tau
  bn_stats          BatchNorm statistics re-estimated per side (MCi, train-time form)

From the command line (launch/evaluate.py --inference) it is comma-separated key=value pairs,
tuples joined by '+': 'text.merge=4,image.prune=learned,image.keep=0.7,image.prune_layers=3+6'.

The learned parts are files in an inference folder beside the model (launch/train_reducer.py
writes them): `text_ranker.npz`, `image_ranker.npz` (Patch Ranking predictors),
`resolution_selector.npz`, `bn_stats.npz`. Each holds its parameters under '/'-joined paths and
a JSON `__meta__` (what it is, the model and tower it was trained for), checked on loading.
"""
import dataclasses
import io
import json
import os
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from mobileclip_jax import embedding
from mobileclip_jax import utils
from mobileclip_jax.models import reduce as reduce_lib

TEXT_RANKER, IMAGE_RANKER = 'text_ranker', 'image_ranker'
SELECTOR, BN_STATS = 'resolution_selector', 'bn_stats'
ARTIFACTS = (TEXT_RANKER, IMAGE_RANKER, SELECTOR, BN_STATS)
_META = '__meta__'
FORMAT = 'mobileclip_jax.inference/1'


@dataclasses.dataclass(frozen=True)
class Inference:
  """What to reduce at inference (module docstring); hashable."""
  text: reduce_lib.TokenReduction = reduce_lib.TokenReduction()
  image: reduce_lib.TokenReduction = reduce_lib.TokenReduction()
  image_size: int = 0
  cascade_size: int = 0
  cascade_tau: float = 0.0
  selector_tau: float = 0.0
  bn_stats: bool = False

  def __post_init__(self):
    if self.image.cut_padding:
      raise ValueError('cut_padding is a text option (image.cut_padding has no meaning).')
    sizes = dict(image_size=self.image_size, cascade_size=self.cascade_size)
    for key, value in sizes.items():
      if value < 0:
        raise ValueError(f'{key} must be >= 0, got {value}.')
    if self.cascade_tau < 0 or not 0 <= self.selector_tau < 1:
      raise ValueError('cascade_tau must be >= 0 and selector_tau in [0, 1).')
    if self.cascade_tau and not self.cascade_size:
      raise ValueError('cascade_tau needs cascade_size (the side of the first pass).')
    modes = [bool(self.image_size), bool(self.cascade_size), bool(self.selector_tau)]
    if sum(modes) > 1:
      raise ValueError('Choose one of image_size, cascade_size and selector_tau: each sets the '
                       'image side.')

  @property
  def dynamic(self) -> bool:
    return bool(self.cascade_size or self.selector_tau)

  def needs(self) -> Tuple[str, ...]:
    """The artifact files this spec reads."""
    out = []
    if self.text.prune == 'learned':
      out.append(TEXT_RANKER)
    if self.image.prune == 'learned':
      out.append(IMAGE_RANKER)
    if self.selector_tau:
      out.append(SELECTOR)
    if self.bn_stats:
      out.append(BN_STATS)
    return tuple(out)


NO_INFERENCE = Inference()
_REDUCTION_FIELDS = {f.name: f for f in dataclasses.fields(reduce_lib.TokenReduction)}
_TOP_FIELDS = {f.name for f in dataclasses.fields(Inference)} - {'text', 'image'}


def _cast(key: str, value: Any, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      if isinstance(value, str):
        if value.lower() not in ('0', '1', 'true', 'false', 'yes', 'no'):
          raise ValueError
        return value.lower() in ('1', 'true', 'yes')
      return bool(value)
    if isinstance(default, tuple):
      items = value.split('+') if isinstance(value, str) else list(value)
      return tuple(int(v) for v in items if str(v).strip())
    return type(default)(value)
  except (TypeError, ValueError):
    raise ValueError(f'Inference option {key}={value!r}: expected a {type(default).__name__}'
                     + (" ('+'-joined integers)" if isinstance(default, tuple) else '') + '.'
                     ) from None


def parse(spec: Union[None, str, Mapping[str, Any], Inference]) -> Inference:
  """An `Inference` from 'key=value,...' text, a flat dict of the same keys, or itself."""
  if spec is None or isinstance(spec, Inference):
    return spec or NO_INFERENCE
  if isinstance(spec, str):
    pairs = {}
    for item in (s.strip() for s in spec.split(',')):
      if not item:
        continue
      if '=' not in item:
        raise ValueError(f'Inference option {item!r} is not key=value (e.g. text.merge=4).')
      key, value = item.split('=', 1)
      pairs[key.strip()] = value.strip()
    spec = pairs
  top, towers = {}, {'text': {}, 'image': {}}
  valid = sorted(_TOP_FIELDS) + [f'{t}.{f}' for t in towers for f in _REDUCTION_FIELDS]
  for key, value in dict(spec).items():
    tower, _, field = key.partition('.')
    if tower in towers and field in _REDUCTION_FIELDS:
      towers[tower][field] = _cast(key, value, _REDUCTION_FIELDS[field].default)
    elif key in _TOP_FIELDS:
      top[key] = _cast(key, value, Inference.__dataclass_fields__[key].default)
    else:
      raise ValueError(f'Unknown inference option {key!r}.{utils.did_you_mean(key, valid)}')
  return Inference(text=reduce_lib.TokenReduction(**towers['text']),
                   image=reduce_lib.TokenReduction(**towers['image']), **top)


def describe(spec: Inference) -> str:
  """The non-default options as 'key=value,...' ('' for none): the inverse of `parse`."""
  out = []
  for tower in ('text', 'image'):
    for f in dataclasses.fields(reduce_lib.TokenReduction):
      value = getattr(getattr(spec, tower), f.name)
      if value != f.default:
        value = '+'.join(map(str, value)) if isinstance(value, tuple) else value
        out.append(f'{tower}.{f.name}={int(value) if isinstance(value, bool) else value}')
  for name in sorted(_TOP_FIELDS):
    value = getattr(spec, name)
    if value != Inference.__dataclass_fields__[name].default:
      out.append(f'{name}={int(value) if isinstance(value, bool) else value}')
  return ','.join(out)


# ----------------------------------------------------------------------------------------------
# Artifact files.


def tower_fingerprint(model_config, tower: str) -> Dict[str, Any]:
  """What an artifact must match: the variant and the tower's architecture and input."""
  cfg = model_config.image if tower == 'image' else model_config.text
  return {'model': model_config.name, 'tower': tower,
          'config': json.loads(json.dumps(dataclasses.asdict(cfg))),
          'image_size': model_config.image_size if tower == 'image' else None,
          'embed_dim': model_config.embed_dim}


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, path + '/'))
    else:
      out[path] = np.asarray(value)
  return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_artifact(path: str, tree: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes `tree` (nested dicts of arrays) and `meta` (JSON) to an .npz, atomically."""
  buffer = io.BytesIO()
  meta = dict(meta, format=FORMAT)
  np.savez(buffer, **_flatten(tree), **{_META: np.asarray(json.dumps(meta))})
  with utils.atomic_write(path, 'wb') as f:
    f.write(buffer.getvalue())


def load_artifact(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(tree, meta) of a file `save_artifact` wrote."""
  try:
    with np.load(path, allow_pickle=False) as data:
      if _META not in data.files:
        raise ValueError(f'{path} is not an inference artifact (no {_META}).')
      meta = json.loads(str(data[_META]))
      tree = _unflatten({k: data[k] for k in data.files if k != _META})
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} does not exist; train it with launch/train_reducer.py '
                            '(or point --inference_dir at the folder holding it).') from None
  except (OSError, ValueError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} cannot be read as an inference artifact: {e}') from None
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")!r}, not {FORMAT!r}.')
  return tree, meta


def default_dir(checkpoint: str) -> str:
  """The inference folder beside a model: DIR/inference for a checkpoint folder or training
  run, FILE_STEM.inference/ beside a weights file."""
  checkpoint = os.path.expanduser(checkpoint).rstrip('/')
  if os.path.isdir(checkpoint) or not os.path.splitext(checkpoint)[1]:
    return os.path.join(checkpoint, 'inference')
  return os.path.splitext(checkpoint)[0] + '.inference'


@dataclasses.dataclass(frozen=True)
class Artifacts:
  """The learned parts an `Inference` needs, loaded and checked: name -> (tree, meta)."""
  items: Mapping[str, Tuple[Dict[str, Any], Dict[str, Any]]] = dataclasses.field(
      default_factory=dict)

  def get(self, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    return self.items[name]

  def __contains__(self, name: str) -> bool:
    return name in self.items


def load_artifacts(folder: str, spec: Inference, model_config) -> Artifacts:
  """Loads what `spec` needs from `folder`; checks each file fits the model and the spec."""
  items = {}
  for name in spec.needs():
    if not folder:
      raise ValueError(f'The inference options need {name}.npz; give the folder holding it '
                       '(--inference_dir, written by launch/train_reducer.py).')
    path = os.path.join(os.path.expanduser(folder), f'{name}.npz')
    tree, meta = load_artifact(path)
    tower = 'text' if name == TEXT_RANKER else 'image'
    want = tower_fingerprint(model_config, tower)
    if meta.get('kind') != name or meta.get('fit') != want:
      raise ValueError(f'{path} was trained for {meta.get("fit", {}).get("model")} '
                       f'({meta.get("kind")}), not for this {model_config.name} {tower} tower; '
                       'train one for this model.')
    if name in (TEXT_RANKER, IMAGE_RANKER):
      layer = (spec.text if tower == 'text' else spec.image).prune_layers[0]
      if meta['layer'] != layer:
        raise ValueError(f'{path} ranks the tokens of block {meta["layer"]}, but '
                         f'{tower}.prune_layers starts at {layer}; use {meta["layer"]} or '
                         'train a ranker for that block.')
    items[name] = (tree, meta)
  return Artifacts(items)


# ----------------------------------------------------------------------------------------------
# From a spec to the embedding engine's passes.


def _ranker_fields(meta: Mapping[str, Any]) -> Tuple[Tuple[str, Any], ...]:
  return tuple(sorted(meta['ranker'].items()))


def tower_pass(spec: Inference, artifacts: Artifacts, tower: str, image_size: int = 0,
               full_size: int = 0):
  """(embedding.TowerPass, the variables it adds) for one tower; image_size = the side to
  encode at (`full_size`, the model's, needs no resize)."""
  reduction = spec.text if tower == 'text' else spec.image
  name = TEXT_RANKER if tower == 'text' else IMAGE_RANKER
  extra, ranker = {}, ()
  if name in artifacts:
    tree, meta = artifacts.get(name)
    extra['ranker'], ranker = tree, _ranker_fields(meta)
  side = image_size if image_size and image_size != full_size else 0
  return embedding.TowerPass(reduction=reduction if reduction != reduce_lib.TokenReduction()
                             else None, image_size=side, ranker=ranker), extra


def selector_pass(artifacts: Artifacts):
  """(TowerPass, variables, sides) of the resolution selector."""
  tree, meta = artifacts.get(SELECTOR)
  return (embedding.TowerPass(selector=tuple(sorted(meta['selector'].items()))),
          {'selector': tree}, tuple(meta['sizes']))


def image_variables(variables: Mapping[str, Any], artifacts: Artifacts, side: int,
                    full_size: int) -> Mapping[str, Any]:
  """The variables to encode at `side`: the image tower's BatchNorm statistics re-estimated
  at that side when `bn_stats.npz` has them (the model's own at full size)."""
  if BN_STATS not in artifacts or side == full_size:
    return variables
  tree, meta = artifacts.get(BN_STATS)
  if str(side) not in tree:
    raise ValueError(f'bn_stats.npz has statistics for sides {meta["sizes"]}, not {side}; '
                     'rerun launch/train_reducer.py --task=bn_stats with it.')
  stats = dict(variables.get('batch_stats', {}))
  if 'visual' not in stats:
    raise ValueError('bn_stats needs the train-time form of the image tower (BatchNorm '
                     'statistics), not a reparameterized one.')
  stats['visual'] = tree[str(side)]
  return {**variables, 'batch_stats': stats}


def check_side(model_config, side: int) -> None:
  """Raises when the image tower cannot take `side` (MCi: a multiple of its stride; ViT: of
  its patch)."""
  stride = getattr(model_config.image, 'stride', None) or model_config.image.patch_size
  if side <= 0 or side % stride:
    raise ValueError(f'{model_config.name} takes image sides that are multiples of {stride}; '
                     f'{side} is not.')

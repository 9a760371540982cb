"""Checkpoint interchange files: PyTorch state_dicts on disk, the configs beside them, and the
two conversions between this project's Orbax checkpoints and PyTorch files.

State_dict files: `.safetensors` (read and written with `safetensors.numpy`; torch is not
needed), `.pt` / `.pth` / `.bin` (torch pickles, read with `torch.load(weights_only=True)`) and
`.npz`. Reading unwraps `{'state_dict': ...}` (open_clip's training checkpoints) and strips the
`module.` prefix of DDP; tensors come back as numpy arrays (bfloat16/float16 as float32).
Writing is atomic: a temporary file in the target directory, renamed into place once complete.

Beside an exported state_dict goes a JSON config in the vocabulary of the library that loads it:
  open_clip  `open_clip_config.json`: `model_cfg` (open_clip's model config, when the model is one
             open_clip can build) and `preprocess_cfg` (size, mean, std, interpolation,
             resize_mode), so `open_clip.create_model_and_transforms('local-dir:DIR')` works when
             the weights are named `open_clip_model.safetensors` (or any *.safetensors / *.bin).
  timm       `config.json`: `architecture`, `num_classes` and timm's `pretrained_cfg`
             (input_size, interpolation, mean, std, crop_pct), as
             `timm.create_model('local-dir:DIR')` reads it (with the weights as `model.safetensors`
             or `pytorch_model.bin`).
  apple_v1   `mobileclip_config.json`: Apple's model name and `preprocess_cfg`.
Each also holds a `mobileclip_jax` section with the full ModelConfig (tokenizer, context length
and every override), so converting back restores the exact model.
"""
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import jax
import numpy as np

from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import utils
from mobileclip_jax.convert import apple_v1
from mobileclip_jax.convert import open_clip as open_clip_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import coca as coca_lib
from mobileclip_jax.models import mci
from mobileclip_jax.models import reparam
from mobileclip_jax.models import text as text_lib
from mobileclip_jax.models import vit

TORCH_SUFFIXES = ('.pt', '.pth', '.bin')
SUFFIXES = TORCH_SUFFIXES + ('.safetensors', '.npz')
FORMATS = ('open_clip', 'timm', 'apple_v1')
SIDECAR_NAMES = {'open_clip': 'open_clip_config.json', 'timm': 'config.json',
                 'apple_v1': 'mobileclip_config.json'}
SECTION = 'mobileclip_jax'

StateDict = Dict[str, np.ndarray]


# ---- State_dict files ----

def _suffix(path: str) -> str:
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(f'{path}: unknown state_dict file type {suffix!r}; use one of '
                     f'{", ".join(SUFFIXES)}.')
  return suffix


def _import_torch(path: str):
  try:
    return importlib.import_module('torch')
  except ImportError as err:
    raise ImportError(f'{path}: reading or writing {", ".join(TORCH_SUFFIXES)} files needs PyTorch '
                      '(pip install torch), or use .safetensors, which does not.') from err


def _read_torch(path: str) -> Mapping[str, Any]:
  torch = _import_torch(path)
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as err:  # pylint: disable=broad-except  (torch raises many kinds here)
    raise ValueError(f'{path} is not a readable PyTorch checkpoint (truncated, corrupt, or not a '
                     f'torch.save file holding only tensors): {type(err).__name__}: '
                     f'{str(err).splitlines()[0] if str(err) else ""}') from err
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']  # open_clip's training checkpoints: {'epoch', 'state_dict', ...}.
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors).')
  state = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected '
                       "a state_dict or {'state_dict': state_dict}.")
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float64:
      value = value.float()  # numpy has no bfloat16.
    state[key] = value.numpy()
  return state


def _read_safetensors(path: str) -> StateDict:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    try:
      return safetensors.numpy.load_file(path)
    except TypeError:  # bfloat16, which numpy cannot represent: read through JAX instead.
      import safetensors.flax  # pylint: disable=g-import-not-at-top
      return {k: np.asarray(v, np.float32 if v.dtype == jax.numpy.bfloat16 else v.dtype)
              for k, v in safetensors.flax.load_file(path).items()}
  except SafetensorError as err:
    raise ValueError(f'{path} is not a readable safetensors file (truncated or corrupt): '
                     f'{err}') from err


def _read_npz(path: str) -> StateDict:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
    raise ValueError(f'{path} is not a readable .npz file (truncated or corrupt): {err}') from err


def read_state_dict(path: str) -> StateDict:
  """Reads a state_dict file into {key: numpy array}; see the module docstring for formats.

  Raises FileNotFoundError for a missing file and ValueError (naming the file) for a truncated,
  corrupt or non-checkpoint file.
  """
  path = os.fspath(path)
  suffix = _suffix(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such checkpoint file: {path}')
  if suffix == '.safetensors':
    state = _read_safetensors(path)
  elif suffix == '.npz':
    state = _read_npz(path)
  else:
    state = dict(_read_torch(path))
  if not state:
    raise ValueError(f'{path} holds an empty state_dict.')
  if all(k.startswith('module.') for k in state):  # Saved from a DistributedDataParallel wrapper.
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state


def _write_state_dict_now(state: Mapping[str, np.ndarray], path: str, suffix: str) -> None:
  # Not np.ascontiguousarray, which turns 0-d arrays (logit_scale) into 1-d ones.
  arrays = {k: np.asarray(v, order='C') for k, v in state.items()}
  if suffix == '.safetensors':
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    safetensors.numpy.save_file(arrays, path, metadata={'format': 'pt'})
  elif suffix == '.npz':
    with open(path, 'wb') as f:
      np.savez(f, **arrays)
  else:
    torch = _import_torch(path)
    torch.save({k: torch.from_numpy(np.require(v, requirements='W')) for k, v in arrays.items()},
               path)


def _check_absent(paths, overwrite: bool) -> None:
  existing = [os.fspath(p) for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f'Will not overwrite the existing {", ".join(existing)}; choose another '
                          'path or pass overwrite=True (--overwrite).')


@contextlib.contextmanager
def _new_directory(directory: str) -> Iterator[None]:
  """Creates `directory` (and missing parents); removes what it created if the body fails."""
  first_missing, parent = None, os.path.abspath(directory)
  while not os.path.exists(parent):
    first_missing, parent = parent, os.path.dirname(parent)
  os.makedirs(directory, exist_ok=True)
  try:
    yield
  except BaseException:
    if first_missing is not None:
      shutil.rmtree(first_missing, ignore_errors=True)
    raise


def write_files(writers: Mapping[str, Callable[[str], None]], overwrite: bool = False) -> None:
  """Writes several files all-or-nothing: each `writer(tmp_path)` writes a temporary file in the
  target's directory; only when every one succeeded are they renamed into place.

  Raises FileExistsError (before writing anything) if a target exists and not `overwrite`.
  """
  _check_absent(list(writers), overwrite)
  temps = []
  directories = sorted({os.path.dirname(os.path.abspath(p)) for p in writers})
  with contextlib.ExitStack() as stack:
    for directory in directories:
      stack.enter_context(_new_directory(directory))
    try:
      for path, writer in writers.items():
        base = os.path.basename(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f'.{base}.',
                                   suffix='.tmp')
        os.close(fd)
        temps.append((tmp, path))
        writer(tmp)
        os.chmod(tmp, utils.FILE_MODE)  # mkstemp's 0600 would stick to the result.
      for tmp, path in temps:
        os.replace(tmp, path)
    except BaseException:
      for tmp, _ in temps:
        if os.path.exists(tmp):
          os.remove(tmp)
      raise


def write_state_dict(state: Mapping[str, np.ndarray], path: str, overwrite: bool = False) -> None:
  """Writes {key: array} to `path` (.safetensors / .pt / .pth / .bin / .npz), atomically."""
  path = os.fspath(path)
  suffix = _suffix(path)
  if suffix in TORCH_SUFFIXES:
    _import_torch(path)  # Fail before writing anything.
  write_files({path: lambda tmp: _write_state_dict_now(state, tmp, suffix)}, overwrite)


# ---- The configs written beside exports ----

def preprocess_cfg(config: clip_lib.ModelConfig) -> Dict[str, Any]:
  """open_clip's PreprocessCfg: resize the shortest side to `size`, centre crop, normalize."""
  return {'size': config.image_size, 'mode': 'RGB', 'mean': list(config.mean),
          'std': list(config.std), 'interpolation': config.interpolation,
          'resize_mode': 'shortest', 'fill_color': 0}


# timm architectures of the image towers of named variants (open_clip builds them by name).
_TIMM_VIT_VARIANTS = {'MobileCLIP2-B': 'vit_base_mci_224',
                      'MobileCLIP2-L-14': 'vit_large_patch14_clip_224'}


def timm_architecture(config: clip_lib.ModelConfig) -> Optional[str]:
  """The timm model name of the image tower (e.g. 'fastvit_mci0'), or None if timm has none."""
  image = config.image
  if config.image_layout != 'timm':
    return None
  if isinstance(image, mci.MCiConfig):
    return next((f'fastvit_{k}' for k, c in mci.MCI_CONFIGS.items() if c == image), None)
  for name, arch in _TIMM_VIT_VARIANTS.items():
    known = clip_lib.MODEL_CONFIGS[name]
    if (dataclasses.replace(known.image, drop_path=0.0) == dataclasses.replace(image, drop_path=0.0)
        and known.image_size == config.image_size):
      return arch
  return None


def _open_clip_vision_cfg(config: clip_lib.ModelConfig) -> Optional[Dict[str, Any]]:
  """open_clip's own VisionTransformer settings for a ViT in open_clip's layout, if it can be one."""
  image = config.image
  if config.image_layout != 'open_clip' or not isinstance(image, vit.ViTConfig):
    return None
  expressible = vit.ViTConfig(
      width=image.width, depth=image.depth, heads=image.heads, patch_size=image.patch_size,
      mlp_ratio=image.mlp_ratio, patch_bias=False, norm_pre=True, head_bias=False, act=image.act,
      norm_eps=1e-5)
  if image != expressible or image.width % image.heads:
    return None
  return {'image_size': config.image_size, 'layers': image.depth, 'width': image.width,
          'head_width': image.width // image.heads, 'patch_size': image.patch_size,
          'mlp_ratio': image.mlp_ratio}


def _open_clip_coca_cfg(config: coca_lib.CoCaConfig) -> Dict[str, Any]:
  """open_clip's CoCa config (as `model_configs/coca_*.json`, with every size written out)."""
  i, t, d = config.image, config.text, config.decoder
  shared = {'context_length': t.context_length, 'vocab_size': t.vocab_size}
  return {
      'embed_dim': config.embed_dim,
      'vision_cfg': {'image_size': config.image_size, 'layers': i.depth, 'width': i.width,
                     'head_width': i.width // i.heads, 'patch_size': i.patch_size,
                     'mlp_ratio': i.mlp_ratio, 'attentional_pool': True,
                     'attn_pooler_queries': i.attn_pool_queries,
                     'attn_pooler_heads': i.attn_pool_heads, 'output_tokens': True},
      'text_cfg': {**shared, 'width': t.width, 'heads': t.heads, 'layers': t.layers,
                   'mlp_ratio': t.mlp_ratio, 'embed_cls': True, 'output_tokens': True},
      'multimodal_cfg': {**shared, 'context_length': d.context_length, 'width': d.width,
                         'heads': d.heads, 'layers': d.layers, 'mlp_ratio': d.mlp_ratio},
      'custom_text': True,
  }


def open_clip_model_cfg(config) -> Optional[Dict[str, Any]]:
  """open_clip's model config (its `model_configs/*.json` vocabulary) for `config`, or None when
  open_clip cannot build this model (MCt text tower, reduced MCi towers, sigmoid attention,
  QK-norm, ...). Towers in timm's layout must be a timm architecture; CLIP ViTs in open_clip's
  own layout may have any size; CoCa captioners are open_clip's own."""
  if isinstance(config, coca_lib.CoCaConfig):
    return _open_clip_coca_cfg(config)
  t = config.text
  plain_text = text_lib.TextConfig(width=t.width, heads=t.heads, layers=t.layers,
                                   vocab_size=t.vocab_size, context_length=t.context_length,
                                   causal=t.causal, act=t.act)
  if t != plain_text or config.attention != 'softmax' or config.qk_norm:
    return None
  text_cfg = {'context_length': t.context_length, 'vocab_size': t.vocab_size, 'width': t.width,
              'heads': t.heads, 'layers': t.layers, 'no_causal_mask': not t.causal}
  arch = timm_architecture(config)
  vision_cfg = _open_clip_vision_cfg(config)
  if arch is not None and config.text_layout == 'open_clip_custom':
    is_mci = isinstance(config.image, mci.MCiConfig)
    cfg = {
        'embed_dim': config.embed_dim,
        'vision_cfg': {'timm_model_name': arch, 'timm_model_pretrained': False,
                       'timm_pool': 'avg' if is_mci else 'token', 'timm_proj': None,
                       'timm_drop': 0.0,
                       'timm_drop_path': 0.0 if is_mci else config.image.drop_path,
                       'image_size': config.image_size},
        'text_cfg': text_cfg,
        'custom_text': True,
    }
  elif vision_cfg is not None and config.text_layout == 'open_clip' and t.act == config.image.act:
    cfg = {'embed_dim': config.embed_dim, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg}
    if t.act == 'quick_gelu':
      cfg['quick_gelu'] = True
  else:
    return None
  if config.init_logit_bias is not None:
    cfg['init_logit_bias'] = config.init_logit_bias
  return cfg


def _section(config: clip_lib.ModelConfig, weights: str, fmt: str) -> Dict[str, Any]:
  return {'weights': os.path.basename(weights), 'format': fmt,
          'reparameterized': getattr(config, 'reparameterized', False),
          'tokenizer': config.tokenizer,
          'context_length': config.text.context_length,
          'model_config': clip_lib.config_to_dict(config)}


def sidecar_config(config: clip_lib.ModelConfig, weights: str, fmt: str) -> Dict[str, Any]:
  """The JSON written beside an export of `config` in format `fmt` (see the module docstring)."""
  if fmt == 'timm':
    arch = timm_architecture(config)
    pretrained = {'input_size': [3, config.image_size, config.image_size],
                  'interpolation': config.interpolation, 'mean': list(config.mean),
                  'std': list(config.std), 'crop_pct': 1.0, 'crop_mode': 'center',
                  'num_classes': config.embed_dim}
    return {'architecture': arch, 'num_classes': config.embed_dim, 'pretrained_cfg': pretrained,
            SECTION: _section(config, weights, fmt)}
  out = {}
  if fmt == 'open_clip':
    model_cfg = open_clip_model_cfg(config)
    if model_cfg is not None:
      out['model_cfg'] = model_cfg
  else:
    out['model_name'] = next((k for k, v in apple_v1.APPLE_V1_MODELS.items()
                              if dataclasses.replace(config, reparameterized=False)
                              == clip_lib.get_config(v)), None)
  out['preprocess_cfg'] = preprocess_cfg(config)
  out[SECTION] = _section(config, weights, fmt)
  return out


def sidecar_path(weights: str, fmt: str) -> str:
  return os.path.join(os.path.dirname(os.fspath(weights)), SIDECAR_NAMES[fmt])


def model_config_beside(weights: str) -> Optional[clip_lib.ModelConfig]:
  """The ModelConfig recorded by an export of `weights` in a config beside it, if there is one."""
  for name in SIDECAR_NAMES.values():
    path = os.path.join(os.path.dirname(os.fspath(weights)), name)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      section = json.load(f).get(SECTION, {})
    if section.get('weights') == os.path.basename(weights) and 'model_config' in section:
      return clip_lib.config_from_dict(section['model_config'])
  return None


# ---- Orbax checkpoints <-> PyTorch files ----

def export_checkpoint(checkpoint: str, out: str, step: Optional[int] = None,
                      reparameterize: bool = False, fmt: str = 'open_clip',
                      overwrite: bool = False) -> Dict[str, str]:
  """A model checkpoint or training run (see `checkpoint.load_variables`) -> a PyTorch file.

  fmt 'open_clip': the whole model in open_clip's names (`open_clip.create_model(name)` loads it
  with strict=True; reparameterized, it loads into `timm.models.reparameterize_model(model)`;
  MobileCLIP-S0's MCt text tower has no open_clip model, so use 'apple_v1' for it);
  'timm': the image tower alone in timm's names (`timm.create_model(arch, num_classes=embed_dim)`);
  'apple_v1': Apple's v1 names (train-time only). The config goes beside it (`sidecar_path`).
  Returns {'weights': path, 'config': path}. Nothing is written if any step fails.
  """
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}.')
  suffix = _suffix(out)
  if suffix in TORCH_SUFFIXES:
    _import_torch(out)
  config_out = sidecar_path(out, fmt)
  _check_absent([out, config_out], overwrite)  # Before the (slow) loading and conversion.
  variables, config = checkpoint_lib.load_variables(checkpoint, step)
  if isinstance(config, coca_lib.CoCaConfig) and (fmt != 'open_clip' or reparameterize):
    raise ValueError(f'{config.name} is a CoCa captioner (no reparameterizable branch): export '
                     'it with --format=open_clip and without --reparameterize.')
  if reparameterize and not config.reparameterized:
    config = dataclasses.replace(config, reparameterized=True)  # Validates: needs an MCi/MCt tower.
    variables = jax.tree.map(np.asarray, jax.jit(reparam.reparameterize)(variables))
  if fmt == 'timm':
    if timm_architecture(config) is None:
      raise ValueError(f'The image tower of {config.name} is not a timm architecture (timm has '
                       'fastvit_mci0..4, vit_base_mci_224, vit_large_patch14_clip_224 at their '
                       'released sizes); export it with --format=open_clip.')
    state = open_clip_lib.to_open_clip(variables, config, tower='visual')
  elif fmt == 'apple_v1':
    state = apple_v1.to_apple_v1(variables, config)
  else:
    state = open_clip_lib.to_open_clip(variables, config)
  sidecar = json.dumps(sidecar_config(config, out, fmt), indent=1)
  def write_sidecar(tmp):
    with open(tmp, 'w') as f:
      f.write(sidecar)
  write_files({out: lambda tmp: _write_state_dict_now(state, tmp, suffix),
               config_out: write_sidecar}, overwrite)
  return {'weights': os.fspath(out), 'config': config_out}


def import_checkpoint(torch_checkpoint: str, out: str,
                      model: Optional[str] = None) -> clip_lib.ModelConfig:
  """A PyTorch file (open_clip or Apple v1 names, train-time or reparameterized) -> a model
  checkpoint at `out` (`checkpoint.save_variables`), which training and evaluation read.

  `model` names the variant; without it, the config written beside the file by
  `export_checkpoint` is used, or, for Apple's checkpoints, the variant whose keys match.
  Returns the saved ModelConfig. `out` must not exist (or be an empty directory); it appears
  only once complete.
  """
  out = os.fspath(out)
  if '://' not in out:
    out = os.path.normpath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f'{out} already exists and is not empty; choose a new directory.')
  state = read_state_dict(torch_checkpoint)
  is_apple = apple_v1.is_apple_v1(state)
  if model is not None:
    config = clip_lib.get_config(model)
  else:
    config = model_config_beside(torch_checkpoint)
    if config is None and is_apple:
      name = apple_v1.match_apple_v1_model({k: v.shape for k, v in state.items()})
      config = clip_lib.get_config(name) if name else None
    if config is None:
      raise ValueError(f'Which variant is {torch_checkpoint}? Pass --model (e.g. MobileCLIP2-S0); '
                       'no config written by this project lies beside it.')
  if is_apple:
    variables = apple_v1.from_apple_v1(state, dataclasses.replace(config, reparameterized=False))
    config = apple_v1.apple_semantics(config)
  elif not any(k.startswith(('visual.', 'text.')) for k in state):
    raise ValueError(f"{torch_checkpoint} holds no CLIP model in open_clip's or Apple's names (its "
                     f'keys start like {sorted(state)[:3]}); an image tower alone, e.g. a timm '
                     'export, cannot make a model checkpoint.')
  else:
    variables = open_clip_lib.from_open_clip(state, config)
  if isinstance(config, clip_lib.ModelConfig):
    config = dataclasses.replace(config, reparameterized=reparam.is_reparameterized(variables))
  if '://' in out:  # Remote storage: no rename; model.json is written last, marking completion.
    checkpoint_lib.save_variables(out, variables, config)
    return config
  parent = os.path.dirname(os.path.abspath(out))
  with _new_directory(parent):
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.')
    try:
      checkpoint_lib.save_variables(tmp, variables, config)
      os.chmod(tmp, utils.DIR_MODE)  # mkdtemp's 0700 would stick to the result.
      os.replace(tmp, out)
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
  return config

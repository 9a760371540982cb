"""Training configuration: the defaults of every key, presets, durations and override checking.

Config files in configs/ define `get_config(arg=None)` and start from `base_config()`; `arg` is
a comma list of presets (`configs/s4.py:runlocal`). Every key exists here with a default, so an
override of an unknown key (`--config.optim.lrr=1`) fails at start naming the nearest keys.
Optional values are typed placeholders (None until set) so that they can be overridden on the
command line.

Durations (`schedule.total`, `schedule.warmup`, `checkpoint.every`, ...) are an int (steps) or
a string '<number>_steps' | '<number>_epochs' | '<number>_examples' (e.g. '200000_steps',
'30_epochs', '13e9_examples'); epochs need the dataset size.
"""
import difflib
import importlib.util
import math
import re
from typing import Iterable, List, Optional, Sequence, Union

import ml_collections
from ml_collections.config_dict import placeholder

ConfigDict = ml_collections.ConfigDict
PRESETS = ('runlocal', 'ablation_12m')
DEMO_DATA_DIR = '~/.cache/mobileclip_jax/demo/tfds'


def base_config() -> ConfigDict:
  """Every key of a training config with its default (the MobileCLIP2 recipe where it applies)."""
  c = ConfigDict()
  c.seed = 0

  c.model = ConfigDict(dict(
      name='MobileCLIP2-S0',
      attention='softmax',       # 'softmax' | 'sigmoid' in every attention layer.
      qk_norm=False,
      dtype='float32',           # Compute dtype; 'bfloat16' keeps float32 parameters.
      bn_group_size=0,           # Examples per BatchNorm statistics group; 0 = the global batch.
      embed_dim=placeholder(int),
      image_size=placeholder(int),
      init_from='',              # A model checkpoint or training run to start the weights from.
  ))
  c.model.image = ConfigDict(dict(  # Image tower overrides (None = the variant's value).
      depths=placeholder(tuple), widths=placeholder(tuple), token_mixers=placeholder(tuple),
      pos_emb=placeholder(tuple), se_downsample=placeholder(tuple), mlp_ratio=placeholder(float),
      # ViT
      width=placeholder(int), depth=placeholder(int), heads=placeholder(int),
      patch_size=placeholder(int), drop_path=placeholder(float)))
  c.model.text = ConfigDict(dict(   # Text tower overrides (None = the variant's value).
      width=placeholder(int), heads=placeholder(int), layers=placeholder(int),
      context_length=placeholder(int), vocab_size=placeholder(int), causal=placeholder(bool),
      layer_scale_init=placeholder(float), hybrid_norm=placeholder(bool)))

  c.data = ConfigDict(dict(
      name='datacompdr_12m',     # TFDS dataset name (or a directory), built by launch/build_dataset.py.
      data_dir='~/tensorflow_datasets',
      split='train',
      tokenizer=placeholder(str),  # Default: the model's ('clip').
      syn_key_regex='^syn_text.*$',
      workers=0,                 # Grain decoding processes per host (0 = in the main process).
      prefetch=2,
      error_policy='skip',       # 'skip' (counted, within max_corrupt) | 'fail'
      max_corrupt='0.001',       # Skip budget: a count ('100') or a fraction ('0.001', '0.1%').
  ))
  c.batch_size = 65536           # Global batch (all hosts).
  c.accum_steps = 1              # Micro-batches per step (embeddings gathered across them).

  c.schedule = ConfigDict(dict(total='200000_steps', warmup='1000_steps', kind='cosine',
                               constant='0_steps'))  # 'cosine' | 'constant_cosine' (B-LT).
  c.optim = ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.95, eps=placeholder(float), weight_decay=0.2,
                            grad_clip=1.0))

  c.loss = ConfigDict(dict(
      kind='softmax',            # 'softmax' (CLIP) | 'sigmoid' (SigLIP) contrastive loss.
      clip_weight=0.0,           # (1 - lambda) on reinforced data.
      distill_weight=1.0,        # lambda on reinforced data.
      gt_weight=1.0, syn_weight=1.0,
      teacher_scales=(70.0, 60.0),
      teacher_biases=placeholder(tuple),
      average='probs',           # 'probs' (average after softmax) | 'logits'
      student_scale=placeholder(float),
      objective='auto',          # 'auto' (DR on reinforced data, CLIP on plain) | 'clip' | 'dr'
      block_size=1024,           # Columns per block of the streamed loss (memory per device
                                 # O(local batch x block)); 0 = whole [local, global] logits.
  ))

  c.mesh = ConfigDict(dict(data=-1, fsdp=1))
  c.sharding = ConfigDict(dict(min_fsdp_size=2 ** 14))

  c.checkpoint = ConfigDict(dict(every='2000_steps', keep_last=3, keep_every=placeholder(str),
                                 async_save=True))
  c.log_every = 50
  c.evals = ConfigDict()         # name -> evaluator spec (see mobileclip_jax.evaluation).
  c.distributed = ConfigDict(dict(coordinator_address=placeholder(str),
                                  num_processes=placeholder(int), process_id=placeholder(int),
                                  heartbeat_timeout_s=100, initialization_timeout_s=300))
  return c


def runlocal(c: ConfigDict) -> ConfigDict:
  """Shrinks batch, steps and data to the demo world, keeping the architecture: a CPU smoke run."""
  c.data.name = 'demo_world_reinforced'   # Falls back to 'demo_world' (plain) if not built.
  c.data.data_dir = DEMO_DATA_DIR
  c.data.syn_key_regex = base_config().data.syn_key_regex  # Recipes name DataCompDR's keys.
  # Batch 8 at 128 px: an S4 step (full architecture) then needs ~4 GB instead of ~26 at 16 x 256.
  c.model.image_size = 128
  c.batch_size = 8
  c.schedule.total = '20_steps'
  c.schedule.warmup = '5_steps'
  c.checkpoint.every = '10_steps'
  c.log_every = 5
  return c


def apply_presets(c: ConfigDict, arg: Optional[str]) -> ConfigDict:
  """Applies the comma-separated presets in `arg` (e.g. 'runlocal')."""
  for preset in [p for p in (arg or '').split(',') if p]:
    if preset not in PRESETS:
      raise ValueError(f'Unknown config preset {preset!r}; presets: {", ".join(PRESETS)}.')
    c = {'runlocal': runlocal, 'ablation_12m': ablation_12m}[preset](c)
  return c


_DURATION = re.compile(r'^\s*([0-9.eE+_]+)\s*_(steps|epochs|examples)\s*$')


def parse_duration(value: Union[int, str], batch_size: int,
                   dataset_size: Optional[int] = None, name: str = 'duration') -> int:
  """Steps for an int or a '<n>_steps' | '<n>_epochs' | '<n>_examples' string."""
  if isinstance(value, int):
    return value
  match = _DURATION.match(str(value))
  if not match:
    raise ValueError(f"{name}={value!r}: use an int (steps) or '<n>_steps', '<n>_epochs', "
                     f"'<n>_examples' (e.g. '30_epochs').")
  amount, unit = float(match.group(1).replace('_', '')), match.group(2)
  if unit == 'steps':
    return int(amount)
  if unit == 'examples':
    return int(math.ceil(amount / batch_size))
  if dataset_size is None:
    raise ValueError(f'{name}={value!r} is in epochs, but the dataset size is unknown.')
  return int(math.ceil(amount * dataset_size / batch_size))


def flat_keys(c: ConfigDict, prefix: str = '') -> List[str]:
  """Dotted names of every leaf key ('optim.lr', 'model.image.depths', ...)."""
  keys = []
  for k, v in c.items():
    if isinstance(v, ConfigDict) and len(v):
      keys += flat_keys(v, f'{prefix}{k}.')
    else:
      keys.append(f'{prefix}{k}')
  return keys


def load_config_file(spec: str) -> ConfigDict:
  """`path.py[:arg]` -> the file's get_config(arg)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_mobileclip_config', path)
  if module_spec is None:
    raise FileNotFoundError(f'Config file {path!r} not found.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_overrides(argv: Sequence[str], flag: str = 'config') -> None:
  """Fails early, with the nearest valid keys, on `--config.<key>=...` for an unknown key."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if spec is None:
    return
  valid = flat_keys(load_config_file(spec))
  evals_prefix = 'evals.'  # Evaluator entries are free-form (named by the user).
  for arg in argv:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if key in valid or key.startswith(evals_prefix):
      continue
    nearest = difflib.get_close_matches(key, valid, n=3, cutoff=0.4)
    hint = f' Nearest valid keys: {", ".join(nearest)}.' if nearest else ''
    raise SystemExit(f'Unknown config key {key!r} in {arg!r}.{hint}')


def overridden(c: ConfigDict) -> dict:
  """The non-None entries of a ConfigDict of optional overrides, as a plain dict."""
  return {k: v for k, v in c.to_dict().items() if v is not None}


def as_tuple(value: Union[Sequence[float], str, float, None]) -> Optional[tuple]:
  """Accepts (70, 60), '70,60' or 70 -> a tuple of floats."""
  if value is None:
    return None
  if isinstance(value, str):
    return tuple(float(x) for x in value.split(',') if x.strip())
  if isinstance(value, Iterable):
    return tuple(float(x) for x in value)
  return (float(value),)


def mobileclip2_recipe(model_name: str) -> ConfigDict:
  """MobileCLIP2's released recipe (DFNDR-2B; Apple's run_dfndr2b.sh and its model configs).

  Global batch 65,536 for 200k steps (13.1B seen samples), AdamW lr 1e-3, beta2 0.95, wd 0.2,
  1k warmup steps then cosine, clip 1.0; pure distillation (lambda = 1) from two DFN2B ViT-L/14
  teachers with logit scales 70 and 60, averaged after softmax.
  """
  c = base_config()
  c.model.name = model_name
  c.data.name = 'dfndr_2b'
  c.data.syn_key_regex = '^syn_text_dfn_mscoco38k$'
  c.loss.teacher_scales = (70.0, 60.0)
  c.loss.clip_weight, c.loss.distill_weight = 0.0, 1.0
  return c


def mobileclip_v1_recipe(model_name: str) -> ConfigDict:
  """MobileCLIP (v1) on DataCompDR-1B: OpenAI + DataComp-XL ViT-L/14 teachers at scale 100.

  lambda = 1 for the S variants and 0.75 for B (Apple's run_datacompdr1b.sh).
  """
  c = base_config()
  c.model.name = model_name
  c.data.name = 'datacompdr_1b'
  c.loss.teacher_scales = (100.0, 100.0)
  lam = 0.75 if model_name.endswith('-B') else 1.0
  c.loss.clip_weight, c.loss.distill_weight = 1.0 - lam, lam
  return c


def ablation_12m(c: ConfigDict) -> ConfigDict:
  """The 12M-scale ablation schedule: DataCompDR-12M, batch 8,192, 30k steps (246M samples)."""
  c.data.name = 'datacompdr_12m'
  c.batch_size = 8192
  c.schedule.total = '30000_steps'
  return c

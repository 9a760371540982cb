"""Training configuration: the defaults of every key, presets, durations and override checking.

Config files in configs/ define `get_config(arg=None)`, start from `base_config()` and set their
recipe's values; `arg` names a variant and then presets (`configs/mobileclip2.py:s4,runlocal`).
Every key exists here with a default, so an override of an unknown key (`--config.optim.lrr=1`)
fails at start naming the nearest keys.
Optional values are typed placeholders (None until set) so that they can be overridden on the
command line.

Durations (`schedule.total`, `schedule.warmup`, `checkpoint.every`, ...) are an int (steps) or
a string '<number>_steps' | '<number>_epochs' | '<number>_examples' (e.g. '200000_steps',
'30_epochs', '13e9_examples'); epochs need the dataset size.
"""
import ast
import importlib.util
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ml_collections
from ml_collections.config_dict import placeholder

from mobileclip_jax import rules
from mobileclip_jax import utils

ConfigDict = ml_collections.ConfigDict
PRESETS = ('runlocal', 'ablation_12m')
DEMO_DATA_DIR = '~/.cache/mobileclip_jax/demo/tfds'
# The recipes of a checkout (configs/ beside the package).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


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
      init_logit_scale=placeholder(float),  # Log of the initial logit scale (None: log(1/0.07)).
      init_logit_bias=placeholder(float),   # Initial logit bias; the sigmoid loss needs one
                                            # (SigLIP: -10 with init_logit_scale log(10)).
  ))
  c.model.image = ConfigDict(dict(  # Image tower overrides (None = the variant's value).
      depths=placeholder(tuple), widths=placeholder(tuple), token_mixers=placeholder(tuple),
      pos_emb=placeholder(tuple), se_downsample=placeholder(tuple), mlp_ratio=placeholder(float),
      # ViT
      width=placeholder(int), depth=placeholder(int), heads=placeholder(int),
      patch_size=placeholder(int), drop_path=placeholder(float),
      attn_pool_queries=placeholder(int), attn_pool_heads=placeholder(int)))  # CoCa's pooler.
  c.model.text = ConfigDict(dict(   # Text tower overrides (None = the variant's value).
      width=placeholder(int), heads=placeholder(int), layers=placeholder(int),
      mlp_ratio=placeholder(float), context_length=placeholder(int), vocab_size=placeholder(int),
      causal=placeholder(bool),
      layer_scale_init=placeholder(float), hybrid_norm=placeholder(bool)))
  c.model.decoder = ConfigDict(dict(  # CoCa's multimodal decoder overrides (models/coca.py).
      width=placeholder(int), heads=placeholder(int), layers=placeholder(int),
      mlp_ratio=placeholder(float), context_length=placeholder(int)))

  c.data = ConfigDict(dict(
      name='datacompdr_12m',     # TFDS dataset name (or a directory), built by launch/build_dataset.py.
      data_dir='~/tensorflow_datasets',
      split='train',
      tokenizer=placeholder(str),  # Default: the model's ('clip').
      syn_key_regex='^syn_text.*$',
      # Relative weights of the synthetic-caption keys (those syn_key_regex selects) in the draw
      # of an example's key, e.g. {'syn_text_a': 2, 'syn_text_b': 1}; empty = uniform (Apple's).
      syn_key_weights=ConfigDict(),
      workers=0,                 # Grain decoding processes per host (0 = in the main process).
      prefetch=2,
      error_policy='skip',       # 'skip' (counted, within max_corrupt) | 'fail'
      max_corrupt='0.001',       # Skip budget: a count ('100') or a fraction ('0.001', '0.1%').
      build_hint=placeholder(str),  # How to build the dataset, told when it is not built.
      teachers=placeholder(tuple),  # Reinforced data: stored teachers to distil from, e.g. (0,)
                                    # (indices in the dataset's order); None = all.
      num_syn=placeholder(int),     # Reinforced data: draw from the first N synthetic captions
                                    # of each key; None = all stored.
  ))
  c.batch_size = 65536           # Global batch (all hosts).
  c.accum_steps = 1              # Micro-batches per step (embeddings gathered across them).

  c.schedule = ConfigDict(dict(total='200000_steps', warmup='1000_steps', kind='cosine',
                               constant='0_steps'))  # 'cosine' | 'constant_cosine' (B-LT).
  c.optim = ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.95, eps=placeholder(float), weight_decay=0.2, grad_clip=1.0,
      # Ordered (regex, value) rules over '/'-joined parameter paths, first match wins (rules.py).
      # A learning-rate or freeze rule that matches no parameter is an error (a typo).
      wd_rules=rules.DEFAULT_WD_RULES,  # Weight-decay multiplier (open_clip's set by default).
      lr_rules=(),                      # Learning-rate multiplier (default 1).
      freeze=(),                        # Regexes of parameters that are not trained.
  ))

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
                                 # | 'coca' (captioners: caption cross-entropy + CLIP)
      caption_weight=2.0,        # 'coca': weight of the caption loss (open_clip's CoCaLoss).
      block_size=1024,           # Columns per block of the streamed loss (memory per device
                                 # O(local batch x block)); 0 = whole [local, global] logits.
  ))

  c.inherit = ConfigDict(dict(     # Learned weight inheritance (mobileclip_jax/inheritance/masks.py).
      masks='',                  # Units to learn gates over: 'heads,mlp,embed,layers' (each may be
                                 # prefixed 'text.' or 'image.'); '' = off.
      target=1.0,                # Kept fraction of each masked tower's parameters (p -> q -> target).
      ramp='0_steps',            # q goes linearly from 1 to `target` over these steps.
      mask_init=3.0,             # Initial log-alpha of the gates (3: P(kept) ~ 0.99).
  ))

  c.mesh = ConfigDict(dict(data=-1, fsdp=1))
  # rules: (regex, 'fsdp' | 'replicate' | per-dimension mesh axes) over state paths (sharding.py).
  c.sharding = ConfigDict(dict(min_fsdp_size=2 ** 14, rules=()))

  c.checkpoint = ConfigDict(dict(every='2000_steps', keep_last=3, keep_every=placeholder(str),
                                 async_save=True))
  c.log_every = 50
  # Global norms logged every step besides grad_norm (clipping computes it): 'param', 'update'.
  # On XLA:CPU each is a pass with its own kernels per parameter array (README, Performance).
  c.norm_metrics = ()
  # XLA:CPU's instruction order for the train step: 'memory' (its memory-optimized scheduler) or
  # 'concurrency' (XLA's default). S0 at batch 8: 0.6 GB less peak memory, ~2% slower (README).
  c.cpu_scheduler = 'memory'
  # The optimizer's update as an XLA program of its own after the loss and gradients'
  # ('separate') or in one program with them ('fused'); 'auto' separates it on CPU, where a
  # resumed run then reads the step from the compilation cache in about half the time (README).
  c.update_program = 'auto'
  c.evals = ConfigDict()         # name -> evaluator spec (see mobileclip_jax.evaluation).
  c.distributed = ConfigDict(dict(coordinator_address=placeholder(str),
                                  num_processes=placeholder(int), process_id=placeholder(int),
                                  heartbeat_timeout_s=100, initialization_timeout_s=300))
  return c


def runlocal(c: ConfigDict) -> ConfigDict:
  """Shrinks batch, steps and data to the demo world, keeping the architecture: a CPU smoke run."""
  c.data.name = 'demo_world_reinforced'
  c.data.data_dir = DEMO_DATA_DIR
  c.data.build_hint = 'python launch/demo.py (it builds the demo world and its reinforced data).'
  c.data.syn_key_regex = base_config().data.syn_key_regex  # Recipes name DataCompDR's keys.
  # Batch 8 at 128 px: an S4 step (full architecture) then needs ~4 GB instead of ~26 at 16 x 256.
  c.model.image_size = 128
  c.batch_size = 8
  c.schedule.total = '20_steps'
  c.schedule.warmup = '5_steps'
  c.checkpoint.every = '10_steps'
  c.log_every = 5
  return c


def ablation_12m(c: ConfigDict) -> ConfigDict:
  """The 12M-scale ablation schedule: DataCompDR-12M, batch 8,192, 30k steps (246M samples)."""
  c.data.name = 'datacompdr_12m'
  c.batch_size = 8192
  c.schedule.total = '30000_steps'
  return c


def apply_presets(c: ConfigDict, presets: Union[str, Sequence[str], None]) -> ConfigDict:
  """Applies presets in order: a comma-separated string ('runlocal') or a list."""
  if isinstance(presets, str) or presets is None:
    presets = [p for p in (presets or '').split(',') if p]
  for preset in presets:
    if preset not in PRESETS:
      raise ValueError(f'Unknown config preset {preset!r}; presets: {", ".join(PRESETS)}.')
    c = {'runlocal': runlocal, 'ablation_12m': ablation_12m}[preset](c)
  return c


def parse_arg(arg: Optional[str], variants: Sequence[str], path: str) -> Tuple[str, List[str]]:
  """'s4,runlocal' -> ('s4', ['runlocal']): a config file's variant, then its presets."""
  parts = [p for p in (arg or '').split(',') if p]
  if not parts or parts[0] not in variants:
    got = f'{parts[0]!r}' if parts else 'none'
    raise ValueError(f'{path} needs a variant first, one of {", ".join(variants)} (e.g. '
                     f'{path}:{next(iter(variants))}); got {got}.')
  return parts[0], parts[1:]


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


def _load_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path!r} not found (configs are in {CONFIGS_DIR}).')
  module_spec = importlib.util.spec_from_file_location('_mobileclip_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ConfigDict:
  """`path.py[:arg]` -> the file's get_config(arg)."""
  path, _, arg = spec.partition(':')
  return _load_module(path).get_config(arg or None)


def recipe_specs() -> Dict[str, str]:
  """{model name: 'CONFIGS_DIR/<family>.py:<variant>'} of the released recipes (configs/)."""
  specs = {}
  for family in ('mobileclip2.py', 'mobileclip.py'):
    path = os.path.join(CONFIGS_DIR, family)
    for variant, name in _load_module(path).VARIANTS.items():
      specs.setdefault(name, f'{path}:{variant}')
  return specs


_EVAL_OVERRIDE = re.compile(r'^--(?P<flag>\w+)\.evals\.(?P<name>\w+)(\.(?P<field>\w+))?=(?P<value>.*)$',
                            re.S)


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def pop_eval_overrides(argv: Sequence[str], flag: str = 'config'
                       ) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
  """Takes the evaluator overrides out of `argv`: (the other args, {name: entry}).

  `--config.evals.NAME=SOURCE` adds an evaluator of a standard evaluation (e.g. 'demo',
  'imagenet'); `--config.evals.NAME.FIELD=VALUE` sets one field of its entry (see
  mobileclip_jax/evaluation/evaluator.py). ml_collections cannot add keys to a config from the
  command line, so launchers pass these to `add_evals` after parsing.
  """
  rest, entries = [], {}
  for arg in argv:
    m = _EVAL_OVERRIDE.match(arg)
    if not m or m.group('flag') != flag:
      rest.append(arg)
      continue
    entry = entries.setdefault(m.group('name'), {})
    entry[m.group('field') or 'source'] = _literal(m.group('value'))
  return rest, entries


def add_evals(c: ConfigDict, entries: Dict[str, Dict[str, Any]]) -> ConfigDict:
  """The config with `entries` merged into `c.evals` (new evaluators, or fields of existing ones)."""
  with c.unlocked():
    for name, entry in entries.items():
      old = c.evals[name].to_dict() if name in c.evals else {}
      c.evals[name] = ConfigDict({**old, **entry})
  return c


def check_overrides(argv: Sequence[str], flag: str = 'config') -> None:
  """Fails early, with the nearest valid keys, on `--config.<key>=...` for an unknown key."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{flag}=')), None)
  if spec is None:
    return
  valid = flat_keys(load_config_file(spec))
  for arg in argv:
    if not arg.startswith(f'--{flag}.'):
      continue
    key = arg[len(flag) + 3:].split('=', 1)[0]
    if key not in valid:
      raise SystemExit(f'Unknown config key {key!r} in {arg!r}.'
                       f'{utils.did_you_mean(key, valid, cutoff=0.4)}')


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

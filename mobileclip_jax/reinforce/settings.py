"""Generation settings and the reinforce config JSON written next to a generated dataset.

The config file follows ml-mobileclip's `training/configs/datacompdr12m.json`, which
`reinforced_tfds.read_reinforce_config` reads: `model_name` and `pretrained` (comma lists, one
entry per teacher), `num_samples` (k) and `reinforce.image_augmentation` (Apple's transform
config, whose keys are the torchvision keyword arguments). Everything else the generation used
is recorded beside them: per-teacher details (resolution, mean/std, tokenizer, weights'
checksum), `teacher_dims`, the synthetic-caption keys (one per captioner) and their regex, the
embedding dtype and the captioners' and caption quality-control settings. A rerun into the same folder must use the same
settings (resume), which is checked against this file.
"""
import dataclasses
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from mobileclip_jax import utils
from mobileclip_jax.data import augment
from mobileclip_jax.data import reinforced_tfds

CONFIG_FILE = 'reinforce_config.json'
FORMAT = 'mobileclip_jax.reinforce/1'


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How a reinforced dataset is generated.

  Attributes:
    k: stored augmentations (and image embeddings) per image.
    num_syn: synthetic captions per image.
    augmentation: sampling config of the augmentations; its `image_size` is the generation size
      (the RandomResizedCrop output every teacher sees, resized down for smaller teachers).
    dedup_threshold: averaged teacher cosine above which two captions of an image are
      near-duplicates.
    max_regenerate: rounds of regeneration of near-duplicate captions (0: measure only).
    emb_dtype: storage of the embeddings: 'float16' (npz), 'float32' (npz) or 'bfloat16'
      (pth.gz, as DataCompDR-12M-bf16; needs torch).
    seed: seed of the augmentations and captions (each shard's draws depend only on it, the
      shard's name and `chunk_size`).
    chunk_size: samples prepared and captioned together.
    tokenizer: tokenizer spec of the student, recorded in the dataset metadata.
  """
  k: int = 10
  num_syn: int = 5
  augmentation: augment.AugmentConfig = augment.AugmentConfig()
  dedup_threshold: float = 0.95
  max_regenerate: int = 3
  emb_dtype: str = 'float16'
  seed: int = 0
  chunk_size: int = 64
  tokenizer: str = 'clip'

  def __post_init__(self):
    for name, minimum in (('k', 1), ('num_syn', 1), ('max_regenerate', 0), ('chunk_size', 1),
                          ('seed', 0)):
      if getattr(self, name) < minimum:
        raise ValueError(f'GenerationConfig.{name} must be >= {minimum}, got '
                         f'{getattr(self, name)}.')
    if self.emb_dtype not in reinforced_tfds.EMB_DTYPES:
      raise ValueError(f'emb_dtype {self.emb_dtype!r} is not one of '
                       f'{sorted(reinforced_tfds.EMB_DTYPES)}.')

  @property
  def gen_size(self) -> int:
    return self.augmentation.image_size


def syn_key_regex(syn_keys: Sequence[str]) -> str:
  """The regex that selects exactly these synthetic-caption keys."""
  alternatives = '|'.join(re.escape(key) for key in syn_keys)
  return f'^{alternatives}$' if len(syn_keys) == 1 else f'^({alternatives})$'


def reinforce_config(teachers: Mapping[str, Any], generation: GenerationConfig,
                     captioners: Sequence[Mapping[str, Any]],
                     syn_keys: Sequence[str]) -> Dict[str, Any]:
  """The JSON config of a generation (see the module docstring).

  Args:
    teachers: `TeacherEnsemble.describe()`.
    generation: the generation settings.
    captioners: each captioner's `describe()`, in order.
    syn_keys: the syn.json key each captioner writes.
  """
  details = teachers['teachers']
  return {
      'format': FORMAT,
      'model_name': ','.join(t['name'] for t in details),
      'pretrained': ','.join(t['tag'] for t in details),
      'num_samples': generation.k,
      'reinforce': {
          'image_augmentation': augment.to_generation_config(generation.augmentation)},
      'teacher_dims': list(teachers['teacher_dims']),
      'syn_key_regex': syn_key_regex(syn_keys),
      'emb_dtype': generation.emb_dtype,
      'tokenizer': generation.tokenizer,
      'generation': {
          'teachers': details, 'num_syn': generation.num_syn, 'syn_keys': list(syn_keys),
          'augmentation': generation.augmentation.to_dict(),
          'captioners': [dict(captioner) for captioner in captioners],
          'dedup_threshold': generation.dedup_threshold,
          'max_regenerate': generation.max_regenerate, 'seed': generation.seed,
          'chunk_size': generation.chunk_size},
  }


def read_config(out_dir: str) -> Optional[Dict[str, Any]]:
  """The reinforce config of a generated folder, or None if it has none."""
  path = os.path.join(out_dir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _differences(old: Any, new: Any, prefix: str = '') -> list:
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for key in sorted(set(old) | set(new))
            for d in _differences(old.get(key), new.get(key), f'{prefix}{key}.')]
  return [] if old == new else [f'{prefix[:-1]}: {old!r} -> {new!r}']


def write_or_check(out_dir: str, config: Dict[str, Any], overwrite: bool) -> None:
  """Writes the config into `out_dir`, or checks that the one there has the same settings.

  Raises:
    ValueError: `out_dir` was generated with other settings and `overwrite` is False.
  """
  old = read_config(out_dir)
  config = json.loads(json.dumps(config))  # Tuples -> lists, as they read back.
  if old is not None and old != config and not overwrite:
    changed = _differences(old, config)
    raise ValueError(
        f'{out_dir} holds a dataset generated with other settings ({len(changed)} differ: '
        f'{"; ".join(changed[:5])}). Resume with the same settings, choose a new --out, or pass '
        '--overwrite to regenerate every shard.')
  if old != config:
    utils.write_json_atomic(os.path.join(out_dir, CONFIG_FILE), config)

"""A learned captioner for reinforcement: a CoCa model sampling captions in JAX.

`launch/reinforce.py --captioners=coca:TAG=PATH[:key=value...]` writes syn.json key
`syn_text_TAG`. PATH is a training run (its latest step, e.g. a configs/coca.py run), a model
checkpoint (e.g. open_clip's released weights converted by launch/convert.py), or an open_clip
state_dict file (.safetensors, .pt, .bin, .npz) with `model=NAME` (or the config an export wrote
beside it). A CLIP checkpoint is refused, and so is a state_dict of another variant: the
conversion names every missing, unexpected or mismatching tensor.

Defaults are ml-mobileclip-dr's `scripts/gen.py`: each caption an independent nucleus sample
(sampler='top_p', top_p=0.9, temperature 1, seq_len 30 counting the start token,
fixed_output_length, min_seq_len 5), cut to its first sentence (`decoding.first_sentences`).
Every option of `decoding.generate` can be set in the spec (coca:a=RUN:top_p=0.95:seq_len=40);
`batch_size` sets the rows per generation call. Images are preprocessed as the model's
evaluation (shorter side resized with its interpolation, centre crop, its mean/std); the
(image, caption) rows run in fixed-size batches (one compilation) sharded over this process's
devices (`jax.local_devices()`, as the teachers). A caption that is empty after the cut (the
sample ended at once, or began with '.') is kept empty here: quality control counts it
(`empty_rate`) and regenerates it like a duplicate (captioners.py).
"""
import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from mobileclip_jax import checkpoint
from mobileclip_jax import decoding
from mobileclip_jax import embedding
from mobileclip_jax import sharding
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.convert import open_clip as convert_open_clip
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import coca as coca_lib
from mobileclip_jax.reinforce import captioners
from mobileclip_jax.reinforce import teachers

# ml-mobileclip-dr scripts/gen.py: model.generate(imgs, generation_type='top_p', top_p=0.9,
# fixed_output_length=True) with open_clip's defaults otherwise.
GEN_DEFAULTS = dict(sampler='top_p', top_p=0.9, top_k=1, temperature=1.0, seq_len=30,
                    min_seq_len=5, repetition_penalty=1.0, num_beams=6)


def load_coca(path: str, model: Optional[str] = None, dtype: Optional[str] = None):
  """(CoCaConfig, numpy variables) of a CoCa at `path` (see the module docstring).

  Raises:
    FileNotFoundError: nothing readable at `path`.
    ValueError: not a CoCa captioner, another variant than `model`, or a state_dict that does not
      match the variant (every mismatching tensor named).
  """
  if os.path.isfile(path):
    config = convert_files.model_config_beside(path)
    if model is not None:
      config = clip_lib.get_config(model)
    if config is None:
      raise ValueError(f'Which CoCa is {path}? Add :model=NAME to the captioner spec (e.g. '
                       'coca:TAG=PATH:model=coca_ViT-L-14); no config written by this project '
                       'lies beside it.')
    _check_coca(config, path)
    variables = convert_open_clip.from_open_clip(convert_files.read_state_dict(path), config)
  else:
    variables, config = checkpoint.load_variables(path)
    _check_coca(config, path)
    if model is not None and model != config.name:
      raise ValueError(f'{path} holds a {config.name}, not the {model} the captioner spec asks '
                       'for; drop :model= or point to a checkpoint of that variant.')
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  return config, variables


def _check_coca(config, path: str) -> None:
  if not isinstance(config, coca_lib.CoCaConfig):
    raise ValueError(f'{path} holds {config.name}, not a CoCa captioner: --captioners=coca:TAG=PATH '
                     'needs a CoCa run or checkpoint (configs/coca.py, or launch/convert.py '
                     '--model=coca_ViT-L-14).')


class CocaCaptioner(captioners.Captioner):
  """Samples captions from a CoCa model (see the module docstring)."""
  name = 'coca'

  def __init__(self, path: str, *, model: Optional[str] = None, dtype: Optional[str] = None,
               batch_size: int = 64, devices: Optional[Sequence[Any]] = None, **generation):
    unknown = sorted(set(generation) - set(GEN_DEFAULTS))
    if unknown:
      raise ValueError(f'unknown option(s) {unknown}; coca options: '
                       f'{sorted(GEN_DEFAULTS) + ["batch_size", "dtype", "model"]}')
    self.config, variables = load_coca(path, model, dtype)
    self.path = os.path.abspath(path)
    self.generation = {**GEN_DEFAULTS, **generation}
    self.tokenizer = self.config.tokenizer
    self.checksum = teachers.checksum(variables)
    # Sampling draws anew; greedy and beam search would give the same caption again.
    self.can_regenerate = self.generation['sampler'] not in ('greedy', 'beam')
    self.module = clip_lib.model_from_config(self.config)
    self.mesh = sharding.create_mesh(devices=list(jax.local_devices() if devices is None
                                                  else devices))
    shards = sharding.num_batch_shards(self.mesh)
    self.batch_size = -(-max(int(batch_size), 1) // shards) * shards
    self.variables = embedding.place_variables(variables, self.mesh)
    self._tokenizer = tokenizer_lib.get_tokenizer(self.tokenizer)
    decoding.generation_config(self.module, **self.generation)  # Bad options fail at start.

  def _pixels(self, batch: Sequence[captioners.CaptionInput]) -> np.ndarray:
    c = self.config
    images = np.stack([preprocess.resize_center_crop(item.image, c.image_size, c.interpolation)
                       for item in batch])
    return preprocess.normalize(images, c.mean, c.std)

  def __call__(self, batch, num_captions, rng):
    """num_captions independent samples per image (rows image-major), first sentences."""
    pixels = np.repeat(self._pixels(batch), num_captions, axis=0)
    key = jax.random.key(int(rng.integers(2 ** 31)))
    texts: List[str] = []
    for start in range(0, len(pixels), self.batch_size):
      rows = pixels[start:start + self.batch_size]
      count = len(rows)
      if count < self.batch_size:  # One shape: one compilation.
        rows = np.concatenate([rows, np.zeros((self.batch_size - count,) + rows.shape[1:],
                                              rows.dtype)])
      key, step_key = jax.random.split(key)
      tokens = decoding.generate(self.module, self.variables, rows, rng=step_key, mesh=self.mesh,
                                 fixed_output_length=True, **self.generation)
      texts += decoding.first_sentences(np.asarray(tokens)[:count], self._tokenizer)
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(batch))]

  def describe(self) -> Dict[str, Any]:
    return {'name': self.name, 'model': self.config.name, 'path': self.path,
            'checksum': self.checksum, 'tokenizer': self.tokenizer,
            'dtype': self.config.dtype, 'first_sentence': True, **self.generation}

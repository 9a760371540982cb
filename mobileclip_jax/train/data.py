"""The trainer's view of its inputs: the config's dataset opened as a Grain iterator, and evals.

The demo world datasets are special-cased: `demo_world_reinforced` falls back to the plain
`demo_world` when launch/demo.py has not made it yet, and the plain one is built on first use,
so that `configs/*.py:runlocal` runs on a fresh machine.
"""
import dataclasses
import logging
from typing import Any, Dict, Tuple

import ml_collections
import numpy as np

from mobileclip_jax.data import demo_dataset
from mobileclip_jax.data import loader
from mobileclip_jax.models import clip as clip_lib

log = logging.getLogger('mobileclip_jax')


@dataclasses.dataclass
class TrainInput:
  """An opened training dataset."""
  name: str
  iterator: loader.TrainIterator

  @property
  def kind(self) -> str:
    return self.iterator.kind

  @property
  def num_examples(self) -> int:
    return self.iterator.num_examples

  @property
  def teacher_dims(self) -> Tuple[int, ...]:
    return tuple(self.iterator.teacher_dims)

  @property
  def element_spec(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    return self.iterator.element_spec

  @property
  def batch_keys(self):
    return tuple(self.element_spec)

  def counters(self) -> Dict[str, float]:
    """Skipped (corrupt) examples so far, total and by reason, for the metrics."""
    counter = self.iterator.skip_counter
    out = {'data/skipped': float(counter.num_skipped())}
    out.update({f'data/skipped/{reason}': float(n) for reason, n in counter.skipped.items()})
    return out


def _resolve_demo(name: str, data_dir: str) -> str:
  if name == demo_dataset.REINFORCED_NAME and demo_dataset.exists(name, data_dir):
    return name
  if name == demo_dataset.REINFORCED_NAME:
    log.warning('%s is not built in %s (launch/demo.py makes it); using the plain demo world: '
                'the objective is CLIP only.', name, data_dir)
  return demo_dataset.ensure_plain_dataset(data_dir)


def open_input(config: ml_collections.ConfigDict, model_config: clip_lib.ModelConfig,
               process_index: int = None, process_count: int = None) -> TrainInput:
  """This process's training iterator for `config.data` at the model's resolution."""
  d = config.data
  name = d.name
  if name in demo_dataset.DEMO_NAMES:
    name = _resolve_demo(name, d.data_dir)
  input_config = loader.InputConfig(
      dataset=name, data_dir=d.data_dir, split=d.split, global_batch_size=config.batch_size,
      image_size=model_config.image_size, tokenizer=d.tokenizer,
      context_length=model_config.text.context_length, syn_key_regex=d.syn_key_regex,
      seed=config.seed, worker_count=d.workers, prefetch_batches=d.prefetch,
      error_policy=d.error_policy, error_budget=d.max_corrupt)
  return TrainInput(name, loader.make_train_iterator(input_config, process_index, process_count))


def build_evaluators(config: ml_collections.ConfigDict, model_config: clip_lib.ModelConfig,
                     mesh: Any) -> list:
  """The evaluators of `config.evals` (see mobileclip_jax.evaluation)."""
  if not config.evals:
    return []
  from mobileclip_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.build_evaluators(config.evals, model_config, mesh)

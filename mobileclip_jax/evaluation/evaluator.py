"""The evaluator interface, and evaluators built from config entries.

An evaluator is built once (it opens its data and checks it) and run many times:

  evaluator.name          str
  evaluator.every_steps   int; 0 = only at the first and the last step
  evaluator.due(step, last_step) -> bool     step 0, the last step, and every `every_steps`
  evaluator.run(model, variables) -> {metric name: float}

`run` takes the Flax CLIP module and its variables ({'params', 'batch_stats'}, numpy or jax
Arrays in any sharding); every process must call it, and every process gets the same metrics.
Metric names are '<prefix>/<name>/<metric>', e.g. 'zeroshot/imagenet/top1',
'zeroshot/demo_shape/top1' (a dataset with several tasks: '<name>_<task>'),
'retrieval/coco/mean_R@1'. A diverged model gives NaN metrics rather than an error.

Config (`config.evals`, a ConfigDict of name -> entry; every key but `source` has a default):

  type             'zeroshot' | 'retrieval' (may be left out for a standard evaluation)
  source           a source spec dict (datasets.py), or the name of a standard evaluation
                   (registry.py: 'imagenet', 'coco', 'demo', ...)
  data_dir         where a standard evaluation looks for its data
  every_steps      0 = only at the first and last step
  batch_size       global images per batch, rounded up to a multiple of the mesh's batch shards
  text_batch_size  global prompts / captions per batch (0 = batch_size)
  prefix           metric-name prefix (default: the type)
  cache            keep this process's preprocessed images in host memory between runs
  num_workers      image-decoding threads per process
  inference        cheaper inference options (mobileclip_jax/inference.py): 'key=value,...'
                   text or a dict, e.g. 'text.merge=4' or {'cascade_size': 128,
                   'cascade_tau': 0.02}; '' = none
  inference_dir    the folder of the learned parts the options need (launch/train_reducer.py)
"""
from typing import Any, Dict, List, Mapping, Protocol

from jax.sharding import Mesh

from mobileclip_jax import inference as inference_lib
from mobileclip_jax import utils
from mobileclip_jax.evaluation import registry
from mobileclip_jax.evaluation import retrieval
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import zeroshot

ENTRY_DEFAULTS: Dict[str, Any] = dict(
    type='', source=None, data_dir='', every_steps=0, batch_size=256, text_batch_size=0,
    prefix='', cache=False, num_workers=8, inference='', inference_dir='')
EVALUATORS = {datasets.CLASSIFICATION: zeroshot.ZeroShotEvaluator,
              datasets.RETRIEVAL: retrieval.RetrievalEvaluator}


class Evaluator(Protocol):
  """What the trainer relies on (see the module docstring)."""
  name: str
  every_steps: int

  def due(self, step: int, last_step: int) -> bool:
    ...

  def run(self, model, variables: Mapping[str, Any]) -> Dict[str, float]:
    ...


def _plain(value: Any) -> Any:
  """ConfigDicts (and FrozenConfigDicts) as plain dicts."""
  return value.to_dict() if hasattr(value, 'to_dict') else value


def build_evaluator(name: str, entry: Mapping[str, Any], model_config, mesh: Mesh) -> Evaluator:
  """One evaluator from a config entry (module docstring); opens and checks its data."""
  entry = dict(_plain(entry))
  for key in entry:
    if key not in ENTRY_DEFAULTS:
      raise ValueError(f'Unknown key {key!r} in evals.{name}.'
                       f'{utils.did_you_mean(key, ENTRY_DEFAULTS)}')
  entry = {**ENTRY_DEFAULTS, **entry}
  source, eval_type = _plain(entry['source']), entry['type']
  if isinstance(source, str):
    standard_type, source = registry.standard_eval(source, entry['data_dir'])
    if eval_type and eval_type != standard_type:
      raise ValueError(f'evals.{name}: type {eval_type!r}, but the standard evaluation '
                       f'{entry["source"]!r} is a {standard_type} evaluation.')
    eval_type = standard_type
  if not isinstance(source, Mapping):
    raise ValueError(f'evals.{name}.source must be a source spec dict or a standard evaluation '
                     f'name ({list(registry.names())}), got {source!r}.')
  if eval_type not in EVALUATORS:
    raise ValueError(f'evals.{name}.type must be one of {sorted(EVALUATORS)}, got {eval_type!r}.')
  try:
    spec = inference_lib.parse(_plain(entry['inference']) or None)
  except ValueError as e:
    raise ValueError(f'evals.{name}.inference: {e}') from None
  artifacts = inference_lib.load_artifacts(entry['inference_dir'], spec, model_config)
  data = datasets.open_source(source, eval_type, model_config.image_size)
  return EVALUATORS[eval_type](
      name, data, model_config, mesh, every_steps=int(entry['every_steps']),
      batch_size=int(entry['batch_size']), text_batch_size=int(entry['text_batch_size']),
      prefix=entry['prefix'], cache=bool(entry['cache']), num_workers=int(entry['num_workers']),
      inference=spec, artifacts=artifacts)


def build_evaluators(evals: Mapping[str, Any], model_config, mesh: Mesh,
                     **overrides) -> List[Evaluator]:
  """Evaluators for every entry of `config.evals`, in its order; `overrides` are entry keys
  set in every entry (launch/evaluate.py's --inference)."""
  return [build_evaluator(name, {**_plain(entry), **overrides}, model_config, mesh)
          for name, entry in _plain(evals).items()]

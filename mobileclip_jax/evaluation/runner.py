"""Stand-alone evaluation: load a model's variables, run evaluators, write the results.

Used by launch/evaluate.py. Variables come from an Orbax model checkpoint or training run
(`checkpoint.load_variables`) or from a PyTorch state_dict in open_clip's names (.safetensors,
.pt / .pth / .bin, .npz; read by `convert.files.read_state_dict`) converted with
`convert.from_open_clip`; Apple's v1 checkpoints are imported first with launch/convert.py.
Results are written as JSON through a temporary file and a rename, only after every evaluation
has finished.
"""
import dataclasses
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from mobileclip_jax import checkpoint
from mobileclip_jax import convert
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.models import clip
from mobileclip_jax.rules import path_str


def check_variables(model: clip.CLIP, variables: Mapping[str, Any], source: str) -> None:
  """Raises ValueError naming every missing, unexpected and mis-shaped variable."""
  expected = clip.abstract_variables(model.config)
  flat = lambda tree: {path_str(p): tuple(np.shape(v))
                       for p, v in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}
  want, got = flat(expected), flat(variables)
  problems = [f'missing {k}' for k in sorted(want.keys() - got.keys())]
  problems += [f'unexpected {k}' for k in sorted(got.keys() - want.keys())]
  problems += [f'{k}: expected shape {want[k]}, got {got[k]}'
               for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
  if problems:
    shown = '\n  '.join(problems[:10]) + (f'\n  ... {len(problems) - 10} more'
                                          if len(problems) > 10 else '')
    raise ValueError(f'The variables from {source} do not fit {model.config.name}:\n  {shown}\n'
                     'Is this a checkpoint of another variant (or other overrides)?')


def load_model(model_name: Optional[str] = None, checkpoint_dir: Optional[str] = None,
               torch_checkpoint: Optional[str] = None, step: Optional[int] = None,
               model_config: Optional[clip.ModelConfig] = None
               ) -> Tuple[clip.CLIP, Dict[str, Any]]:
  """(model, numpy variables) from exactly one of `checkpoint_dir` and `torch_checkpoint`.

  A model checkpoint or training run knows its variant; `model_name`, if given, must match it.
  A PyTorch state_dict needs `model_name`, or `model_config` (a variant with overrides, e.g. from
  a training config), whose name then stands for `model_name`.
  """
  if model_config is not None:
    if model_name and model_name != model_config.name:
      raise ValueError(f'The model name {model_name} and the config\'s {model_config.name} '
                       'differ; give one of them.')
    model_name = model_config.name
  if (checkpoint_dir is None) == (torch_checkpoint is None):
    raise ValueError('Give exactly one of a checkpoint directory and a PyTorch checkpoint.')
  if checkpoint_dir is not None:
    variables, config = checkpoint.load_variables(checkpoint_dir, step)
    if model_name and model_name != config.name:
      raise ValueError(f'{checkpoint_dir} holds a {config.name} model, not {model_name}; leave '
                       'the model name out or fix it.')
    model = clip.CLIP(config)
    source = checkpoint_dir
  else:
    if not model_name:
      raise ValueError(f'Loading the PyTorch checkpoint {torch_checkpoint} needs the model name '
                       f'(one of {sorted(clip.MODEL_CONFIGS)}).')
    state = convert_files.read_state_dict(torch_checkpoint)
    # Inference-form (reparameterized) weights, as from_open_clip detects them, need that form.
    config = dataclasses.replace(model_config or clip.get_config(model_name),
                                 reparameterized=any('reparam_conv' in k for k in state))
    try:
      variables = convert.from_open_clip(state, config)
    except ValueError as e:
      raise ValueError(f'{torch_checkpoint} is not a {model_name} checkpoint:\n{e}') from None
    model = clip.CLIP(config)
    source = torch_checkpoint
  check_variables(model, variables, source)
  return model, variables


def run_evaluators(model, variables, evaluators: Sequence[Any]) -> Dict[str, Any]:
  """Runs every evaluator; returns {'metrics': {...}, 'evals': {name: {...}}}."""
  results: Dict[str, Any] = {'metrics': {}, 'evals': {}}
  for evaluator in evaluators:
    start = time.perf_counter()
    metrics = evaluator.run(model, variables)
    results['metrics'].update(metrics)
    results['evals'][evaluator.name] = {
        'source': evaluator.data.description, 'num_images': len(evaluator.data.examples),
        'seconds': round(time.perf_counter() - start, 3), 'metrics': sorted(metrics)}
  return results


def format_table(metrics: Mapping[str, float]) -> str:
  """Metrics as an aligned two-column table (percentages)."""
  width = max((len(k) for k in metrics), default=0)
  return '\n'.join(f'{name:<{width}}  {100 * value:6.2f}' for name, value in metrics.items())

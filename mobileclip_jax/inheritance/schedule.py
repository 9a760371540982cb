"""Inheritance schedules: stages of (inherit -> train), each from the previous stage's result.

A schedule (configs/inherit.py) names the parent checkpoint, the training recipe of every stage
and the stages. A stage keeps a manual `keep` spec, or a `fraction` of the *original* parent's
parameters per tower (`stages.fraction_keep`), or learns its keep spec: with `masks` it first
trains the current model with learned gates for `mask_steps` (a masked run of the trainer,
target = the fraction), then keeps what the gates chose (`masks.keep_from_masks`) from the
masked run's weights. The child's BatchNorm statistics are re-estimated on `bn_batches` batches
of the recipe's data, and the child trains for `steps`. `from_scratch` trains the stage's
architecture from random init instead (the baseline at equal steps).

Every stage is the two commands a user would type, which `run` prints as it goes:

  python launch/inherit.py --checkpoint=PREV --keep=... --out=W/<stage>/init
  python launch/train.py --config=RECIPE --flagfile=W/<stage>/init/train.flags \
      --config.schedule.total=N_steps --workdir=W/<stage>/run

Stages whose outputs exist are skipped (training resumes or is complete), so a rerun finishes
an interrupted schedule. `W/schedule.json` records each stage's keep spec, parameter fractions
and the zero-shot curve of its run (demo evaluations).
"""
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

import ml_collections
import numpy as np

from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import keys
from mobileclip_jax import utils
from mobileclip_jax.inheritance import masks as masks_lib
from mobileclip_jax.inheritance import slicing
from mobileclip_jax.inheritance import stages
from mobileclip_jax.inheritance import units
from mobileclip_jax.models import clip as clip_lib

log = logging.getLogger('mobileclip_jax')
INHERIT_JSON = 'inherit.json'
TRAIN_FLAGS = 'train.flags'
SCHEDULE_JSON = 'schedule.json'


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a schedule.

  Attributes:
    name: names its directory.
    share: its training steps as a share of the schedule's `steps`.
    keep: a manual keep spec (dict or launch/inherit.py --keep text), or None:
    fraction: the size after the stage, as a fraction of the *original* parent's parameters per
      tower (None: the schedule's `fraction`).
    masks: learned inheritance over these units ('heads,mlp,embed,layers'), '' = manual.
    mask_share: steps of the masked run, as a share of the schedule's `steps`.
    from_scratch: train the stage's architecture from random init (the baseline).
    lr: the stage's learning rate (None: the recipe's).
  """
  name: str
  share: float = 1.0
  keep: Optional[Dict[str, Any]] = None
  fraction: Optional[float] = None
  masks: str = ''
  mask_share: float = 0.0
  from_scratch: bool = False
  lr: Optional[float] = None

  @classmethod
  def from_config(cls, entry: Mapping[str, Any]) -> 'Stage':
    entry = dict(entry)
    unknown = set(entry) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'Unknown stage keys {sorted(unknown)}; stage keys: '
                       f'{[f.name for f in dataclasses.fields(cls)]}.')
    keep = entry.pop('keep', None)
    if isinstance(keep, str):
      keep = stages.parse_keep(keep)
    stage = cls(keep=dict(keep) if keep else None, **entry)
    if stage.keep is not None and stage.fraction is not None:
      raise ValueError(f'Stage {stage.name}: give keep or fraction, not both.')
    if stage.masks and (stage.keep is not None or stage.mask_share <= 0):
      raise ValueError(f'Stage {stage.name}: learned masks need mask_share > 0 and no keep.')
    return stage


# ----------------------------------------------------------------------------------------------
# One inheritance (launch/inherit.py).


def write_child(out: str, variables: Mapping, config: clip_lib.ModelConfig,
                record: Mapping[str, Any]) -> Dict[str, Any]:
  """Writes the child's model checkpoint, `inherit.json` and `train.flags` into `out`."""
  overrides = {**stages.config_overrides(config), 'model.init_from': os.path.abspath(out)}
  checkpoint_lib.save_variables(out, variables, config)
  utils.write_json_atomic(os.path.join(out, INHERIT_JSON), {**record, 'train_overrides': {
      k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}})
  with utils.atomic_write(os.path.join(out, TRAIN_FLAGS)) as f:
    f.write('\n'.join(stages.flag_lines(overrides)) + '\n')
  return overrides


def inherit_checkpoint(checkpoint: str, keep: Mapping[str, Any], out: str, *,
                       step: Optional[int] = None, model: Optional[str] = None,
                       bn_batches: int = 0, bn_config: Optional[ml_collections.ConfigDict] = None
                       ) -> Dict[str, Any]:
  """launch/inherit.py: a checkpoint -> the child's checkpoint in `out`. Returns its record.

  `keep` may be {'masks': True} (a masked run's learned choice), {'target': VARIANT} or
  {'fraction': F} besides a keep spec (slicing.py). With `bn_batches`, the BatchNorm statistics
  are re-estimated on that many batches of `bn_config`'s training data.
  """
  if os.path.exists(os.path.join(out, checkpoint_lib.MODEL_JSON)):
    raise FileExistsError(f'{out} already holds a model checkpoint; choose a new --out.')
  variables, parent = checkpoint_lib.load_variables(checkpoint, step)
  if model and model != parent.name:
    raise ValueError(f'{checkpoint} holds a {parent.name} model, not {model}.')
  target = keep.get('target')
  keep = resolve_keep(keep, variables, parent)
  child_vars, child, kept = slicing.inherit_units(variables, parent, keep)
  if target:  # target_keep checked that the child is that variant.
    child = dataclasses.replace(child, name=target)
  if bn_batches:
    child_vars = reestimate_on_data(child_vars, child, bn_config, bn_batches)
  record = describe_inheritance(checkpoint, parent, child, keep, variables, child_vars)
  record['kept'] = stages.describe(kept, units.layout(parent))
  record['bn_batches'] = bn_batches
  record['train_overrides'] = write_child(out, child_vars, child, record)
  return record


def resolve_keep(keep: Mapping[str, Any], variables: Mapping, parent: clip_lib.ModelConfig
                 ) -> Dict[str, Any]:
  keep = dict(keep)
  if keep.pop('masks', False):
    learned = masks_lib.keep_from_masks(variables, parent)
    return {**learned, **keep}
  if 'target' in keep:
    return {**stages.target_keep(parent, clip_lib.get_config(keep.pop('target'))), **keep}
  if 'fraction' in keep:
    return {**stages.fraction_keep(parent, float(keep.pop('fraction'))), **keep}
  return keep


def describe_inheritance(source: str, parent, child, keep, parent_vars, child_vars
                         ) -> Dict[str, Any]:
  fractions = {t: stages.param_fraction(parent, child, t) for t in ('visual', 'text')}
  return {'source': os.fspath(source), 'parent': clip_lib.config_to_dict(parent),
          'child': clip_lib.config_to_dict(child), 'keep': stages.to_json(keep),
          'param_fraction': fractions,
          'params': {'parent': slicing.param_count(parent_vars) - _mask_count(parent_vars),
                     'child': slicing.param_count(child_vars)}}


def _mask_count(variables) -> int:
  masks = variables['params'].get(keys.MASKS)
  return 0 if masks is None else int(sum(np.size(x) for x in masks.values()))


def reestimate_on_data(variables, config: clip_lib.ModelConfig,
                       train_config: Optional[ml_collections.ConfigDict], batches: int):
  """BatchNorm statistics of `config` re-estimated on `batches` batches of `train_config`'s data."""
  if train_config is None:
    raise ValueError('Re-estimating BatchNorm statistics needs a training config for its data '
                     '(--bn_config).')
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.inheritance import batchnorm
  from mobileclip_jax.train import setup
  # pylint: enable=g-import-not-at-top
  data = setup.open_input(train_config, config, process_index=0, process_count=1)
  def pairs():
    for _ in range(batches):
      batch = next(data.iterator)
      yield batch[keys.IMAGE], batch[keys.TEXT]
  return batchnorm.reestimate(clip_lib.CLIP(config), variables, pairs())


# ----------------------------------------------------------------------------------------------
# The schedule.


def stage_config(schedule: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                 steps: int, lr: Optional[float] = None) -> ml_collections.ConfigDict:
  """The recipe with the schedule's settings and a stage's model overrides."""
  c = config_lib.load_config_file(schedule.recipe)
  stages.apply_overrides(c, overrides)
  with c.unlocked():
    c.seed = schedule.seed
    c.schedule.total = f'{steps}_steps'
    c.checkpoint.every = f'{steps}_steps'
    if lr is not None:
      c.optim.lr = lr
    if schedule.data_dir:
      c.data.data_dir = schedule.data_dir
    for entry in c.evals.values():
      entry.every_steps = schedule.evals_every
  return c


def run(schedule: ml_collections.ConfigDict, workdir: str,
        print_fn: Callable[[str], None] = print,
        train_fn: Optional[Callable[[ml_collections.ConfigDict, str], Any]] = None
        ) -> Dict[str, Any]:
  """Runs (or completes) the schedule in `workdir`; returns what schedule.json holds."""
  if train_fn is None:
    from mobileclip_jax.train import loop  # pylint: disable=g-import-not-at-top
    train_fn = loop.train
  if not schedule.parent:
    raise ValueError('The schedule needs a parent checkpoint (--schedule.parent=RUN_OR_MODEL).')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  _, original = checkpoint_lib.load_variables(schedule.parent)
  previous, results, total_steps = schedule.parent, [], 0
  for index, entry in enumerate(schedule.stages):
    stage = Stage.from_config(entry)
    steps = max(int(round(stage.share * schedule.steps)), 1)
    fraction = schedule.fraction if stage.fraction is None else stage.fraction
    sdir = os.path.join(workdir, f'{index}_{stage.name}')
    init_dir, run_dir = os.path.join(sdir, 'init'), os.path.join(sdir, 'run')
    source = previous
    if stage.masks:
      source = os.path.join(sdir, 'masks')
      mask_steps = max(int(round(stage.mask_share * schedule.steps)), 1)
      _, current = checkpoint_lib.load_variables(previous)
      config = _mask_config(schedule, stage, mask_steps, fraction, previous, current, original)
      print_fn(f'[{stage.name}] learning masks: python launch/train.py --config={schedule.recipe} '
               f'<{previous} architecture> --config.model.init_from={previous} '
               f'--config.inherit.masks={stage.masks} --config.inherit.target='
               f'{config.inherit.target:.3f} --workdir={source}')
      train_fn(config, source)
      total_steps += mask_steps
    if not os.path.exists(os.path.join(init_dir, checkpoint_lib.MODEL_JSON)):
      if stage.masks:
        keep = {'masks': True}
      elif stage.keep is not None:
        keep = dict(stage.keep)
      else:
        keep = _fraction_of_original(original, fraction, source)
      if not stage.masks:
        keep.setdefault('select', schedule.select)
      print_fn(f'[{stage.name}] python launch/inherit.py --checkpoint={source} '
               f"--keep='{json.dumps(stages.to_json(keep))}' --out={init_dir}")
      inherit_checkpoint(source, keep, init_dir, bn_batches=schedule.bn_batches,
                         bn_config=stage_config(schedule, {}, 1))
    with open(os.path.join(init_dir, INHERIT_JSON), encoding='utf-8') as f:
      record = json.load(f)
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in record['train_overrides'].items()}
    if stage.from_scratch:
      overrides['model.init_from'] = ''
    config = stage_config(schedule, overrides, steps, stage.lr)
    print_fn(f'[{stage.name}] python launch/train.py --config={schedule.recipe} '
             f'--flagfile={os.path.join(init_dir, TRAIN_FLAGS)}'
             f'{" --config.model.init_from=" if stage.from_scratch else ""} '
             f'--config.schedule.total={steps}_steps --workdir={run_dir}')
    train_fn(config, run_dir)
    child = clip_lib.config_from_dict(record['child'])
    results.append({
        'stage': stage.name, 'keep': record['keep'], 'from_scratch': stage.from_scratch,
        'param_fraction': {t: stages.param_fraction(original, child, t)
                           for t in ('visual', 'text')},
        'start_step': total_steps, 'steps': steps,
        'curve': zeroshot_curve(run_dir, offset=total_steps)})
    total_steps += steps
    previous = run_dir
  out = {'schedule': schedule.to_dict(), 'stages': results}
  utils.write_json_atomic(os.path.join(workdir, SCHEDULE_JSON), out)
  return out


def _fraction_of_original(original, fraction: float, source: str) -> Dict[str, Any]:
  """A keep spec of the current model (`source`) reaching `fraction` of the original's params."""
  _, current = checkpoint_lib.load_variables(source)
  now = np.mean([stages.param_fraction(original, current, t) for t in ('visual', 'text')])
  if fraction > now + 1e-6:
    raise ValueError(f'A stage cannot grow the model: {fraction} of the original parameters, '
                     f'but the current model holds {now:.3f}.')
  return stages.fraction_keep(current, min(fraction / now, 1.0))


def _mask_config(schedule, stage: Stage, steps: int, fraction: float, previous: str, current,
                 original) -> ml_collections.ConfigDict:
  """The masked run: the current model, gates over `stage.masks`, q ramped to the fraction of
  the *current* parameters that reaches `fraction` of the original's over 3/4 of the steps."""
  now = np.mean([stages.param_fraction(original, current, t) for t in ('visual', 'text')])
  overrides = {**stages.config_overrides(current), 'model.init_from': previous,
               'inherit.masks': stage.masks, 'inherit.target': min(fraction / now, 1.0),
               'inherit.ramp': f'{max(steps * 3 // 4, 1)}_steps'}
  config = stage_config(schedule, overrides, steps, stage.lr)
  with config.unlocked():
    config.optim.lr_rules = tuple(config.optim.lr_rules) + (
        (r'^masks/', schedule.mask_lr / config.optim.lr),)
  return config


def zeroshot_curve(run_dir: str, offset: int = 0) -> List[List[float]]:
  """[[step + offset, zero-shot mean over the 'demo' tasks]] from a run's metrics.jsonl."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  curve = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      tasks = [v for k, v in row.items() if k.startswith('zeroshot/demo_')
               and k.endswith('/top1') and not k.startswith('zeroshot/demo_heldout')]
      if tasks:
        curve[row['step']] = float(np.mean(tasks))
  return [[s + offset, v] for s, v in sorted(curve.items())]

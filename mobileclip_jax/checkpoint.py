"""Orbax checkpoints: model variables for interchange, and the training checkpoints' readers.

A *model checkpoint* is a directory with `variables/` (an Orbax PyTree of {'params',
'batch_stats'}) and `model.json` (the ModelConfig). `launch/convert.py` writes them from PyTorch
checkpoints; `load_variables` reads them and also the latest (or a given) step of a training
run's checkpoints, on any number of devices: arrays come back as host numpy arrays.
"""
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mobileclip_jax.models import clip as clip_lib

log = logging.getLogger('mobileclip_jax')

MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
STATE_ITEM = 'state'   # Training checkpoints: the TrainState.
META_ITEM = 'meta'     # Training checkpoints: JSON with the config and the model config.
VARIABLE_COLLECTIONS = ('params', 'batch_stats')


def _path(path: str) -> epath.Path:
  """Orbax needs absolute paths; remote ones (gs://...) are left as they are."""
  path = os.fspath(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def save_variables(directory: str, variables: Dict[str, Any],
                   model_config: clip_lib.ModelConfig) -> None:
  """Writes a model checkpoint. `model.json` is written last, so a directory that has it is complete."""
  path = _path(directory)
  if (path / MODEL_JSON).exists():
    raise FileExistsError(f'{directory} already holds a model checkpoint; choose a new directory.')
  path.mkdir(parents=True, exist_ok=True)
  tree = {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / VARIABLES_DIR, tree)
  tmp = path / (MODEL_JSON + '.tmp')
  tmp.write_text(json.dumps(clip_lib.config_to_dict(model_config), indent=1))
  tmp.rename(path / MODEL_JSON)


def _restore_numpy(item_dir: epath.Path, collections=VARIABLE_COLLECTIONS) -> Dict[str, Any]:
  """Restores the given top-level entries of an Orbax PyTree as numpy, whatever its topology.

  The item's handler reads it directly: a Checkpointer would also look for the step-level
  _CHECKPOINT_METADATA inside the item of a training step and warn that it is missing."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(item_dir).tree
    wanted = {k: tree[k] for k in collections if k in tree}
    if 'params' not in wanted:
      raise ValueError(f'{item_dir} holds no model parameters (top-level entries: '
                       f'{sorted(tree)}).')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    return handler.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))
  finally:
    handler.close()


def training_steps(checkpoint_dir: str) -> list:
  """Complete steps in a training run's checkpoint directory, ascending."""
  path = _path(checkpoint_dir)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM).exists() and (p / META_ITEM).exists()
                and ocp.utils.is_checkpoint_finalized(p))


def load_variables(path: str, step: Optional[int] = None
                   ) -> Tuple[Dict[str, Any], clip_lib.ModelConfig]:
  """(variables as numpy, ModelConfig) from a model checkpoint or a training run.

  `path` is a model checkpoint directory, a training workdir, or its `checkpoints/` directory;
  for training runs `step` selects a step (default: the latest complete one that reads; a
  damaged one is named in a warning and skipped). The step read is logged.
  """
  root = _path(path)
  if (root / MODEL_JSON).exists():
    config = clip_lib.config_from_dict(json.loads((root / MODEL_JSON).read_text()))
    return _restore_numpy(root / VARIABLES_DIR), config
  ckpt_dir = root / 'checkpoints' if (root / 'checkpoints').is_dir() else root
  steps = training_steps(os.fspath(ckpt_dir))
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint at {path}: expected a model checkpoint ({MODEL_JSON} + {VARIABLES_DIR}/) '
        f'or a training run with complete steps under {ckpt_dir}.')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'Step {step} is not a complete checkpoint in {ckpt_dir}; '
                            f'available: {steps}.')
  for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
    try:
      meta = json.loads((ckpt_dir / str(candidate) / META_ITEM / 'metadata').read_text())
      variables = _restore_numpy(ckpt_dir / str(candidate) / STATE_ITEM)
    except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise many kinds)
      if step is not None:
        raise ValueError(f'Step {step} of {ckpt_dir} cannot be read ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:300]}).') from None
      log.warning('Checkpoint step %d of %s cannot be read (%s: %s); trying the previous one.',
                  candidate, ckpt_dir, type(e).__name__, str(e).splitlines()[0][:200])
      continue
    log.info('Read step %d of %s%s.', candidate, ckpt_dir,
             ' (the latest)' if candidate == steps[-1] else '')
    return variables, clip_lib.config_from_dict(meta['model_config'])
  raise ValueError(f'No step of {ckpt_dir} can be read ({steps} are all damaged).')


DATA_ITER_ITEM = 'data_iter'  # Training checkpoints: the Grain iterator state (one file per process).


class TrainCheckpointer:
  """Orbax CheckpointManager for training: TrainState + data-iterator state + JSON metadata.

  Saves are asynchronous; every `every_steps` steps, when asked (`force`, e.g. on preemption
  or at the end) and never twice for one step. Keeps the last `keep_last` checkpoints plus
  every `keep_every`-th step. A step directory becomes visible under its final name only when
  complete, so a run killed mid-save resumes from the last complete step; a complete step whose
  files were damaged later is set aside (`<checkpoints>_damaged/<step>`, nothing deleted) and the
  previous one restored. Restores onto any mesh: the target carries the new shardings.
  """

  def __init__(self, directory: str, *, every_steps: int, keep_last: int,
               keep_every: Optional[int] = None, async_save: bool = True):
    preservation = [checkpoint_managers.LatestN(keep_last)]
    if keep_every:
      preservation.append(checkpoint_managers.EveryNSteps(keep_every))
    self._options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(every_steps),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(preservation),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.directory = directory
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={STATE_ITEM: _state_handler(),
                       META_ITEM: ocp.JsonCheckpointHandler(),
                       DATA_ITER_ITEM: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: Dict[str, Any],
           force: bool = False) -> bool:
    """Starts an (async) save if the policy says so or `force`; returns whether it did."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, force=force, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeSave(state),
        META_ITEM: ocp.args.JsonSave(meta),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(data_iter)}))

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Tuple[Any, Dict[str, Any]]:
    """(state placed per the target's shardings, meta); the data iterator is restored in place."""
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(abstract_state, restore_args=(
            ocp.checkpoint_utils.construct_restore_args(abstract_state))),
        META_ITEM: ocp.args.JsonRestore(),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(data_iter)}))
    return out[STATE_ITEM], out[META_ITEM]

  def restore_newest(self, abstract_state: Any, data_iter: Any) -> Tuple[Any, Optional[int]]:
    """(state, step) of the newest step that restores, or (None, None) when there is none.

    A step that fails to read is damaged: it is moved aside with a warning naming it (every
    process agrees, so that all restore the same step), and the previous step is tried.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      error = None
      try:
        state, _ = self.restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except
        if _is_mismatch(e):
          raise
        error = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
      if not _any_process(error is not None):
        return state, step
      self._set_aside(step, error or 'damaged on another process')
    return None, None

  def _set_aside(self, step: int, error: str) -> None:
    aside = os.path.join(f'{os.path.normpath(self.directory)}_damaged', str(step))
    log.warning('Checkpoint step %d in %s cannot be read (%s); it is moved to %s and the previous '
                'complete step is used.', step, self.directory, error, aside)
    self._manager.close()
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)),
                 aside if not os.path.exists(aside) else f'{aside}.{int(time.time())}')
    _sync('set-aside')
    self._manager = self._open()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The TrainState's handler: within one process each array is written whole from one replica.

  Orbax's default (replica-parallel) has every replica of a replicated array write a slice of
  it, cut by an eager `lax.slice_in_dim`: one compiled program per array shape and replica, and
  a single process holds all its replicas, so it spreads no work. On 8 CPU devices those
  compiles were 8 of a tiny run's 17 s (its first save) and grow with the model's distinct
  shapes. Across processes replica-parallel spreads the writes: Orbax's handlers stay as they are.
  """
  if jax.process_count() > 1:
    return ocp.PyTreeCheckpointHandler()
  handlers = ocp.type_handlers
  return ocp.PyTreeCheckpointHandler(type_handler_registry=handlers.create_type_handler_registry(
      (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
      *[(ty, handlers.get_type_handler(ty)) for ty in (np.ndarray, np.number, int, float, str)]))


def _is_mismatch(error: Exception) -> bool:
  """A restore that failed because the target differs (a config change), not the files."""
  text = str(error)
  return 'tree structures do not match' in text or 'Requested shape' in text


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

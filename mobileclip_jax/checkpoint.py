"""Orbax checkpoints: model variables for interchange, and the training checkpoints' readers.

A *model checkpoint* is a directory with `variables/` (an Orbax PyTree of {'params',
'batch_stats'}) and `model.json` (the ModelConfig). `launch/convert.py` writes them from PyTorch
checkpoints; `load_variables` reads them and also the latest (or a given) step of a training
run's checkpoints, on any number of devices: arrays come back as host numpy arrays.
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from mobileclip_jax.models import clip as clip_lib

MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
STATE_ITEM = 'state'   # Training checkpoints: the TrainState.
META_ITEM = 'meta'     # Training checkpoints: JSON with the config and the model config.
VARIABLE_COLLECTIONS = ('params', 'batch_stats')


def save_variables(directory: str, variables: Dict[str, Any],
                   model_config: clip_lib.ModelConfig) -> None:
  """Writes a model checkpoint. `model.json` is written last, so a directory that has it is complete."""
  path = epath.Path(directory)
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
  """Restores the given top-level entries of an Orbax PyTree as numpy, whatever its topology."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item_dir).item_metadata.tree
  wanted = {k: tree[k] for k in collections if k in tree}
  if 'params' not in wanted:
    raise ValueError(f'{item_dir} holds no model parameters (top-level entries: {sorted(tree)}).')
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))


def training_steps(checkpoint_dir: str) -> list:
  """Complete steps in a training run's checkpoint directory, ascending."""
  path = epath.Path(checkpoint_dir)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM).exists() and (p / META_ITEM).exists()
                and ocp.utils.is_checkpoint_finalized(p))


def load_variables(path: str, step: Optional[int] = None
                   ) -> Tuple[Dict[str, Any], clip_lib.ModelConfig]:
  """(variables as numpy, ModelConfig) from a model checkpoint or a training run.

  `path` is a model checkpoint directory, a training workdir, or its `checkpoints/` directory;
  for training runs `step` selects a step (default: the latest complete one).
  """
  root = epath.Path(path)
  if (root / MODEL_JSON).exists():
    config = clip_lib.config_from_dict(json.loads((root / MODEL_JSON).read_text()))
    return _restore_numpy(root / VARIABLES_DIR), config
  ckpt_dir = root / 'checkpoints' if (root / 'checkpoints').is_dir() else root
  steps = training_steps(os.fspath(ckpt_dir))
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint at {path}: expected a model checkpoint ({MODEL_JSON} + {VARIABLES_DIR}/) '
        f'or a training run with complete steps under {ckpt_dir}.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'Step {step} is not a complete checkpoint in {ckpt_dir}; '
                            f'available: {steps}.')
  meta = json.loads((ckpt_dir / str(step) / META_ITEM / 'metadata').read_text())
  config = clip_lib.config_from_dict(meta['model_config'])
  return _restore_numpy(ckpt_dir / str(step) / STATE_ITEM), config

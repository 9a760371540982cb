r"""Trains a learned part of cheaper inference and saves it beside the model.

  python launch/train_reducer.py --checkpoint=/tmp/demo/runs/student_dr --task=text_ranker \
    --layer=1 --source='{"kind": "demo", "split": "train", "num_samples": 2000}'
  python launch/train_reducer.py --checkpoint=RUN --task=image_ranker --layer=3 --source=...
  python launch/train_reducer.py --checkpoint=RUN --task=resolution_selector --sizes=16,24 ...
  python launch/train_reducer.py --checkpoint=RUN --task=bn_stats --sizes=16,24 ...

Tasks (mobileclip_jax/reducers.py): text_ranker / image_ranker (Patch Ranking's predictor at
block --layer, trained on feature-preservation golden scores), resolution_selector (predicts
each side's cosine to the full-size embedding from a low-resolution copy), bn_stats (BatchNorm
statistics re-estimated per side, MCi). The model comes as for launch/evaluate.py (--checkpoint,
or --torch_checkpoint with --model / --config). --source is an evaluation source spec (JSON, see
mobileclip_jax/evaluation/datasets.py) or a standard evaluation name: use training data, not the
data you evaluate on. Writes <out_dir>/<task>.npz (default out_dir: beside the checkpoint, where
launch/evaluate.py --inference looks) and the targets it was trained on, <task>.golden.npz
(reused by a rerun made the same way).
"""
import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import inference
from mobileclip_jax import reducers
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import registry
from mobileclip_jax.evaluation import runner
from mobileclip_jax.train import setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A training config: its model.',
                                          lock_config=False)
_MODEL = flags.DEFINE_string('model', None, 'Variant name (with --torch_checkpoint).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Orbax model checkpoint or training run.')
_STEP = flags.DEFINE_integer('step', None, 'Training-run step (default: the latest).')
_TORCH_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None, 'open_clip state_dict file.')
_TASK = flags.DEFINE_enum('task', None, reducers.TASKS, 'What to train.')
_SOURCE = flags.DEFINE_string('source', None, 'Evaluation source spec (JSON) or standard name.')
_SOURCE_TYPE = flags.DEFINE_enum('source_type', datasets.RETRIEVAL, datasets.EVAL_TYPES,
                                  'How to read a JSON --source: retrieval (images, captions as '
                                  'texts) or zeroshot (images, class prompts as texts).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'Where a standard evaluation looks for data.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Only the first N examples of the source (0 = all).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Default: beside the checkpoint.')
_LAYER = flags.DEFINE_integer('layer', reducers.Settings.layer, 'Rankers: the block they score.')
_WINDOW = flags.DEFINE_integer('window', 0, 'Golden-score window (0: 1 text position, 2x2 '
                               'patches).')
_SIZES = flags.DEFINE_list('sizes', [], 'Selector / bn_stats: the smaller image sides.')
_EPOCHS = flags.DEFINE_integer('epochs', reducers.Settings.epochs, 'Training epochs.')
_BATCH = flags.DEFINE_integer('batch_size', reducers.Settings.batch_size, 'Batch size.')
_LR = flags.DEFINE_float('lr', reducers.Settings.lr, 'Peak learning rate (cosine decay).')
_RECOMPUTE = flags.DEFINE_bool('recompute', False, 'Recompute the stored targets.')


def _source(text: str):
  text = text.strip()
  if text.startswith('{'):
    try:
      return _SOURCE_TYPE.value, json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'--source is not valid JSON: {e}') from None
  return registry.standard_eval(text, _DATA_DIR.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  if not _TASK.value or not _SOURCE.value:
    raise app.UsageError('--task and --source are required.')
  compilation_cache.enable()
  config = _CONFIG.value
  try:
    model, variables = runner.load_model(
        _MODEL.value, _CHECKPOINT.value, _TORCH_CHECKPOINT.value, _STEP.value,
        model_config=setup.model_config(config) if config else None)
    eval_type, spec = _source(_SOURCE.value)
    data = datasets.open_source(dict(spec, limit=_LIMIT.value), eval_type,
                                model.config.image_size)
    settings = reducers.Settings(
        layer=_LAYER.value, window=_WINDOW.value, sizes=tuple(int(s) for s in _SIZES.value),
        epochs=_EPOCHS.value, batch_size=_BATCH.value, lr=_LR.value)
    out_dir = _OUT_DIR.value or inference.default_dir(_CHECKPOINT.value or _TORCH_CHECKPOINT.value)
    meta = reducers.run(_TASK.value, model, variables, data, out_dir, settings,
                        reuse=not _RECOMPUTE.value)
  except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}\nNothing was written.')
  print(json.dumps({'task': _TASK.value, 'out_dir': out_dir, 'report': meta.get('report')},
                   indent=1))


if __name__ == '__main__':
  sys.argv, _ = cli.config_argv(sys.argv)
  cli.run(main)

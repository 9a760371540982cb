r"""Zero-shot classification and image-text retrieval numbers for a checkpoint.

  python launch/evaluate.py --checkpoint=WORKDIR_OR_MODEL_DIR --eval=imagenet,coco,flickr \
    --data_dir=~/eval_data --out=results.json
  python launch/evaluate.py --model=MobileCLIP2-S0 --torch_checkpoint=mobileclip2_s0.pt \
    --eval=imagenet --data_dir=~/eval_data
  python launch/evaluate.py --checkpoint=/tmp/demo_run --eval=demo,demo_heldout,demo_retrieval
  python launch/evaluate.py --config=configs/demo.py:student_dr --checkpoint=/tmp/student_dr

--checkpoint takes an Orbax model checkpoint (launch/convert.py) or a training run (its latest
step, or --step); --torch_checkpoint a state_dict in open_clip's names (.safetensors, .pt, .pth,
.bin, .npz) of --model (import Apple's v1 checkpoints with launch/convert.py first). --config
gives the model (a variant with overrides) and, without --eval, the training config's evals.
Standard evaluations and where they look for data under --data_dir:

{registry}

--inference makes inference cheaper (mobileclip_jax/inference.py; every evaluation reports its
accuracy with it): token merging ('text.merge=4', 'image.merge=8'), pruning
('image.prune=learned,image.keep=0.7,image.prune_layers=3', also random or attention; text
'text.cut_padding=1'), a lower image side ('image_size=192'), the zero-shot confidence cascade
('cascade_size=160,cascade_tau=0.02') or the learned resolution selector ('selector_tau=0.98',
'bn_stats=1'). The learned parts come from --inference_dir (default: beside the checkpoint,
where launch/train_reducer.py writes them).

Prints a table; with --out, writes JSON (metrics, per-evaluation source, image count and time)
atomically, and only when every evaluation succeeded. On several hosts run the same command on
every host (--coordinator_address, --num_processes, --process_id outside a cluster that JAX
detects); host 0 prints and writes.
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import distributed
from mobileclip_jax import inference
from mobileclip_jax import sharding
from mobileclip_jax import utils
from mobileclip_jax.evaluation import evaluator as evaluator_lib
from mobileclip_jax.evaluation import registry
from mobileclip_jax.evaluation import runner
from mobileclip_jax.train import setup

__doc__ = __doc__.format(registry=registry.__doc__.split('\n\n')[1])

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A training config (path.py[:presets]): its model, with its overrides, and '
    'without --eval its `evals` entries.', lock_config=False)
_MODEL = flags.DEFINE_string('model', None, 'Variant name; --torch_checkpoint needs it or --config.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Orbax model checkpoint or training run.')
_STEP = flags.DEFINE_integer('step', None, 'Training-run step (default: the latest).')
_TORCH_CHECKPOINT = flags.DEFINE_string('torch_checkpoint', None, 'open_clip state_dict file.')
_EVAL = flags.DEFINE_list('eval', None, f'Standard evaluations: {sorted(registry.STANDARD_EVALS)}.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('MOBILECLIP_EVAL_DATA', ''),
                                'Folder holding the evaluation datasets ($MOBILECLIP_EVAL_DATA).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Global images per batch.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Only the first N examples of each dataset (0 = all).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 8, 'Image-decoding threads per host.')
_OUT = flags.DEFINE_string('out', None, 'Write the results here as JSON.')
_INFERENCE = flags.DEFINE_string('inference', '', 'Cheaper inference options, key=value,... '
                                 '(see above; default: none).')
_INFERENCE_DIR = flags.DEFINE_string('inference_dir', None, 'Folder of the learned inference '
                                     'parts (default: beside the checkpoint).')
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}.')
  config = _CONFIG.value
  if not _EVAL.value and not (config and config.evals):
    raise app.UsageError(f'--eval is required (some of {sorted(registry.STANDARD_EVALS)}), or '
                         'a --config with evals.')
  compilation_cache.enable()
  distributed.initialize(distributed.settings_from_flags())
  start = time.time()
  try:
    model, variables = runner.load_model(
        _MODEL.value, _CHECKPOINT.value, _TORCH_CHECKPOINT.value, _STEP.value,
        model_config=setup.model_config(config) if config else None)
    mesh = sharding.create_mesh()
    cheaper = dict(inference=_INFERENCE.value, inference_dir=_INFERENCE_DIR.value or (
        inference.default_dir(_CHECKPOINT.value or _TORCH_CHECKPOINT.value)))
    evaluators = []
    for name in _EVAL.value or ():
      eval_type, source = registry.standard_eval(name, _DATA_DIR.value)
      entry = dict(type=eval_type, source=dict(source, limit=_LIMIT.value),
                   batch_size=_BATCH_SIZE.value, num_workers=_NUM_WORKERS.value, **cheaper)
      evaluators.append(evaluator_lib.build_evaluator(name, entry, model.config, mesh))
    if not evaluators:  # The training config's own evaluations.
      evaluators = evaluator_lib.build_evaluators(config.evals, model.config, mesh, **cheaper)
    results = runner.run_evaluators(model, variables, evaluators)
  except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}\nNothing was written.')
  if jax.process_index() == 0:
    print(runner.format_table(results['metrics']))
    if _OUT.value:
      utils.write_json_atomic(_OUT.value, {
          'model': model.config.name, 'checkpoint': _CHECKPOINT.value or _TORCH_CHECKPOINT.value,
          'step': _STEP.value, 'data_dir': _DATA_DIR.value, 'limit': _LIMIT.value,
          'inference': inference.describe(inference.parse(_INFERENCE.value)),
          'seconds': round(time.time() - start, 1), **results})
      print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  sys.argv, _ = cli.config_argv(sys.argv)
  cli.run(main)

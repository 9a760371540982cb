r"""A smaller model that inherits a trained model's weights (TinyCLIP weight inheritance).

  python launch/inherit.py --checkpoint=RUN_OR_MODEL --out=DIR \
      --keep='text.layers=6;image.widths=(32,64,128,256)'
  python launch/inherit.py --checkpoint=S2 --model=MobileCLIP2-S2 --target=MobileCLIP2-S0 --out=DIR
  python launch/inherit.py --checkpoint=RUN --fraction=0.5 --out=DIR      # ~half of each tower
  python launch/inherit.py --checkpoint=MASKED_RUN --keep=masks --out=DIR  # the masks' choice

--checkpoint is a model checkpoint (launch/convert.py imports released open_clip / Apple
weights into one) or a training run (its latest step, or --step). --keep is a JSON object or
`key=value;...` with the keys of mobileclip_jax/inheritance/slicing.py (text.layers, text.heads,
text.width, text.mlp_ratio, image.depths, image.widths, image.mlp_ratio, image.depth,
image.heads, image.width, select); --select sets how units are chosen (first, magnitude, masks).
With --bn_config (a training config) and --bn_batches, BatchNorm statistics are re-estimated on
that many batches of its data.

DIR gets the model checkpoint (variables/, model.json: evaluate.py and convert.py read it),
inherit.json (parent, keep spec, kept units, parameter fractions) and train.flags (the child's
model.* overrides and model.init_from), so that the child trains with

  python launch/train.py --config=configs/demo.py:student_dr --flagfile=DIR/train.flags \
      --workdir=RUN2

A schedule of stages (progressive shrinking, learned masks, the from-scratch baseline;
configs/inherit.py) runs with one command, each stage an inherit + train as above:

  python launch/inherit.py --schedule=configs/inherit.py:progressive \
      --schedule.parent=/tmp/demo/runs/student_dr --schedule.data_dir=/tmp/demo/tfds --workdir=W
"""
import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The parent: model checkpoint or run.')
_STEP = flags.DEFINE_integer('step', None, 'Training-run step of the parent (default: latest).')
_MODEL = flags.DEFINE_string('model', None, 'The parent variant (checked against the checkpoint).')
_KEEP = flags.DEFINE_string('keep', None, "What to keep (JSON or 'key=value;...'), or 'masks'.")
_TARGET = flags.DEFINE_string('target', None, 'A smaller named variant of the same family.')
_FRACTION = flags.DEFINE_float('fraction', None, 'About this fraction of each tower\'s parameters.')
_SELECT = flags.DEFINE_enum('select', None, ['first', 'magnitude', 'masks'],
                            'How units are chosen (default: the keep spec\'s, else magnitude).')
_OUT = flags.DEFINE_string('out', None, 'The new model checkpoint directory.')
_BN_CONFIG = config_flags.DEFINE_config_file(
    'bn_config', None, 'A training config whose data re-estimates BatchNorm statistics.',
    lock_config=False)
_BN_BATCHES = flags.DEFINE_integer('bn_batches', 0, 'Batches for the BatchNorm statistics.')
_SCHEDULE = config_flags.DEFINE_config_file('schedule', None, 'An inheritance schedule '
                                            '(configs/inherit.py:NAME).', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where a --schedule puts its stages.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  compilation_cache.enable()
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.inheritance import schedule
  from mobileclip_jax.inheritance import stages
  # pylint: enable=g-import-not-at-top
  if _SCHEDULE.value is not None:
    if _CHECKPOINT.value or _OUT.value or not _WORKDIR.value:
      raise app.UsageError('--schedule takes --workdir (and --schedule.parent), not --checkpoint '
                           'or --out.')
    out = schedule.run(_SCHEDULE.value, _WORKDIR.value)
    print(json.dumps([{k: s[k] for k in ('stage', 'param_fraction', 'start_step', 'steps')}
                      for s in out['stages']], indent=1))
    return
  given = [f for f in (_KEEP, _TARGET, _FRACTION) if f.value is not None]
  if len(given) != 1 or not _CHECKPOINT.value or not _OUT.value:
    raise app.UsageError('Give --checkpoint, --out and exactly one of --keep, --target, '
                         '--fraction (or --schedule with --workdir).')
  if _KEEP.value is not None:
    keep = {'masks': True} if _KEEP.value.strip() == 'masks' else stages.parse_keep(_KEEP.value)
  elif _TARGET.value is not None:
    keep = {'target': _TARGET.value}
  else:
    keep = {'fraction': _FRACTION.value}
  if _SELECT.value:
    keep['select'] = _SELECT.value
  if _BN_BATCHES.value and _BN_CONFIG.value is None:
    raise app.UsageError('--bn_batches needs --bn_config (a training config for the data).')
  record = schedule.inherit_checkpoint(
      _CHECKPOINT.value, keep, _OUT.value, step=_STEP.value, model=_MODEL.value,
      bn_batches=_BN_BATCHES.value, bn_config=_BN_CONFIG.value)
  fractions = ', '.join(f'{t} {f:.1%}' for t, f in record['param_fraction'].items())
  print(f'Wrote {_OUT.value}: {record["params"]["child"]:,} of {record["params"]["parent"]:,} '
        f'parameters ({fractions}); keep {json.dumps(record["keep"])}.\n'
        f'Train it: python launch/train.py --config=RECIPE --flagfile={_OUT.value}/'
        f'{schedule.TRAIN_FLAGS} --workdir=...')


if __name__ == '__main__':
  sys.argv, _ = cli.config_argv(sys.argv, 'bn_config')
  sys.argv, _ = cli.config_argv(sys.argv, 'schedule')
  cli.run(main)

"""Trains a MobileCLIP model.

  python launch/train.py --config=configs/mobileclip2.py:s4 --workdir=DIR

Overrides: `--config.optim.lr=5e-4 --config.loss.teacher_scales=70,60
--config.model.attention=sigmoid`; presets after the variant:
`--config=configs/mobileclip2.py:s4,runlocal` (a CPU smoke run on the demo world with the full
architecture); training-time evaluators: `--config.evals.demo=demo
--config.evals.demo.every_steps=100`. Every host of a pod runs the same command; rerunning with
the same --workdir resumes from its last complete checkpoint.
"""
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mobileclip_jax import compilation_cache
from mobileclip_jax import config as config_lib
from mobileclip_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:presets]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                               required=True)
_EVALS = {}  # --config.evals.* overrides, taken out of argv before flag parsing.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/Grain INFO lines drown the progress.
  logging.getLogger('mobileclip_jax').setLevel(logging.INFO)
  compilation_cache.enable()
  loop.train(config_lib.add_evals(_CONFIG.value, _EVALS), _WORKDIR.value)


if __name__ == '__main__':
  sys.argv, _EVALS = config_lib.pop_eval_overrides(sys.argv)
  config_lib.check_overrides(sys.argv)
  flags.mark_flag_as_required('config')
  app.run(main)

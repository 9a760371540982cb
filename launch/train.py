"""Trains a MobileCLIP model.

  python launch/train.py --config=configs/mobileclip2.py:s4 --workdir=DIR

Overrides: `--config.optim.lr=5e-4 --config.loss.teacher_scales=70,60
--config.model.attention=sigmoid`; presets after the variant:
`--config=configs/mobileclip2.py:s4,runlocal` (a CPU smoke run on the demo world with the full
architecture); training-time evaluators: `--config.evals.demo=demo
--config.evals.demo.every_steps=100`. Every host of a pod runs the same command; rerunning with
the same --workdir resumes from its last complete checkpoint. A workdir holds one run: a second
run on it is refused while the first holds its lock, and so is a rerun with a different config
(except keys that are safe to change on resume, see mobileclip_jax/train/workdir.py).
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import config as config_lib
from mobileclip_jax import utils
from mobileclip_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:presets]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                               required=True)
_TAKE_OVER_LOCK = flags.DEFINE_bool('take_over_lock', False, "Take over a stale lock of the "
                                    "workdir (a run that died without releasing it).")
_EVALS = {}  # --config.evals.* overrides, taken out of argv before flag parsing.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  compilation_cache.enable()
  utils.run_cpu_programs_inline()
  loop.train(config_lib.add_evals(_CONFIG.value, _EVALS), _WORKDIR.value, _TAKE_OVER_LOCK.value)


if __name__ == '__main__':
  sys.argv, _EVALS = cli.config_argv(sys.argv)
  flags.mark_flag_as_required('config')
  cli.run(main)

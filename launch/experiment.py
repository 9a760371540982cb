r"""Variants x seeds of a config through the trainer and evaluator: a table with mean and std.

  python launch/experiment.py --config=configs/demo.py:student_dr --sweep=distill_weight \
      --seeds=3 --workdir=/tmp/exp_distill
  python launch/experiment.py --config=configs/demo.py:student_dr --seeds=3 --workdir=/tmp/exp \
      --grid='loss.distill_weight=0,0.5,1' --workers=2     # two runs at a time on a CPU
  python launch/experiment.py --config=configs/demo.py:student_dr --list_sweeps

Rerunning the same command skips finished runs and resumes interrupted ones. Writes
<workdir>/results.json, results.md, metrics.png and losses.png (see mobileclip_jax/experiment.py).
"""
from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import experiment

_CONFIG = flags.DEFINE_string('config', None, 'Config file, path.py[:arg] (as launch/train.py).',
                              required=True)
_SWEEP = flags.DEFINE_string('sweep', None, "A named sweep of the config file's get_sweeps().")
_GRID = flags.DEFINE_multi_string('grid', [], "Ad-hoc variants 'dotted.key=v1,v2,...'; "
                                  'repeat for the product of several keys.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Runs per variant, with config.seed + 0, 1, ...')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs and the summary go.')
_LIST = flags.DEFINE_bool('list_sweeps', False, "List the config file's sweeps and exit.")
_WORKERS = flags.DEFINE_integer(
    'workers', 1, 'Runs side by side, each in its own process, on one CPU host (0: one per '
    'core); accelerators and clusters run one after another on the whole mesh.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  path, _, arg = _CONFIG.value.partition(':')
  module = experiment.load_config_module(path)
  sweeps = module.get_sweeps(arg or None) if hasattr(module, 'get_sweeps') else {}
  if _LIST.value:
    for name, sweep in sweeps.items():
      print(f'{name}: {sweep.description} ({", ".join(sweep.variants)})')
    return
  if bool(_SWEEP.value) == bool(_GRID.value):
    raise app.UsageError('Give one of --sweep=NAME and --grid=KEY=V1,V2,...')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  if _SWEEP.value:
    if _SWEEP.value not in sweeps:
      raise app.UsageError(f'{path} has no sweep {_SWEEP.value!r}; sweeps: '
                           f'{", ".join(sweeps) or "none (no get_sweeps)"}.')
    sweep = sweeps[_SWEEP.value]
  if _SEEDS.value < 1:
    raise app.UsageError(f'--seeds must be >= 1, got {_SEEDS.value}.')
  base = module.get_config(arg or None)
  if not _SWEEP.value:
    sweep = experiment.parse_grid(_GRID.value)
  configs = {name: experiment.apply_overrides(base, overrides)
             for name, overrides in sweep.variants.items()}
  compilation_cache.enable()
  experiment.run(configs, _SEEDS.value, _WORKDIR.value,
                 metrics=getattr(module, 'METRICS', None), overrides=sweep.variants,
                 description=sweep.description or _SWEEP.value, workers=_WORKERS.value)


if __name__ == '__main__':
  cli.run(main)

"""Weight-inheritance schedules (launch/inherit.py --schedule; inheritance/schedule.py).

  python launch/inherit.py --schedule=configs/inherit.py:progressive \
      --schedule.parent=/tmp/demo/runs/student_dr --schedule.data_dir=/tmp/demo/tfds --workdir=W

Every arm ends at `fraction` of the parent's parameters per tower after `steps` training steps in
total (mask learning included), with the recipe's data, loss and optimizer:

  manual        inherit (importance-chosen units), train `steps`
  first         the same with first-k units (TinyCLIP's manual choice)
  scratch       the manual child's architecture from random init (the baseline)
  learned       gates over heads, MLP neurons, embedding dims and layers for steps / 4, then the
                child they choose trains for 3 steps / 4
  progressive   100 -> 50 -> 25 %: two stages of steps / 2 (fraction is the last stage's)
  progressive4  100 -> 75 -> 50 -> 25 %: three stages of steps / 3

Preset `quick` after the arm: 8 steps, fraction 0.5, for a smoke run on `launch/demo.py --quick`.
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from mobileclip_jax import config as config_lib

ARMS = ('manual', 'first', 'scratch', 'learned', 'progressive', 'progressive4')


def get_config(arg=None):
  parts = [p for p in (arg or '').split(',') if p]
  if not parts or parts[0] not in ARMS or set(parts[1:]) - {'quick'}:
    raise ValueError(f'configs/inherit.py needs an arm ({", ".join(ARMS)}), optionally then '
                     f"'quick'; got {arg!r}.")
  arm = parts[0]
  c = ml_collections.ConfigDict()
  c.parent = placeholder(str)                 # The trained model to inherit from.
  c.recipe = os.path.join(config_lib.CONFIGS_DIR, 'demo.py') + ':student_dr'
  c.data_dir = placeholder(str)               # The recipe's data.data_dir (e.g. DEMO/tfds).
  c.seed = 0
  c.steps = 200                               # Total training steps of the arm.
  c.fraction = 0.25                           # Final parameters per tower / the parent's.
  c.select = 'magnitude'                      # Manual stages: first | magnitude.
  c.bn_batches = 8                            # BatchNorm re-estimation batches after slicing.
  c.evals_every = 25                          # The recipe's evaluations every this many steps.
  c.mask_lr = 0.05                            # The gates' learning rate (TinyCLIP: 0.01, 3k steps).
  c.stages = {
      'manual': ({'name': 'child'},),
      'first': ({'name': 'child'},),
      'scratch': ({'name': 'child', 'from_scratch': True},),
      'learned': ({'name': 'child', 'masks': 'heads,mlp,embed,layers', 'mask_share': 0.25,
                   'share': 0.75},),
      'progressive': ({'name': '50', 'fraction': 0.5, 'share': 0.5},
                      {'name': '25', 'share': 0.5}),
      'progressive4': ({'name': '75', 'fraction': 0.75, 'share': 1 / 3},
                       {'name': '50', 'fraction': 0.5, 'share': 1 / 3},
                       {'name': '25', 'share': 1 / 3}),
  }[arm]
  if arm == 'first':
    c.select = 'first'
  if 'quick' in parts:
    c.recipe = os.path.join(config_lib.CONFIGS_DIR, 'demo.py') + ':student_dr,quick'
    c.steps, c.fraction, c.bn_batches, c.evals_every = 8, 0.5, 2, 4
  return c

"""MobileCLIP-B (LT): 300k steps at constant lr, then 300k cosine (36B seen samples).

  python launch/train.py --config=configs/mobileclip_b_lt.py --workdir=DIR
"""
from mobileclip_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.mobileclip_v1_recipe('MobileCLIP-B')
  c.schedule.total = '600000_steps'
  c.schedule.kind = 'constant_cosine'
  c.schedule.constant = '300000_steps'
  return config_lib.apply_presets(c, arg)

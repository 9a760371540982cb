"""MobileCLIP2-S4 with MobileCLIP2's released recipe (see mobileclip_jax.config.mobileclip2_recipe).

  python launch/train.py --config=configs/s4.py --workdir=DIR
  python launch/train.py --config=configs/s4.py:runlocal --workdir=/tmp/s4   # CPU smoke run, demo world
"""
from mobileclip_jax import config as config_lib


def get_config(arg=None):
  return config_lib.apply_presets(config_lib.mobileclip2_recipe('MobileCLIP2-S4'), arg)

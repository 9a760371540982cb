"""MobileCLIP-S1 (v1, DataCompDR-1B recipe): MobileCLIP2 has no S1.

  python launch/train.py --config=configs/s1.py --workdir=DIR
"""
from mobileclip_jax import config as config_lib


def get_config(arg=None):
  return config_lib.apply_presets(config_lib.mobileclip_v1_recipe('MobileCLIP-S1'), arg)

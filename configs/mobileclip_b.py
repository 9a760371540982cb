"""MobileCLIP-B (v1) with its DataCompDR-1B recipe (see mobileclip_jax.config.mobileclip_v1_recipe).

  python launch/train.py --config=configs/mobileclip_b.py --workdir=DIR
"""
from mobileclip_jax import config as config_lib


def get_config(arg=None):
  return config_lib.apply_presets(config_lib.mobileclip_v1_recipe('MobileCLIP-B'), arg)

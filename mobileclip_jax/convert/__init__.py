"""Parameter trees <-> PyTorch state_dicts (open_clip / timm names; Apple's MCt names)."""
from mobileclip_jax.convert.open_clip import conversion_table
from mobileclip_jax.convert.open_clip import from_open_clip
from mobileclip_jax.convert.open_clip import to_open_clip
from mobileclip_jax.convert.apple_v1 import from_apple_v1
from mobileclip_jax.convert.apple_v1 import to_apple_v1
from mobileclip_jax.convert.files import export_checkpoint
from mobileclip_jax.convert.files import import_checkpoint
from mobileclip_jax.convert.files import read_state_dict
from mobileclip_jax.convert.files import write_state_dict

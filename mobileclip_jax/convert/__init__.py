"""Parameter trees <-> PyTorch state_dicts (open_clip / timm names; Apple's MCt names)."""
from mobileclip_jax.convert.open_clip import conversion_table
from mobileclip_jax.convert.open_clip import from_open_clip
from mobileclip_jax.convert.open_clip import to_open_clip

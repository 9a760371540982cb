"""Flax (linen) modules of the MobileCLIP family: MCi / ViT image towers, base / MCt text towers."""
from mobileclip_jax.models.clip import CLIP
from mobileclip_jax.models.clip import MODEL_CONFIGS
from mobileclip_jax.models.clip import ModelConfig
from mobileclip_jax.models.clip import count_params
from mobileclip_jax.models.clip import create_model
from mobileclip_jax.models.clip import get_config
from mobileclip_jax.models.reparam import reparameterize

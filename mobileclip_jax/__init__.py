"""mobileclip_jax: MobileCLIP / MobileCLIP2 with multi-modal reinforced training in JAX/Flax.

The model entry points are imported lazily, so that `import mobileclip_jax.data.tokenizer` in a
data-loader worker does not pay for importing JAX and Flax.
"""
import importlib

__version__ = '0.1.0'
_LAZY = {
    'create_model': 'mobileclip_jax.models.clip',
    'generate': 'mobileclip_jax.decoding',
    'get_config': 'mobileclip_jax.models.clip',
    'count_params': 'mobileclip_jax.models.clip',
    'reparameterize': 'mobileclip_jax.models.reparam',
    'inherit': 'mobileclip_jax.inheritance.slicing',
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

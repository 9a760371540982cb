"""The two towers as exported: inference-form variables, fixed input shapes, plain functions.

An exported tower is `fn(variables, x) -> embeddings [batch, embed_dim] float32` (unnormalized,
as `CLIP.encode_image` / `encode_text`), traced with:
  image  x float32 [batch, size, size, 3] (NHWC), pixels already normalized with mean/std
  text   x int32 [batch, context_length], CLIP's layout (SOT, ids, EOT, 0...)
Shapes are fixed at export (`Shapes`): phone runtimes plan memory for one shape. A resolution
other than the trained one resizes a ViT's position embedding once here (bicubic, as the model
does on the fly), and a shorter context slices the text position embedding, so the graphs hold
no resize or slice of parameters.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mobileclip_jax.export import portable
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import mci
from mobileclip_jax.models import reparam
from mobileclip_jax.models import vit

TOWERS = ('image', 'text')
_METHODS = {'image': 'encode_image', 'text': 'encode_text'}
_PARAMS = {'image': 'visual', 'text': 'text'}
Variables = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The fixed input shapes of an export. None: the model's own resolution / context length."""
  batch: int = 1
  image_size: Optional[int] = None
  context_length: Optional[int] = None


def image_stride(config: clip_lib.ModelConfig) -> int:
  """What the resolution must be a multiple of: the image tower's total downsampling."""
  if isinstance(config.image, mci.MCiConfig):
    widths = config.image.widths  # Stride-4 stem; a stage downsamples 2x when the width changes.
    return 4 * 2 ** sum(a != b for a, b in zip(widths, widths[1:]))
  return config.image.patch_size


def resolve_shapes(config: clip_lib.ModelConfig, shapes: Shapes) -> Shapes:
  """`shapes` with defaults filled in; ValueError (one line) for a shape the towers cannot take."""
  size = shapes.image_size or config.image_size
  context = shapes.context_length or config.text.context_length
  if not isinstance(shapes.batch, int) or shapes.batch < 1:
    raise ValueError(f'batch={shapes.batch}: exported towers have a fixed batch; give a positive '
                     'integer (1 for one image / text per call).')
  stride = image_stride(config)
  if size < stride or size % stride:
    raise ValueError(f'image_size={size} does not fit {config.name}\'s image tower, which needs a '
                     f'multiple of {stride} (trained at {config.image_size}).')
  if context > config.text.context_length or context < 2:
    raise ValueError(f'context_length={context}: {config.name}\'s text tower takes 2 to '
                     f'{config.text.context_length} tokens (SOT and EOT included).')
  if config.text.variant == 'mct' and context != config.text.context_length:
    raise ValueError(f'context_length={context}: {config.name}\'s MCt text tower mixes tokens with '
                     f'convolutions trained on exactly {config.text.context_length} positions; '
                     'export it with that length.')
  return Shapes(shapes.batch, size, context)


def has_reparameterizable_tower(config: clip_lib.ModelConfig) -> bool:
  return isinstance(config.image, mci.MCiConfig) or config.text.variant == 'mct'


def inference_form(variables: Variables, config: clip_lib.ModelConfig, shapes: Shapes
                   ) -> Tuple[Variables, clip_lib.ModelConfig]:
  """(variables, config) to export: reparameterized (one conv per MobileOne / RepMixer block),
  float32 compute, and position embeddings for `shapes` (already resolved)."""
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  if has_reparameterizable_tower(config) and not reparam.is_reparameterized(variables):
    variables = jax.jit(reparam.reparameterize)(variables)
  reparameterized = has_reparameterizable_tower(config)
  params = jax.tree.map(np.asarray, dict(variables['params']))
  text = dict(params['text'])
  text['positional_embedding'] = text['positional_embedding'][:shapes.context_length]
  params['text'] = text
  if isinstance(config.image, vit.ViTConfig) and shapes.image_size != config.image_size:
    grid = config.image_size // config.image.patch_size
    new_grid = (shapes.image_size // config.image.patch_size,) * 2
    visual = dict(params['visual'])
    visual['pos_embed'] = np.asarray(vit._resize_pos_embed(  # pylint: disable=protected-access
        jnp.asarray(visual['pos_embed']), grid, new_grid, config.image.embed_class))
    params['visual'] = visual
  config = dataclasses.replace(
      config, reparameterized=reparameterized, dtype='float32', image_size=shapes.image_size,
      text=dataclasses.replace(config.text, context_length=shapes.context_length))
  return {**variables, 'params': params}, config


def random_variables(config: clip_lib.ModelConfig, seed: int = 0) -> Variables:
  """Train-time variables of `config` with seeded random values that make every part count.

  Shapes come from `jax.eval_shape` (no compile, any size). Kernels are N(0, 1/fan_in); unlike
  the real init, normalization statistics and affines are far from identity and layer scales are
  0.02-0.1 rather than 1e-5, so that an exported branch computed wrongly changes the embeddings
  (as the models benchmark does for its PyTorch comparison). Larger layer scales let the
  residual stream grow until float32 rounding alone moves the embeddings: at 0.1-0.5, JAX's own
  train-time and reparameterized S0 differed by 2e-4 relative L2; at these, by 6e-7.
  """
  shapes = clip_lib.abstract_variables(config)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name in ('kernel', 'text_projection'):
      return rng.normal(0, np.prod(shape[:-1]) ** -0.5, shape)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape)
    if name in ('bias', 'mean'):
      return rng.uniform(-0.1, 0.1, shape)
    if name == 'gamma':
      return rng.uniform(0.02, 0.1, shape)
    return rng.normal(0, 0.02, shape)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.asarray(fill(path, leaf), np.float32), shapes)


def tower_variables(variables: Variables, tower: str) -> Variables:
  """The variables one tower reads (the other tower's weights are not exported with it)."""
  out = {'params': {_PARAMS[tower]: variables['params'][_PARAMS[tower]],
                    # CLIP.setup declares it; a one-tower apply never reads it.
                    'logit_scale': np.float32(0)}}
  stats = variables.get('batch_stats', {})
  if _PARAMS[tower] in stats:
    out['batch_stats'] = {_PARAMS[tower]: stats[_PARAMS[tower]]}
  return out


def tower_function(config: clip_lib.ModelConfig, tower: str) -> Callable[[Variables, Any], Any]:
  """fn(variables, x) -> embeddings, with the platform-independent (default) convolutions."""
  model = clip_lib.CLIP(config)
  method = _METHODS[tower]
  return portable.resolve_platform(lambda variables, x: model.apply(variables, x, method=method))


def input_spec(config: clip_lib.ModelConfig, shapes: Shapes, tower: str) -> jax.ShapeDtypeStruct:
  """The traced input of a tower (NHWC images / int32 tokens)."""
  if tower == 'image':
    return jax.ShapeDtypeStruct((shapes.batch, shapes.image_size, shapes.image_size, 3),
                                jnp.float32)
  return jax.ShapeDtypeStruct((shapes.batch, shapes.context_length), jnp.int32)


def jax_embeddings(config: clip_lib.ModelConfig, variables: Variables, tower: str,
                   x: np.ndarray) -> np.ndarray:
  """The reference: the model itself under jax.jit on this machine (its own platform branches)."""
  model = clip_lib.CLIP(config)
  fn = jax.jit(lambda v, x: model.apply(v, x, method=_METHODS[tower]))
  return np.asarray(fn(tower_variables(variables, tower), x))

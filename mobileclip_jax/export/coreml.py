"""Core ML towers: the PyTorch (open_clip / timm) form of the model through coremltools.

coremltools has no JAX or ONNX frontend (9.0: torch, TensorFlow, MIL), so the towers go through
the PyTorch model that `convert/` proves equal to the Flax one: the inference-form variables in
open_clip's names (`convert.open_clip.to_open_clip`, timm's reparameterized names) load with
strict=True into open_clip's model built from `convert.files.open_clip_model_cfg` and folded by
`timm.models.reparameterize_model`; each tower is captured with `torch.export` (TorchScript
tracing trips coremltools on timm's shape arithmetic in attention) and converted to an ML
program. Towers open_clip cannot build (MobileCLIP-S0's MCt text tower, reduced MCi students,
sigmoid attention, QK-norm) are refused with that reason.

Core ML runs only on Apple's OSes: on Linux the conversion is what can be tested, and the export
is checked by running the very PyTorch module that was converted against JAX. On macOS `load`
runs the .mlpackage itself.

Precisions: fp32 (float32 compute), fp16 (float16 compute, Core ML's default for the GPU and
Neural Engine), int8 (float16 compute with int8 weights: `linear_quantize_weights`, symmetric,
per channel).
"""
import importlib
import importlib.metadata
import sys
from typing import Any, Callable, Dict, Optional

import numpy as np

from mobileclip_jax import torch_compat
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.convert import open_clip as open_clip_convert
from mobileclip_jax.models import clip as clip_lib

PRECISIONS = ('fp32', 'fp16', 'int8')
SUFFIX = '.mlpackage'
IMAGE_LAYOUT = 'NCHW'
_DEPLOYMENT_TARGET = 'iOS17'
RUNTIME = 'coremltools'
SOURCE_RUNTIME = 'PyTorch: the module converted (Core ML predictions need macOS)'


def _coremltools():
  try:
    return importlib.import_module('coremltools')
  except ImportError as e:
    raise ImportError('Core ML export needs coremltools: pip install -e \'.[export]\'.') from e


def versions() -> Dict[str, str]:
  return {name: importlib.metadata.version(name)
          for name in ('coremltools', 'torch', 'open_clip_torch', 'timm')}


def torch_model(config: clip_lib.ModelConfig, variables: Dict[str, Any]):
  """open_clip's model in eval mode and inference form holding the inference-form `variables`."""
  model_cfg = convert_files.open_clip_model_cfg(config)
  if model_cfg is None:
    raise ValueError(f'Core ML export goes through open_clip, which cannot build {config.name} '
                     f'as configured (image {type(config.image).__name__}, text '
                     f'{config.text.variant}, attention {config.attention}); ONNX and TFLite '
                     'export it.')
  import torch  # pylint: disable=g-import-not-at-top
  open_clip, timm = torch_compat.import_open_clip(), torch_compat.import_timm()
  custom_text = model_cfg.pop('custom_text', False)
  model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**model_cfg)
  model = timm.models.reparameterize_model(model.eval())
  state = open_clip_convert.to_open_clip(variables, config)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return model


def _tower_module(model, tower: str):
  import torch  # pylint: disable=g-import-not-at-top

  class Tower(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, x):
      return self.model.encode_image(x) if tower == 'image' else self.model.encode_text(x)

  return Tower().eval()


def _torch_input(spec, tower: str):
  import torch  # pylint: disable=g-import-not-at-top
  if tower == 'image':
    b, h, w, c = spec.shape
    return torch.zeros((b, c, h, w), dtype=torch.float32)
  return torch.ones(spec.shape, dtype=torch.int32)


def write(config: clip_lib.ModelConfig, variables: Dict[str, Any], tower: str, spec, path: str,
          precision: str, names) -> Dict[str, Any]:
  """Converts one tower of the open_clip model to an .mlpackage at `path`."""
  ct = _coremltools()
  import torch  # pylint: disable=g-import-not-at-top
  module = _tower_module(torch_model(config, variables), tower)
  example = _torch_input(spec, tower)
  with torch.no_grad():
    program = torch.export.export(module, (example,)).run_decompositions({})
  dtype = np.float32 if tower == 'image' else np.int32
  mlmodel = ct.convert(
      program, inputs=[ct.TensorType(name=names[0], shape=tuple(example.shape), dtype=dtype)],
      outputs=[ct.TensorType(name=names[1], dtype=np.float32)], convert_to='mlprogram',
      minimum_deployment_target=getattr(ct.target, _DEPLOYMENT_TARGET),
      compute_precision=ct.precision.FLOAT32 if precision == 'fp32' else ct.precision.FLOAT16)
  if precision == 'int8':
    op_config = ct.optimize.coreml.OpLinearQuantizerConfig(mode='linear_symmetric',
                                                           dtype='int8', granularity='per_channel')
    mlmodel = ct.optimize.coreml.linear_quantize_weights(
        mlmodel, ct.optimize.coreml.OptimizationConfig(global_config=op_config))
  mlmodel.save(path)
  return describe(path)


def describe(path: str) -> Dict[str, Any]:
  """{'input': {...}, 'output': {...}} (name, shape, dtype) from the saved model's spec."""
  ct = _coremltools()
  spec = ct.utils.load_spec(path)
  dtypes = {ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32: 'float32',
            ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32: 'int32',
            ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16: 'float16'}
  def entry(feature):
    array = feature.type.multiArrayType
    return {'name': feature.name, 'shape': [int(d) for d in array.shape],
            'dtype': dtypes[array.dataType]}
  return {'input': entry(spec.description.input[0]), 'output': entry(spec.description.output[0])}


def load(path: str, threads: int = 0) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  """The Core ML tower as a function (macOS only); None elsewhere, where Core ML cannot run."""
  del threads
  if sys.platform != 'darwin':
    return None
  mlmodel = _coremltools().models.MLModel(path)
  spec = mlmodel.get_spec().description
  name_in, name_out = spec.input[0].name, spec.output[0].name
  return lambda x: mlmodel.predict({name_in: x})[name_out]


def source_runner(config: clip_lib.ModelConfig, variables: Dict[str, Any],
                  tower: str) -> Callable[[np.ndarray], np.ndarray]:
  """The PyTorch tower that `write` converts, as a function of the Core ML input."""
  import torch  # pylint: disable=g-import-not-at-top
  module = _tower_module(torch_model(config, variables), tower)
  def run(x):
    with torch.no_grad():
      return module(torch.from_numpy(x)).numpy()
  return run


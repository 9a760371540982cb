"""TFLite (LiteRT) towers: jax2tf (StableHLO) -> tf.function -> TFLiteConverter; LiteRT to run.

Route (Google's LiteRT page for JAX models): `jax2tf.convert` serializes the platform-resolved
tower (portable.py) as StableHLO inside a TF function (native serialization, the only mode jax
0.10 keeps); the weights are function arguments held as tf.Variables, so the serialized module
stays small and the converter freezes them into the flatbuffer (faster than embedding them as
constants of the StableHLO module). The converter legalizes StableHLO to TFLite builtin ops only
(no Flex/TF ops, which phone runtimes lack); `lax.platform_dependent` is already resolved to the
grouped convolution, which becomes DEPTHWISE_CONV_2D. Images are NHWC, TFLite's layout.

Precisions: fp32; fp16 (weights stored as float16, `Optimize.DEFAULT` + supported_types float16:
dequantized to float32 on CPU, float16 on GPU delegates); int8 (dynamic-range quantization,
`Optimize.DEFAULT` alone: int8 weights per channel, activations quantized per call; the token
embedding table, read by GATHER, stays float32).
"""
import importlib
import importlib.metadata
import os
from typing import Any, Callable, Dict

import jax
import numpy as np

from mobileclip_jax.export import towers as towers_lib
from mobileclip_jax.models import clip as clip_lib

PRECISIONS = ('fp32', 'fp16', 'int8')
SUFFIX = '.tflite'
IMAGE_LAYOUT = 'NHWC'
RUNTIME = 'ai-edge-litert'


def _import(name: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f'TFLite export needs {name.split(".")[0]}: pip install -e \'.[export]\' '
                      '(see setup.py).') from e


def versions() -> Dict[str, str]:
  return {'tensorflow': _import('tensorflow').__version__,
          'ai_edge_litert': importlib.metadata.version('ai-edge-litert')}


def write(config: clip_lib.ModelConfig, variables: Dict[str, Any], tower: str,
          spec: jax.ShapeDtypeStruct, path: str, precision: str, names) -> Dict[str, Any]:
  """Writes the TFLite model of one tower (inference-form `variables`; x like `spec`) to `path`.

  Returns the model's input and output description for the export's JSON.
  """
  tf = _import('tensorflow')
  jax2tf = importlib.import_module('jax.experimental.jax2tf')
  converted = jax2tf.convert(towers_lib.tower_function(config, tower),
                             native_serialization_platforms=('cpu',), with_gradient=False)
  module = tf.Module()
  module.variables_ = jax.tree.map(lambda a: tf.Variable(np.asarray(a), trainable=False),
                                   towers_lib.tower_variables(variables, tower))

  @tf.function(input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name=names[0])],
               autograph=False)
  def serve(x):
    return {names[1]: converted(module.variables_, x)}

  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if precision in ('fp16', 'int8'):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if precision == 'fp16':
    converter.target_spec.supported_types = [tf.float16]
  with open(path, 'wb') as f:
    f.write(converter.convert())
  return describe(path)


def _interpreter(path: str, threads: int = 0):
  litert = _import('ai_edge_litert.interpreter')
  interpreter = litert.Interpreter(model_path=path, num_threads=threads or os.cpu_count())
  interpreter.allocate_tensors()
  return interpreter


def describe(path: str) -> Dict[str, Any]:
  """{'input': {...}, 'output': {...}} (signature name, shape, dtype) of a one-input model."""
  signature = _interpreter(path, threads=1).get_signature_runner()
  def entry(details):
    (name, detail), = details.items()
    return {'name': name, 'shape': [int(d) for d in detail['shape']],
            'dtype': np.dtype(detail['dtype']).name}
  return {'input': entry(signature.get_input_details()),
          'output': entry(signature.get_output_details())}


def load(path: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """The exported tower as a function of its input (NHWC images / int32 tokens), on CPU."""
  interpreter = _interpreter(path, threads)
  signature = interpreter.get_signature_runner()
  (input_name,) = signature.get_input_details()
  (output_name,) = signature.get_output_details()
  return lambda x: signature(**{input_name: x})[output_name]

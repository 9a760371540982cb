"""ONNX towers: jax2onnx from the tower's jaxpr, then onnxruntime's fp16 / int8 tools.

Route: the platform-resolved tower function (portable.py) with its weights closed over goes
through `jax2onnx.to_onnx`, which lowers JAX primitives one by one to ONNX operators (opset 21),
so the graph is the JAX computation itself. Why jax2onnx installed without its dependencies:
its package metadata pins orbax-checkpoint < 0.11.37 (for its orbax-export helpers), which
conflicts with this project's orbax-checkpoint pin; the conversion path imports only jax, flax,
onnx, onnx_ir and onnxruntime (checked: no orbax import anywhere in jax2onnx 0.17.1). tf2onnx
cannot take jax2tf's output (StableHLO inside XlaCallModule ops), and torch.onnx from the
open_clip export would not cover towers open_clip cannot build (MobileCLIP-S0's MCt text tower,
reduced or modified students such as the demo's).

Images enter as NCHW (jax2onnx transposes to the model's NHWC inside the graph), the layout
ONNX image models conventionally take. Einsums of a dense layer ('abc,cd->abd', what jax2onnx
emits for `nn.Dense` on [B, N, C]) become MatMul, which onnxruntime's quantizer and its fused
kernels know, and onnxruntime's basic (portable) optimizations fold constants before saving.

Precisions: fp32; fp16 (`onnxruntime.transformers.float16`: weights and compute in float16,
float32 inputs and outputs, numerically sensitive ops kept float32 by its default block list);
int8 (`onnxruntime.quantization.quantize_dynamic`: int8 weights of Conv/MatMul/Gemm, activations
quantized per call, no calibration data).
"""
import importlib
import importlib.metadata
import logging
import os
import re
from typing import Any, Callable, Dict

import jax
import numpy as np

from mobileclip_jax.export import towers as towers_lib
from mobileclip_jax.models import clip as clip_lib

PRECISIONS = ('fp32', 'fp16', 'int8')
SUFFIX = '.onnx'
OPSET = 21
IMAGE_LAYOUT = 'NCHW'
RUNTIME = 'onnxruntime'
_DTYPES = {'tensor(float)': 'float32', 'tensor(int32)': 'int32'}


def _import(name: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f'ONNX export needs {name.split(".")[0]}: pip install -e \'.[export]\' && '
                      'pip install --no-deps jax2onnx==0.17.1 (see setup.py).') from e


def versions() -> Dict[str, str]:
  return {name: importlib.metadata.version(name) for name in ('jax2onnx', 'onnx', 'onnxruntime')}


def _dense_einsums_to_matmul(model) -> int:
  """Rewrites Einsum 'P c, c d -> P d' (a weight matrix on the last axis) as MatMul, in place."""
  onnx = _import('onnx')
  pattern = re.compile(r'^([a-z]*)([a-z]),\2([a-z])->\1\3$')
  rewritten = 0
  for node in model.graph.node:
    if node.op_type != 'Einsum':
      continue
    equation = onnx.helper.get_attribute_value(node.attribute[0]).decode()
    match = pattern.match(equation.replace(' ', ''))
    if not match or len(set(equation) - set(',->')) != len(match.group(1)) + 2:
      continue
    node.op_type = 'MatMul'
    del node.attribute[:]
    rewritten += 1
  return rewritten


def _to_proto(fn: Callable[[Any], Any], spec: jax.ShapeDtypeStruct, tower: str, names):
  jax2onnx = _import('jax2onnx')
  # jax2onnx imports every plugin module at first use; those for equinox / dm_pix models (not
  # installed, not needed here) log import tracebacks.
  logging.getLogger('jax2onnx.plugins.plugin_system').setLevel(logging.ERROR)
  model = jax2onnx.to_onnx(fn, [spec], model_name=f'{tower}_tower', opset=OPSET,
                           input_names=[names[0]], output_names=[names[1]],
                           inputs_as_nchw=[0] if tower == 'image' else None)
  _dense_einsums_to_matmul(model)
  return model


def _fold_constants(path: str, out: str) -> None:
  """onnxruntime's basic (portable, standard-op) graph optimizations, saved: jax2onnx feeds
  each Conv its kernel through a Transpose (HWIO -> OIHW); folded, the kernels are initializers
  again, which the int8 quantizer needs (it quantizes initializer weights offline, anything
  else per call) and which spare every runtime the work."""
  ort = _import('onnxruntime')
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
  options.optimized_model_filepath = out
  options.log_severity_level = 3
  ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def write(config: clip_lib.ModelConfig, variables: Dict[str, Any], tower: str,
          spec: jax.ShapeDtypeStruct, path: str, precision: str, names) -> Dict[str, Any]:
  """Writes the ONNX model of one tower (inference-form `variables`; x like `spec`) to `path`.

  Returns the model's input and output description for the export's JSON.
  """
  onnx = _import('onnx')
  fn = towers_lib.tower_function(config, tower)
  weights = towers_lib.tower_variables(variables, tower)
  model = _to_proto(lambda x: fn(weights, x), spec, tower, names)
  traced = path + '.traced'
  try:
    onnx.save(model, traced)
    _fold_constants(traced, path)
  finally:
    os.remove(traced)
  if precision == 'fp16':
    float16 = _import('onnxruntime.transformers.float16')
    onnx.save(float16.convert_float_to_float16(onnx.load(path), keep_io_types=True), path)
  if precision == 'int8':
    quantization = _import('onnxruntime.quantization')
    quantization.quantize_dynamic(path, path, weight_type=quantization.QuantType.QInt8)
  return describe(path)


def describe(path: str) -> Dict[str, Any]:
  """{'input': {...}, 'output': {...}} (name, shape, dtype) of a one-input one-output model."""
  session = load_session(path)
  def entry(arg):
    return {'name': arg.name, 'shape': list(arg.shape), 'dtype': _DTYPES[arg.type]}
  return {'input': entry(session.get_inputs()[0]), 'output': entry(session.get_outputs()[0])}


def load_session(path: str, threads: int = 0):
  ort = _import('onnxruntime')
  options = ort.SessionOptions()
  options.log_severity_level = 3  # fp16 graphs warn about every Add they cannot constant-fold.
  options.intra_op_num_threads = threads
  return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def load(path: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
  """The exported tower as a function of its input (NCHW images / int32 tokens), on CPU."""
  session = load_session(path, threads)
  name = session.get_inputs()[0].name
  return lambda x: session.run(None, {name: x})[0]

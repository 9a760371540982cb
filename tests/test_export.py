"""Mobile export: ONNX / TFLite / Core ML towers against JAX, in onnxruntime and LiteRT.

Every round trip runs the exported files in the format's own runtime on inputs the export's own
check never saw and compares with the Flax model as trained (train-time branches), so a wrong
reparameterization, platform resolution, layout, weight or tokenizer entry fails here. Random
weights with non-trivial normalization statistics and layer scales (`towers.random_variables`)
make every branch count. Full-size exports are `slow` (S0 and B; the other released variants
also `exhaustive`).
"""
import json
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.export import bundle
from mobileclip_jax.export import portable
from mobileclip_jax.export import towers
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=16, image=dict(depths=(1, 1, 1, 2), widths=(8, 16, 32, 64)),
            text=dict(layers=2, width=32, heads=2))
TINY_VIT = dict(embed_dim=16, image=dict(width=64, depth=2, heads=2),
                text=dict(layers=2, width=32, heads=2))
RUNTIMES = {'onnx': 'onnxruntime', 'tflite': 'ai_edge_litert', 'coreml': 'coremltools'}
CONVERTERS = {'onnx': 'jax2onnx', 'tflite': 'tensorflow', 'coreml': 'coremltools'}
VARIANTS = ('MobileCLIP2-S0', 'MobileCLIP2-S2', 'MobileCLIP2-S3', 'MobileCLIP2-S4',
            'MobileCLIP2-B', 'MobileCLIP2-L-14', 'MobileCLIP-S0', 'MobileCLIP-S1', 'MobileCLIP-S2',
            'MobileCLIP-B')
CAPTIONS = ('a small green frog on a leaf', 'mountains at dawn', 'a red bicycle', 'the sea')


def _needs(fmt):
  pytest.importorskip(RUNTIMES[fmt])
  pytest.importorskip(CONVERTERS[fmt])


def _rel_l2(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _reference(config, variables, tower, x):
  """The model as given (train-time form, float32), under jax.jit."""
  model = clip_lib.CLIP(config)
  method = 'encode_image' if tower == 'image' else 'encode_text'
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=method))(variables, x))


def _fresh_inputs(config, shapes, seed=7):
  """Inputs other than the export's own check: uniform pixels, other captions."""
  rng = np.random.default_rng(seed)
  size = shapes.image_size or config.image_size
  images = rng.uniform(-2, 2, (shapes.batch, size, size, 3)).astype(np.float32)
  tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer)
  tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(shapes.batch)],
                     shapes.context_length or config.text.context_length)
  return {'image': images, 'text': tokens.astype(np.int32)}


def _round_trip(tmp_path, fmt, config, variables, shapes, precision='fp32'):
  """Exports, then runs both files in the format's runtime: {tower: (exported, JAX)}, metadata."""
  out = str(tmp_path / f'{fmt}_{precision}')
  metadata = bundle.export_variables(variables, config, out, fmt, precision, shapes)
  module = bundle.FORMATS[fmt]
  inputs = _fresh_inputs(config, shapes)
  results = {}
  for tower in towers.TOWERS:
    x = inputs[tower]
    run = module.load(os.path.join(out, metadata[tower]['file']))
    layout_x = x.transpose(0, 3, 1, 2).copy() if (
        tower == 'image' and metadata['image']['input']['layout'] == 'NCHW') else x
    results[tower] = (run(layout_x), _reference(config, variables, tower, x))
  return results, metadata, out


# ---------------------------------------------------------------- platform resolution


def test_resolve_platform_takes_the_grouped_convolution_and_computes_the_same():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 6))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 6))
  fn = lambda x, k: layers.depthwise_conv(x, k, 2, (1, 1))
  jaxpr = str(jax.make_jaxpr(fn)(x, kernel))
  assert 'platform_index' in jaxpr and 'optimization_barrier' in jaxpr  # Both branches.
  resolved = portable.resolve_platform(fn)
  jaxpr = str(jax.make_jaxpr(resolved)(x, kernel))
  assert 'platform_index' not in jaxpr and 'cond' not in jaxpr
  assert 'optimization_barrier' not in jaxpr  # The CPU taps' branch is gone.
  assert 'feature_group_count=6' in jaxpr
  want = jax.lax.conv_general_dilated(x, kernel, (2, 2), [(1, 1), (1, 1)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=6)
  np.testing.assert_allclose(jax.jit(resolved)(x, kernel), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(fn)(x, kernel), want, rtol=1e-5, atol=1e-5)


def test_resolve_platform_keeps_pytrees_and_refuses_a_choice_without_default():
  resolved = portable.resolve_platform(lambda d: {'y': d['a'] * 2, 'z': (d['b'],)})
  out = resolved({'a': jnp.ones(2), 'b': jnp.zeros(3)})
  assert set(out) == {'y', 'z'} and out['z'][0].shape == (3,)
  no_default = portable.resolve_platform(
      lambda x: jax.lax.platform_dependent(x, cpu=lambda x: x, cuda=lambda x: -x))
  with pytest.raises(ValueError, match='without a default branch'):
    no_default(jnp.ones(2))


# ---------------------------------------------------------------- round trips (small models)


class _TinyExport(NamedTuple):
  fmt: str
  tmp_path: pathlib.Path
  config: clip_lib.ModelConfig
  variables: dict
  shapes: towers.Shapes
  results: dict
  metadata: dict
  out: str


@pytest.fixture(scope='module', params=['onnx', 'tflite'])
def tiny(request, tmp_path_factory):
  """A tiny MCi CLIP exported in fp32 (128 px, 24 tokens) and run in the format's runtime; the
  reduced-precision test compares its own exports with this one."""
  fmt = request.param
  _needs(fmt)
  tmp_path = tmp_path_factory.mktemp(fmt)
  config = clip_lib.get_config('MobileCLIP2-S0', **TINY)
  variables = towers.random_variables(config, seed=1)
  shapes = towers.Shapes(batch=2, image_size=128, context_length=24)
  return _TinyExport(fmt, tmp_path, config, variables, shapes,
                     *_round_trip(tmp_path, fmt, config, variables, shapes))


def test_tiny_round_trip_matches_jax_and_the_json_describes_the_files(tiny):
  fmt, results, metadata, out = tiny.fmt, tiny.results, tiny.metadata, tiny.out
  for tower, (got, want) in results.items():
    assert got.shape == want.shape == (2, 16)
    assert _rel_l2(got, want) < 1e-4, tower
    assert metadata[tower]['rel_l2_vs_jax'] < 1e-4
  image, text = metadata['image'], metadata['text']
  assert image['input']['shape'] == ([2, 3, 128, 128] if fmt == 'onnx' else [2, 128, 128, 3])
  assert image['input']['dtype'] == 'float32' and image['output']['shape'] == [2, 16]
  assert text['input'] == {'name': 'tokens', 'shape': [2, 24], 'dtype': 'int32'}
  assert image['preprocess']['size'] == 128 and image['preprocess']['mean'] == [0.0] * 3
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  ids = tokenizer([bundle.EXAMPLE_TEXT], 24)[0]
  assert text['tokenizer']['example']['ids'] == [int(i) for i in ids[ids > 0]]
  assert text['tokenizer']['context_length'] == 24 and text['tokenizer']['eot'] == 49407
  assert os.path.getsize(os.path.join(out, text['tokenizer']['vocabulary'])) > 1_000_000
  assert metadata['source']['model_config']['reparameterized'] is True
  with open(os.path.join(out, bundle.METADATA)) as f:
    assert json.load(f) == json.loads(json.dumps(metadata))
  assert sorted(os.listdir(tiny.tmp_path)) == [f'{fmt}_fp32']  # No temporary directory left.


def test_vit_round_trip_at_another_resolution_and_context_in_onnx(tmp_path):
  """A ViT at 160 px (position embedding resized at export) and 20 tokens, causal text."""
  _needs('onnx')
  config = clip_lib.get_config('MobileCLIP2-B', **TINY_VIT)
  variables = towers.random_variables(config, seed=2)
  results, metadata, _ = _round_trip(tmp_path, 'onnx', config, variables,
                                     towers.Shapes(batch=1, image_size=160, context_length=20))
  for tower, (got, want) in results.items():
    assert _rel_l2(got, want) < 1e-4, tower
  assert metadata['image']['input']['shape'] == [1, 3, 160, 160]


def test_reduced_precisions_drift_a_little_and_are_really_reduced(tiny, tmp_path):
  for precision, (low, high) in (('fp16', (1e-6, 1e-2)), ('int8', (1e-3, 0.2))):
    results, metadata, out = _round_trip(tmp_path, tiny.fmt, tiny.config, tiny.variables,
                                         tiny.shapes, precision)
    for tower, (got, want) in results.items():
      assert low < _rel_l2(got, want) < high, (precision, tower, _rel_l2(got, want))
      assert low < metadata[tower]['rel_l2_vs_jax'] < high
    # Weights really are smaller (biases and norms stay float32; a tiny model has many).
    size = lambda d: os.path.getsize(os.path.join(d, metadata['image']['file']))
    assert size(out) < 0.7 * size(tiny.out), precision


def test_onnx_graphs_use_matmul_for_dense_layers_and_int8_integer_kernels(tmp_path):
  _needs('onnx')
  onnx = pytest.importorskip('onnx')
  config = clip_lib.get_config('MobileCLIP2-S0', **TINY)
  variables = towers.random_variables(config)
  out = str(tmp_path / 'int8')
  bundle.export_variables(variables, config, out, 'onnx', 'int8', towers.Shapes())
  text = onnx.load(os.path.join(out, 'text.onnx'))
  ops = [n.op_type for n in text.graph.node]
  dense_einsums = [n for n in text.graph.node if n.op_type == 'Einsum'
                   and b'->' in n.attribute[0].s and n.attribute[0].s.count(b',') == 1
                   and len(n.attribute[0].s.split(b',')[1].split(b'->')[0]) == 2]
  assert not dense_einsums and ops.count('MatMulInteger') >= 4 * 2  # qkv, proj, fc1, fc2 x 2.
  image_ops = [n.op_type for n in onnx.load(os.path.join(out, 'image.onnx')).graph.node]
  assert 'ConvInteger' in image_ops


def test_one_tower_exports_that_tower_alone(tmp_path):
  """An image-only export has no text tower, tokenizer or vocabulary; a text-only one no image
  tower or preprocessing; each file still matches JAX."""
  _needs('onnx')
  config = clip_lib.get_config('MobileCLIP2-S0', **TINY)
  variables = towers.random_variables(config, seed=4)
  for tower, other in (('image', 'text'), ('text', 'image')):
    out = str(tmp_path / tower)
    metadata = bundle.export_variables(variables, config, out, 'onnx', towers=(tower,))
    assert other not in metadata and metadata[tower]['rel_l2_vs_jax'] < 1e-4
    files = {bundle.METADATA, f'{tower}.onnx'}
    if tower == 'text':
      files.add(metadata['text']['tokenizer']['vocabulary'])
    else:
      assert metadata['image']['preprocess']['size'] == config.image_size
    assert set(os.listdir(out)) == files


# ---------------------------------------------------------------- bad input


def _export_cli(tmp_path, *args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'export.py'), *args],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.parametrize('args, message', [
    (['--model=MobileCLIP2-S9', '--format=onnx'], "Unknown model 'MobileCLIP2-S9'"),
    (['--model=MobileCLIP2-S0', '--format=tflite', '--precision=bf16'],
     "tflite export has no precision 'bf16'"),
    (['--model=MobileCLIP2-S0', '--format=onnx', '--image_size=250'],
     'image_size=250 does not fit MobileCLIP2-S0'),
    (['--model=MobileCLIP-S0', '--format=onnx', '--context_length=32'],
     "MCt text tower mixes tokens"),
    (['--model=MobileCLIP2-S0', '--format=onnx', '--batch=0'], 'fixed batch'),
    (['--model=MobileCLIP2-S0', '--format=torchscript'], "Unknown export format 'torchscript'"),
    (['--model=MobileCLIP2-S0', '--format=onnx', '--towers=image,audio'],
     "Export towers ['image', 'audio']: choose one or both of image, text"),
    (['--checkpoint=does/not/exist', '--format=onnx'], 'No checkpoint at does/not/exist'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
  result = _export_cli(tmp_path, *args, '--out=out')
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  assert os.listdir(tmp_path) == []


def test_a_failure_mid_export_leaves_nothing_and_an_existing_export_stays(tmp_path, monkeypatch):
  _needs('onnx')
  config = clip_lib.get_config('MobileCLIP2-S0', **TINY)
  variables = towers.random_variables(config)
  out = tmp_path / 'out'
  with pytest.raises(FileExistsError):
    os.makedirs(out / 'old')
    bundle.export_variables(variables, config, str(out), 'onnx')
  module = bundle.FORMATS['onnx']
  written = []

  def write_then_fail(config, variables, tower, spec, path, precision, names):
    if written:
      raise RuntimeError('converter crashed')
    written.append(path)
    return real_write(config, variables, tower, spec, path, precision, names)

  real_write = module.write
  monkeypatch.setattr(module, 'write', write_then_fail)
  with pytest.raises(RuntimeError, match='converter crashed'):
    bundle.export_variables(variables, config, str(out), 'onnx', overwrite=True)
  assert os.path.exists(written[0]) is False  # The image tower was written, then removed.
  assert sorted(os.listdir(tmp_path)) == ['out'] and os.listdir(out) == ['old']


def test_fp32_export_that_differs_from_jax_is_refused(tmp_path, monkeypatch):
  """The check is real: exported weights 0.1% off the model's must fail it."""
  _needs('onnx')
  config = clip_lib.get_config('MobileCLIP2-S0', **TINY)
  variables = towers.random_variables(config)
  real_inference_form = towers.inference_form

  def perturbed(*args):
    variables, config = real_inference_form(*args)
    text = dict(variables['params']['text'])
    text['text_projection'] = text['text_projection'] * 1.001
    return {**variables, 'params': {**variables['params'], 'text': text}}, config

  monkeypatch.setattr(towers, 'inference_form', perturbed)
  with pytest.raises(ValueError, match='exported text tower differs from JAX'):
    bundle.export_variables(variables, config, str(tmp_path / 'out'), 'onnx')
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- Core ML (conversion only)


def test_coreml_converts_a_small_vit_clip_and_checks_the_converted_module(tmp_path):
  """Core ML predictions need macOS: on Linux the conversion and its source are tested."""
  _needs('coreml')
  config = clip_lib.get_config('ViT-B-16', **TINY_VIT)
  variables = towers.random_variables(config, seed=4)
  metadata = bundle.export_variables(variables, config, str(tmp_path / 'ml'), 'coreml', 'fp16',
                                     towers.Shapes(batch=1, image_size=160, context_length=20))
  assert metadata['image']['input'] == {'name': 'image', 'shape': [1, 3, 160, 160],
                                        'dtype': 'float32', 'layout': 'NCHW'}
  assert metadata['text']['input'] == {'name': 'tokens', 'shape': [1, 20], 'dtype': 'int32'}
  assert metadata['text']['output']['name'] == 'embedding'
  for tower in towers.TOWERS:
    assert os.path.isdir(tmp_path / 'ml' / metadata[tower]['file'])
    if sys.platform != 'darwin':
      assert metadata[tower]['checked_in'].startswith('PyTorch')
      assert metadata[tower]['rel_l2_vs_jax'] < 1e-4  # The PyTorch source runs float32.


def test_coreml_refuses_what_open_clip_cannot_build(tmp_path):
  _needs('coreml')
  config = clip_lib.get_config('MobileCLIP-S0', **TINY)
  with pytest.raises(ValueError, match='open_clip, which cannot build MobileCLIP-S0'):
    bundle.export_variables(towers.random_variables(config), config, str(tmp_path / 'ml'),
                            'coreml')
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- full size


@pytest.mark.slow  # 1-2 min per format on 2 cores; the tiny round trips cover every branch.
@pytest.mark.parametrize('fmt', ['onnx', 'tflite'])
def test_full_size_s0_round_trip(tmp_path, fmt):
  """The released MobileCLIP2-S0 at full size (random weights): both towers, batch 1."""
  _needs(fmt)
  config = clip_lib.get_config('MobileCLIP2-S0')
  variables = towers.random_variables(config, seed=5)
  results, _, _ = _round_trip(tmp_path, fmt, config, variables, towers.Shapes())
  for tower, (got, want) in results.items():
    assert _rel_l2(got, want) < 1e-4, tower


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['onnx', 'tflite'])
@pytest.mark.parametrize('variant', [  # CI's slow run: the ViT; the rest with -m exhaustive.
    v if v == 'MobileCLIP2-B' else pytest.param(v, marks=pytest.mark.exhaustive)
    for v in VARIANTS if v != 'MobileCLIP2-S0'])
def test_every_variant_exports_at_full_size(tmp_path, variant, fmt):
  _needs(fmt)
  config = clip_lib.get_config(variant)
  variables = towers.random_variables(config, seed=6)
  results, _, _ = _round_trip(tmp_path, fmt, config, variables, towers.Shapes())
  for tower, (got, want) in results.items():
    assert _rel_l2(got, want) < 1e-4, tower


@pytest.mark.slow
def test_full_size_s0_converts_to_coreml(tmp_path):
  _needs('coreml')
  config = clip_lib.get_config('MobileCLIP2-S0')
  metadata = bundle.export_variables(towers.random_variables(config), config, str(tmp_path / 'ml'),
                                     'coreml', 'fp32')
  assert metadata['image']['input']['shape'] == [1, 3, 256, 256]
  assert metadata['image']['rel_l2_vs_jax'] < 1e-4 and metadata['text']['rel_l2_vs_jax'] < 1e-4


# ---------------------------------------------------------------- zero-shot on the demo world


@pytest.mark.slow  # 3 min on a loaded 2-core machine: an export, demo renders, an 8-device eval.
def test_exported_pair_scores_what_the_jax_evaluator_scores_on_the_demo_world(tmp_path):
  """fp32 ONNX towers, run from the export directory alone (its vocabulary, its JSON), give the
  zero-shot evaluator's numbers; the demo world's class names make tasks the tiny model can
  partly solve only by chance, so equality is what is tested, not accuracy."""
  _needs('onnx')
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding
  from mobileclip_jax.evaluation import evaluator as evaluator_lib
  from mobileclip_jax.export import app_zeroshot as zeroshot
  # pylint: enable=g-import-not-at-top
  config = clip_lib.get_config('MobileCLIP2-S0', **dict(TINY, image_size=64))
  variables = towers.random_variables(config, seed=8)
  out = str(tmp_path / 'onnx')
  bundle.export_variables(variables, config, out, 'onnx', 'fp32', towers.Shapes(batch=8))
  source = dict(kind='demo', split='val', num_samples=60)
  got = zeroshot.evaluate(out, source)
  evaluator = evaluator_lib.build_evaluator(
      'demo', dict(type='zeroshot', source=source, batch_size=16), config, sharding.create_mesh())
  want = evaluator.run(clip_lib.CLIP(config), variables)
  assert set(got) == set(want) and len(got) >= 4
  for key, value in want.items():
    assert abs(got[key] - value) <= 1 / 60 + 1e-9, key  # At most one near-tie may flip.
  assert sum(abs(got[k] - want[k]) for k in want) <= 2 / 60

"""Batch-1 CPU latency of the exported towers in onnxruntime and LiteRT, beside JAX and PyTorch.

  python launch/benchmark.py export [--option=KEY=VALUE ...]

Options (all optional):
  variants=MobileCLIP2-S0,MobileCLIP2-S2,MobileCLIP2-B   named variants with an open_clip config
  towers=image,text
  formats=onnx,tflite
  precisions=fp32                  also fp16,int8 (their rows reuse the fp32 JAX / torch runs)
  repeats=5                        timed calls after 2 warm-up calls (more for short calls)
  threads=0                        0: every framework and runtime with its default threads (all
                                   cores); 1: all single-threaded, the usual phone-benchmark
                                   setting, and on a shared machine the one whose `*_cpu_ms`
                                   (CPU time per call) is the latency on an idle core
  quick=1                          defaults become MobileCLIP2-S0, fp32
  overrides={"image_size": 224}    as in the models benchmark (both sides)
  max_others_cpu=0.1, attempts=3   re-measure while other processes used more than this CPU share
  seed=0

One row per (variant, tower, precision). Method: the models benchmark's reference (open_clip's
tower with seeded non-trivial normalization statistics, its state_dict and inputs) is made once
per variant; JAX (`jax.jit`, reparameterized where the tower has branches to fold) and PyTorch
(`timm.models.reparameterize_model`, `inference_mode`) are measured by `benchmark/models.py`'s
workers. The same weights, converted to Flax, are exported by `export.export_variables` (batch 1,
the requested towers only, checked against JAX on export), and each exported tower is timed in
its runtime in a fresh process: onnxruntime's CPU provider (its default threads) and LiteRT's
interpreter (XNNPACK, `os.cpu_count()` threads). Every output is compared with JAX's
(`*_rel_l2`), so a fast but wrong number shows. Each timed section records the CPU share other
processes used.
"""
# This benchmark reuses the models benchmark's reference, workers and timing helpers.
# pylint: disable=protected-access
import os
import tempfile
from typing import Any, Dict, Iterator, List

import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.benchmark import common
from mobileclip_jax.benchmark import models as models_bench

DEFAULT_VARIANTS = ('MobileCLIP2-S0', 'MobileCLIP2-S2', 'MobileCLIP2-B')
FORMATS = ('onnx', 'tflite')
RUNTIME_NAMES = {'onnx': 'onnxruntime', 'tflite': 'litert'}
PRECISIONS = ('fp32', 'fp16', 'int8')
_OPTIONS = ('variants', 'towers', 'formats', 'precisions', 'repeats', 'threads', 'quick',
            'overrides', 'max_others_cpu', 'attempts', 'seed')
# XLA:CPU on one thread (its Eigen pool and its intra-op parallelism).
_JAX_ONE_THREAD = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
_CONVERT_TOWER = {'image': 'visual', 'text': 'text'}


# ---------------------------------------------------------------- worker processes


def _flax_variables(variant: str, overrides: Dict[str, Any], workdir: str, towers: List[str]):
  """The reference weights of `towers` (benchmark/models.py's npz files) as Flax variables; a
  tower not measured keeps seeded random weights (the export needs only its shapes)."""
  from mobileclip_jax import convert  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.export import towers as towers_lib  # pylint: disable=g-import-not-at-top
  config = models_bench._model_config(variant, overrides)
  variables = towers_lib.random_variables(config)  # Fresh containers, ours to update.
  variables['params']['logit_scale'] = np.float32(config.init_logit_scale)
  for tower in towers:
    with np.load(models_bench._weights_path(workdir, tower)) as weights:
      part = convert.from_open_clip(weights, config, tower=_CONVERT_TOWER[tower])
    for collection, tree in part.items():
      variables.setdefault(collection, {}).update(tree)
  return variables, config


def export_towers(variant: str, fmt: str, precision: str, overrides: Dict[str, Any],
                  workdir: str, towers: List[str]) -> Dict[str, Any]:
  """Exports `towers` (batch 1) into workdir/<fmt>_<precision>; returns export.json."""
  from mobileclip_jax.export import bundle  # pylint: disable=g-import-not-at-top
  variables, config = _flax_variables(variant, overrides, workdir, towers)
  return bundle.export_variables(variables, config, os.path.join(workdir, f'{fmt}_{precision}'),
                                 fmt, precision, towers=towers)


def measure_runtime(fmt: str, path: str, tower: str, layout: str, repeats: int, threads: int,
                    workdir: str, output: str) -> Dict[str, Any]:
  """Times one exported tower in its runtime on the reference input (batch 1); saves its output."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.export import bundle  # pylint: disable=g-import-not-at-top
  module = bundle.FORMATS[fmt]
  run = module.load(path, threads)
  with np.load(os.path.join(workdir, 'inputs.npz')) as inputs:
    x = inputs['images'][:1] if tower == 'image' else inputs['tokens'][:1]
  if tower == 'image' and layout == 'NHWC':
    x = x.transpose(0, 2, 3, 1)  # The reference images are NCHW (torch).
  x = np.ascontiguousarray(x)
  np.save(output, np.asarray(run(x)))
  result = common.time_with_contention(lambda: run(x), repeats)
  result['peak_rss_mb'] = round(common.peak_rss_mb(), 1)
  result['version'] = importlib.metadata.version(module.RUNTIME)
  return result


# ---------------------------------------------------------------- orchestration


def _parse(options: Dict[str, Any]) -> Dict[str, Any]:
  quick, overrides = common.common_options(options, _OPTIONS, 'export', '{"image_size": 224}')
  models_bench._check_overrides(overrides)
  parsed = {
      'variants': common.option_list(options, 'variants',
                                     DEFAULT_VARIANTS[:1] if quick else DEFAULT_VARIANTS),
      'towers': common.option_list(options, 'towers', models_bench.TOWERS),
      'formats': common.option_list(options, 'formats', FORMATS),
      'precisions': common.option_list(options, 'precisions', ('fp32',)),
      'repeats': common.option_scalar(options, 'repeats', 5, int),
      'threads': common.option_scalar(options, 'threads', 0, int),
      'overrides': overrides,
      'max_others_cpu': common.option_scalar(options, 'max_others_cpu', 0.1, float),
      'attempts': common.option_scalar(options, 'attempts', 3, int),
      'seed': common.option_scalar(options, 'seed', 0, int),
  }
  for key, valid in (('towers', models_bench.TOWERS), ('formats', FORMATS),
                     ('precisions', PRECISIONS)):
    bad = [v for v in parsed[key] if v not in valid]
    if bad or not parsed[key]:
      raise ValueError(f'{key}={",".join(parsed[key])}: {bad} not in {", ".join(valid)}.')
  for key in ('repeats', 'attempts'):
    if parsed[key] < 1:
      raise ValueError(f'{key} must be at least 1, got {parsed[key]}.')
  if parsed['threads'] not in (0, 1):
    raise ValueError(f'threads must be 0 (each framework\'s default) or 1, got '
                     f'{parsed["threads"]}.')
  return parsed


def _timing(prefix: str, r: Dict[str, Any]) -> Dict[str, Any]:
  sig = common.significant
  return {f'{prefix}_median_s': sig(r['median_s']), f'{prefix}_min_s': sig(r['min_s']),
          f'{prefix}_cpu_ms': sig(1000 * r['cpu_s_per_call']),
          f'{prefix}_peak_rss_mb': r['peak_rss_mb'],
          f'{prefix}_others_cpu_frac': r['others_cpu_frac']}


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields one row per (variant, tower, precision): JAX, torch, onnxruntime and LiteRT seconds
  (median / min), ratios to torch, each runtime's relative L2 from JAX, CPU contention, load."""
  o = _parse(options)
  sig = common.significant
  for variant in o['variants']:
    with tempfile.TemporaryDirectory(prefix='mobileclip_bench_export_') as workdir:
      common.isolated(models_bench.__name__, 'make_reference', dict(
          variant=variant, towers=o['towers'], max_batch=1,
          overrides=o['overrides'], workdir=workdir, seed=o['seed']))
      exports = {(fmt, precision): common.isolated(__name__, 'export_towers', dict(
          variant=variant, fmt=fmt, precision=precision, overrides=o['overrides'],
          workdir=workdir, towers=o['towers']))
                 for fmt in o['formats'] for precision in o['precisions']}
      for tower in o['towers']:
        forms = models_bench._forms(variant, tower, ['reparameterized'], o['overrides'])
        form = forms[0] if forms else 'train-time'
        kwargs = dict(variant=variant, tower=tower, form=form, batch=1, repeats=o['repeats'],
                      overrides=o['overrides'], workdir=workdir)
        jax_env = {'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} {_JAX_ONE_THREAD}'.strip()
                   } if o['threads'] == 1 else None
        measured = {
            'torch': common.quietest(
                models_bench.__name__, 'measure_torch', dict(kwargs, threads=o['threads']), o['max_others_cpu'],
                o['attempts']),
            'jax': common.quietest(
                models_bench.__name__, 'measure_jax', kwargs, o['max_others_cpu'], o['attempts'], env=jax_env)}
        jax_out = np.load(models_bench._output_path(workdir, 'jax', tower, form, 1))
        torch_out = np.load(models_bench._output_path(workdir, 'torch', tower, form, 1))
        for precision in o['precisions']:
          row = {'variant': variant, 'tower': tower, 'precision': precision, 'batch': 1,
                 'jax_form': form, **_timing('jax', measured['jax']),
                 **_timing('torch', measured['torch']),
                 'torch_rel_l2': sig(utils.rel_l2(torch_out, jax_out))}
          for fmt in o['formats']:
            name, metadata = RUNTIME_NAMES[fmt], exports[(fmt, precision)]
            output = os.path.join(workdir, f'{fmt}_{precision}_{tower}.npy')
            result = common.quietest(__name__, 'measure_runtime', dict(
                fmt=fmt, tower=tower, repeats=o['repeats'], threads=o['threads'],
                workdir=workdir, output=output,
                path=os.path.join(workdir, f'{fmt}_{precision}', metadata[tower]['file']),
                layout=metadata[tower]['input'].get('layout', '')),
                o['max_others_cpu'], o['attempts'])
            row.update(_timing(name, result))
            row[f'{name}_rel_l2'] = sig(utils.rel_l2(np.load(output), jax_out))
            row[f'{name}_vs_torch'] = sig(result['median_s'] / measured['torch']['median_s'])
            row[f'{name}_version'] = result['version']
          row['jax_vs_torch'] = sig(measured['jax']['median_s'] / measured['torch']['median_s'])
          row['threads'] = o['threads'] or 'default'
          row['load_avg_1m'] = common.machine().get('load_avg_1m')
          row['cpu_count'] = os.cpu_count()
          yield row

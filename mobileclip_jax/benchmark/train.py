"""Speed, compile time and memory of one full DR train step: JAX vs the same step in PyTorch.

  python launch/benchmark.py train [--option=KEY=VALUE ...]

Options (all optional; defaults marked CPU / accelerator depend on where JAX runs):
  variants=MobileCLIP2-S0,MobileCLIP2-S4   named variants that open_clip also builds; default
                                           S0,S4 (CPU) / S0,S4,B (accelerator)
  batch=8                                  global batch sizes; default 8 (CPU) / 256
  dtype=float32                            compute dtype, float32 (CPU) / bfloat16: JAX's model
                                           dtype (float32 parameters), torch.autocast in torch
  torch_modes=eager                        eager (CPU) / eager,compile: PyTorch eager and
                                           torch.compile(model), each in its own process
  repeats=5, warmup=2                      timed steps (each timed alone: median and min) after
                                           the first step and `warmup` more untimed steps
  max_others_cpu=0.1, attempts=3           re-time (same process, more steps) while other
                                           processes used more than this share of the CPUs;
                                           keep the quietest timed section
  quick=1                                  MobileCLIP2-S0, the first default batch, 2 repeats,
                                           1 warm-up step, 1 attempt
  overrides={"image_size": 64}             JSON `create_model` overrides applied to both sides:
                                           image_size, embed_dim, text width/heads/layers/mlp_ratio
                                           and, for ViT image towers, image width/depth/heads/
                                           patch_size (how the smoke test stays tiny)
  loss_rtol=, grad_rtol=                   first-step agreement tolerances (relative); default
                                           1e-4 / 1e-3 when JAX runs on CPU in float32, 1e-2 /
                                           5e-2 on accelerators (TF32 convolutions and matmuls),
                                           3e-2 / 1e-1 in bfloat16
  seed=0

One row per (variant, batch). Both sides run the MobileCLIP2 recipe's step
(configs/mobileclip2.py, the variant's own or S0's for the teachers' ViTs): train-mode BatchNorm; uint8 images normalized inside the step; the
image tower once and the ground-truth + synthetic captions through the text tower in one pass;
the DR loss (CLIP + distillation from two 768-d teachers at scales 70 / 60, averaged after
softmax, both directions, for both caption kinds; weighted 0 / 1 as in the recipe, but both terms
computed); the backward pass; global-norm clipping at 1.0; AdamW (lr 1e-3 with warmup + cosine,
betas (0.9, 0.95), weight decay 0.2 on open_clip's decay set); the logit-scale clamp. fp32.

Method: each framework runs in its own fresh process (`common.isolated`), torch first.
- torch: `open_clip.create_model(variant)` with seeded non-trivial normalization statistics,
  affines and layer scales (as the models benchmark; with the default init the residual branches
  barely contribute), whose state_dict is saved with one batch (uint8 images, open_clip tokens of
  ground-truth and synthetic captions, teacher embeddings: per-teacher unit vectors). Then
  `model.train()`, AdamW with open_clip_train's parameter groups and
  `open_clip_train.scheduler.cosine_lr`, `clip_grad_norm_`, the clamp; the loss is
  `torch_dr_loss` below, written from the formulas of `mobileclip_jax.losses` (Apple's
  `DRClipLoss` / `DistillClipLoss`). `torch.set_num_threads(os.cpu_count())`; on CUDA TF32
  matmuls and cudnn.benchmark, as open_clip_train's main() sets them.
- JAX: the step is the trainer's own, built by `train.setup.build` from the same config (mesh,
  state and batch shardings, fsdp threshold, accumulation, the state donated); the saved weights
  go through `convert.from_open_clip` into its state; compile time is lower + compile with the
  persistent compilation cache disabled, so it is a real compile.
- The first step's losses (total and each term) and pre-clipping gradient norms of both sides
  are recorded: same weights, same batch, both in train mode, so they must agree.
- FLOPs and MFU: XLA's cost analysis of the compiled JAX step (`flops_per_step`, per device, the
  forward, backward and optimizer update), divided by the step time: achieved FLOP/s, and over
  the chip's dense bf16 peak (`common.PEAK_BF16_FLOPS`, by device kind): MFU, None where the
  peak is unknown (CPUs). PyTorch's MFU uses the same FLOP count (the same step's work).
- Memory: process peak RSS (building the model and saving its weights (torch), or loading them
  and compiling (JAX), included), plus the device peak on an accelerator; for JAX also the peak
  RSS before the first step and XLA's per-device buffer sizes of the step (arguments, outputs,
  donated/aliased, temporaries), which tell compiler memory from step memory. CPU seconds per step (own process, all threads) beside the wall
  times: on a shared machine they show whether a slow step was waiting for a CPU.
- A configuration whose process fails (e.g. out of memory at a large batch) yields a row with
  `error` instead of numbers, and the run goes on.
"""
import os
import tempfile
import time
from typing import Any, Dict, Iterator, Sequence

import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.benchmark import common
from mobileclip_jax.benchmark import models as models_benchmark

# Generic helpers of the models benchmark, shared rather than copied.
# pylint: disable=protected-access
_busy_cpu_s = common.busy_cpu_s
_randomize_normalization_ = models_benchmark._randomize_normalization_
# pylint: enable=protected-access

DEFAULTS = {  # Per platform kind: what a run measures unless told otherwise.
    'cpu': {'variants': ('MobileCLIP2-S0', 'MobileCLIP2-S4'), 'batch': (8,),
            'dtype': 'float32', 'torch_modes': ('eager',)},
    'accelerator': {'variants': ('MobileCLIP2-S0', 'MobileCLIP2-S4', 'MobileCLIP2-B'),
                    'batch': (256,), 'dtype': 'bfloat16', 'torch_modes': ('eager', 'compile')},
}
DTYPES = ('float32', 'bfloat16')
TORCH_MODES = ('eager', 'compile')
# The recipe's teachers: two DFN2B ViT-L/14 models, 768-d embeddings each.
TEACHER_DIMS = (768, 768)
LOSS_TERMS = ('gt/clip', 'gt/distill', 'syn/clip', 'syn/distill')
_OPTIONS = ('variants', 'batch', 'dtype', 'torch_modes', 'repeats', 'warmup', 'max_others_cpu',
            'attempts', 'quick', 'overrides', 'loss_rtol', 'grad_rtol', 'seed')
_TEXT_OVERRIDES = ('width', 'heads', 'layers', 'mlp_ratio')   # Same names in open_clip's text_cfg.
_VIT_OVERRIDES = ('width', 'depth', 'heads', 'patch_size')    # JAX ViTConfig names.
_OVERRIDES = ('image_size', 'embed_dim', 'text', 'image')
_TOLERANCES = {'cpu': {'loss': 1e-4, 'grad': 1e-3}, 'accelerator': {'loss': 1e-2, 'grad': 5e-2},
               'bfloat16': {'loss': 3e-2, 'grad': 1e-1}}
TORCH_MODULE = 'mobileclip_jax.benchmark.train_torch'  # The PyTorch side of the comparison.
_SUBPROCESS_TIMEOUT_S = 4 * 3600  # S4's CPU compile and steps on a loaded machine take long.


# ---------------------------------------------------------------- shared by the worker processes


def _weights_path(workdir: str) -> str:
  return os.path.join(workdir, 'weights.npz')


def _batch_path(workdir: str) -> str:
  return os.path.join(workdir, 'batch.npz')


def _timed_steps(step, warmup: int, repeats: int, max_others_cpu: float,
                 attempts: int) -> Dict[str, Any]:
  """Times `step()` (blocking) in sections of `repeats` calls after `warmup` untimed calls.

  A section during which other processes used more than `max_others_cpu` of all CPUs is
  followed by another, up to `attempts` sections; the quietest one is kept.
  """
  for _ in range(warmup):
    step()
  best = None
  for section in range(1, attempts + 1):
    busy, own, wall = _busy_cpu_s(), common.cpu_time_s(), time.perf_counter()
    timing = common.time_calls(step, warmup=0, repeats=repeats)
    busy_after, own_after, wall_after = _busy_cpu_s(), common.cpu_time_s(), time.perf_counter()
    timing['cpu_s_per_step'] = (own_after - own) / repeats
    timing['others_cpu_frac'] = None
    if busy is not None:
      others = max(0.0, (busy_after - busy) - (own_after - own)) / (
          (wall_after - wall) * os.cpu_count())
      timing['others_cpu_frac'] = round(others, 3)
    if best is None or (timing['others_cpu_frac'] is not None and
                        timing['others_cpu_frac'] < best['others_cpu_frac']):
      best = timing
    if timing['others_cpu_frac'] is None or timing['others_cpu_frac'] <= max_others_cpu:
      break
  return {**best, 'sections': section}


# ---------------------------------------------------------------- JAX side (own processes)


def jax_platform() -> Dict[str, str]:
  """{'platform': the default JAX backend, 'cpu', 'gpu' or 'tpu'}."""
  import jax  # pylint: disable=g-import-not-at-top
  return {'platform': jax.default_backend()}


def training_config(variant: str, batch: int, overrides: Dict[str, Any],
                    dtype: str = 'float32'):
  """The config both sides run: MobileCLIP2's recipe (configs/mobileclip2.py) for `variant` at
  `batch`, with the model overrides and compute dtype; JAX builds its step from it through
  train/setup.py."""
  from mobileclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import rules  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  specs = config_lib.recipe_specs()
  c = config_lib.load_config_file(specs.get(variant, specs['MobileCLIP2-S0']))
  c.model.name = variant
  if clip_lib.get_config(variant).image_layout == 'open_clip':
    c.optim.wd_rules = (rules.OPEN_CLIP_VIT_WD_RULE,) + tuple(c.optim.wd_rules)
  c.batch_size = batch
  c.model.dtype = dtype
  for key, value in overrides.items():
    if isinstance(value, dict):
      c.model[key].update(value)
    else:
      c.model[key] = value
  return c


def measure_jax(variant: str, overrides: Dict[str, Any], batch: int, workdir: str, warmup: int,
                repeats: int, max_others_cpu: float, attempts: int, seed: int,
                dtype: str) -> Dict[str, Any]:
  """Builds the trainer's step (train/setup.py) and runs it on the saved weights and batch.

  dtype: the model's compute dtype (parameters stay float32). The step's FLOPs are XLA's cost
  analysis of the compiled executable that is timed (per device).
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import convert  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.train import setup  # pylint: disable=g-import-not-at-top
  # A cache hit would make the compile time a cache read.
  jax.config.update('jax_enable_compilation_cache', False)
  utils.run_cpu_programs_inline()  # As launch/train.py: this process is fresh.
  config = training_config(variant, batch, overrides, dtype)
  config.seed = seed
  mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
  model_config = setup.model_config(config)
  run = setup.build(config, mesh, spec=setup.InputSpec.synthetic(model_config, TEACHER_DIMS))
  with np.load(_weights_path(workdir)) as weights:
    variables = convert.from_open_clip(weights, model_config)
  with np.load(_batch_path(workdir)) as data:
    batch_arrays = sharding_lib.global_batch({k: data[k] for k in data.files}, mesh)
  state = run.init_state()
  state = state.replace(
      params=jax.device_put(variables['params'], run.state_shardings.params),
      batch_stats=jax.device_put(variables.get('batch_stats', {}), run.state_shardings.batch_stats))
  del variables
  compiled = run.step
  compile_peak_rss_mb = common.peak_rss_mb()  # Loading and compiling, before any step ran.
  holder = {'state': state}
  del state  # Donated by the first step; only `holder` may refer to it.

  def train_step():
    holder['state'], metrics = compiled(holder['state'], batch_arrays)
    return jax.block_until_ready(metrics)

  metrics = jax.device_get(train_step())
  first = {k: float(metrics[k]) for k in ('loss', 'grad_norm') + LOSS_TERMS}
  result = _timed_steps(train_step, warmup, repeats, max_others_cpu, attempts)
  result['first_step'] = first
  result['compile_s'] = round(run.lower_seconds + run.compile_seconds, 3)  # Lower + compile.
  result['peak_rss_mb'] = round(common.peak_rss_mb(), 1)
  result['compile_peak_rss_mb'] = round(compile_peak_rss_mb, 1)
  cost = compiled.cost_analysis()  # Summed over the step's programs.
  if cost and cost.get('flops', 0) > 0:
    result['flops_per_step'] = float(cost['flops'])
  analysis = compiled.memory_analysis()  # XLA's buffers of one step, per device.
  if analysis is not None:
    result['step_buffers_mb'] = {
        name: round(getattr(analysis, f'{name}_size_in_bytes') / 2**20, 1)
        for name in ('argument', 'output', 'alias', 'temp')}
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['peak_device_mb'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  result['device'] = f'{device.platform}:{device.device_kind}'
  result['device_count'] = jax.device_count()
  result['versions'] = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                        'flax': flax.__version__}
  return result


# ---------------------------------------------------------------- orchestration (runs no model)


def recipe_settings(variant: str, batch: int, overrides: Dict[str, Any]) -> Dict[str, Any]:
  """The training config's optimizer, schedule and loss settings, for the torch side (JSON)."""
  from mobileclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  c = training_config(variant, batch, overrides)
  loss = c.loss
  # torch_dr_loss implements this form of the objective; a recipe that changes it needs both.
  if loss.kind != 'softmax' or loss.average != 'probs' or loss.student_scale is not None:
    raise ValueError(f'torch_dr_loss implements the softmax loss with teachers averaged after '
                     f'softmax and the learned student scale; the recipe now has '
                     f'kind={loss.kind!r}, average={loss.average!r}, '
                     f'student_scale={loss.student_scale}.')
  if c.accum_steps != 1 or c.optim.lr_rules or c.optim.freeze:
    raise ValueError('The torch side runs one micro-batch, no lr multipliers and no frozen '
                     'parameters; the recipe asks for them.')
  return {
      'lr': c.optim.lr, 'b1': c.optim.b1, 'b2': c.optim.b2,
      'eps': c.optim.eps if c.optim.eps is not None else optimizer_lib.default_eps(variant),
      'weight_decay': c.optim.weight_decay, 'grad_clip': c.optim.grad_clip,
      'warmup_steps': config_lib.parse_duration(c.schedule.warmup, batch),
      'total_steps': config_lib.parse_duration(c.schedule.total, batch),
      # The keyword arguments of torch_dr_loss and LossConfig beside teacher_dims.
      'loss': {'clip_weight': loss.clip_weight, 'distill_weight': loss.distill_weight,
               'gt_weight': loss.gt_weight, 'syn_weight': loss.syn_weight,
               'teacher_scales': list(config_lib.as_tuple(loss.teacher_scales))},
  }


def _check_overrides(overrides: Any) -> None:
  if not isinstance(overrides, dict) or any(
      not isinstance(overrides.get(k, {}), dict) for k in ('text', 'image')):
    raise ValueError(f'overrides must be a JSON object (with `text` and `image` objects too), such '
                     f'as {{"image_size": 64, "text": {{"layers": 1}}}}; got {overrides!r}.')
  unknown = sorted(set(overrides) - set(_OVERRIDES))
  for tower, valid in (('text', _TEXT_OVERRIDES), ('image', _VIT_OVERRIDES)):
    unknown += [f'{tower}.{k}' for k in sorted(set(overrides.get(tower, {})) - set(valid))]
  if unknown:
    raise ValueError(f'overrides {unknown} have no counterpart in the PyTorch reference config; '
                     f'the train benchmark can override image_size, embed_dim, text '
                     f'{", ".join(_TEXT_OVERRIDES)} and ViT image {", ".join(_VIT_OVERRIDES)}.')


def _parse(options: Dict[str, Any]) -> Dict[str, Any]:
  """Options as values; the platform-dependent ones not given stay None (see `_defaults`)."""
  quick, overrides = common.common_options(options, _OPTIONS, 'train', '{"image_size": 64}')
  _check_overrides(overrides)
  given = lambda key, cast=str: common.option_list(options, key, (), cast) if key in options else None
  parsed = {
      'variants': given('variants'),
      'batch': given('batch', int),
      'dtype': options.get('dtype'),
      'torch_modes': given('torch_modes'),
      'quick': quick,
      'repeats': common.option_scalar(options, 'repeats', 2 if quick else 5, int),
      'warmup': common.option_scalar(options, 'warmup', 1 if quick else 2, int),
      'max_others_cpu': common.option_scalar(options, 'max_others_cpu', 0.1, float),
      'attempts': common.option_scalar(options, 'attempts', 1 if quick else 3, int),
      'overrides': overrides,
      'loss_rtol': common.option_scalar(options, 'loss_rtol', None, float),
      'grad_rtol': common.option_scalar(options, 'grad_rtol', None, float),
      'seed': common.option_scalar(options, 'seed', 0, int),
  }
  for key, low in (('repeats', 1), ('attempts', 1), ('warmup', 0)):
    if parsed[key] < low:
      raise ValueError(f'{key} must be at least {low}, got {parsed[key]}.')
  if parsed['batch'] is not None and (not parsed['batch'] or min(parsed['batch']) < 1):
    raise ValueError(f'batch must list positive integers, got {options["batch"]!r}.')
  if parsed['variants'] is not None and not parsed['variants']:
    raise ValueError('variants must name at least one variant.')
  if parsed['dtype'] is not None and parsed['dtype'] not in DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {parsed["dtype"]!r}.')
  modes = parsed['torch_modes']
  if modes is not None and (not modes or set(modes) - set(TORCH_MODES) or modes[0] != 'eager'):
    raise ValueError(f'torch_modes must list eager first, then optionally compile (the first-step '
                     f'comparison and the reference weights come from eager), got '
                     f'{options["torch_modes"]!r}.')
  return parsed


def _defaults(o: Dict[str, Any]) -> Dict[str, Any]:
  """o with the platform-dependent options that were not given filled in (`DEFAULTS`).

  Finds the platform in a JAX process only when some option needs it.
  """
  keys = ('variants', 'batch', 'dtype', 'torch_modes')
  if all(o[k] is not None for k in keys):
    return o
  platform = _isolated('jax_platform', {})['platform']
  defaults = DEFAULTS['cpu' if platform == 'cpu' else 'accelerator']
  o = dict(o)
  for key in keys:
    if o[key] is None:
      value = defaults[key]
      o[key] = value if isinstance(value, str) else list(value[:1] if o['quick'] and key in (
          'variants', 'batch') else value)
  return o




def _model_config(variant: str, overrides: Dict[str, Any]):
  """The JAX config; fails here, before any process starts, on overrides the tower lacks."""
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import vit  # pylint: disable=g-import-not-at-top
  base = clip_lib.get_config(variant)
  if overrides.get('image') and not (isinstance(base.image, vit.ViTConfig) and
                                     base.image_layout == 'open_clip'):
    raise ValueError(f'Image tower overrides apply to open_clip ViT towers (e.g. ViT-B-16); the '
                     f'image tower of {variant} is built by timm, whose open_clip config has no '
                     'such keys. Override image_size instead.')
  return clip_lib.get_config(variant, **overrides)


def _relative(got: float, want: float) -> float:
  return abs(got - want) / max(abs(want), 1e-12)


def _row(variant: str, batch: int, image_size: int, recipe: Dict[str, Any],
         jax_r: Dict[str, Any], torch_rs: Dict[str, Dict[str, Any]],
         o: Dict[str, Any]) -> Dict[str, Any]:
  torch_r = torch_rs['eager']
  row = {'variant': variant, 'batch': batch, 'image_size': image_size, 'dtype': o['dtype'],
         'parameters': torch_r['parameters']}
  flops = jax_r.get('flops_per_step')
  peak = common.peak_flops(jax_r['device'])
  row['jax_flops_per_step'] = common.significant(flops) if flops else None
  row['peak_flops_per_s'] = peak
  sides = [('jax', jax_r)] + [('torch' if m == 'eager' else f'torch_{m}', torch_rs[m])
                              for m in o['torch_modes']]
  for prefix, r in sides:
    if 'error' in r:
      row[f'{prefix}_error'] = r['error']
      continue
    row[f'{prefix}_examples_per_s'] = common.significant(batch / r['median_s'])
    row[f'{prefix}_median_s'] = common.significant(r['median_s'])
    row[f'{prefix}_min_s'] = common.significant(r['min_s'])
    # Achieved FLOP/s and MFU from the JAX step's FLOPs: both sides do the same step's work.
    row[f'{prefix}_tflops_per_s'] = (common.significant(flops / r['median_s'] / 1e12)
                                     if flops else None)
    row[f'{prefix}_mfu'] = (common.significant(flops / r['median_s'] / peak)
                            if flops and peak else None)
    if 'compile_s' in r:
      row[f'{prefix}_compile_s'] = r['compile_s']
    if prefix == 'jax':
      row['jax_compile_peak_rss_mb'] = r['compile_peak_rss_mb']
      if 'step_buffers_mb' in r:
        row['jax_step_buffers_mb'] = r['step_buffers_mb']
    row[f'{prefix}_cpu_s_per_step'] = common.significant(r['cpu_s_per_step'])
    row[f'{prefix}_peak_rss_mb'] = r['peak_rss_mb']
    if 'peak_device_mb' in r:
      row[f'{prefix}_peak_device_mb'] = r['peak_device_mb']
    row[f'{prefix}_others_cpu_frac'] = r['others_cpu_frac']
  row['ratio_median'] = common.significant(jax_r['median_s'] / torch_r['median_s'])
  row['ratio_min'] = common.significant(jax_r['min_s'] / torch_r['min_s'])
  for mode in o['torch_modes'][1:]:
    if 'error' not in torch_rs[mode]:
      row[f'ratio_vs_{mode}_median'] = common.significant(
          jax_r['median_s'] / torch_rs[mode]['median_s'])
  jax_first, torch_first = jax_r['first_step'], torch_r['first_step']
  row['jax_first_loss'], row['torch_first_loss'] = jax_first['loss'], torch_first['loss']
  row['loss_rel_diff'] = common.significant(_relative(jax_first['loss'], torch_first['loss']))
  row['jax_first_grad_norm'] = jax_first['grad_norm']
  row['torch_first_grad_norm'] = torch_first['grad_norm']
  row['grad_norm_rel_diff'] = common.significant(
      _relative(jax_first['grad_norm'], torch_first['grad_norm']))
  row['term_rel_diff'] = {k: common.significant(_relative(jax_first[k], torch_first[k]))
                          for k in LOSS_TERMS}
  kind = 'bfloat16' if o['dtype'] == 'bfloat16' else (
      'cpu' if jax_r['device'].startswith('cpu:') else 'accelerator')
  loss_rtol = o['loss_rtol'] if o['loss_rtol'] is not None else _TOLERANCES[kind]['loss']
  grad_rtol = o['grad_rtol'] if o['grad_rtol'] is not None else _TOLERANCES[kind]['grad']
  row['losses_agree'] = (max(row['loss_rel_diff'], *row['term_rel_diff'].values()) <= loss_rtol
                         and row['grad_norm_rel_diff'] <= grad_rtol)
  row['tolerances'] = {'loss': loss_rtol, 'grad_norm': grad_rtol}
  row['first_step'] = {prefix: r['first_step'] for prefix, r in sides if 'first_step' in r}
  row['repeats'], row['warmup'] = o['repeats'], o['warmup']
  row['sections'] = {prefix: r['sections'] for prefix, r in sides if 'sections' in r}
  row['jax_device'], row['torch_device'] = jax_r['device'], torch_r['device']
  row['jax_device_count'] = jax_r['device_count']
  row['torch_threads'] = torch_r['threads']
  row['recipe'] = recipe
  row['load_avg_1m'] = common.machine().get('load_avg_1m')
  row['versions'] = {**jax_r['versions'], **torch_r['versions']}
  return row


_SUMMARY_SIDES = (('JAX', 'jax'), ('torch eager', 'torch'), ('torch.compile', 'torch_compile'))


def summary_table(rows: Sequence[Dict[str, Any]]) -> str:
  """A Markdown table of `run` rows: per side examples/s, step seconds and MFU; the ratios."""
  def cell(row, key, fmt):
    value = row.get(key)
    return '–' if value is None else format(value, fmt)

  head = ['variant', 'batch', 'dtype', 'TFLOP/step']
  for name, _ in _SUMMARY_SIDES:
    head += [f'{name} ex/s', f'{name} s/step', f'{name} MFU']
  head += ['JAX/eager time', 'JAX/compile time', 'JAX compile s', 'torch.compile s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    if 'error' in row:
      lines.append(f"| {row['variant']} | {row['batch']} | {row.get('dtype', '')} | error: "
                   f"{row['error'].strip().splitlines()[-1][:120]} |")
      continue
    flops = row.get('jax_flops_per_step')
    cells = [row['variant'], str(row['batch']), row['dtype'],
             '–' if flops is None else f'{flops / 1e12:.3g}']
    for _, prefix in _SUMMARY_SIDES:
      if f'{prefix}_error' in row:
        cells += ['failed', '', '']
        continue
      cells += [cell(row, f'{prefix}_examples_per_s', '.4g'), cell(row, f'{prefix}_median_s', '.4g'),
                cell(row, f'{prefix}_mfu', '.1%')]
    cells += [cell(row, 'ratio_median', '.3g'), cell(row, 'ratio_vs_compile_median', '.3g'),
              cell(row, 'jax_compile_s', '.0f'), cell(row, 'torch_compile_compile_s', '.0f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  devices = sorted({row['jax_device'] for row in rows if 'jax_device' in row})
  return '\n'.join(lines + ['', f"Device: {', '.join(devices) or 'unknown'}."])


def _isolated(function: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
  module = TORCH_MODULE if function == 'measure_torch' else __name__
  return common.isolated(module, function, kwargs, timeout=_SUBPROCESS_TIMEOUT_S)


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields one row per (variant, batch); see the module docstring for the options and method.

  Row fields: variant, batch, image_size, dtype, parameters, jax_flops_per_step (XLA's cost
  analysis of the timed executable, per device), peak_flops_per_s (None when unknown); for
  prefix jax / torch (eager) / torch_compile: *_examples_per_s, *_median_s, *_min_s (wall
  seconds per step), *_tflops_per_s, *_mfu, *_cpu_s_per_step, *_peak_rss_mb
  (*_peak_device_mb on an accelerator), *_others_cpu_frac, or *_error when that side failed;
  jax_compile_s, torch_compile_compile_s (its first step), jax_compile_peak_rss_mb,
  jax_step_buffers_mb; ratio_median / ratio_min (JAX / torch eager seconds: > 1 means JAX
  is slower), ratio_vs_compile_median; jax_first_loss, torch_first_loss, loss_rel_diff, jax_first_grad_norm,
  torch_first_grad_norm, grad_norm_rel_diff, term_rel_diff (per loss term), losses_agree and its
  tolerances, first_step (every first-step value of both); repeats, warmup, sections (timed
  sections run), devices, torch threads,
  the recipe settings, the 1-minute load average, versions. A failed configuration yields
  variant, batch and `error`.
  """
  o = _parse(options)
  for variant in o['variants'] or ():  # Named before any process starts.
    _model_config(variant, o['overrides'])
  o = _defaults(o)
  configs = {v: _model_config(v, o['overrides']) for v in o['variants']}
  for variant in o['variants']:
    config = configs[variant]
    for batch in o['batch']:
      recipe = recipe_settings(variant, batch, o['overrides'])
      with tempfile.TemporaryDirectory(prefix='mobileclip_bench_train_') as workdir:
        common_kwargs = dict(variant=variant, overrides=o['overrides'], batch=batch,
                             workdir=workdir, seed=o['seed'], warmup=o['warmup'],
                             repeats=o['repeats'], max_others_cpu=o['max_others_cpu'],
                             attempts=o['attempts'], dtype=o['dtype'])
        torch_kwargs = dict(common_kwargs, recipe=recipe, image_size=config.image_size,
                            mean=list(config.mean), std=list(config.std))
        try:
          torch_rs = {'eager': _isolated('measure_torch', dict(torch_kwargs, mode='eager',
                                                               write_reference=True))}
          for mode in o['torch_modes'][1:]:
            try:
              torch_rs[mode] = _isolated('measure_torch', dict(torch_kwargs, mode=mode,
                                                               write_reference=False))
            except RuntimeError as e:  # A failing compiler loses its columns, not the row.
              torch_rs[mode] = {'error': str(e)[-2000:]}
          jax_r = _isolated('measure_jax', common_kwargs)
        except RuntimeError as e:  # E.g. out of memory at this batch: report it, go on.
          yield {'variant': variant, 'batch': batch, 'dtype': o['dtype'], 'error': str(e)[-2000:],
                 'load_avg_1m': common.machine().get('load_avg_1m')}
          continue
      yield _row(variant, batch, config.image_size, recipe, jax_r, torch_rs, o)

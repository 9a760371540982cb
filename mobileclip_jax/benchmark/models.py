"""Forward latency, compile time and memory of each tower: JAX (jit) vs the PyTorch reference.

  python launch/benchmark.py models [--option=KEY=VALUE ...]

Options (all optional):
  variants=MobileCLIP2-S0,MobileCLIP2-S4   named variants with an open_clip custom-text config
  towers=image,text                        which towers
  forms=train-time,reparameterized         image towers only; the text towers of these variants
                                           have nothing to reparameterize
  batch_sizes=1,8
  repeats=5                                timed calls after 2 warm-up calls (median and min); more
                                           for short calls, so that each timed section lasts >= 1 s
  quick=1                                  defaults become MobileCLIP2-S0 and batch 1
  overrides={"image_size": 224}            JSON `create_model` overrides applied to both sides;
                                           image_size, embed_dim and text width/heads/layers/mlp_ratio
  max_others_cpu=0.1, attempts=3           re-measure (in a new process) while other processes used
                                           more than this share of the CPUs; keep the quietest attempt
  rel_l2_tol=                              `outputs_agree` is rel_l2 <= this; default 1e-4 when
                                           JAX runs on CPU, 1e-2 on accelerators (whose default
                                           float32 matmul precision is TF32 / bf16 passes)
  seed=0

One row per (variant, tower, form, batch). Method:
- A torch process builds each tower with open_clip's own tower builders (the modules that
  `open_clip.create_model` puts in `model.visual` / `model.text`), gives it seeded non-trivial
  normalization statistics, affines and layer scales (with the default init the residual branches
  would barely contribute and a wrong port could still agree), and saves its state_dict and the
  inputs (normal images, tokenized captions).
- Every measurement then runs in its own fresh process (`common.isolated`), so peak memory is that
  configuration's own and the frameworks never share a process:
  - torch: the tower loads the saved weights, eval, `timm.models.reparameterize_model` for the
    reparameterized form, `torch.inference_mode()`, `torch.set_num_threads(os.cpu_count())`;
    CUDA when torch has it, else CPU.
  - JAX: the weights go through `convert.from_open_clip` (and `reparameterize`), then
    `jax.jit(encode_*)` in eval mode with the variables as arguments; compile time is
    lower + compile with the persistent compilation cache disabled, so it is a real compile.
- Latency: median / min wall seconds per call (`common.time_calls`). Memory: process peak RSS,
  building the tower and loading its weights included, plus the device peak on an accelerator.
- Both outputs are saved and compared (relative L2) in the row, so a fast but wrong number shows.
- Each timed section records the share of CPU that *other* processes used (`*_others_cpu_frac`).
"""
import os
import tempfile
import time
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.benchmark import common

DEFAULT_VARIANTS = ('MobileCLIP2-S0', 'MobileCLIP2-S4')
TOWERS = ('image', 'text')
FORMS = ('train-time', 'reparameterized')
_CONVERT_TOWER = {'image': 'visual', 'text': 'text'}
_TEXT_OVERRIDES = ('width', 'heads', 'layers', 'mlp_ratio')  # Same names in open_clip's text_cfg.
_OVERRIDES = ('image_size', 'embed_dim', 'text')
_OPTIONS = ('variants', 'towers', 'forms', 'batch_sizes', 'repeats', 'quick', 'overrides',
            'max_others_cpu', 'attempts', 'rel_l2_tol', 'seed')
_CAPTIONS = ('a photo of a cat', 'two dogs playing in the snow on a sunny winter morning',
             'a diagram on a whiteboard', 'an empty street at night, wet with rain',
             'a bowl of fruit', 'a red bicycle leaning against a brick wall next to a door',
             'mountains', 'a close-up of a hand holding a small green frog')
_CPU_REL_L2_TOL = 1e-4
_ACCELERATOR_REL_L2_TOL = 1e-2


# ---------------------------------------------------------------- shared by the worker processes


def _model_config(variant: str, overrides: Dict[str, Any]):
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  return clip_lib.get_config(variant, **overrides)


def _output_path(workdir: str, framework: str, tower: str, form: str, batch: int) -> str:
  return os.path.join(workdir, f'{framework}_{tower}_{form}_{batch}.npy')


def _weights_path(workdir: str, tower: str) -> str:
  return os.path.join(workdir, f'{tower}_weights.npz')


# ---------------------------------------------------------------- torch side (own processes)


def _torch_tower(variant: str, tower: str, overrides: Dict[str, Any]):
  """The open_clip module of one tower, as `open_clip.create_model(variant)` would build it.

  Built alone (not the whole CLIP model), so that the torch process holds only the measured tower,
  like the JAX process. open_clip's config is given the JAX config's values of every field that
  `overrides` may change.
  """
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  from open_clip import model as open_clip_model  # pylint: disable=g-import-not-at-top
  config = _model_config(variant, overrides)
  cfg = open_clip.get_model_config(variant)
  if cfg is None or not cfg.get('custom_text') or 'timm_model_name' not in cfg['vision_cfg']:
    raise ValueError(f'{variant} has no open_clip custom-text config with a timm image tower; the '
                     f'models benchmark compares those (e.g. {", ".join(DEFAULT_VARIANTS)}).')
  if tower == 'image':
    return open_clip_model._build_vision_tower(  # pylint: disable=protected-access
        config.embed_dim, dict(cfg['vision_cfg'], image_size=config.image_size))
  text_cfg = dict(cfg['text_cfg'], **{k: getattr(config.text, k) for k in _TEXT_OVERRIDES})
  return open_clip_model._build_text_tower(config.embed_dim, text_cfg)  # pylint: disable=protected-access


def _weights_module(module, tower: str):
  """The module whose state_dict has the key layout `from_open_clip(tower=...)` reads."""
  return module.trunk if tower == 'image' else module  # timm's own names for timm image towers.


def _randomize_normalization_(module, generator) -> None:
  """Seeded non-trivial BatchNorm statistics/affines, LayerNorm affines and layer scales."""
  import torch  # pylint: disable=g-import-not-at-top

  def uniform_(t, low, high):
    t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)

  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        uniform_(m.running_mean, -0.1, 0.1)
        uniform_(m.running_var, 0.5, 1.5)
      if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):  # pylint: disable=protected-access
        uniform_(m.weight, 0.5, 1.5)
        uniform_(m.bias, -0.1, 0.1)
    for name, p in module.named_parameters():
      if name.endswith('gamma'):  # timm / open_clip layer scales.
        uniform_(p, 0.1, 0.5)


def make_reference(variant: str, towers: Sequence[str], max_batch: int, overrides: Dict[str, Any],
                   workdir: str, seed: int) -> Dict[str, Any]:
  """Writes `{tower}_weights.npz` (tower-relative state_dict) and `inputs.npz` into `workdir`.

  inputs.npz: images [max_batch, 3, S, S] float32 (standard normal, i.e. already normalized),
  tokens [max_batch, 77] int32 (open_clip's tokenizer on varied captions).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed + 1)
  for tower in towers:
    module = _torch_tower(variant, tower, overrides)
    _randomize_normalization_(module, generator)
    state = {k: v.numpy() for k, v in _weights_module(module, tower).state_dict().items()}
    np.savez(_weights_path(workdir, tower), **state)
    del module, state
  size = _model_config(variant, overrides).image_size
  images = torch.randn(max_batch, 3, size, size, generator=generator).numpy()
  captions = [_CAPTIONS[i % len(_CAPTIONS)] for i in range(max_batch)]
  tokens = open_clip.get_tokenizer(variant)(captions).numpy().astype(np.int32)
  np.savez(os.path.join(workdir, 'inputs.npz'), images=images, tokens=tokens)
  return {'image_size': size}


def measure_torch(variant: str, tower: str, form: str, batch: int, repeats: int,
                  overrides: Dict[str, Any], workdir: str, threads: int = 0) -> Dict[str, Any]:
  """Times the open_clip tower with the saved weights; saves its output [batch, embed_dim]."""
  import torch  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  timm = torch_compat.import_timm()
  torch.set_num_threads(threads or os.cpu_count())
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  module = _torch_tower(variant, tower, overrides)
  with np.load(_weights_path(workdir, tower)) as weights:
    _weights_module(module, tower).load_state_dict(
        {k: torch.from_numpy(weights[k]) for k in weights.files})
  module = module.eval()
  if form == 'reparameterized':
    module = timm.models.reparameterize_model(module, inplace=True)  # No second copy in memory.
  module = module.to(device)
  with np.load(os.path.join(workdir, 'inputs.npz')) as inputs:
    x = torch.from_numpy(inputs['images' if tower == 'image' else 'tokens'][:batch])
  x = (x if tower == 'image' else x.long()).to(device)

  def call():
    out = module(x)
    if device.type == 'cuda':
      torch.cuda.synchronize()
    return out

  with torch.inference_mode():
    np.save(_output_path(workdir, 'torch', tower, form, batch), call().float().cpu().numpy())
    result = common.time_with_contention(call, repeats)
  result.update(common.torch_process_fields(device))
  return result


# ---------------------------------------------------------------- JAX side (own processes)


def measure_jax(variant: str, tower: str, form: str, batch: int, repeats: int,
                overrides: Dict[str, Any], workdir: str) -> Dict[str, Any]:
  """Compiles and times `jax.jit(encode_*)` with the saved weights; saves its output."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import convert  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import reparam  # pylint: disable=g-import-not-at-top
  # A cache hit would make the compile time a cache read.
  jax.config.update('jax_enable_compilation_cache', False)
  config = _model_config(variant, overrides)
  with np.load(_weights_path(workdir, tower)) as weights:
    variables = convert.from_open_clip(weights, config, tower=_CONVERT_TOWER[tower])
  if form == 'reparameterized':
    variables = reparam.reparameterize(variables)
    config = dataclasses.replace(config, reparameterized=True)
  # CLIP.setup declares logit_scale; a one-tower apply still needs the (unused) scalar.
  variables['params']['logit_scale'] = np.float32(config.init_logit_scale)
  variables = jax.device_put(variables)
  with np.load(os.path.join(workdir, 'inputs.npz')) as inputs:
    x = inputs['images'][:batch].transpose(0, 2, 3, 1) if tower == 'image' else inputs['tokens'][:batch]
  x = jax.device_put(np.ascontiguousarray(x))
  model = clip_lib.CLIP(config)
  method = 'encode_image' if tower == 'image' else 'encode_text'

  def forward(v, inputs):
    return model.apply(v, inputs, method=method)

  start = time.perf_counter()
  compiled = jax.jit(forward).lower(variables, x).compile()
  compile_s = time.perf_counter() - start
  call = lambda: compiled(variables, x).block_until_ready()
  np.save(_output_path(workdir, 'jax', tower, form, batch), np.asarray(call()))
  result = common.time_with_contention(call, repeats)
  result['compile_s'] = round(compile_s, 3)
  result['peak_rss_mb'] = round(common.peak_rss_mb(), 1)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['peak_device_mb'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  result['device'] = f'{device.platform}:{device.device_kind}'
  result['versions'] = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                        'flax': flax.__version__}
  return result


# ---------------------------------------------------------------- orchestration (runs no model)


def _check_overrides(overrides: Dict[str, Any]) -> None:
  if not isinstance(overrides, dict) or not isinstance(overrides.get('text', {}), dict):
    raise ValueError(f'overrides must be a JSON object (with `text` an object too), such as '
                     f'{{"image_size": 224, "text": {{"layers": 6}}}}; got {overrides!r}.')
  unknown = sorted(set(overrides) - set(_OVERRIDES))
  unknown += [f'text.{k}' for k in sorted(set(overrides.get('text', {})) - set(_TEXT_OVERRIDES))]
  if unknown:
    raise ValueError(f'overrides {unknown} have no counterpart in the PyTorch reference config; '
                     f'the models benchmark can override {", ".join(_OVERRIDES[:2])} and '
                     f'text {", ".join(_TEXT_OVERRIDES)}.')


def _parse(options: Dict[str, Any]) -> Dict[str, Any]:
  quick, overrides = common.common_options(options, _OPTIONS, 'models', '{"image_size": 224}')
  _check_overrides(overrides)
  parsed = {
      'variants': common.option_list(options, 'variants', DEFAULT_VARIANTS[:1] if quick else DEFAULT_VARIANTS),
      'towers': common.option_list(options, 'towers', TOWERS),
      'forms': common.option_list(options, 'forms', FORMS),
      'batch_sizes': common.option_list(options, 'batch_sizes', (1,) if quick else (1, 8), int),
      'repeats': common.option_scalar(options, 'repeats', 5, int),
      'overrides': overrides,
      'max_others_cpu': common.option_scalar(options, 'max_others_cpu', 0.1, float),
      'attempts': common.option_scalar(options, 'attempts', 3, int),
      'rel_l2_tol': common.option_scalar(options, 'rel_l2_tol', None, float),
      'seed': common.option_scalar(options, 'seed', 0, int),
  }
  for key in ('repeats', 'attempts'):
    if parsed[key] < 1:
      raise ValueError(f'{key} must be at least 1, got {parsed[key]}.')
  if not parsed['batch_sizes'] or min(parsed['batch_sizes']) < 1:
    raise ValueError(f'batch_sizes must be positive integers, got {parsed["batch_sizes"]}.')
  for key, valid in (('towers', TOWERS), ('forms', FORMS)):
    bad = [v for v in parsed[key] if v not in valid]
    if bad:
      raise ValueError(f'{key}={",".join(parsed[key])}: {bad} not in {", ".join(valid)}.')
  return parsed


def _forms(variant: str, tower: str, forms: Sequence[str], overrides: Dict[str, Any]) -> List[str]:
  """The requested forms that exist for this tower (reparameterized: MCi image towers only)."""
  from mobileclip_jax.models import mci  # pylint: disable=g-import-not-at-top
  config = _model_config(variant, overrides)
  has_reparam = (isinstance(config.image, mci.MCiConfig) if tower == 'image'
                 else config.text.variant == 'mct')
  return [f for f in forms if f == 'train-time' or has_reparam]


def _row(variant, tower, form, batch, image_size, jax_r, torch_r, rel_l2, tol) -> Dict[str, Any]:
  row = {'variant': variant, 'tower': tower, 'form': form, 'batch': batch}
  if tower == 'image':
    row['image_size'] = image_size
  for prefix, r in (('jax', jax_r), ('torch', torch_r)):
    row[f'{prefix}_median_s'] = common.significant(r['median_s'])
    row[f'{prefix}_min_s'] = common.significant(r['min_s'])
    if prefix == 'jax':
      row['jax_compile_s'] = r['compile_s']
    row[f'{prefix}_peak_rss_mb'] = r['peak_rss_mb']
    if 'peak_device_mb' in r:
      row[f'{prefix}_peak_device_mb'] = r['peak_device_mb']
  row['ratio_median'] = common.significant(jax_r['median_s'] / torch_r['median_s'])
  row['ratio_min'] = common.significant(jax_r['min_s'] / torch_r['min_s'])
  row['rel_l2'] = common.significant(rel_l2)
  if tol is None:
    tol = _CPU_REL_L2_TOL if jax_r['device'].startswith('cpu:') else _ACCELERATOR_REL_L2_TOL
  row['outputs_agree'] = rel_l2 <= tol
  row.update(common.provenance(jax_r, torch_r))
  return row


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields one row per (variant, tower, form, batch); see the module docstring for options.

  Row fields: variant, tower, form, batch, image_size (image rows); jax_median_s, jax_min_s,
  jax_compile_s, jax_peak_rss_mb, torch_median_s, torch_min_s, torch_peak_rss_mb
  (`*_peak_device_mb` on an accelerator); ratio_median / ratio_min (JAX / torch seconds);
  rel_l2 (JAX output vs torch output) and outputs_agree; devices, torch threads, the CPU share
  of other processes during each timed section, attempts, the 1-minute load average, versions.
  """
  o = _parse(options)
  measure = dict(repeats=o['repeats'], overrides=o['overrides'])
  for variant in o['variants']:
    plan = [(tower, form) for tower in o['towers']
            for form in _forms(variant, tower, o['forms'], o['overrides'])]
    if not plan:
      continue
    towers = sorted({tower for tower, _ in plan})
    with tempfile.TemporaryDirectory(prefix='mobileclip_bench_') as workdir:
      ref = common.isolated(__name__, 'make_reference', dict(
          variant=variant, towers=towers, max_batch=max(o['batch_sizes']),
          overrides=o['overrides'], workdir=workdir, seed=o['seed']))
      for tower, form in plan:
        for batch in o['batch_sizes']:
          kwargs = dict(measure, variant=variant, tower=tower, form=form, batch=batch,
                        workdir=workdir)
          torch_r = common.quietest(__name__, 'measure_torch', kwargs, o['max_others_cpu'],
                                    o['attempts'])
          jax_r = common.quietest(__name__, 'measure_jax', kwargs, o['max_others_cpu'],
                                  o['attempts'])
          rel_l2 = utils.rel_l2(np.load(_output_path(workdir, 'jax', tower, form, batch)),
                           np.load(_output_path(workdir, 'torch', tower, form, batch)))
          yield _row(variant, tower, form, batch, ref['image_size'], jax_r, torch_r, rel_l2,
                     o['rel_l2_tol'])

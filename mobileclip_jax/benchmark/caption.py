"""Captions per second of the JAX CoCa captioner vs open_clip's generate, same weights and images.

  python launch/benchmark.py caption [--option=KEY=VALUE ...]

Options (all optional):
  variant=coca_ViT-B-32        or coca_ViT-L-14 (and its -context128 / -context256 forms)
  samplers=greedy,top_p        greedy: open_clip generation_type='top_k', top_k=1 (the tokens of
                               both sides are compared); top_p: ml-mobileclip-dr's top_p=0.9
                               (sampled, so only the speed is compared)
  batch_sizes=1,8
  seq_len=30
  repeats=3                    timed calls (median and min); JAX's follow an untimed first call
  quick=1                      defaults become greedy, batch 1, one repeat
  output_scale=8              the decoder's output projection is drawn x this (see below)
  overrides={"text": {"layers": 2}}  JSON `create_model` overrides of both sides' config: embed_dim,
                               image_size, image/text/decoder width, heads, layers (a smaller
                               model for a smoke run)
  max_others_cpu=0.1, attempts=2  re-measure (in a new process) while other processes used more
                               than this share of the CPUs; keep the quietest attempt
  seed=0

One row per (sampler, batch). Method, as the models benchmark:
- A torch process builds open_clip's CoCa (`open_clip.CoCa` from the variant's json with the
  overrides), draws every weight from a seeded generator (open_clip leaves the decoder's output
  projection uninitialized) and saves the state_dict and the images (standard normal, i.e.
  already normalized). Matrices are N(0, 1/fan_in), except the decoder's output projection, x
  `output_scale`: at 1 the next-token distributions are nearly flat (top-p 0.9 keeps ~30k of the
  49408 tokens), at 8 they are as peaked as a trained captioner's (a median of 5 tokens, at most
  ~20, measured on coca_ViT-B-32), which is what the JAX top-p sampler's speed depends on.
- Each measurement runs in a fresh process (`common.isolated`):
  - torch: `model.generate(images, ..., seq_len, fixed_output_length=True)` under
    `torch.inference_mode()` with `torch.set_num_threads(os.cpu_count())`: open_clip re-runs
    the text tower and decoder over the whole prefix at every step (no KV cache);
  - JAX: `mobileclip_jax.generate` with the converted weights (KV cache, one jitted loop); its
    first call (trace + compile + one run, persistent compilation cache off) is reported as
    `jax_first_call_s`, and `jax_compile_s` = first call - median call.
- captions/s = batch / median seconds per call; `speedup` = torch seconds / JAX seconds (the
  issue's target is >= 3 at batch 8). Memory: each process's peak RSS, building the model and
  loading the weights included. `others_cpu_frac`: the CPU share other processes used while
  timing; `load_avg_1m` says how busy the machine was.
"""
import os
import tempfile
import time
from typing import Any, Dict, Iterator

import numpy as np

from mobileclip_jax.benchmark import common

DEFAULT_VARIANT = 'coca_ViT-B-32'
SAMPLERS = ('greedy', 'top_p')
_TOP_P = 0.9  # ml-mobileclip-dr's scripts/gen.py.
_OPTIONS = ('variant', 'samplers', 'batch_sizes', 'seq_len', 'repeats', 'quick', 'output_scale',
            'overrides', 'max_others_cpu', 'attempts', 'seed')
_TOWER_FIELDS = ('width', 'heads', 'layers')  # Overridable in image / text / decoder.


def _config(variant: str, overrides: Dict[str, Any]):
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  ours = {k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}
  if 'layers' in ours.get('image', {}):
    ours['image']['depth'] = ours['image'].pop('layers')
  return clip_lib.get_config(variant, **ours)


def _open_clip_model(variant: str, overrides: Dict[str, Any]):
  """open_clip's CoCa for the variant (its json; longer contexts as Apple's), with overrides."""
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  config = _config(variant, overrides)
  cfg = open_clip.get_model_config(variant.split('-context')[0])
  cfg['embed_dim'] = config.embed_dim
  cfg['vision_cfg'].update(image_size=config.image_size, width=config.image.width,
                           layers=config.image.depth, head_width=config.image.width // config.image.heads)
  for ours, section in (('text', 'text_cfg'), ('decoder', 'multimodal_cfg')):
    tower = getattr(config, ours)
    cfg[section].update(width=tower.width, heads=tower.heads, layers=tower.layers,
                        context_length=tower.context_length)
  return open_clip.CoCa(**{k: v for k, v in cfg.items() if k != 'custom_text'})


def _weights_path(workdir: str) -> str:
  return os.path.join(workdir, 'weights.npz')


def _tokens_path(workdir: str, framework: str, sampler: str, batch: int) -> str:
  return os.path.join(workdir, f'{framework}_{sampler}_{batch}.npy')


def make_reference(variant: str, max_batch: int, output_scale: float, overrides: Dict[str, Any],
                   workdir: str, seed: int) -> Dict[str, Any]:
  """Writes weights.npz (open_clip state_dict, every weight random) and images.npy [B, 3, S, S]."""
  import math  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = _open_clip_model(variant, overrides)
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:  # Raw [in, out] projections and [out, in] Linear weights alike.
        fan_in = p.shape[0] if name.endswith(('text_projection', 'visual.proj')) else p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
      elif name.endswith('weight'):  # LayerNorm scales.
        p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.text_decoder.text_projection.mul_(output_scale)
  np.savez(_weights_path(workdir), **{k: v.numpy() for k, v in model.state_dict().items()})
  size = model.visual.image_size[0]
  images = torch.randn(max_batch, 3, size, size, generator=generator).numpy()
  np.save(os.path.join(workdir, 'images.npy'), images)
  return {'image_size': size, 'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _images(workdir: str, batch: int) -> np.ndarray:
  return np.load(os.path.join(workdir, 'images.npy'))[:batch]


def measure_torch(variant: str, sampler: str, batch: int, seq_len: int, repeats: int,
                  overrides: Dict[str, Any], workdir: str) -> Dict[str, Any]:
  """Times open_clip's generate (fixed_output_length=True) and saves its tokens."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top  (open_clip's generate needs it)
  torch.set_num_threads(os.cpu_count())
  model = _open_clip_model(variant, overrides)
  with np.load(_weights_path(workdir)) as weights:
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
  model = model.eval()
  images = torch.from_numpy(_images(workdir, batch))
  kw = (dict(generation_type='top_k', top_k=1) if sampler == 'greedy'
        else dict(generation_type='top_p', top_p=_TOP_P))
  outputs = []  # No warm-up call: nothing compiles, and one call can take minutes.
  call = lambda: outputs.append(
      model.generate(images, seq_len=seq_len, fixed_output_length=True, **kw))
  with torch.inference_mode():
    result = common.time_with_contention(call, repeats, warmup=0, min_window_s=0)
  np.save(_tokens_path(workdir, 'torch', sampler, batch), outputs[0].numpy())
  result.update(common.torch_process_fields(torch.device('cpu')))
  result['versions']['transformers'] = transformers.__version__
  return result


def measure_jax(variant: str, sampler: str, batch: int, seq_len: int, repeats: int,
                overrides: Dict[str, Any], workdir: str, seed: int) -> Dict[str, Any]:
  """Times `mobileclip_jax.generate` with the converted weights and saves its tokens."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import mobileclip_jax  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import convert  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)  # The first call compiles for real.
  config = _config(variant, overrides)
  with np.load(_weights_path(workdir)) as weights:
    variables = jax.device_put(convert.from_open_clip(weights, config))
  module = clip_lib.model_from_config(config)
  images = jax.device_put(np.ascontiguousarray(_images(workdir, batch).transpose(0, 2, 3, 1)))
  kw = dict(sampler=sampler, seq_len=seq_len)
  if sampler == 'top_p':
    kw.update(top_p=_TOP_P, rng=jax.random.key(seed))
  call = lambda: mobileclip_jax.generate(module, variables, images, **kw).block_until_ready()
  start = time.perf_counter()
  np.save(_tokens_path(workdir, 'jax', sampler, batch), np.asarray(call()))
  first_call_s = time.perf_counter() - start
  result = common.time_with_contention(call, repeats, warmup=0, min_window_s=0)
  result['first_call_s'] = round(first_call_s, 3)
  result['peak_rss_mb'] = round(common.peak_rss_mb(), 1)
  device = jax.devices()[0]
  result['device'] = f'{device.platform}:{device.device_kind}'
  result['versions'] = {'jax': jax.__version__, 'flax': flax.__version__}
  return result


def _parse(options: Dict[str, Any]) -> Dict[str, Any]:
  quick, overrides = common.common_options(options, _OPTIONS, 'caption',
                                           '{"text": {"layers": 2}}')
  if not isinstance(overrides, dict):
    raise ValueError(f'overrides must be a JSON object, got {overrides!r}.')
  bad = []
  for key, value in overrides.items():
    if isinstance(value, dict) and key in ('image', 'text', 'decoder'):
      bad += [f'{key}.{k}' for k in value if k not in _TOWER_FIELDS]
    elif key not in ('embed_dim', 'image_size'):
      bad.append(key)
  if bad:
    raise ValueError(f'overrides {bad} have no counterpart in the open_clip config; the caption '
                     'benchmark can override embed_dim, image_size and image/text/decoder '
                     'width, heads, layers.')
  parsed = {
      'variant': options.get('variant', DEFAULT_VARIANT),
      'samplers': common.option_list(options, 'samplers', SAMPLERS[:1] if quick else SAMPLERS),
      'batch_sizes': common.option_list(options, 'batch_sizes', (1,) if quick else (1, 8), int),
      'seq_len': common.option_scalar(options, 'seq_len', 30, int),
      'repeats': common.option_scalar(options, 'repeats', 1 if quick else 3, int),
      'output_scale': common.option_scalar(options, 'output_scale', 8.0, float),
      'overrides': overrides,
      'max_others_cpu': common.option_scalar(options, 'max_others_cpu', 0.1, float),
      'attempts': common.option_scalar(options, 'attempts', 2, int),
      'seed': common.option_scalar(options, 'seed', 0, int),
  }
  if not parsed['variant'].startswith('coca_'):
    raise ValueError(f'variant must be a CoCa model (coca_ViT-B-32, coca_ViT-L-14, ...), got '
                     f'{parsed["variant"]!r}.')
  _config(parsed['variant'], overrides)  # Unknown names and bad shapes fail here, with a hint.
  bad = [s for s in parsed['samplers'] if s not in SAMPLERS]
  if bad:
    raise ValueError(f'samplers={",".join(parsed["samplers"])}: {bad} not in {", ".join(SAMPLERS)}.')
  for key in ('repeats', 'attempts'):
    if parsed[key] < 1:
      raise ValueError(f'{key} must be at least 1, got {parsed[key]}.')
  if not parsed['batch_sizes'] or min(parsed['batch_sizes']) < 1:
    raise ValueError(f'batch_sizes must be positive integers, got {parsed["batch_sizes"]}.')
  return parsed


def _last_eot(tokens: np.ndarray, eot: int) -> int:
  """Latest position of a row's first EOT (the number of steps a loop that stops early needs)."""
  return max(int(np.argmax(row == eot)) if eot in row else tokens.shape[1] for row in tokens)


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields one row per (sampler, batch); see the module docstring for options and method."""
  o = _parse(options)
  eot = _config(o['variant'], o['overrides']).text.vocab_size - 1
  with tempfile.TemporaryDirectory(prefix='mobileclip_caption_bench_') as workdir:
    ref = common.isolated(__name__, 'make_reference', dict(
        variant=o['variant'], max_batch=max(o['batch_sizes']), output_scale=o['output_scale'],
        overrides=o['overrides'], workdir=workdir, seed=o['seed']))
    for sampler in o['samplers']:
      for batch in o['batch_sizes']:
        kwargs = dict(variant=o['variant'], sampler=sampler, batch=batch, seq_len=o['seq_len'],
                      repeats=o['repeats'], overrides=o['overrides'], workdir=workdir)
        torch_r = common.quietest(__name__, 'measure_torch', kwargs, o['max_others_cpu'],
                                  o['attempts'])
        jax_r = common.quietest(__name__, 'measure_jax', dict(kwargs, seed=o['seed']),
                                o['max_others_cpu'], o['attempts'])
        theirs = np.load(_tokens_path(workdir, 'torch', sampler, batch))
        ours = np.load(_tokens_path(workdir, 'jax', sampler, batch))
        row = {'variant': o['variant'], 'params_m': ref['params_m'], 'sampler': sampler,
               'batch': batch, 'seq_len': o['seq_len'], 'image_size': ref['image_size'],
               'output_scale': o['output_scale']}
        for prefix, r in (('jax', jax_r), ('torch', torch_r)):
          row[f'{prefix}_median_s'] = common.significant(r['median_s'])
          row[f'{prefix}_min_s'] = common.significant(r['min_s'])
          row[f'{prefix}_captions_per_s'] = common.significant(batch / r['median_s'])
          row[f'{prefix}_peak_rss_mb'] = r['peak_rss_mb']
        row['jax_first_call_s'] = jax_r['first_call_s']
        row['jax_compile_s'] = common.significant(jax_r['first_call_s'] - jax_r['median_s'])
        row['speedup_median'] = common.significant(torch_r['median_s'] / jax_r['median_s'])
        row['speedup_min'] = common.significant(torch_r['min_s'] / jax_r['min_s'])
        if sampler == 'greedy':
          row['tokens_equal'] = bool(np.array_equal(ours, theirs))
        row['last_eot_position'] = {'jax': _last_eot(ours, eot), 'torch': _last_eot(theirs, eot)}
        row.update(common.provenance(jax_r, torch_r))
        yield row

"""Cheaper inference: each method's cost against the unreduced tower, and its accuracy on the demo.

  python launch/benchmark.py efficiency [--option=KEY=VALUE ...]

Options (all optional):
  parts=cost,accuracy         which parts to run
  variants=MobileCLIP2-S0,MobileCLIP2-B,MobileCLIP2-L-14   full-size towers (random weights)
  towers=image,text
  batch_sizes=1,64
  heavy_batch_sizes=1         batch sizes of the variants in `heavy` (L-14 at batch 64 takes
  heavy=MobileCLIP2-L-14      minutes per call on 2 shared cores)
  repeats=3                   timed rounds; in each, the unreduced tower and every setting run
                              once, interleaved (after one warm-up call each)
  demo=/tmp/demo              a trained demo workdir (launch/demo.py): its student_dr (MCi +
                              bidirectional text) and teacher_a (ViT + causal text); '' = skip
  demo_models=student_dr,teacher_a
  train_samples=1000          demo 'train' images for the rankers, selector and BN statistics
  reducer_dir=/tmp/mobileclip_efficiency_reducers   where those are written (not the demo)
  plot_dir=efficiency_plots   accuracy-vs-GFLOPs PNGs, one per demo model
  quick=1                     MobileCLIP2-S0 only, batch 1, fewer settings
  overrides={"text": {...}}   JSON `get_config` overrides of the cost part's towers (tests)

Method settings (`SETTINGS`): ToMe merging (r per layer), pruning by a learned ranker, random
scores or the pooled token's attention (keep rate rho, after block l, or progressively),
cutting text padding, and for image towers a lower side, the zero-shot confidence cascade and
the learned resolution selector (with BatchNorm statistics re-estimated per side for MCi).

Rows:
  part=cost      variant, tower, method, setting (inference spec), batch, gflops (XLA cost
                 analysis of the compiled forward), gflops_ratio (/ unreduced), median_s,
                 base_median_s, speedup (unreduced / reduced median seconds, interleaved),
                 cosine_mean / cosine_min (unit embeddings vs the unreduced ones; random
                 weights, so only a sanity check), compile_s.
  part=accuracy  model, method, setting, tower, gflops (per image or per text at the demo's
                 sizes; dynamic resolution: the mean over the images, selector and cascade
                 re-runs counted), zeroshot (mean top-1 over the demo's val tasks), heldout,
                 retrieval (mean R@1), their changes vs the unreduced model, and every metric.
"""
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.benchmark import common

_OPTIONS = ('parts', 'variants', 'towers', 'batch_sizes', 'heavy_batch_sizes', 'heavy',
            'repeats', 'demo', 'demo_models', 'train_samples', 'reducer_dir', 'plot_dir', 'quick',
            'overrides')
DEFAULT_VARIANTS = ('MobileCLIP2-S0', 'MobileCLIP2-B', 'MobileCLIP2-L-14')
_CAPTIONS = ('a photo of a dog.', 'a photo of a red car parked on the street.',
             'two people walking along a sandy beach at sunset with a dog',
             'a close-up photo of a bowl of fruit.', 'a diagram.',
             'an aerial view of a small town surrounded by green fields and a river',
             'a photo of the number 7.', 'a black and white photo of a cat sleeping on a sofa.')


# ---------------------------------------------------------------- the settings of each method


def _settings(kind: str, depth: int, side: int, stride: int, quick: bool
              ) -> List[Tuple[str, str]]:
  """(method, inference spec) pairs for a tower kind: 'text', 'vit' or 'mci'."""
  third = tuple(range(max(1, depth // 4), depth, max(1, depth // 4)))[:3]
  out: List[Tuple[str, str]] = []
  if kind == 'text':
    out += [('tome', f'text.merge={r}') for r in ((4,) if quick else (2, 4, 6))]
    out.append(('cut_padding', 'text.cut_padding=1'))
    for method in ('random', 'attention'):
      out += [(f'prune_{method}', f'text.prune={method},text.keep={k},text.prune_layers=2')
              for k in ((0.5,) if quick else (0.5, 0.3))]
    return out
  prefix = 'image'
  if kind == 'vit':
    out += [('tome', f'image.merge={r}') for r in ((8,) if quick else (4, 8, 16))]
    for method in ('random', 'attention'):
      out.append((f'prune_{method}',
                  f'image.prune={method},image.keep=0.7,'
                  f'image.prune_layers={"+".join(map(str, third))}'))
      if not quick:
        out.append((f'prune_{method}', f'image.prune={method},image.keep=0.5,'
                    f'image.prune_layers={third[0]}'))
  else:
    out += [('tome', f'{prefix}.merge={r}') for r in ((16,) if quick else (8, 16))]
  sides = [side - k * stride for k in range(1, 4) if side - k * stride >= side // 2]
  out += [('resolution', f'image_size={s}') for s in (sides[:1] if quick else sides)]
  return out


# ---------------------------------------------------------------- cost (fresh process per tower)


def _interleaved(fns: Sequence[Callable[[], Any]], rounds: int) -> List[Dict[str, float]]:
  """Median / min seconds of each fn, timed in `rounds` rounds that call every fn once."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - start)
  return [{'median_s': statistics.median(t), 'min_s': min(t)} for t in times]


def _flops(compiled) -> float:
  return float(utils.cost_analysis(compiled).get('flops', float('nan')))


def measure_cost(variant: str, tower: str, batch_sizes: Sequence[int], repeats: int,
                 quick: bool, overrides: Optional[Dict[str, Any]] = None,
                 seed: int = 0) -> List[Dict[str, Any]]:
  """Rows for one full-size tower (runs in its own process; random weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import embedding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import inference as inference_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import mci  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)  # compile_s is a real compile.
  config = clip_lib.get_config(variant, **dict(overrides or {}))
  model = clip_lib.CLIP(config)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  method = embedding.IMAGE if tower == 'image' else embedding.TEXT
  images, tokens = clip_lib.dummy_inputs(config, 1)
  sample = images if tower == 'image' else tokens
  variables = jax.jit(lambda k: model.init(k, sample, method=method))(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  big = max(batch_sizes)
  if tower == 'image':
    inputs = rng.integers(0, 256, (big, config.image_size, config.image_size, 3), np.uint8)
    is_mci = isinstance(config.image, mci.MCiConfig)
    kind = 'mci' if is_mci else 'vit'
    depth = sum(config.image.depths[i] for i, m in enumerate(config.image.token_mixers)
                if m == 'attention') if is_mci else config.image.depth
    stride = config.image.stride if is_mci else config.image.patch_size
  else:
    captions = [_CAPTIONS[i % len(_CAPTIONS)] for i in range(big)]
    inputs = tokenizer_lib.get_tokenizer(config.tokenizer)(captions, config.text.context_length)
    kind, depth, stride = 'text', config.text.layers, 1
  settings = _settings(kind, depth, config.image_size, stride, quick)
  rows = []
  for batch in batch_sizes:
    x = inputs[:batch]
    calls, costs = [], []
    for method_name, text in [('none', '')] + settings:
      spec = inference_lib.parse(text)
      tower_pass, _ = inference_lib.tower_pass(spec, inference_lib.Artifacts(), tower,
                                               spec.image_size, config.image_size)
      xi = embedding.cut_padding(x, mesh) if spec.text.cut_padding else x
      fn = embedding.encoder(model, method, mesh, tower_pass)
      start = time.perf_counter()
      compiled = fn.lower(variables, xi).compile()
      compile_s = time.perf_counter() - start
      calls.append(lambda c=compiled, xi=xi: c(variables, xi).block_until_ready())
      costs.append((method_name, text, _flops(compiled), compile_s,
                    np.asarray(compiled(variables, xi)), xi.shape))
    timing = _interleaved(calls, repeats)
    base_emb, base_flops = costs[0][4], costs[0][2]
    for (method_name, text, flops, compile_s, emb, shape), t in zip(costs, timing):
      cos = (emb * base_emb).sum(-1)
      rows.append({
          'part': 'cost', 'variant': variant, 'tower': tower, 'method': method_name,
          'setting': text, 'batch': batch, 'input_shape': list(shape),
          'gflops': round(flops / 1e9, 4), 'gflops_ratio': round(flops / base_flops, 4),
          'median_s': common.significant(t['median_s']),
          'min_s': common.significant(t['min_s']),
          'base_median_s': common.significant(timing[0]['median_s']),
          'speedup': common.significant(timing[0]['median_s'] / t['median_s']),
          'cosine_mean': round(float(cos.mean()), 5), 'cosine_min': round(float(cos.min()), 5),
          'compile_s': round(compile_s, 2), 'weights': 'random', 'repeats': repeats})
  return rows


# ---------------------------------------------------------------- accuracy on the demo world


_ACCURACY_KEYS = {'zeroshot': ('zeroshot/demo_', '/top1'), 'heldout': ('zeroshot/demo_heldout',
                                                                        '/top1'),
                  'retrieval': ('retrieval/demo_retrieval/mean_R@1', '')}


def _summary(metrics: Dict[str, float]) -> Dict[str, float]:
  out = {}
  for name, (prefix, suffix) in _ACCURACY_KEYS.items():
    values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)
              and (name != 'zeroshot' or not k.startswith('zeroshot/demo_heldout'))]
    out[name] = round(100 * float(np.mean(values)), 3) if values else float('nan')
  return out


def _prune_layer(depth: int) -> int:
  """Where the demo prunes: a quarter of the way in (Patch Ranking: block 4 of ViT-B's 12)."""
  return depth // 4


def _demo_settings(model_config, quick: bool) -> Tuple[List[Tuple[str, str]], List[int]]:
  """(method, inference spec) pairs for a demo model, and its smaller image sides."""
  from mobileclip_jax.models import mci  # pylint: disable=g-import-not-at-top
  out, first = [], _prune_layer(model_config.text.layers)
  out += [('tome', f'text.merge={r}') for r in ((2,) if quick else (2, 4, 6))]
  out.append(('cut_padding', 'text.cut_padding=1'))
  keeps = (0.5,) if quick else (0.7, 0.5, 0.3)
  for method in ('learned', 'random', 'attention'):
    out += [(f'text_prune_{method}',
             f'text.prune={method},text.keep={k},text.prune_layers={first}') for k in keeps]
  image, side = model_config.image, model_config.image_size
  if isinstance(image, mci.MCiConfig):
    out += [('image_tome', f'image.merge={r}') for r in ((2,) if quick else (2, 4))]
    stride = image.stride
  else:
    out += [('image_tome', f'image.merge={r}') for r in ((2,) if quick else (1, 2, 3))]
    for method in ('learned', 'random', 'attention'):
      out += [(f'image_prune_{method}', f'image.prune={method},image.keep={k},'
               f'image.prune_layers={_prune_layer(image.depth)}') for k in keeps]
    stride = image.patch_size
  low = [side - k * stride for k in (1, 2) if side - k * stride >= max(stride, side // 2)]
  out += [('resolution', f'image_size={s}') for s in low]
  if low:
    for tau in ((0.02,) if quick else (0.005, 0.01, 0.02, 0.05)):
      out.append(('cascade', f'cascade_size={low[-1]},cascade_tau={tau}'))
    for tau in ((0.99,) if quick else (0.95, 0.98, 0.99, 0.995)):
      out.append(('selector', f'selector_tau={tau}'))
    if isinstance(image, mci.MCiConfig):
      out += [('resolution_bn', f'image_size={s},bn_stats=1') for s in low]
      out += [('selector_bn', f'selector_tau={tau},bn_stats=1')
              for tau in ((0.99,) if quick else (0.98, 0.99))]
  return out, low


def _unit_gflops(model, variables, tower: str, spec, artifacts, side: int) -> float:
  """GFLOPs of one text (a demo prompt) or one image at `side`, with `spec`'s reduction."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import embedding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import inference as inference_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  c = model.config
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  if tower == embedding.SELECT:
    tower_pass, extra, _ = inference_lib.selector_pass(artifacts)
    x = np.zeros((1, c.image_size, c.image_size, 3), np.uint8)
    return _flops(embedding.encoder(model, tower, mesh, tower_pass).lower(extra, x).compile()) / 1e9
  name = 'image' if tower == embedding.IMAGE else 'text'
  tower_pass, extra = inference_lib.tower_pass(spec, artifacts, name, side, c.image_size)
  if tower == embedding.IMAGE:
    x = np.zeros((1, c.image_size, c.image_size, 3), np.uint8)
  else:
    x = tokenizer_lib.get_tokenizer(c.tokenizer)(['a photo of a big red circle.'],
                                                 c.text.context_length)
    if spec.text.cut_padding:
      x = embedding.cut_padding(x, mesh)
  fn = embedding.encoder(model, tower, mesh, tower_pass)
  return _flops(fn.lower({**variables, **extra}, x).compile()) / 1e9


def _accuracy_rows(workdir: str, role: str, train_samples: int, reducer_dir: str,
                   quick: bool) -> Iterator[Dict[str, Any]]:
  from mobileclip_jax import embedding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import inference as inference_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import reducers  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.evaluation import datasets  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.evaluation import evaluator as ev_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.demo import recipe  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.demo import hparams as demo_settings  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, recipe.SETTINGS_FILE), encoding='utf-8') as f:
    stored = json.load(f)
  demo = demo_settings.DemoSettings(seed=stored['seed'], eval_samples=stored['eval_samples'],
                                    teacher_seeds=tuple(stored['teacher_seeds']))
  model, variables = runner.load_model(
      checkpoint_dir=recipe.run_dirs(workdir, role, demo)[0])  # The role's first seed.
  c = model.config
  settings, low = _demo_settings(c, quick)
  out_dir = os.path.join(reducer_dir, role)
  train = datasets.open_source(dict(kind='demo', split='train', num_samples=train_samples,
                                    seed=stored['seed'], num_captions=2),
                               datasets.RETRIEVAL, c.image_size)
  tasks = [(inference_lib.TEXT_RANKER, reducers.Settings(layer=_prune_layer(c.text.layers)))]
  if hasattr(c.image, 'depth'):
    tasks.append((inference_lib.IMAGE_RANKER,
                  reducers.Settings(layer=_prune_layer(c.image.depth))))
  if low:
    tasks.append((inference_lib.SELECTOR, reducers.Settings(sizes=tuple(low))))
    if not hasattr(c.image, 'depth'):
      tasks.append((inference_lib.BN_STATS, reducers.Settings(sizes=tuple(low))))
  reports = {}
  for task, task_settings in tasks:
    meta = reducers.run(task, model, variables, train, out_dir,
                        dataclasses.replace(task_settings, epochs=5 if quick else 30))
    reports[task] = meta.get('report')
  yield {'part': 'reducers', 'model': role, 'reports': reports}
  mesh = sharding.create_mesh()
  entries = demo_settings.eval_entries(demo)
  base = None
  for method, text in [('none', '')] + settings:
    spec = inference_lib.parse(text)
    # The cascade needs zero-shot classes: its rows have no retrieval numbers.
    chosen = {k: v for k, v in entries.items() if v['type'] == 'zeroshot' or not spec.cascade_size}
    evaluators = ev_lib.build_evaluators(chosen, c, mesh, inference=text, inference_dir=out_dir)
    metrics = runner.run_evaluators(model, variables, evaluators)['metrics']
    artifacts = inference_lib.load_artifacts(out_dir, spec, c)
    text_gflops = _unit_gflops(model, variables, embedding.TEXT, spec, artifacts, 0)
    if spec.dynamic:
      shares = {int(k.split('/at_')[1][:-2]): v for k, v in metrics.items()
                if k.startswith('zeroshot/demo/at_')}
      image_gflops = sum(share * _unit_gflops(model, variables, embedding.IMAGE, spec,
                                              artifacts, side) for side, share in shares.items())
      if spec.cascade_size:  # Every image ran at cascade_size first.
        image_gflops = (_unit_gflops(model, variables, embedding.IMAGE, spec, artifacts,
                                     spec.cascade_size) +
                        shares.get(c.image_size, 0.0) * _unit_gflops(
                            model, variables, embedding.IMAGE, spec, artifacts, c.image_size))
      else:
        image_gflops += _unit_gflops(model, variables, embedding.SELECT, spec, artifacts, 0)
    else:
      image_gflops = _unit_gflops(model, variables, embedding.IMAGE, spec, artifacts,
                                  spec.image_size or c.image_size)
    summary = _summary(metrics)
    base = base or dict(summary, text_gflops=text_gflops, image_gflops=image_gflops)
    row = {'part': 'accuracy', 'model': role, 'method': method, 'setting': text,
           'text_gflops': round(text_gflops, 6), 'image_gflops': round(image_gflops, 6),
           'text_gflops_ratio': round(text_gflops / base['text_gflops'], 4),
           'image_gflops_ratio': round(image_gflops / base['image_gflops'], 4), **summary}
    row.update({f'{k}_change': round(summary[k] - base[k], 3) for k in _ACCURACY_KEYS})
    row['metrics'] = {k: round(v, 5) for k, v in metrics.items()}
    yield row


def plot(rows: Sequence[Dict[str, Any]], plot_dir: str) -> List[str]:
  """Accuracy against GFLOPs per method, one PNG per demo model (text and image panels)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import utils  # pylint: disable=g-import-not-at-top
  written = []
  for role in sorted({r['model'] for r in rows}):
    mine = [r for r in rows if r['model'] == role]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, tower in zip(axes, ('text', 'image')):
      base = mine[0]
      for method in sorted({r['method'] for r in mine}):
        points = [r for r in mine if r['method'] in (method, 'none') and (
            r['method'] == 'none' or r[f'{tower}_gflops_ratio'] != 1.0)]
        if method == 'none' or len(points) < 2:
          continue
        points.sort(key=lambda r: r[f'{tower}_gflops'])
        ax.plot([r[f'{tower}_gflops'] for r in points], [r['zeroshot'] for r in points],
                marker='o', label=method)
      ax.scatter([base[f'{tower}_gflops']], [base['zeroshot']], c='k', zorder=3,
                 label='unreduced')
      ax.set_xlabel(f'{tower} tower GFLOPs per {"text" if tower == "text" else "image"}')
      ax.set_ylabel('demo zero-shot top-1 (%)')
      ax.set_title(f'{role}: {tower} tower')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(plot_dir, f'efficiency_{role}.png')
    with utils.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
    written.append(path)
  return written


# ---------------------------------------------------------------- orchestration


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields the cost rows, then the demo's reducer reports and accuracy rows, then the plots."""
  quick, overrides = common.common_options(options, _OPTIONS, 'efficiency',
                                           '{"text": {"layers": 2}}')
  parts = common.option_list(options, 'parts', ('cost', 'accuracy'))
  bad = sorted(set(parts) - {'cost', 'accuracy'})
  if bad:
    raise ValueError(f'parts={",".join(parts)}: {bad} not in cost, accuracy.')
  variants = common.option_list(options, 'variants',
                                DEFAULT_VARIANTS[:1] if quick else DEFAULT_VARIANTS)
  towers = common.option_list(options, 'towers', ('image', 'text'))
  if sorted(set(towers) - {'image', 'text'}):
    raise ValueError(f'towers={",".join(towers)}: only image and text.')
  batch_sizes = common.option_list(options, 'batch_sizes', (1,) if quick else (1, 64), int)
  heavy = common.option_list(options, 'heavy', ('MobileCLIP2-L-14',))
  heavy_batches = common.option_list(options, 'heavy_batch_sizes', (1,), int)
  repeats = common.option_scalar(options, 'repeats', 3, int)
  if repeats < 1 or not batch_sizes or min(batch_sizes + heavy_batches) < 1:
    raise ValueError('repeats and batch sizes must be >= 1.')
  if 'cost' in parts:
    for variant in variants:
      for tower in towers:
        sizes = heavy_batches if variant in heavy else batch_sizes
        yield from common.isolated(__name__, '_cost_rows', dict(
            variant=variant, tower=tower, batch_sizes=sizes, repeats=repeats, quick=quick,
            overrides=overrides), timeout=4 * 3600)['rows']
  workdir = options.get('demo', '')
  if 'accuracy' in parts and workdir:
    roles = common.option_list(options, 'demo_models', ('student_dr', 'teacher_a'))
    train_samples = common.option_scalar(options, 'train_samples', 200 if quick else 1000, int)
    reducer_dir = options.get('reducer_dir') or os.path.join(
        tempfile.gettempdir(), 'mobileclip_efficiency_reducers')
    rows = []
    for role in roles:
      for row in _accuracy_rows(os.path.expanduser(workdir), role, train_samples, reducer_dir,
                                quick):
        if row['part'] == 'accuracy':
          rows.append(row)
        yield row
    paths = plot(rows, options.get('plot_dir') or 'efficiency_plots')
    yield {'part': 'plots', 'paths': paths}


def _cost_rows(**kwargs) -> Dict[str, Any]:
  """`measure_cost` as a dict (what `common.isolated` returns)."""
  return {'rows': measure_cost(**kwargs)}

"""Training the learned parts of cheaper inference (launch/train_reducer.py; inference.py reads
them).

  text_ranker / image_ranker  Patch Ranking (Wu et al., WACV 2025) for a transformer tower.
      Golden scores by feature preservation: for every window of rows at the prune layer (w
      consecutive text positions, or w x w patches), the tower runs with the window removed from
      that layer on (its keys masked after the layer's attention, as pruning would drop it), and
      s(window) = cosine(pooled embedding, pooled embedding without the window). A row's
      importance is 1 - the mean s of the windows that hold it. The protected rows (SOT, EOT,
      class token) and causal padding are never scored. The scores and the layer's features are
      stored (`<task>.golden.npz`), then the Mix-MLP ranker is trained on them with the listwise
      ranking loss (reduce.ranking_loss), keeping a held-out tenth for its top-k overlap.
  resolution_selector  DRNet-style: each image is embedded at every candidate side; the target
      of a side is log(1 - cosine to the full-size embedding) (no labels); a small CNN on a
      low-resolution copy learns it (mean squared error). At inference the selector picks the
      smallest side whose predicted cosine is >= selector_tau.
  bn_stats  BatchNorm statistics of the image tower re-estimated at each side (precise BN: the
      mean of the per-batch train-mode statistics over calibration images), for MCi towers
      evaluated below their training resolution.

Data come from an evaluation source (evaluation/datasets.py): its images, and as texts its
captions (retrieval) or its prompts (zero-shot classes x templates). Single process, local
device; the towers run on the same variables as evaluation.
"""
import dataclasses
import logging
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mobileclip_jax import embedding
from mobileclip_jax import inference as inference_lib
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import base as eval_base
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import templates as templates_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mci
from mobileclip_jax.models import reduce as reduce_lib

TASKS = (inference_lib.TEXT_RANKER, inference_lib.IMAGE_RANKER, inference_lib.SELECTOR,
         inference_lib.BN_STATS)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to train a learned part (defaults follow Patch Ranking's predictor training)."""
  layer: int = 3                 # Rankers: the block after whose attention they score rows.
  window: int = 0                # Golden windows: text rows / patches a side (0 = 1 / 2).
  dim: int = 0                   # Ranker width (0 = the tower's width / 8, in [8, 64]).
  sizes: Tuple[int, ...] = ()    # Selector / bn_stats: the smaller sides (the model's is added).
  selector_input: int = 0        # Selector input side (0 = a quarter of the model's, >= 16).
  epochs: int = 30
  batch_size: int = 64
  lr: float = 1e-3
  weight_decay: float = 1e-4
  heldout: float = 0.1           # Share of examples kept out of training for the report.
  seed: int = 0


# ----------------------------------------------------------------------------------------------
# Inputs.


def texts_of(data: datasets.EvalData) -> List[str]:
  """The texts of a source: retrieval captions, or every zero-shot prompt."""
  if data.tasks:
    return [p for t in data.tasks for p in templates_lib.prompts(t.classnames, t.templates)]
  return [c for i in range(len(data.examples)) for c in data.examples[i].captions]


def images_of(data: datasets.EvalData, model_config) -> np.ndarray:
  """uint8 [N, S, S, 3]: every image at the model's side (evaluation preprocessing)."""
  c = model_config
  return np.stack([eval_base.load_image(e.image, c.image_size, c.interpolation, e.where)
                   for e in (data.examples[i] for i in range(len(data.examples)))])


def _batches(n: int, batch: int):
  for start in range(0, n, batch):
    yield start, min(n, start + batch)


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x


# ----------------------------------------------------------------------------------------------
# Golden scores.


def _window_masks(tower: str, rows: int, window: int) -> np.ndarray:
  """bool [W, rows]: which rows each window removes (text: w consecutive rows; image: w x w
  patches of the square grid after the class token)."""
  if tower == 'text':
    return np.stack([(np.arange(rows) >= i) & (np.arange(rows) < i + window)
                     for i in range(rows - window + 1)])
  grid = math.isqrt(rows - 1)
  if grid * grid != rows - 1:
    raise ValueError(f'{rows - 1} patch rows are not a square grid.')
  out = []
  for i in range(grid - window + 1):
    for j in range(grid - window + 1):
      m = np.zeros((grid, grid), bool)
      m[i:i + window, j:j + window] = True
      out.append(np.concatenate([[False], m.ravel()]))
  return np.stack(out)


def golden_scores(model, variables, tower: str, inputs: np.ndarray, layer: int, window: int,
                  batch_size: int = 64) -> Dict[str, np.ndarray]:
  """Feature-preservation golden scores (module docstring) of `inputs` at block `layer`.

  Args:
    inputs: int32 tokens [N, L] or normalized float32 images [N, S, S, 3].

  Returns:
    'features' float16 [N, R, C] (the rows at the layer), 'scores' float32 [N, R] (importance,
    higher = keep) and 'valid' bool [N, R] (the rows that can be pruned).
  """
  method = embedding.TEXT if tower == 'text' else embedding.IMAGE
  none = reduce_lib.TokenReduction()

  def capture_hook(store, layer_of):
    def extra(i):
      if i != layer_of:
        return None
      def hook(x, q, k, tokens):
        store.update(x=x, tokens=tokens)
        return x, tokens
      return hook
    return extra

  @jax.jit
  def features(variables, x):
    store = {}
    emb = model.apply(variables, x, method=method, reduction=none,
                      extra_hook=capture_hook(store, layer))
    t = store['tokens']
    removable = ~t.protect if t.dead is None else ~t.protect & ~t.dead
    return embedding.unit_rows(emb), store['x'].astype(jnp.float16), removable

  @jax.jit
  def without(variables, x, remove):
    def extra(i):
      if i != layer:
        return None
      def hook(h, q, k, tokens):
        live = jnp.ones(remove.shape, bool) if tokens.live is None else tokens.live
        return h, tokens.replace(live=live & ~(remove & ~tokens.protect))
      return hook
    return embedding.unit_rows(model.apply(variables, x, method=method, reduction=none,
                                           extra_hook=extra))

  out = {'features': [], 'scores': [], 'valid': []}
  masks = None
  for start, end in _batches(len(inputs), batch_size):
    x = _pad_to(inputs[start:end], batch_size)
    full, feats, valid = features(variables, x)
    if masks is None:
      masks = _window_masks(tower, feats.shape[1], window)
      per_row = masks.sum(0).astype(np.float32)
    # Every (example, window) pair of the batch, in chunks of `batch_size` forward passes.
    full = np.asarray(full)
    pairs = np.stack(np.meshgrid(np.arange(end - start), np.arange(len(masks)),
                                 indexing='ij'), -1).reshape(-1, 2)
    sums = np.zeros((end - start, feats.shape[1]), np.float32)
    for p0, p1 in _batches(len(pairs), batch_size):
      e, w = pairs[p0:p1, 0], pairs[p0:p1, 1]
      emb = np.asarray(without(variables, _pad_to(x[e], batch_size),
                               jnp.asarray(_pad_to(masks[w], batch_size))))[:p1 - p0]
      cos = (emb * full[e]).sum(-1)
      np.add.at(sums, e, cos[:, None] * masks[w])
    importance = 1.0 - sums / np.maximum(per_row, 1)
    out['features'].append(np.asarray(feats)[:end - start])
    out['scores'].append(importance)
    out['valid'].append(np.asarray(valid)[:end - start] & (per_row > 0))
    logging.info('Golden scores: %d / %d examples.', end, len(inputs))
  return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Training a small model on stored targets.


def _fit(module, params, loss_fn, arrays: Mapping[str, np.ndarray], settings: Settings,
         what: str):
  """Adam(W) with a cosine schedule over `epochs`; returns the trained params."""
  n = len(next(iter(arrays.values())))
  steps = max(1, settings.epochs * max(1, n // settings.batch_size))
  tx = optax.adamw(optax.cosine_decay_schedule(settings.lr, steps, alpha=0.1),
                   weight_decay=settings.weight_decay)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(module.apply({'params': p}, batch['x']),
                                                       batch))(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(settings.seed)
  batch = min(settings.batch_size, n)
  for epoch in range(settings.epochs):
    order = rng.permutation(n)
    losses = []
    for start in range(0, n - batch + 1, batch):
      idx = order[start:start + batch]
      params, opt, loss = step(params, opt, {k: v[idx] for k, v in arrays.items()})
      losses.append(float(loss))
    if epoch in (0, settings.epochs - 1) or (epoch + 1) % 10 == 0:
      logging.info('%s: epoch %d / %d, loss %.4f.', what, epoch + 1, settings.epochs,
                   np.mean(losses))
  return params


def top_overlap(predicted: np.ndarray, golden: np.ndarray, valid: np.ndarray,
                keep: float = 0.5) -> float:
  """Mean share of the golden top-k rows among the predicted top-k (k = keep * valid rows)."""
  shares = []
  for p, g, v in zip(predicted, golden, valid):
    rows = np.flatnonzero(v)
    k = max(1, int(round(keep * len(rows))))
    if len(rows) <= k:
      continue
    top = lambda s: set(rows[np.argsort(-s[rows], kind='stable')[:k]])
    shares.append(len(top(p) & top(g)) / k)
  return float(np.mean(shares)) if shares else float('nan')


def train_ranker(golden: Mapping[str, np.ndarray], settings: Settings):
  """(params, ranker fields, report) of a Mix-MLP ranker fitted to stored golden scores."""
  n, rows = golden['scores'].shape
  dim = settings.dim or int(np.clip(golden['features'].shape[-1] // 8, 8, 64))
  fields = dict(tokens=int(rows), dim=dim)
  module = reduce_lib.Ranker(**fields)
  held = max(1, int(round(settings.heldout * n))) if n > 1 else 0
  order = np.random.default_rng(settings.seed).permutation(n)
  train, test = order[held:], order[:held]
  arrays = {'x': golden['features'][train].astype(np.float32),
            'golden': golden['scores'][train], 'valid': golden['valid'][train]}
  params = module.init(jax.random.PRNGKey(settings.seed), arrays['x'][:1])['params']
  params = _fit(module, params,
                lambda pred, b: reduce_lib.ranking_loss(pred, b['golden'], b['valid']), arrays,
                settings, 'ranker')
  report = {'train_examples': int(len(train)), 'heldout_examples': int(held)}
  if held:
    predicted = np.asarray(jax.jit(module.apply)({'params': params},
                                                 golden['features'][test].astype(np.float32)))
    report['heldout_top50_overlap'] = top_overlap(predicted, golden['scores'][test],
                                                  golden['valid'][test])
    rand = np.random.default_rng(settings.seed + 1).random(predicted.shape)
    report['random_top50_overlap'] = top_overlap(rand, golden['scores'][test],
                                                 golden['valid'][test])
  return params, fields, report


def selector_targets(model, variables, images: np.ndarray, sides: Sequence[int],
                     input_side: int, batch_size: int = 64) -> Dict[str, np.ndarray]:
  """'inputs' float32 [N, s, s, 3] (the selector's view) and 'cosines' [N, R] of each side's
  embedding to the full-size one (sides ascending, the model's last)."""
  c = model.config

  @jax.jit
  def run(variables, images):
    x = preprocess.normalize(images, c.mean, c.std)
    embs = [embedding.unit_rows(model.apply(variables, reduce_lib.resize(x, s, c.interpolation),
                                            method=embedding.IMAGE)) for s in sides]
    cos = jnp.stack([(e * embs[-1]).sum(-1) for e in embs], axis=-1)
    return reduce_lib.resize(x, input_side, 'bilinear'), cos

  inputs, cosines = [], []
  for start, end in _batches(len(images), batch_size):
    small, cos = run(variables, _pad_to(images[start:end], batch_size))
    inputs.append(np.asarray(small)[:end - start])
    cosines.append(np.asarray(cos)[:end - start])
  return {'inputs': np.concatenate(inputs), 'cosines': np.concatenate(cosines)}


def train_selector(targets: Mapping[str, np.ndarray], sides: Sequence[int], input_side: int,
                   settings: Settings):
  """(params, selector fields, report) of a ResolutionSelector fitted to measured cosines."""
  fields = dict(num_sizes=len(sides), input_size=input_side)
  module = reduce_lib.ResolutionSelector(**fields)
  n = len(targets['inputs'])
  held = max(1, int(round(settings.heldout * n))) if n > 1 else 0
  order = np.random.default_rng(settings.seed).permutation(n)
  train, test = order[held:], order[:held]
  arrays = {'x': targets['inputs'][train],
            'target': np.asarray(reduce_lib.selector_target(targets['cosines'][train]))}
  params = flax.core.unfreeze(
      module.init(jax.random.PRNGKey(settings.seed), arrays['x'][:1])['params'])
  params['head']['bias'] = jnp.asarray(arrays['target'].mean(0))  # Start at the mean target.
  params = _fit(module, params, lambda pred, b: jnp.mean((pred - b['target']) ** 2), arrays,
                settings, 'selector')
  report = {'train_examples': int(len(train)), 'heldout_examples': int(held),
            'mean_cosine': [float(v) for v in targets['cosines'].mean(0)]}
  if held:
    predicted = np.asarray(jax.jit(module.apply)({'params': params}, targets['inputs'][test]))
    want = np.asarray(reduce_lib.selector_target(targets['cosines'][test]))
    report['heldout_rmse'] = float(np.sqrt(np.mean((predicted - want) ** 2)))
    report['heldout_rmse_of_mean'] = float(np.sqrt(np.mean((want - want.mean(0)) ** 2)))
  return params, fields, report


def bn_statistics(model, variables, images: np.ndarray, side: int,
                  batch_size: int = 64) -> Dict[str, Any]:
  """The image tower's BatchNorm statistics at `side`: the mean over calibration batches of
  each layer's train-mode batch mean and (unbiased) variance (precise BN).

  A train-mode apply from zero running statistics leaves momentum * the batch statistics, so
  dividing by the momentum reads them back exactly.
  """
  if not isinstance(model.config.image, mci.MCiConfig) or 'visual' not in variables.get(
      'batch_stats', {}):
    raise ValueError('bn_stats needs the train-time form of an MCi image tower (BatchNorm '
                     'statistics); this model has none.')
  c, momentum = model.config, layers.BatchNorm.momentum
  zero = jax.tree.map(jnp.zeros_like, variables['batch_stats']['visual'])

  @jax.jit
  def batch_stats(variables, images):
    x = reduce_lib.resize(preprocess.normalize(images, c.mean, c.std), side, c.interpolation)
    v = {**variables, 'batch_stats': {**variables['batch_stats'], 'visual': zero}}
    _, updated = model.apply(v, x, True, method=embedding.IMAGE, mutable=['batch_stats'])
    return jax.tree.map(lambda s: s / momentum, updated['batch_stats']['visual'])

  total, count = None, 0
  for start, end in _batches(len(images), batch_size):
    if end - start < batch_size and count:
      break  # A short last batch would weigh as much as a full one.
    stats = batch_stats(variables, images[start:end])
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  return jax.tree.map(lambda s: np.asarray(s / count), total)


# ----------------------------------------------------------------------------------------------
# The tasks.


def _sides(model_config, settings: Settings) -> Tuple[int, ...]:
  full = model_config.image_size
  sides = tuple(sorted(set(settings.sizes) - {full}))
  if not sides:
    raise ValueError('Give the smaller image sides to consider (--sizes).')
  for s in sides:
    inference_lib.check_side(model_config, s)
    if s > full:
      raise ValueError(f'Side {s} exceeds the model\'s {full}; dynamic resolution only shrinks.')
  return sides + (full,)


def _reuse_or_compute(path: str, compute: Callable[[], Dict[str, np.ndarray]],
                      meta: Mapping[str, Any], reuse: bool) -> Dict[str, np.ndarray]:
  """Stored targets (`<task>.golden.npz`) when they were made the same way, else computed."""
  if reuse and os.path.exists(path):
    tree, stored = inference_lib.load_artifact(path)
    if {k: stored.get(k) for k in meta} == dict(meta):
      logging.info('Reusing the stored targets %s.', path)
      return tree
    logging.info('%s was made differently; computing again.', path)
  tree = compute()
  inference_lib.save_artifact(path, tree, dict(meta, kind='targets'))
  return tree


def run(task: str, model, variables, data: datasets.EvalData, out_dir: str,
        settings: Settings = Settings(), reuse: bool = True) -> Dict[str, Any]:
  """Trains one learned part (`TASKS`) and writes `<out_dir>/<task>.npz`; returns its meta."""
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; tasks: {", ".join(TASKS)}.')
  c = model.config
  tower = 'text' if task == inference_lib.TEXT_RANKER else 'image'
  fit = inference_lib.tower_fingerprint(c, tower)
  meta: Dict[str, Any] = {'kind': task, 'fit': fit, 'source': data.description,
                          'settings': dataclasses.asdict(settings)}
  targets_path = os.path.join(out_dir, f'{task}.golden.npz')
  if task in (inference_lib.TEXT_RANKER, inference_lib.IMAGE_RANKER):
    if task == inference_lib.IMAGE_RANKER and isinstance(c.image, mci.MCiConfig):
      raise ValueError('MCi image towers only merge tokens; rankers are for ViT towers.')
    window = settings.window or (1 if tower == 'text' else 2)
    if tower == 'text':
      inputs = tokenizer_lib.get_tokenizer(c.tokenizer)(texts_of(data), c.text.context_length)
    else:
      inputs = preprocess.normalize(images_of(data, c), c.mean, c.std)
    how = {'fit': fit, 'source': data.description, 'layer': settings.layer, 'window': window,
           'count': int(len(inputs))}
    golden = _reuse_or_compute(targets_path, lambda: golden_scores(
        model, variables, tower, inputs, settings.layer, window, settings.batch_size), how, reuse)
    params, fields, report = train_ranker(golden, settings)
    meta.update(layer=settings.layer, window=window, ranker=fields, report=report)
  elif task == inference_lib.SELECTOR:
    sides = _sides(c, settings)
    input_side = settings.selector_input or max(16, c.image_size // 4)
    images = images_of(data, c)
    how = {'fit': fit, 'source': data.description, 'sizes': list(sides),
           'input': input_side, 'count': int(len(images))}
    targets = _reuse_or_compute(targets_path, lambda: selector_targets(
        model, variables, images, sides, input_side, settings.batch_size), how, reuse)
    params, fields, report = train_selector(targets, sides, input_side, settings)
    meta.update(sizes=list(sides), selector=fields, report=report)
  else:
    sides = _sides(c, settings)[:-1]
    images = images_of(data, c)
    params = {str(s): bn_statistics(model, variables, images, s, settings.batch_size)
              for s in sides}
    meta.update(sizes=list(sides), report={'calibration_images': int(len(images))})
  inference_lib.save_artifact(os.path.join(out_dir, f'{task}.npz'),
                              flax.core.unfreeze(params), meta)
  return meta

"""Cheaper inference through the evaluators and the reducer tools (inference.py, reducers.py).

Identity cases exact: the confidence cascade at the model's own side, with tau 0 (nothing re-run:
the low-side pass) and with a tau every margin is below (everything re-run: the full pass). The
selector's grouping by side gives each image the embedding it has when every image is encoded at
that side. Golden scores (keys masked after the layer's attention) equal the cosines of the
tower run with the same row physically pruned at that layer. Precise-BN statistics equal the
batch statistics of the first BatchNorm's input computed with lax.conv.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import embedding
from mobileclip_jax import inference as inference_lib
from mobileclip_jax import reducers
from mobileclip_jax import sharding
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import evaluator as evaluator_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import reduce as reduce_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = dict(kind='demo', split='val', num_samples=24, tasks='shape,color')
TRAIN = dict(kind='demo', split='train', num_samples=8, num_captions=1)


@pytest.fixture(scope='module')
def vit():
  """A tiny ViT CLIP (causal text) with random weights of order 1."""
  config = clip_lib.get_config(
      'MobileCLIP2-B', image_size=32, embed_dim=16,
      image=dict(width=32, depth=3, heads=2, stem='patch', patch_size=8),
      text=dict(width=32, heads=2, layers=2, context_length=24))
  model = clip_lib.CLIP(config)
  variables = jax.jit(functools.partial(clip_lib.init_variables, model))(jax.random.PRNGKey(0))
  return model, jax.tree.map(np.asarray, variables)


def _zeroshot(model, inference='', inference_dir=''):
  return evaluator_lib.build_evaluator(
      'd', dict(type='zeroshot', source=TASKS, batch_size=8, inference=inference,
                inference_dir=inference_dir), model.config,
      sharding.create_mesh(devices=jax.devices()[:1]))


def _images(ev, model, variables, cascade=True):
  """The evaluator's image embeddings (after the cascade's second pass)."""
  v = embedding.place_variables(variables, ev.mesh)
  images = ev.encode_images(model, v, ev._labels, {'labels': (2,)})
  if cascade and ev.inference.cascade_size:
    text = ev.embed_text(model, v, ev._prompt_stream(), ('index',))['embeddings']
    ev._cascade(model, v, images, ev._classifiers(text))
  return images


def test_cascade_identity_cases_are_exact(vit):
  model, variables = vit
  full = _images(_zeroshot(model), model, variables)['embeddings']
  low = _images(_zeroshot(model, 'image_size=16'), model, variables)['embeddings']
  assert np.abs(full - low).max() > 1e-3  # The sides differ.
  same_side = _images(_zeroshot(model, 'cascade_size=32,cascade_tau=0.5'), model, variables)
  np.testing.assert_array_equal(same_side['embeddings'], full)
  nothing = _images(_zeroshot(model, 'cascade_size=16,cascade_tau=0'), model, variables)
  np.testing.assert_array_equal(nothing['embeddings'], low)
  assert np.all(nothing['side'] == 16)
  everything = _images(_zeroshot(model, 'cascade_size=16,cascade_tau=10'), model, variables)
  np.testing.assert_array_equal(everything['embeddings'], full)
  # A tau between: some images re-run (exactly those under the margin), the rest kept.
  some = _zeroshot(model, 'cascade_size=16,cascade_tau=0.02')
  mixed = _images(some, model, variables)
  rerun = mixed['side'] == 32
  assert 0 < rerun.sum() < len(rerun)
  np.testing.assert_array_equal(mixed['embeddings'][rerun], full[rerun])
  np.testing.assert_array_equal(mixed['embeddings'][~rerun], low[~rerun])
  metrics = some.run(model, variables)
  assert metrics['zeroshot/d/at_32px'] == pytest.approx(rerun.mean())


def test_selector_groups_images_by_side_with_the_embeddings_of_that_side(vit, tmp_path):
  model, variables = vit
  c = model.config
  sides = (16, 24, 32)
  selector = reduce_lib.ResolutionSelector(num_sizes=3, input_size=16)
  params = selector.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))['params']
  meta = dict(kind=inference_lib.SELECTOR, fit=inference_lib.tower_fingerprint(c, 'image'),
              sizes=list(sides), selector=dict(num_sizes=3, input_size=16))
  inference_lib.save_artifact(str(tmp_path / 'resolution_selector.npz'),
                              jax.tree.map(np.asarray, params), meta)
  # A tau at the median of the predicted cosine of side 16: about half the images take it.
  ev = _zeroshot(model)
  predicted = np.asarray(jax.jit(selector.apply)({'params': params}, jnp.asarray(
      np.stack([ev._load(i)[0] for i in range(24)]), jnp.float32) / 255.0))
  tau = float(1 - np.exp(np.median(predicted[:, 0])))
  ev = _zeroshot(model, f'selector_tau={tau}', str(tmp_path))
  got = _images(ev, model, variables)
  assert len(set(got['side'])) >= 2
  for side in set(got['side']):
    at_side = _images(_zeroshot(model, f'image_size={side}' if side != 32 else ''), model,
                      variables)['embeddings']
    rows = got['side'] == side
    np.testing.assert_allclose(got['embeddings'][rows], at_side[rows], atol=1e-6)
  np.testing.assert_array_equal(got['index'], np.arange(24))


def test_golden_scores_equal_cosines_of_the_tower_with_the_row_pruned(vit):
  model, variables = vit
  tokens = tokenizer_lib.get_tokenizer('clip')(['a red square',
                                                'two blue circles on a green field'], 24)
  golden = reducers.golden_scores(model, variables, 'text', tokens, layer=1, window=1,
                                  batch_size=8)
  eot = np.argmax(tokens, -1)
  for row in range(2):
    valid = golden['valid'][row]
    # SOT, EOT and the causal padding are never scored.
    assert not valid[0] and not valid[eot[row]] and not valid[eot[row] + 1:].any()
    assert valid[1:eot[row]].all()
  full = np.asarray(embedding.unit_rows(model.apply(variables, tokens, method='encode_text')))

  @functools.partial(jax.jit, static_argnums=2)
  def pruned(row_tokens, scores, keep):
    # Keep `keep` of the rows: the ranker's scores put row t last.
    spec = reduce_lib.TokenReduction(prune='learned', keep=keep, prune_layers=(1,))
    return embedding.unit_rows(model.apply(variables, row_tokens, method='encode_text',
                                           reduction=spec, ranker=lambda x: scores))[0]

  for row in range(2):
    for t in (1, 2):
      # Keep eot of the eot + 1 live rows: the (dead, exactly removable) padding and row t go.
      scores = jnp.asarray(np.where(np.arange(24) == t, -1.0, 1.0)[None])
      got = np.asarray(pruned(tokens[row:row + 1], scores, float(eot[row] / 24)))
      np.testing.assert_allclose(golden['scores'][row, t], 1 - got @ full[row], atol=1e-5)


@pytest.mark.slow  # Three launcher processes, each compiling the towers again.
def test_ranker_training_and_learned_pruning_through_evaluate(vit, tmp_path):
  model, variables = vit
  run_dir = tmp_path / 'model'
  checkpoint.save_variables(str(run_dir), variables, model.config)
  common = [sys.executable, os.path.join(ROOT, 'launch', 'train_reducer.py'),
            f'--checkpoint={run_dir}', f'--source={json.dumps(TRAIN)}', '--epochs=2']
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  for task in ('text_ranker', 'image_ranker'):
    out = subprocess.run(common + [f'--task={task}', '--layer=1'], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index('{'):])['report']
    assert report['train_examples'] + report['heldout_examples'] > 0
  folder = run_dir / 'inference'
  assert sorted(os.listdir(folder)) == ['image_ranker.golden.npz', 'image_ranker.npz',
                                        'text_ranker.golden.npz', 'text_ranker.npz']
  spec = ('text.prune=learned,text.keep=0.5,text.prune_layers=1,'
          'image.prune=learned,image.keep=0.5,image.prune_layers=1')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'),
                        f'--checkpoint={run_dir}', '--eval=demo', '--limit=8',
                        f'--inference={spec}', f'--out={tmp_path / "r.json"}'],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads((tmp_path / 'r.json').read_text())
  assert inference_lib.parse(result['inference']) == inference_lib.parse(spec)
  # A ranker for another block is refused with a line that says so.
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'),
                        f'--checkpoint={run_dir}', '--eval=demo', '--limit=8',
                        '--inference=text.prune=learned,text.keep=0.5,text.prune_layers=0'],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode != 0 and 'ranks the tokens of block 1' in out.stderr + out.stdout


@pytest.mark.slow  # An MCi tower's train-mode compile.
def test_precise_bn_statistics_equal_the_batch_statistics_of_the_first_layer():
  config = clip_lib.get_config('MobileCLIP2-S0', image_size=64, embed_dim=16,
                               image=dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)),
                               text=dict(width=32, heads=2, layers=1, context_length=24))
  model = clip_lib.CLIP(config)
  variables = jax.jit(functools.partial(clip_lib.init_variables, model))(jax.random.PRNGKey(0))
  images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), np.uint8)
  stats = reducers.bn_statistics(model, variables, images, 32, batch_size=4)
  x = reduce_lib.resize(jnp.asarray((images / 255.0 - np.asarray(config.mean)) /
                                    np.asarray(config.std), jnp.float32), 32, 'bilinear')
  kernel = variables['params']['visual']['stem_0']['conv_kxk_0']['conv']['kernel']
  y = np.asarray(jax.lax.conv_general_dilated(x, kernel, (2, 2), [(1, 1), (1, 1)],
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  batches = y.reshape(2, -1, y.shape[-1])
  want_mean = batches.mean(1).mean(0)
  want_var = batches.var(1, ddof=1).mean(0)
  got = stats['stem_0']['conv_kxk_0']['bn']
  np.testing.assert_allclose(got['mean'], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['var'], want_var, rtol=1e-4, atol=1e-5)

"""Cheaper inference (models/reduce.py, inference.py): token merging, pruning, dynamic resolution.

References: ToMe's bipartite soft matching and merge_wavg re-implemented in plain numpy loops from
the paper (Bolya et al., ICLR 2023, Alg. 1 and its size-weighted average); proportional
attention against attention over the unmerged (duplicated) tokens, for softmax and sigmoid;
Patch Ranking's listwise loss against its numpy formula. Identity cases (merge 0, keep rate 1,
sides equal to the model's, cascade tau 0) must give bit-identical outputs; the padding cut of a
causal text tower must equal the uncut tower up to float summation order, while a bidirectional
tower's output changes by O(1) (so the tolerance is tight enough to fail on a real change).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileclip_jax import embedding
from mobileclip_jax import inference as inference_lib
from mobileclip_jax import sharding
from mobileclip_jax.models import attention
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import layers
from mobileclip_jax.models import mci
from mobileclip_jax.models import reduce as reduce_lib

TR = reduce_lib.TokenReduction
SOT, EOT = 49406, 49407


# ---------------------------------------------------------------- tiny models


def _vit_clip(causal=True, **text):
  return clip_lib.get_config(
      'MobileCLIP2-B', image_size=32, embed_dim=16,
      image=dict(width=32, depth=3, heads=2, stem='patch', patch_size=8),
      text=dict(width=32, heads=2, layers=3, context_length=24, causal=causal, **text))


def _mci_clip():
  return clip_lib.get_config('MobileCLIP2-S0', image_size=64, embed_dim=16,
                             image=dict(depths=(1, 1, 1, 2), widths=(8, 16, 32, 64)),
                             text=dict(width=32, heads=2, layers=2, context_length=24))


def _init(config, seed=0):
  model = clip_lib.CLIP(config)
  variables = jax.jit(functools.partial(clip_lib.init_variables, model))(jax.random.PRNGKey(seed))
  # Non-trivial layer scales, so that the MCi attention blocks matter.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 2e4 if 'gamma' in jax.tree_util.keystr(p) else x, variables)
  return model, variables


def _tokens(lengths, context):
  rng = np.random.default_rng(len(lengths))
  out = np.zeros((len(lengths), context), np.int32)
  for i, n in enumerate(lengths):
    out[i, 0], out[i, n - 1] = SOT, EOT
    out[i, 1:n - 1] = rng.integers(1, 49000, n - 2)
  return out


def _apply(model, variables, tower, x, **kwargs):
  fn = jax.jit(lambda v, x: model.apply(v, x, method=tower, **kwargs))
  return np.asarray(fn(variables, x))


# ---------------------------------------------------------------- ToMe against numpy


def _tome_reference(x, metric, size, r, protect_first):
  """ToMe on one example, in loops: A = even rows, B = odd rows; each A row's best B partner by
  cosine; the r A rows with the best partners merge into them by size-weighted averaging.
  Returns (rows, sizes): the unmerged A rows in index order, then the B rows."""
  m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a_rows, b_rows = list(range(0, len(x), 2)), list(range(1, len(x), 2))
  best, best_score = [], []
  for i in a_rows:
    sims = [float(m[i] @ m[j]) for j in b_rows]
    if protect_first and i == 0:
      sims = [-np.inf] * len(sims)
    best.append(int(np.argmax(sims)))
    best_score.append(max(sims))
  order = sorted(range(len(a_rows)), key=lambda i: -best_score[i])  # Stable: ties by index.
  merged = set(order[:r])
  total = {j: x[b] * size[b] for j, b in enumerate(b_rows)}
  weight = {j: size[b] for j, b in enumerate(b_rows)}
  for i in order[:r]:
    total[best[i]] = total[best[i]] + x[a_rows[i]] * size[a_rows[i]]
    weight[best[i]] = weight[best[i]] + size[a_rows[i]]
  rows = [x[a] for i, a in enumerate(a_rows) if i not in merged]
  sizes = [size[a] for i, a in enumerate(a_rows) if i not in merged]
  rows += [total[j] / weight[j] for j in range(len(b_rows))]
  sizes += [weight[j] for j in range(len(b_rows))]
  return np.stack(rows), np.asarray(sizes)


@pytest.mark.parametrize('n,r,protect', [(9, 3, True), (10, 5, False), (7, 2, True)])
def test_bipartite_matching_and_weighted_merge_equal_numpy_tome(n, r, protect):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(2, n, 6)).astype(np.float32)
  metric = rng.normal(size=(2, n, 5)).astype(np.float32)
  size = rng.integers(1, 4, size=(2, n)).astype(np.float32)
  tokens = reduce_lib.sequence_tokens(2, n)
  tokens = tokens.replace(size=jnp.asarray(size),
                          protect=tokens.protect if protect else jnp.zeros((2, n), bool))
  m = reduce_lib.bipartite_soft_matching(jnp.asarray(metric), r, tokens.protect)
  got, got_tokens = reduce_lib.merge_tokens(jnp.asarray(x), tokens, m)
  for b in range(2):
    want, want_size = _tome_reference(x[b], metric[b], size[b], r, protect)
    np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_tokens.size[b]), want_size)
  if protect:  # The class token stays first, alone, pooled.
    assert np.all(np.asarray(got_tokens.pooled)[:, 0])
    np.testing.assert_array_equal(got_tokens.size[:, 0], size[:, 0])


def test_dead_rows_merge_with_each_other_first_and_never_with_live_rows():
  rng = np.random.default_rng(0)
  metric = jnp.asarray(rng.normal(size=(1, 10, 4)), jnp.float32)
  dead = jnp.asarray([[False] * 4 + [True] * 6])
  m = reduce_lib.bipartite_soft_matching(metric, 3, dead=dead)
  src = 2 * np.asarray(m.src[0])          # Rows of A.
  dst = 2 * np.asarray(m.dst[0]) + 1      # Rows of B.
  assert set(src) <= {4, 6, 8} and set(dst) <= {5, 7, 9}


def test_unmerge_gives_every_row_its_merged_value():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)
  m = reduce_lib.bipartite_soft_matching(x, 3)
  merged, _ = reduce_lib.merge_wavg(x, m)
  back = np.asarray(reduce_lib.unmerge(merged, m, 9))
  for b in range(2):
    unm, src, dst = (np.asarray(v[b]) for v in (m.unmerged, m.src, m.dst))
    for i, a in enumerate(unm):
      np.testing.assert_array_equal(back[b, 2 * a], merged[b, i])
    for s, d in zip(src, dst):
      np.testing.assert_array_equal(back[b, 2 * s], merged[b, len(unm) + d])
    for j in range(4):
      np.testing.assert_array_equal(back[b, 2 * j + 1], merged[b, len(unm) + j])


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_proportional_attention_equals_attention_over_the_unmerged_duplicates(kind):
  rng = np.random.default_rng(2)
  unique = rng.normal(size=(2, 5, 16)).astype(np.float32)
  counts = np.asarray([[1, 3, 2, 1, 2], [2, 1, 1, 4, 1]])
  mha = attention.MultiHeadAttention(num_heads=2, opts=layers.Options(attention=kind))
  variables = mha.init(jax.random.PRNGKey(0), jnp.asarray(unique))
  merged = mha.apply(variables, jnp.asarray(unique), key_size=jnp.asarray(counts, jnp.float32))
  for b in range(2):
    full = np.repeat(unique[b], counts[b], axis=0)[None]
    want = np.asarray(mha.apply(variables, jnp.asarray(full)))[0]
    # Every copy of a token has the same output: compare each token's last copy.
    np.testing.assert_allclose(np.asarray(merged[b]), want[np.cumsum(counts[b]) - 1],
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- identity cases (exact)


@pytest.mark.parametrize('causal', [True, False])
def test_reducing_nothing_gives_identical_text_embeddings(causal):
  config = _vit_clip(causal=causal)
  model, variables = _init(config)
  tokens = _tokens([5, 11, 24], 24)
  want = _apply(model, variables, 'encode_text', tokens)
  for spec in (TR(merge=0, merge_layers=(0, 1)),
               TR(prune='attention', keep=1.0, prune_layers=(0, 2))):
    got = _apply(model, variables, 'encode_text', tokens, reduction=spec)
    np.testing.assert_array_equal(got, want)


def test_reducing_nothing_gives_identical_image_embeddings():
  for config in (_vit_clip(), _mci_clip()):
    model, variables = _init(config)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, config.image_size,
                                                       config.image_size, 3))
    want = _apply(model, variables, 'encode_image', images)
    specs = [TR(merge=0)]
    if isinstance(config.image, clip_lib.vit.ViTConfig):
      specs = [TR(prune='attention', keep=1.0, prune_layers=(1,))]
    for spec in specs:
      np.testing.assert_array_equal(
          _apply(model, variables, 'encode_image', images, reduction=spec), want)
    if not isinstance(config.image, mci.MCiConfig):  # Merging does change the output.
      merged = _apply(model, variables, 'encode_image', images, reduction=TR(merge=3))
      assert np.abs(merged - want).max() > 1e-3 * np.abs(want).max()


def test_mci_merge_and_unmerge_of_identical_tokens_is_exact_and_of_others_is_not():
  block = mci.AttentionBlock(mlp_ratio=2.0, head_dim=8, layer_scale_init=1.0)
  rng = np.random.default_rng(4)
  pairs = rng.normal(size=(2, 4, 2, 1, 16)).astype(np.float32)
  # Each even row equals the next odd row; the rows of the grid in order, 4 x 4.
  x = jnp.asarray(np.repeat(pairs, 2, axis=3).reshape(2, 4, 4, 16))
  variables = block.init(jax.random.PRNGKey(0), x)
  # Attention weights of order 1 (trunc-normal 0.02 would make its branch negligible).
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 25 if 'token_mixer' in jax.tree_util.keystr(p) else v, variables)
  want = np.asarray(block.apply(variables, x))
  assert np.abs(want - np.asarray(x)).max() > 0.1
  np.testing.assert_allclose(np.asarray(block.apply(variables, x, merge=8)), want,
                             rtol=1e-5, atol=1e-5)
  noisy = x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
  changed = np.asarray(block.apply(variables, noisy, merge=8)) - np.asarray(
      block.apply(variables, noisy))
  assert np.abs(changed).max() > 1e-2


# ---------------------------------------------------------------- padding


def test_cut_padding_is_exact_for_a_causal_tower_only():
  tokens = _tokens([4, 9, 12], 24)
  for causal in (True, False):
    model, variables = _init(_vit_clip(causal=causal))
    want = _apply(model, variables, 'encode_text', tokens)
    # A bucket of 16 columns: padding is cut and the rest of it masked.
    got = _apply(model, variables, 'encode_text', tokens[:, :16], reduction=TR(cut_padding=True))
    # Causal: equal up to float summation order (a plain cut differs as much).
    assert (np.abs(got - want).max() < 1e-5) == causal, (causal, np.abs(got - want).max())
    if not causal:  # Masked padding: the cut length does not matter.
      uncut = _apply(model, variables, 'encode_text', tokens, reduction=TR(cut_padding=True))
      np.testing.assert_allclose(got, uncut, atol=1e-5)


def test_engine_cuts_padding_to_a_bucket_of_the_longest_text():
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  np.testing.assert_array_equal(embedding.cut_padding(_tokens([3, 9], 24), mesh).shape, (2, 16))
  np.testing.assert_array_equal(embedding.cut_padding(_tokens([3, 4], 24), mesh).shape, (2, 8))
  np.testing.assert_array_equal(embedding.cut_padding(_tokens([24], 24), mesh).shape, (1, 24))


def test_causal_merging_of_padding_only_is_exact():
  tokens = _tokens([5, 7, 6], 24)  # >= 17 dead rows: 3 layers x 4 merges stay among them.
  for causal in (True, False):
    model, variables = _init(_vit_clip(causal=causal))
    want = _apply(model, variables, 'encode_text', tokens)
    got = _apply(model, variables, 'encode_text', tokens, reduction=TR(merge=4))
    assert (np.abs(got - want).max() < 1e-5) == causal


# ---------------------------------------------------------------- pruning


def test_pruning_keeps_the_best_scored_rows_in_order_and_the_protected_ones():
  tokens = reduce_lib.sequence_tokens(1, 6)
  x = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)
  scores = jnp.asarray([[-5.0, 0.3, 0.9, 0.1, 0.8, 0.2]])
  kept, kept_tokens = reduce_lib.prune_tokens(x, tokens, scores, 3)
  np.testing.assert_array_equal(np.asarray(kept)[0, :, 0], [0, 2, 4])  # Class token kept.
  np.testing.assert_array_equal(np.asarray(kept_tokens.pos)[0], [0, 2, 4])
  assert reduce_lib.keep_count(197, 0.7) == 138 and reduce_lib.keep_count(10, 1.0) == 10


def test_text_pruning_keeps_sot_and_eot_and_drops_causal_padding_first():
  model, variables = _init(_vit_clip(causal=True))
  tokens = _tokens([6, 8], 24)
  seen = {}

  def capture(layer):
    def hook(x, q, k, t):
      seen['pos'] = t.pos
      return x, t
    return hook if layer == 2 else None

  @jax.jit
  def run(variables, tokens):
    emb = model.apply(variables, tokens, method='encode_text', extra_hook=capture,
                      reduction=TR(prune='random', keep=0.4, prune_layers=(0, 1)))
    return emb, seen['pos']

  got, pos = (np.asarray(v) for v in run(variables, tokens))
  n = pos.shape[1]
  assert n == reduce_lib.keep_count(reduce_lib.keep_count(24, 0.4), 0.4) == 4
  for row, length in enumerate((6, 8)):
    assert {0, length - 1} <= set(pos[row]) and pos[row].max() < length  # No padding left.
  assert np.all(np.isfinite(got))


def test_ranking_loss_equals_its_formula():
  rng = np.random.default_rng(3)
  predicted, golden = rng.normal(size=(2, 2, 7))
  valid = np.ones((2, 7), bool)
  valid[1, 5:] = False
  want = []
  for p, g, v in zip(predicted, golden, valid):
    p, g = p[v], g[v]
    z = (g - g.mean()) / (g.std() + 1e-6)
    target = np.exp(z) / np.exp(z).sum()
    log_p = p - np.log(np.exp(p).sum())
    want.append(-(target * log_p).sum())
  got = reduce_lib.ranking_loss(jnp.asarray(predicted), jnp.asarray(golden), jnp.asarray(valid))
  np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)


# ---------------------------------------------------------------- static shapes


def test_reduced_encoders_compile_once_for_every_batch():
  config = _vit_clip()
  model, variables = _init(config)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  spec = inference_lib.parse('text.merge=3,image.prune=attention,image.keep=0.5,'
                             'image.prune_layers=1,image.merge=2')
  for tower, batches in (
      (embedding.TEXT, [_tokens([3, 7], 24), _tokens([12, 24], 24), _tokens([5, 5], 24)]),
      (embedding.IMAGE, [np.random.default_rng(i).integers(0, 255, (2, 32, 32, 3), np.uint8)
                         for i in range(3)])):
    name = 'text' if tower == embedding.TEXT else 'image'
    tower_pass, _ = inference_lib.tower_pass(spec, inference_lib.Artifacts(), name)
    fn = embedding.encoder(model, tower, mesh, tower_pass)
    for batch in batches:
      fn(variables, batch).block_until_ready()
    assert fn._cache_size() == 1  # pylint: disable=protected-access


# ---------------------------------------------------------------- the spec


def test_inference_spec_parses_round_trips_and_explains_mistakes():
  text = ('text.merge=4,text.merge_layers=0+1+2,image.prune=learned,image.keep=0.7,'
          'image.prune_layers=3+6,cascade_size=160,cascade_tau=0.05')
  spec = inference_lib.parse(text)
  assert spec.image.prune_layers == (3, 6) and spec.text.merge_layers == (0, 1, 2)
  assert inference_lib.parse(inference_lib.describe(spec)) == spec
  assert inference_lib.parse('') == inference_lib.NO_INFERENCE
  for bad, message in (('text.merg=4', 'Did you mean text.merge'),
                       ('image.keep=1.5', 'keep must be in'),
                       ('text.prune=learned', 'needs prune_layers'),
                       ('image_size=128,selector_tau=0.9', 'Choose one'),
                       ('cascade_tau=0.1', 'needs cascade_size'),
                       ('image.cut_padding=1', 'text option'),
                       ('text.merge=four', 'expected a int')):
    with pytest.raises(ValueError, match=message):
      inference_lib.parse(bad)


def test_artifacts_are_checked_against_the_model_and_the_spec(tmp_path):
  config = _vit_clip()
  fit = inference_lib.tower_fingerprint(config, 'text')
  inference_lib.save_artifact(str(tmp_path / 'text_ranker.npz'), {'a': {'b': np.ones(2)}},
                              dict(kind='text_ranker', fit=fit, layer=1,
                                   ranker=dict(tokens=24, dim=8)))
  spec = inference_lib.parse('text.prune=learned,text.keep=0.5,text.prune_layers=1')
  artifacts = inference_lib.load_artifacts(str(tmp_path), spec, config)
  tree, meta = artifacts.get('text_ranker')
  np.testing.assert_array_equal(tree['a']['b'], np.ones(2))
  with pytest.raises(ValueError, match='block 1, but text.prune_layers starts at 2'):
    inference_lib.load_artifacts(str(tmp_path), inference_lib.parse(
        'text.prune=learned,text.keep=0.5,text.prune_layers=2'), config)
  with pytest.raises(ValueError, match='train one for this model'):
    inference_lib.load_artifacts(str(tmp_path), spec, _vit_clip(causal=False))
  with pytest.raises(FileNotFoundError, match='train_reducer'):
    inference_lib.load_artifacts(str(tmp_path / 'nowhere'), spec, config)


def test_sides_must_fit_the_tower():
  inference_lib.check_side(_mci_clip(), 32)
  with pytest.raises(ValueError, match='multiples of 32'):
    inference_lib.check_side(_mci_clip(), 48)
  with pytest.raises(ValueError, match='multiples of 8'):
    inference_lib.check_side(_vit_clip(), 20)
  assert mci.MCI_CONFIGS['mci0'].stride == 32 and mci.MCI_CONFIGS['mci4'].stride == 64
  assert math.isclose(float(reduce_lib.selector_target(jnp.float32(1.0))), math.log(1e-4),
                      rel_tol=1e-6)

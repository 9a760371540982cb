"""Caption generation equals open_clip 3.3's CoCa.generate and transformers' logits processors.

The reference models are tiny random CoCas (coca_reference.py) whose greedy and beam outputs
vary from token to token, end with EOT at varied lengths, and emit the padding id (which
finishes a sampled row and is masked inside a beam), so each rule of the loops takes part.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mobileclip_jax
from mobileclip_jax import convert
from mobileclip_jax import decoding
from mobileclip_jax import sharding
from mobileclip_jax.data import tokenizer as tokenizer_lib

ref = pytest.importorskip('coca_reference', reason='needs torch and open_clip')
transformers = pytest.importorskip('transformers', reason="open_clip's generate needs transformers")
torch = ref.torch

SEEDS = (0, 1, 3)
SEQ_LEN = 12
IDS = dict(sot_token_id=ref.SOT, eos_token_id=ref.EOT)


class _Case:
  """One tiny open_clip CoCa, its converted variables and 4 images."""

  def __init__(self, seed, batch=4):
    self.model, gen = ref.tiny_coca(seed)
    self.images = ref.images(gen, batch, 32)
    self.variables = convert.from_open_clip(ref.tr.state_dict_numpy(self.model), ref.BASE,
                                            **ref.TINY)
    self.images_nhwc = ref.tr.nhwc(self.images)

  def open_clip(self, **kw):
    with torch.no_grad():
      return self.model.generate(torch.from_numpy(self.images), seq_len=SEQ_LEN, **IDS,
                                 **kw).numpy()

  def ours(self, **kw):
    return np.asarray(mobileclip_jax.generate(MODULE, self.variables, self.images_nhwc,
                                              seq_len=SEQ_LEN, **kw))


MODULE = mobileclip_jax.create_model(ref.BASE, **ref.TINY)


@pytest.fixture(scope='module')
def cases():
  return [_Case(seed) for seed in SEEDS]


def _describe(outputs):
  """Counts over rows: EOT before the last position, padding emitted, distinct tokens."""
  rows = np.concatenate(outputs)
  early_eot = sum(ref.EOT in r[1:-1].tolist() for r in rows)
  padding = sum(0 in r[1:].tolist() and ref.EOT not in r.tolist() for r in rows)
  return early_eot, padding, len(set(rows[:, 1:].ravel().tolist()))


@pytest.mark.parametrize('options', [{}, dict(repetition_penalty=1.5, min_seq_len=3)])
def test_greedy_equals_open_clip(cases, options):
  theirs = [c.open_clip(generation_type='top_k', top_k=1, fixed_output_length=True, **options)
            for c in cases]
  ours = [c.ours(sampler='greedy', **options) for c in cases]
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)
  early_eot, padding, distinct = _describe(theirs)
  assert early_eot >= 2 and padding >= 2 and distinct >= 15, (early_eot, padding, distinct)


@pytest.mark.parametrize('num_beams', [2, 3])
def test_beam_search_equals_open_clip(cases, num_beams):
  theirs = [c.open_clip(generation_type='beam_search', num_beams=num_beams, num_beam_groups=1,
                        fixed_output_length=True) for c in cases]
  ours = [c.ours(sampler='beam', num_beams=num_beams) for c in cases]
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)
  early_eot, padding, distinct = _describe(theirs)
  assert early_eot >= 2 and distinct >= 15, (early_eot, padding, distinct)


@pytest.mark.parametrize('sampler', ['greedy', 'beam'])
def test_unfixed_output_length_trims_as_open_clip(cases, sampler):
  kw = dict(generation_type='top_k', top_k=1) if sampler == 'greedy' else dict(
      generation_type='beam_search', num_beams=3, num_beam_groups=1)
  widths = set()
  for c in cases:
    theirs = c.open_clip(fixed_output_length=False, **kw)
    np.testing.assert_array_equal(c.ours(sampler=sampler, num_beams=3, fixed_output_length=False),
                                  theirs)
    widths.add(theirs.shape[1])
  assert min(widths) < SEQ_LEN  # Some batch ended early.


# Settings shared with the tests above, so that each compiled function serves twice.
@pytest.mark.parametrize('sampler,options', [
    ('greedy', dict(repetition_penalty=1.5, min_seq_len=3)), ('beam', dict(num_beams=3)),
    ('top_p', dict(top_p=0.6, repetition_penalty=1.2))])
def test_kv_cache_equals_rerunning_the_prefix(cases, sampler, options):
  key = jax.random.key(7)
  for c in cases:
    np.testing.assert_array_equal(c.ours(sampler=sampler, rng=key, **options),
                                  c.ours(sampler=sampler, rng=key, kv_cache=False, **options))


@pytest.mark.parametrize('sampler,top', [('top_p', 0.6), ('top_k', 3)])
def test_sampled_tokens_lie_in_transformers_allowed_set(cases, sampler, top):
  """Every sampled token is allowed by open_clip's processors + warper on open_clip's logits."""
  c = cases[0]
  warper = (transformers.TopPLogitsWarper(top) if sampler == 'top_p'
            else transformers.TopKLogitsWarper(top))
  processors = transformers.LogitsProcessorList([
      transformers.MinLengthLogitsProcessor(5, ref.EOT),
      transformers.RepetitionPenaltyLogitsProcessor(1.2)])
  runs = [c.ours(sampler=sampler, **{sampler: top}, repetition_penalty=1.2,
                 rng=jax.random.key(seed)) for seed in range(2)]
  assert not np.array_equal(*runs)  # It samples.
  images = torch.from_numpy(c.images)
  checked = 0
  for out in runs:
    assert np.all(out[:, 0] == ref.SOT)
    for t in range(1, SEQ_LEN):
      prefix = torch.from_numpy(out[:, :t].copy()).long()
      live = ~np.isin(out[:, t - 1], (ref.EOT, 0))
      if not live.any():
        break
      assert np.all(out[~live, t] == 0)  # Finished rows continue with padding.
      if t == SEQ_LEN - 1:
        assert np.all(out[live, t] == ref.EOT)  # The last position is forced to EOT.
        continue
      with torch.no_grad():
        logits = c.model(images, prefix, output_labels=False)['logits'][:, -1]
        allowed = torch.isfinite(warper(prefix, processors(prefix, logits))).numpy()
      assert np.all(allowed[live, out[live, t]]), t
      checked += int(live.sum())
  assert checked >= 40


def test_temperature_scales_logits_before_sampling():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]] * 4000))
  cfg = lambda t: decoding.GenerationConfig('temperature', SEQ_LEN, t, 1, 0.9, 2, 5, 1.0, True,
                                            62, 63, 0)
  for temperature in (0.5, 2.0):
    picks = np.asarray(decoding._choose(logits, jax.random.key(0), cfg(temperature)))
    expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / len(picks), expected, atol=0.03)


def _random_scores(gen, rows=64, vocab=300):
  scores = torch.randn(rows, vocab, generator=gen) * 3
  scores[::7, 5] = -float('inf')           # EOT-like bans.
  scores[1::9, :40] = torch.round(scores[1::9, :40])  # Ties.
  return scores


def test_processors_and_warpers_equal_transformers():
  gen = torch.Generator().manual_seed(0)
  scores = _random_scores(gen)
  tokens = torch.randint(0, 300, (64, 10), generator=gen)
  same = lambda ours, theirs: np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
  for length in (3, 5, 8):
    same(decoding.min_length(jnp.asarray(scores.numpy()), length, 5, 5),
         transformers.MinLengthLogitsProcessor(5, 5)(tokens[:, :length], scores.clone()))
    for penalty in (0.7, 1.3):
      ours = np.asarray(decoding.repetition_penalty(
          jnp.asarray(scores.numpy()), jnp.asarray(tokens.numpy()), length, penalty))
      theirs = transformers.RepetitionPenaltyLogitsProcessor(penalty)(
          tokens[:, :length], scores.clone()).numpy()
      # The same entries change; XLA on CPU divides by a scalar through its reciprocal (1 ulp).
      np.testing.assert_array_equal(ours != scores.numpy(), theirs != scores.numpy())
      np.testing.assert_allclose(ours, theirs, rtol=2e-7, atol=0)
  for k in (1, 5, 50):
    same(decoding.top_k_filter(jnp.asarray(scores.numpy()), k),
         transformers.TopKLogitsWarper(k)(tokens, scores.clone()))
  for p in (0.1, 0.5, 0.9, 1.0):
    ours = np.asarray(decoding.top_p_keep(jnp.asarray(scores.numpy()), p))
    theirs = torch.isfinite(transformers.TopPLogitsWarper(p)(tokens, scores.clone())).numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=f'top_p={p}')
    assert 1 < ours.sum(1).mean() < 300 or p in (0.1, 1.0)
  # Below float32's resolution of the total mass no threshold exists: the best token stays.
  tiny = np.asarray(decoding.top_p_keep(jnp.asarray(scores.numpy()), 1e-9))
  np.testing.assert_array_equal(tiny, scores.numpy() == scores.numpy().max(1, keepdims=True))


def test_top_p_among_candidates_equals_transformers():
  """The sampler's fast path (the set among the k best) and its fallback (the whole row)."""
  gen = torch.Generator().manual_seed(1)
  flat, peaked = _random_scores(gen) * 0.2, _random_scores(gen) * 4  # Nuclei of 100s / a few.
  for scores, p in ((flat, 0.9), (peaked, 0.9), (peaked, 0.99)):
    theirs = torch.isfinite(transformers.TopPLogitsWarper(p)(None, scores.clone())).numpy()
    candidates, ids, covered = map(np.asarray, decoding.top_p_candidates(
        jnp.asarray(scores.numpy()), p, 8))
    np.testing.assert_array_equal(covered, theirs.sum(1) <= 8)  # The set fits in 8 candidates.
    for row in np.flatnonzero(covered):
      kept = ids[row][np.isfinite(candidates[row])]
      assert sorted(kept.tolist()) == np.flatnonzero(theirs[row]).tolist(), (p, row)
    # Sampling: rows whose sets all fit (fast path), and all rows (fallback when any does not).
    for rows in (np.flatnonzero(covered), np.arange(len(covered))):
      if not len(rows):
        continue
      for i in range(3):
        pick = np.asarray(decoding._sample_top_p(jnp.asarray(scores.numpy()[rows]), p, 1.0,
                                                 jax.random.key(i), k=8))
        assert np.all(theirs[rows, pick]), (p, i)
  # Both branches ran: flat sets never fit in 8 candidates, most peaked ones do.
  assert not np.asarray(decoding.top_p_candidates(jnp.asarray(flat.numpy()), 0.9, 8)[2]).any()
  assert np.asarray(decoding.top_p_candidates(jnp.asarray(peaked.numpy()), 0.9, 8)[2]).mean() > 0.5


@pytest.mark.parametrize('sampler,batch', [('greedy', 8), ('beam', 5)])
def test_batch_sharded_over_the_mesh_equals_open_clip(sampler, batch):
  """8 fake devices; a batch of 5 is padded to 8 and cut back."""
  c = _Case(0, batch=batch)
  kw = dict(generation_type='top_k', top_k=1) if sampler == 'greedy' else dict(
      generation_type='beam_search', num_beams=3, num_beam_groups=1)
  sharded = mobileclip_jax.generate(MODULE, c.variables, c.images_nhwc, sampler=sampler,
                                    num_beams=3, seq_len=SEQ_LEN, mesh=sharding.create_mesh())
  np.testing.assert_array_equal(np.asarray(sharded), c.open_clip(fixed_output_length=True, **kw))
  if batch == 8:
    assert len({s.device for s in sharded.addressable_shards}) == 8
    assert {s.data.shape for s in sharded.addressable_shards} == {(1, SEQ_LEN)}


def test_first_sentences_equal_ml_mobileclip_dr_cut():
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
  texts = ['a dog runs on the beach. it is sunny', 'two cats, sleeping on a sofa', '. starts empty',
           'ends with a dot.', 'no dot here at all but a long sentence that will be cut short ' * 3]
  rows = list(tokenizer(texts, context_length=30))
  mid_sot = rows[0].copy()
  mid_sot[6] = sot                                   # Text restarts after a second SOT.
  no_eot = rows[1].copy()
  no_eot[no_eot == eot] = tokenizer.encode('sofa')[0]  # Runs to the end; padding ('!') kept.
  rng = np.random.default_rng(0)
  random_rows = rng.integers(300, 49000, (20, 30))
  random_rows[:, 0] = sot
  random_rows[np.arange(20), rng.integers(2, 30, 20)] = eot
  rows = np.stack(rows + [mid_sot, no_eot] + list(random_rows))
  theirs = [ref.open_clip.decode(torch.from_numpy(r)).split('<end_of_text>')[0]
            .split('<start_of_text>')[-1].split('.')[0].rstrip() for r in rows]
  assert decoding.first_sentences(rows, tokenizer) == theirs
  assert theirs[:4] == ['a dog runs on the beach', 'two cats , sleeping on a sofa', '',
                        'ends with a dot']


def test_bad_requests_are_refused(cases):
  c = cases[0]
  with pytest.raises(ValueError, match="sampler must be one of .*'top_p'"):
    c.ours(sampler='nucleus')
  with pytest.raises(ValueError, match='seq_len=13 must be .* at most the context length 12'):
    mobileclip_jax.generate(MODULE, c.variables, c.images_nhwc, seq_len=13)
  with pytest.raises(ValueError, match=r"pass rng=jax.random.key\(seed\)"):
    c.ours(sampler='top_p')
  with pytest.raises(ValueError, match='num_beams >= 2'):
    c.ours(sampler='beam', num_beams=1)
  with pytest.raises(TypeError, match='needs a CoCa module'):
    mobileclip_jax.generate(mobileclip_jax.create_model('ViT-B-16'), c.variables, c.images_nhwc)


@pytest.mark.slow
def test_full_size_greedy_and_beam_equal_open_clip():
  """coca_ViT-B-32 with random weights at seq_len 30 (open_clip's defaults otherwise)."""
  torch.manual_seed(0)
  model = ref.open_clip.create_model('coca_ViT-B-32', pretrained=None).eval()
  gen = torch.Generator().manual_seed(1)
  ref.randomize_(model, gen)
  images = torch.randn(2, 3, 224, 224, generator=gen)
  with torch.no_grad():
    greedy = model.generate(images, generation_type='top_k', top_k=1, seq_len=30,
                            fixed_output_length=True).numpy()
    beam = model.generate(images, generation_type='beam_search', num_beams=3, num_beam_groups=1,
                          seq_len=30, fixed_output_length=True).numpy()
  variables = convert.from_open_clip(ref.tr.state_dict_numpy(model), 'coca_ViT-B-32')
  module = mobileclip_jax.create_model('coca_ViT-B-32')
  x = ref.tr.nhwc(images.numpy())
  np.testing.assert_array_equal(mobileclip_jax.generate(module, variables, x), greedy)
  np.testing.assert_array_equal(
      mobileclip_jax.generate(module, variables, x, sampler='beam', num_beams=3), beam)
  assert len(set(greedy[:, 1:].ravel().tolist())) > 5

"""Caption generation with a CoCa model: jitted, KV-cached, the same tokens as open_clip 3.3.

`generate(module, variables, images)` reproduces open_clip's `CoCa.generate(images, ...,
fixed_output_length=True)`: rows start with SOT; at each step MinLength (EOT banned while the
sequence is shorter than `min_seq_len`) and the repetition penalty process the decoder's logits
(as transformers' processors); then
  - 'greedy': argmax (open_clip's generation_type='top_k', top_k=1);
  - 'temperature' / 'top_k' / 'top_p': sample from softmax(warped logits / temperature), the
    warper being none / transformers' TopKLogitsWarper / TopPLogitsWarper (open_clip applies the
    temperature after the warper, so the nucleus is taken at temperature 1);
  - 'beam': open_clip's beam search (num_beam_groups=1, transformers' BeamSearchScorer: beam
    scores are sums of processed logits, not log-probabilities; hypotheses scored by sum / length;
    early stop when no open beam can beat the worst kept hypothesis).
A row that emits EOT or padding is finished and continues with padding; the last position is
forced to EOT. Output: int32 [B, seq_len], padded after EOT (with `fixed_output_length=False`
trimmed to open_clip's width instead).

Unlike open_clip, which re-runs the text tower and decoder over the whole prefix at every step
(and re-projects the image tokens in every cross-attention), the image is encoded once, its
cross-attention keys/values are projected once, and each step runs one token against the cached
keys/values (attention.py). Prefill and the step loop (`lax.while_loop`, stopping early when every
row is finished) are one jitted function; with a `mesh` the batch is split over its batch axes.

`first_sentences` applies ml-mobileclip-dr's cut (scripts/gen.py: text between the last SOT and
the first EOT, up to the first '.', right-stripped); MobileCLIP's captions use sampler='top_p',
top_p=0.9, seq_len=30.
"""
import dataclasses
import functools
from typing import Any, List, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from mobileclip_jax import sharding
from mobileclip_jax.models import attention as attn_lib
from mobileclip_jax.models import coca as coca_lib

SAMPLERS = ('greedy', 'temperature', 'top_k', 'top_p', 'beam')
_BEAM_INIT = -1e9  # Score of the initial copies of each beam (open_clip), so that beam 0 leads.
_NUCLEUS_CANDIDATES = 256  # Top-p looks for its set among this many best tokens first.


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Static settings of one compiled generation function (see `generate`)."""
  sampler: str
  seq_len: int
  temperature: float
  top_k: int
  top_p: float
  num_beams: int
  min_seq_len: int
  repetition_penalty: float
  kv_cache: bool
  sot_token_id: int
  eos_token_id: int
  pad_token_id: int


# ---- logits processors and warpers (transformers' semantics, on [B, V] float32 scores) ----

def min_length(scores: jax.Array, length, min_len: int, eos_token_id: int) -> jax.Array:
  """MinLengthLogitsProcessor: EOT gets -inf while the sequence (SOT included) is shorter."""
  banned = (jnp.arange(scores.shape[-1]) == eos_token_id) & (length < min_len)
  return jnp.where(banned, -jnp.inf, scores)


def repetition_penalty(scores: jax.Array, tokens: jax.Array, length, penalty: float) -> jax.Array:
  """RepetitionPenaltyLogitsProcessor over tokens[:, :length] (SOT included).

  A token already present has its score divided by `penalty` when positive, multiplied when
  negative.
  """
  if penalty == 1.0:
    return scores
  b, v = scores.shape
  ids = jnp.where(jnp.arange(tokens.shape[1]) < length, tokens, v)  # Unwritten slots: dropped.
  seen = jnp.zeros((b, v + 1), bool).at[jnp.arange(b)[:, None], ids].set(True)[:, :v]
  return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_k_filter(scores: jax.Array, k: int) -> jax.Array:
  """TopKLogitsWarper: scores below the k-th largest become -inf (ties with it are kept)."""
  kth = jax.lax.top_k(scores, min(k, scores.shape[-1]))[0][..., -1:]
  return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_candidates(scores: jax.Array, p: float, k: int):
  """TopPLogitsWarper's set found among the k best tokens, without sorting the vocabulary.

  Token of descending rank i is kept iff the probability of the tokens ranked above it is < p
  (the ascending-cumsum rule `cumulative <= 1 - p` removes exactly the others). Returns
  (candidate scores [B, k] with -inf outside the set, their ids [B, k], covered [B]: whether the
  set ends within the k candidates, i.e. they hold probability >= p).
  """
  top_scores, ids = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  probs = jnp.exp(top_scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True))
  above = jnp.cumsum(probs, axis=-1) - probs
  keep = (above < jnp.float32(p)).at[..., 0].set(True)
  return jnp.where(keep, top_scores, -jnp.inf), ids, jnp.sum(probs, axis=-1) >= jnp.float32(p)


def top_p_keep(scores: jax.Array, p: float) -> jax.Array:
  """TopPLogitsWarper's set without sorting the vocabulary: keep [B, V].

  transformers drops a token iff the probability of it and the tokens below it is <= 1 - p. That
  mass grows with the score, so the dropped tokens are those below T, the smallest score whose
  mass exceeds 1 - p; T is found by bisection over the 32-bit order-preserving keys of the float
  scores: 32 masked sums of the row, exact to the float (tied scores are kept or dropped
  together). XLA:CPU sorts a 49408-token row in ~20 ms; this takes ~1.3 ms.
  """
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  # Radix-sort keys: negative floats have every bit flipped, positive ones the sign bit set.
  keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  dropped_mass = jnp.float32(1 - p)  # The threshold as transformers rounds it.

  def halve(_, bounds):  # Invariant: T lies in [lo, hi].
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    above = jnp.sum(jnp.where(keys <= mid[:, None], probs, 0.0), axis=-1) > dropped_mass
    return jnp.where(above, lo, jnp.minimum(mid + 1, hi)), jnp.where(above, mid, hi)

  rows = scores.shape[0]
  lo = jnp.zeros((rows,), jnp.uint32)
  hi = jnp.full((rows,), jnp.iinfo(jnp.uint32).max, jnp.uint32)
  threshold, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  # The best token stays (transformers' min_tokens_to_keep=1), also where p is below float32's
  # resolution of the row's total mass and no threshold exists.
  return (keys >= threshold[:, None]) | (keys == keys.max(axis=-1, keepdims=True))


def _sample_top_p(scores, p: float, temperature: float, key, k: int = _NUCLEUS_CANDIDATES):
  """A token per row from softmax(TopP(scores) / temperature).

  A captioner's nucleus is usually a few tokens, so the set is taken from the k best (top_k),
  and only when some row's set is larger (a flat distribution: an early or barely trained
  captioner, a high temperature) does the step search the whole row (`top_p_keep`).
  """
  candidates, ids, covered = top_p_candidates(scores, p, k)

  def among_candidates():
    pick = jax.random.categorical(key, candidates / temperature, axis=-1)
    return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]

  def everything():
    kept = jnp.where(top_p_keep(scores, p), scores, -jnp.inf)
    return jax.random.categorical(key, kept / temperature, axis=-1)

  return jax.lax.cond(jnp.all(covered), among_candidates, everything).astype(jnp.int32)


def _process(logits, tokens, length, cfg: GenerationConfig):
  scores = min_length(logits.astype(jnp.float32), length, cfg.min_seq_len, cfg.eos_token_id)
  return repetition_penalty(scores, tokens, length, cfg.repetition_penalty)


def _choose(scores, key, cfg: GenerationConfig):
  if cfg.sampler == 'greedy':
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
  if cfg.sampler == 'top_p':
    return _sample_top_p(scores, cfg.top_p, cfg.temperature, key)
  if cfg.sampler == 'top_k':
    scores = top_k_filter(scores, cfg.top_k)
  return jax.random.categorical(key, scores / cfg.temperature, axis=-1).astype(jnp.int32)


# ---- next-token logits with or without the KV cache ----

class _Stepper:
  """Next-token logits for token buffers [B', L] whose first t positions are written.

  With the cache, `start` encodes SOT (and projects the memory for cross-attention once) and
  `step` feeds the newest token; without it every call re-runs the whole buffer (open_clip's way:
  later positions are padding the causal masks hide), which the tests compare against.
  """

  def __init__(self, module, kv_cache: bool):
    self.module, self.kv_cache = module, kv_cache

  def _apply(self, variables, tokens, memory, mutable=False):
    return self.module.apply(variables, tokens, memory, decode=self.kv_cache,
                             method='decode', mutable=mutable)

  def start(self, variables, memory, tokens):
    if not self.kv_cache:
      return self._apply(variables, tokens, memory)[:, 0], memory
    collections = [attn_lib.CACHE, attn_lib.CROSS_CACHE]
    shapes = jax.eval_shape(lambda v, t, m: self._apply(v, t, m, collections)[1],
                            variables, tokens, memory)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[attn_lib.CACHE])
    logits, state = self._apply({**variables, attn_lib.CACHE: cache}, tokens[:, :1], memory,
                                collections)
    return logits[:, 0], (state[attn_lib.CACHE], state[attn_lib.CROSS_CACHE])

  def step(self, variables, state, tokens, t):
    if not self.kv_cache:
      logits = self._apply(variables, tokens, state)
      return jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), state
    cache, cross = state
    newest = jax.lax.dynamic_slice_in_dim(tokens, t - 1, 1, axis=1)
    logits, updated = self._apply({**variables, attn_lib.CACHE: cache, attn_lib.CROSS_CACHE: cross},
                                  newest, None, [attn_lib.CACHE])
    return logits[:, 0], (updated[attn_lib.CACHE], cross)

  def reorder(self, state, rows):
    """Beam search: row i continues the sequence of row rows[i]."""
    if not self.kv_cache:
      return state
    cache, cross = state
    return jax.tree.map(lambda x: x[rows] if x.ndim else x, cache), cross


def _last_finished(tokens, t, cfg):
  last = jax.lax.dynamic_index_in_dim(tokens, t - 1, axis=1, keepdims=False)
  return (last == cfg.eos_token_id) | (last == cfg.pad_token_id)


def _sample(stepper, variables, memory, key, cfg: GenerationConfig):
  """open_clip's top_k / top_p loop -> (tokens [B, L], used width)."""
  b, length = memory.shape[0], cfg.seq_len
  tokens = jnp.full((b, length), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.sot_token_id)
  logits, state = stepper.start(variables, memory, tokens)

  def not_done(carry):
    t, tokens = carry[:2]
    return (t < length) & ~jnp.all(_last_finished(tokens, t, cfg))

  def body(carry):
    t, tokens, logits, state, key = carry
    key, sub = jax.random.split(key)
    choice = _choose(_process(logits, tokens, t, cfg), sub, cfg)
    choice = jnp.where(t + 1 == length, cfg.eos_token_id, choice)
    choice = jnp.where(_last_finished(tokens, t, cfg), cfg.pad_token_id, choice)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, choice[:, None], t, axis=1)
    logits, state = jax.lax.cond(t + 1 < length,
                                 lambda: stepper.step(variables, state, tokens, t + 1),
                                 lambda: (logits, state))
    return t + 1, tokens, logits, state, key

  t, tokens, *_ = jax.lax.while_loop(not_done, body, (jnp.int32(1), tokens, logits, state, key))
  return tokens, t


class _Hypotheses(NamedTuple):
  """Finished beams per image (transformers' BeamHypotheses as arrays): [B, num_beams, ...]."""
  tokens: jax.Array   # [B, K, L] without the EOT, padded.
  scores: jax.Array   # [B, K] sum of processed logits / generated length.
  lengths: jax.Array  # [B, K] tokens kept (SOT included).
  valid: jax.Array    # [B, K]


def _add_hypotheses(hyps: _Hypotheses, tokens, scores, length, add) -> _Hypotheses:
  """Keeps the best K of the old and the added ones (BeamHypotheses.add, one at a time, keeps
  the best K of all it was given: a new one enters when better than the worst)."""
  k = hyps.scores.shape[1]
  merged = _Hypotheses(jnp.concatenate([hyps.tokens, tokens], 1),
                       jnp.concatenate([hyps.scores, scores], 1),
                       jnp.concatenate([hyps.lengths, jnp.broadcast_to(length, scores.shape)], 1),
                       jnp.concatenate([hyps.valid, add], 1))
  _, best = jax.lax.top_k(jnp.where(merged.valid, merged.scores, -jnp.inf), k)
  return jax.tree.map(lambda x: jnp.take_along_axis(x, best.reshape(best.shape + (1,) * (x.ndim - 2)),
                                                    axis=1), merged)


def _beam(stepper, variables, memory, cfg: GenerationConfig):
  """open_clip's _generate_beamsearch with one beam group -> (tokens [B, L], width)."""
  b, k, length = memory.shape[0], cfg.num_beams, cfg.seq_len
  tokens = jnp.full((b, k, length), cfg.pad_token_id, jnp.int32).at[..., 0].set(cfg.sot_token_id)
  logits, state = stepper.start(variables, memory, tokens.reshape(b * k, length))
  beam_scores = jnp.full((b, k), _BEAM_INIT, jnp.float32).at[:, 0].set(0.0)
  hyps = _Hypotheses(jnp.full((b, k, length), cfg.pad_token_id, jnp.int32),
                     jnp.full((b, k), -jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32),
                     jnp.zeros((b, k), bool))
  done = jnp.zeros((b,), bool)

  def not_done(carry):
    return (carry[0] < length) & ~jnp.all(carry[-1])

  def body(carry):
    t, tokens, beam_scores, logits, state, hyps, done = carry
    scores = _process(logits, tokens.reshape(b * k, length), t, cfg)
    vocab = scores.shape[-1]
    candidates = (scores + beam_scores.reshape(b * k, 1)).reshape(b, k * vocab)
    top_scores, top = jax.lax.top_k(candidates, 2 * k)
    source, token = top // vocab, (top % vocab).astype(jnp.int32)
    is_eos = token == cfg.eos_token_id
    # EOT among the best k candidates finishes its beam (generated length t + 1, EOT included).
    add = is_eos & (jnp.arange(2 * k) < k) & ~done[:, None]
    hyps = _add_hypotheses(hyps, jnp.take_along_axis(tokens, source[..., None], 1),
                           top_scores / (t + 1), t, add)
    # The next beams: the best k candidates that are not EOT.
    keep = jnp.argsort(is_eos, axis=1, stable=True)[:, :k]
    source = jnp.take_along_axis(source, keep, 1)
    beam_scores = jnp.take_along_axis(top_scores, keep, 1)
    # BeamHypotheses.is_done (early_stopping=False, length_penalty=1).
    worst = jnp.min(jnp.where(hyps.valid, hyps.scores, jnp.inf), axis=1)
    done = done | (jnp.all(hyps.valid, axis=1) & (worst >= top_scores[:, 0] / (t + 1)))
    tokens = jnp.take_along_axis(tokens, source[..., None], 1)
    tokens = jax.lax.dynamic_update_slice_in_dim(
        tokens, jnp.take_along_axis(token, keep, 1)[..., None], t, axis=2)
    state = stepper.reorder(state, (jnp.arange(b)[:, None] * k + source).reshape(-1))
    logits, state = jax.lax.cond(
        t + 1 < length, lambda: stepper.step(variables, state, tokens.reshape(b * k, length), t + 1),
        lambda: (logits, state))
    return t + 1, tokens, beam_scores, logits, state, hyps, done

  t, tokens, beam_scores, _, _, hyps, done = jax.lax.while_loop(
      not_done, body, (jnp.int32(1), tokens, beam_scores, logits, state, hyps, done))
  # BeamSearchScorer.finalize: open beams of unfinished images join as they are, then the best
  # hypothesis is written with EOT after it when it fits, padding after that.
  open_beams = jnp.broadcast_to(~done[:, None], (b, k))
  hyps = _add_hypotheses(hyps, tokens, beam_scores / t, t, open_beams)
  best = jnp.argmax(jnp.where(hyps.valid, hyps.scores, -jnp.inf), axis=1)[:, None]
  best_tokens = jnp.take_along_axis(hyps.tokens, best[..., None], 1)[:, 0]
  best_length = jnp.take_along_axis(hyps.lengths, best, 1)
  position = jnp.arange(length)
  out = jnp.where(position < best_length, best_tokens, cfg.pad_token_id)
  out = jnp.where(position == best_length, cfg.eos_token_id, out)
  return out, jnp.minimum(jnp.max(best_length) + 1, length)


@functools.lru_cache(maxsize=16)
def _compiled(module, cfg: GenerationConfig, mesh: Optional[Mesh]):
  """jit(variables, images, key) -> (tokens [B, L] int32, width) for one module and config."""
  stepper = _Stepper(module, cfg.kv_cache)

  def run(variables, images, key):
    memory = module.apply(variables, images, method='image_tokens')[1]
    if cfg.sampler == 'beam':
      return _beam(stepper, variables, memory, cfg)
    return _sample(stepper, variables, memory, key, cfg)

  out_shardings = None if mesh is None else (sharding.batch_sharding(mesh),
                                             sharding.replicated(mesh))
  return jax.jit(run, out_shardings=out_shardings)


def _check_settings(module, cfg: GenerationConfig) -> None:
  if not isinstance(module, coca_lib.CoCa):
    raise TypeError(f'generate needs a CoCa module (create_model("coca_ViT-B-32") ...), got '
                    f'{type(module).__name__}.')
  if cfg.sampler not in SAMPLERS:
    raise ValueError(f'sampler must be one of {SAMPLERS}, got {cfg.sampler!r}.')
  context = min(module.config.text.context_length, module.config.decoder.context_length)
  if not cfg.min_seq_len < cfg.seq_len <= context:
    raise ValueError(f'seq_len={cfg.seq_len} must be larger than min_seq_len={cfg.min_seq_len} '
                     f'and at most the context length {context} of {module.config.name}.')
  if cfg.sampler == 'beam' and cfg.num_beams < 2:
    raise ValueError(f'Beam search needs num_beams >= 2, got {cfg.num_beams}; use '
                     "sampler='greedy' for one beam.")
  checks = [(cfg.temperature > 0, f'temperature must be > 0, got {cfg.temperature}'),
            (cfg.top_k >= 1, f'top_k must be >= 1, got {cfg.top_k}'),
            (0 < cfg.top_p <= 1, f'top_p must be in (0, 1], got {cfg.top_p}'),
            (cfg.repetition_penalty > 0,
             f'repetition_penalty must be > 0, got {cfg.repetition_penalty}')]
  for ok, message in checks:
    if not ok:
      raise ValueError(message + '.')


def _check(module, images, cfg: GenerationConfig, key) -> None:
  """What `generation_config` cannot check: the key and the images."""
  if cfg.sampler in ('temperature', 'top_k', 'top_p') and key is None:
    raise ValueError(f"sampler={cfg.sampler!r} samples: pass rng=jax.random.key(seed).")
  size = module.config.image_size
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be [B, {size}, {size}, 3] (NHWC, normalized), got '
                     f'{tuple(images.shape)}.')


def _place_variables(variables: Mapping[str, Any], mesh: Mesh) -> Any:
  """Leaves that are not jax Arrays yet are put on the mesh, replicated."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, replicated),
                      variables)


def generation_config(module, *, sampler: str = 'greedy', seq_len: int = 30,
                      temperature: float = 1.0, top_k: int = 1, top_p: float = 0.9,
                      num_beams: int = 6, min_seq_len: int = 5, repetition_penalty: float = 1.0,
                      kv_cache: bool = True, sot_token_id: Optional[int] = None,
                      eos_token_id: Optional[int] = None,
                      pad_token_id: int = 0) -> GenerationConfig:
  """The checked settings of `generate` for `module` (ValueError naming a bad one)."""
  vocab = module.config.text.vocab_size if isinstance(module, coca_lib.CoCa) else 0
  cfg = GenerationConfig(
      sampler, int(seq_len), float(temperature), int(top_k), float(top_p), int(num_beams),
      int(min_seq_len), float(repetition_penalty), bool(kv_cache),
      vocab - 2 if sot_token_id is None else int(sot_token_id),
      vocab - 1 if eos_token_id is None else int(eos_token_id), int(pad_token_id))
  _check_settings(module, cfg)
  return cfg


def generate(module, variables: Mapping[str, Any], images, *, sampler: str = 'greedy',
             seq_len: int = 30, temperature: float = 1.0, top_k: int = 1, top_p: float = 0.9,
             num_beams: int = 6, min_seq_len: int = 5, repetition_penalty: float = 1.0,
             fixed_output_length: bool = True, rng: Optional[jax.Array] = None,
             mesh: Optional[Mesh] = None, kv_cache: bool = True,
             sot_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
             pad_token_id: int = 0) -> jax.Array:
  """Captions for images [B, H, W, 3] (normalized) -> int32 tokens [B, seq_len].

  Args:
    module, variables: a CoCa model (`create_model('coca_ViT-L-14')`) and its variables.
    sampler: one of SAMPLERS (see the module docstring); MobileCLIP's data uses 'top_p'.
    seq_len: output length, SOT included (open_clip's default 30).
    temperature, top_k, top_p: sampling settings; num_beams: for 'beam'.
    min_seq_len, repetition_penalty: open_clip's logits processors (defaults 5 and 1.0).
    fixed_output_length: False trims the padding columns as open_clip does without it.
    rng: a PRNG key, needed by the sampling samplers.
    mesh: split the batch over the mesh's batch axes (padded to a multiple of its shards).
    kv_cache: False re-runs the whole prefix at every step (as open_clip; for checking).
    sot_token_id, eos_token_id, pad_token_id: default to the CLIP layout (vocab - 2, vocab - 1, 0).
  """
  cfg = generation_config(
      module, sampler=sampler, seq_len=seq_len, temperature=temperature, top_k=top_k,
      top_p=top_p, num_beams=num_beams, min_seq_len=min_seq_len,
      repetition_penalty=repetition_penalty, kv_cache=kv_cache, sot_token_id=sot_token_id,
      eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  _check(module, images, cfg, rng)
  key = jax.random.key(0) if rng is None else rng
  batch = images.shape[0]
  if mesh is not None:
    shards = sharding.num_batch_shards(mesh)
    padded = -(-batch // shards) * shards
    if padded != batch:
      images = jnp.concatenate([jnp.asarray(images),
                                jnp.zeros((padded - batch,) + images.shape[1:], images.dtype)])
    images = jax.device_put(images, sharding.batch_sharding(mesh))
    variables = _place_variables(variables, mesh)
    key = jax.device_put(key, sharding.replicated(mesh))
  tokens, width = _compiled(module, cfg, mesh)(variables, images, key)
  if tokens.shape[0] != batch:
    tokens = tokens[:batch]
  return tokens if fixed_output_length else tokens[:, :int(width)]


def first_sentences(tokens, tokenizer) -> List[str]:
  """ml-mobileclip-dr's caption from each row of tokens [B, L].

  gen.py: decode(row).split('<end_of_text>')[0].split('<start_of_text>')[-1].split('.')[0]
  .rstrip(). Here on ids: the ids after the last SOT before the first EOT, decoded, cut at the
  first '.', right-stripped (the tokenizer's decode also drops leading whitespace, which no CLIP
  tokenization produces).
  """
  sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
  captions = []
  for row in np.asarray(tokens).tolist():
    if eot in row:
      row = row[:row.index(eot)]
    if sot in row:
      row = row[len(row) - row[::-1].index(sot):]
    captions.append(tokenizer.decode(row).split('.')[0].rstrip())
  return captions

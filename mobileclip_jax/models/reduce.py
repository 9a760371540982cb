"""Cheaper inference: token merging and pruning with static shapes, and a resolution selector.

A reduced forward pass runs the towers' own blocks on the same variables; the blocks take a
`Tokens` record (what each row of the shrinking sequence stands for) and a per-layer hook that
runs after the attention residual, before the MLP (where ToMe merges and EViT prunes):

  merging   ToMe's bipartite soft matching (Bolya et al., ICLR 2023; PuMer's MAM applies it per
            modality): alternate tokens into sets A and B, link each A token to its most similar
            B token (cosine of the attention keys, averaged over heads), merge the r best links
            by size-weighted averaging. Later attention layers add log(size) to the logits
            (proportional attention), so a merged token weighs as the tokens it stands for.
  pruning   keep the ceil(keep * N) best-scored tokens: scores from a learned ranker (Patch
            Ranking's Mix-MLP, `Ranker`), from the attention the pooled token pays (EViT), or
            random; with several prune layers the first layer's scores rank every later step.

r and keep are static, so every layer has a fixed token count under jit. The pooled token (text
EOT, ViT class token) and the text's SOT are never merged or pruned. Causal text towers mark
padding past the EOT as dead: the pooled output never depends on it, so dead tokens merge with
each other first and are pruned first, both exactly. Merged tokens hold the latest position
they cover, and causal masks compare positions once the order is no longer the original one.
"""
import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

PRUNE_METHODS = ('learned', 'random', 'attention')


@dataclasses.dataclass(frozen=True)
class TokenReduction:
  """What one tower drops or merges; hashable (a static argument of the reduced forward).

  Attributes:
    merge: ToMe: tokens merged in each merging layer (r; at most half the mergeable tokens).
    merge_layers: block indices that merge (() = every block; MCi: its attention blocks).
    prune: '' (none), 'learned' (a `Ranker`), 'random' or 'attention' (the pooled token's
      attention, EViT's criterion).
    keep: keep rate of each pruning step (tokens kept = ceil(keep * tokens before)).
    prune_layers: blocks after whose attention tokens are pruned; scores come from the first.
    cut_padding: text towers: padding past the batch's longest text is cut (embedding.py) and
      the rest is masked: exact for causal towers, a change for bidirectional ones.
  """
  merge: int = 0
  merge_layers: Tuple[int, ...] = ()
  prune: str = ''
  keep: float = 1.0
  prune_layers: Tuple[int, ...] = ()
  cut_padding: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'merge_layers', tuple(int(i) for i in self.merge_layers))
    object.__setattr__(self, 'prune_layers', tuple(int(i) for i in self.prune_layers))
    if self.merge < 0:
      raise ValueError(f'merge must be >= 0 tokens per layer, got {self.merge}.')
    if self.prune not in ('',) + PRUNE_METHODS:
      raise ValueError(f'prune must be one of {PRUNE_METHODS} (or empty), got {self.prune!r}.')
    if not 0.0 < self.keep <= 1.0:
      raise ValueError(f'keep must be in (0, 1], got {self.keep}.')
    if self.prune and not self.prune_layers:
      raise ValueError(f"prune={self.prune!r} needs prune_layers (the blocks after which tokens "
                       'are pruned, e.g. (3,)).')
    if any(i < 0 for i in self.merge_layers + self.prune_layers):
      raise ValueError('merge_layers and prune_layers are block indices (>= 0).')

  @property
  def active(self) -> bool:
    """Whether anything is reduced (a spec that reduces nothing still runs the reduced path)."""
    return self.merge > 0 or (bool(self.prune) and self.keep < 1.0) or self.cut_padding

  def merges_at(self, layer: int) -> int:
    return self.merge if not self.merge_layers or layer in self.merge_layers else 0

  def check_depth(self, depth: int, what: str) -> None:
    late = [i for i in self.merge_layers + self.prune_layers if i >= depth]
    if late:
      raise ValueError(f'{what} has {depth} blocks; reduction layers {late} do not exist.')


@flax.struct.dataclass
class Tokens:
  """What each row of a reduced [B, N, C] sequence stands for.

  Attributes:
    pos: int32 [B, N], the latest original position a row covers (causal masks compare these).
    pooled: bool [B, N], the row pooled at the end (exactly one per example).
    protect: bool [B, N], rows never merged or pruned (pooled, text SOT).
    live: bool [B, N] or None (all live), rows other rows may attend to.
    dead: bool [B, N] or None, rows the pooled output never depends on (causal padding).
    size: float32 [B, N] or None (all 1), original tokens merged into each row.
    score: float32 [B, N] or None, the ranking of the first pruning step, kept for later ones.
    ordered: static; positions still increase along N (causal masks can stay triangular).
  """
  pos: jax.Array
  pooled: jax.Array
  protect: jax.Array
  live: Optional[jax.Array] = None
  dead: Optional[jax.Array] = None
  size: Optional[jax.Array] = None
  score: Optional[jax.Array] = None
  ordered: bool = flax.struct.field(pytree_node=False, default=True)

  def attention_mask(self, causal: bool) -> Tuple[Optional[jax.Array], bool]:
    """(mask broadcastable to [B, H, Nq, Nk] or None, whether to add the triangular mask)."""
    mask = None if self.live is None else self.live[:, None, None, :]
    if not causal or self.ordered:
      return mask, causal
    order = self.pos[:, None, None, :] <= self.pos[:, None, :, None]
    return (order if mask is None else order & mask), False

  def pooled_index(self) -> jax.Array:
    return jnp.argmax(self.pooled, axis=-1)


def sequence_tokens(batch: int, length: int) -> Tokens:
  """A ViT's tokens: the class token (row 0) is pooled and protected."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return Tokens(pos=pos, pooled=pos == 0, protect=pos == 0)


def text_tokens(token_ids: jax.Array, causal: bool, mask_padding: bool = False) -> Tokens:
  """A text tower's tokens: the EOT (argmax id) is pooled; SOT and EOT are protected.

  Causal towers mark everything past the EOT dead and unattended (exact: no earlier query can see
  it); `mask_padding` does the same for a bidirectional tower, which changes its output.
  """
  b, n = token_ids.shape
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  eot = jnp.argmax(token_ids, axis=-1)[:, None]
  tokens = Tokens(pos=pos, pooled=pos == eot, protect=(pos == eot) | (pos == 0))
  if causal or mask_padding:
    tokens = tokens.replace(live=pos <= eot, dead=pos > eot)
  return tokens


def pool(x: jax.Array, tokens: Optional[Tokens], default_index) -> jax.Array:
  """The pooled row [B, C]: `default_index` ([B] or an int) on the unreduced path."""
  if tokens is None and isinstance(default_index, int):
    return x[:, default_index]
  index = default_index if tokens is None else tokens.pooled_index()
  return x[jnp.arange(x.shape[0]), index]


# ----------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching, size-weighted merging, unmerging.


@flax.struct.dataclass
class Matching:
  """Which rows merge: `unmerged` [B, Na - r] rows of A (ascending), `src` [B, r] rows of A
  merged into `dst` [B, r] rows of B. A = even rows, B = odd rows of the sequence."""
  unmerged: jax.Array
  src: jax.Array
  dst: jax.Array


def mergeable(n: int, r: int, protected: int) -> int:
  """r clipped so that only unprotected A rows merge (A holds ceil(n / 2) rows)."""
  return max(0, min(r, (n + 1) // 2 - protected, n // 2))


def bipartite_soft_matching(metric: jax.Array, r: int, protect: Optional[jax.Array] = None,
                            dead: Optional[jax.Array] = None) -> Matching:
  """ToMe's matching on metric [B, N, C] (keys averaged over heads): the r most similar A->B links.

  Protected rows are neither sources (A) nor destinations (B). Dead rows link only to dead rows,
  and those links come first. Ties in similarity keep the lower A index first.
  """
  metric = metric.astype(jnp.float32)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum('bic,bjc->bij', a, b)
  if dead is not None:
    da, db = dead[:, ::2, None], dead[:, None, 1::2]
    scores = jnp.where(da & db, jnp.inf, jnp.where(da | db, -jnp.inf, scores))
  if protect is not None:
    scores = jnp.where(protect[:, ::2, None] | protect[:, None, 1::2], -jnp.inf, scores)
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  order = jnp.argsort(-node_max, axis=-1, stable=True)
  src = order[:, :r]
  return Matching(unmerged=jnp.sort(order[:, r:], axis=-1), src=src,
                  dst=jnp.take_along_axis(node_idx, src, axis=-1))


def _scatter(dst: jax.Array, index: jax.Array, src: jax.Array, mode: str) -> jax.Array:
  def one(d, i, s):
    return d.at[i].add(s) if mode == 'sum' else d.at[i].max(s)
  return jax.vmap(one)(dst, index, src)


def merge(x: jax.Array, m: Matching, mode: str = 'sum') -> jax.Array:
  """[B, N, ...] -> [B, N - r, ...]: unmerged A rows, then B rows with their sources added
  ('sum') or maxed ('max') in."""
  a, b = x[:, ::2], x[:, 1::2]
  take = lambda rows, idx: jnp.take_along_axis(rows, idx.reshape(idx.shape + (1,) * (x.ndim - 2)),
                                               axis=1)
  return jnp.concatenate([take(a, m.unmerged), _scatter(b, m.dst, take(a, m.src), mode)], axis=1)


def merge_wavg(x: jax.Array, m: Matching,
               size: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """ToMe's merge_wavg: (size-weighted means of the merged rows [B, N - r, C], their sizes)."""
  size = jnp.ones(x.shape[:2], jnp.float32) if size is None else size
  total = merge(size, m)
  return (merge(x.astype(jnp.float32) * size[..., None], m) / total[..., None]).astype(
      x.dtype), total


def merge_tokens(x: jax.Array, tokens: Tokens, m: Matching) -> Tuple[jax.Array, Tokens]:
  """`merge_wavg` and the bookkeeping of the merged rows."""
  x, total = merge_wavg(x, m, tokens.size)
  flag = lambda f: None if f is None else merge(f.astype(jnp.int32), m, 'max') > 0
  return x, tokens.replace(
      pos=merge(tokens.pos, m, 'max'), pooled=flag(tokens.pooled), protect=flag(tokens.protect),
      live=flag(tokens.live), dead=flag(tokens.dead), size=total,
      score=None if tokens.score is None else merge(tokens.score, m, 'max'), ordered=False)


def unmerge(y: jax.Array, m: Matching, n: int) -> jax.Array:
  """[B, N - r, C] -> [B, n, C]: every original row gets the value of the row it was merged into."""
  kept = m.unmerged.shape[1]
  unm, dst = y[:, :kept], y[:, kept:]
  src = jnp.take_along_axis(dst, m.dst[..., None], axis=1)
  put = jax.vmap(lambda rows, i, v: rows.at[i].set(v))
  a = jnp.zeros((y.shape[0], (n + 1) // 2, y.shape[2]), y.dtype)
  a = put(put(a, m.unmerged, unm), m.src, src)
  out = jnp.zeros((y.shape[0], n, y.shape[2]), y.dtype)
  return out.at[:, ::2].set(a).at[:, 1::2].set(dst)


# ----------------------------------------------------------------------------------------------
# Pruning.


def keep_count(n: int, keep: float) -> int:
  return max(1, math.ceil(keep * n - 1e-9))


def prune_tokens(x: jax.Array, tokens: Tokens, scores: jax.Array,
                 keep: int) -> Tuple[jax.Array, Tokens]:
  """Keeps the `keep` best-scored rows (protected first, dead last), in their current order."""
  scores = scores.astype(jnp.float32)
  if tokens.dead is not None:
    scores = jnp.where(tokens.dead, -jnp.inf, scores)
  scores = jnp.where(tokens.protect, jnp.inf, scores)
  idx = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1)
  take = lambda f: None if f is None else jnp.take_along_axis(
      f, idx.reshape(idx.shape + (1,) * (f.ndim - 2)), axis=1)
  return take(x), tokens.replace(
      pos=take(tokens.pos), pooled=take(tokens.pooled), protect=take(tokens.protect),
      live=take(tokens.live), dead=take(tokens.dead), size=take(tokens.size),
      score=take(scores))


def pooled_attention(q: jax.Array, k: jax.Array, tokens: Tokens, kind: str) -> jax.Array:
  """EViT's score: the attention the pooled row's query pays to every key, mean over heads.

  q, k: [B, N, H, D]. Returns [B, N] float32 (softmax rows sum to 1; sigmoid rows do not).
  """
  qp = q[jnp.arange(q.shape[0]), tokens.pooled_index()]
  logits = jnp.einsum('bhd,bkhd->bhk', qp, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  size = 1.0 if tokens.size is None else tokens.size[:, None, :]
  if kind == 'sigmoid':
    n = k.shape[1] if tokens.size is None else tokens.size.sum(-1)[:, None, None]
    weights = jax.nn.sigmoid(logits - jnp.log(n)) * size
  else:
    logits = logits + jnp.log(size)
    if tokens.live is not None:
      logits = jnp.where(tokens.live[:, None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
  if tokens.live is not None:
    weights = jnp.where(tokens.live[:, None, :], weights, 0.0)
  return weights.mean(1)


# ----------------------------------------------------------------------------------------------
# Patch Ranking's predictor.


class Ranker(nn.Module):
  """Patch Ranking's Mix-MLP predictor: features [B, N, C] at a layer -> token scores [B, N].

  Channels are reduced to `dim`, one Mixer block (token MLP across the N rows, then channel MLP;
  pre-norm, residual, GELU) mixes them, and a linear head gives one score per row. N is fixed
  (the token MLP's width): a ranker serves the sequence length it was trained for.
  """
  tokens: int
  dim: int = 64
  token_hidden: int = 0   # 0 = max(tokens // 2, 8)
  channel_hidden: int = 0  # 0 = 4 * dim

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[1] != self.tokens:
      raise ValueError(f'This ranker was trained on {self.tokens} tokens and cannot rank '
                       f'{x.shape[1]}; train one for this sequence length or resolution.')
    gelu = lambda v: jax.nn.gelu(v, approximate=False)
    x = nn.Dense(self.dim, name='reduce')(nn.LayerNorm(name='norm_in')(x.astype(jnp.float32)))
    y = nn.LayerNorm(name='norm_tokens')(x).swapaxes(1, 2)
    y = nn.Dense(self.tokens, name='token_fc2')(
        gelu(nn.Dense(self.token_hidden or max(self.tokens // 2, 8), name='token_fc1')(y)))
    x = x + y.swapaxes(1, 2)
    y = nn.LayerNorm(name='norm_channels')(x)
    x = x + nn.Dense(self.dim, name='channel_fc2')(
        gelu(nn.Dense(self.channel_hidden or 4 * self.dim, name='channel_fc1')(y)))
    return nn.Dense(1, name='head')(x)[..., 0]


def ranking_loss(predicted: jax.Array, golden: jax.Array,
                 valid: Optional[jax.Array] = None) -> jax.Array:
  """Patch Ranking's listwise loss: -sum_t softmax(z(golden))_t log softmax(predicted)_t.

  predicted, golden: [B, N] (higher = keep); z() standardizes each row over its valid rows.
  Returns the mean over the batch.
  """
  valid = jnp.ones(golden.shape, bool) if valid is None else valid
  count = valid.sum(-1, keepdims=True)
  mean = jnp.where(valid, golden, 0).sum(-1, keepdims=True) / count
  std = jnp.sqrt(jnp.where(valid, (golden - mean) ** 2, 0).sum(-1, keepdims=True) / count)
  target = jax.nn.softmax(jnp.where(valid, (golden - mean) / (std + 1e-6), -jnp.inf), axis=-1)
  log_p = jax.nn.log_softmax(jnp.where(valid, predicted, -jnp.inf), axis=-1)
  return -jnp.where(valid, target * log_p, 0).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# The per-layer hook of a reduced forward pass.

Hook = Callable[[jax.Array, jax.Array, jax.Array, Tokens], Tuple[jax.Array, Tokens]]


class Plan:
  """Builds the hooks of one tower's reduced forward from its `TokenReduction`.

  Args:
    spec: the reduction.
    depth: blocks in the tower.
    attention: 'softmax' or 'sigmoid' (the 'attention' pruning criterion follows it).
    protected: the most protected rows an example has (clips ToMe's r).
    ranker: features [B, N, C] -> scores [B, N], for prune='learned'.
    seed: of the 'random' criterion (scores are fixed per call shape, not per batch).
    extra: an additional hook per layer (golden-score windows, feature capture), or None.
  """

  def __init__(self, spec: TokenReduction, depth: int, *, attention: str = 'softmax',
               protected: int = 1, ranker: Optional[Callable[[jax.Array], jax.Array]] = None,
               seed: int = 0, extra: Optional[Callable[[int], Optional[Hook]]] = None,
               what: str = 'the tower'):
    spec.check_depth(depth, what)
    if spec.prune == 'learned' and ranker is None:
      raise ValueError("prune='learned' needs a trained ranker (launch/train_reducer.py).")
    self.spec, self.attention, self.protected = spec, attention, protected
    self.ranker, self.seed, self.extra = ranker, seed, extra

  def _score(self, layer: int, x, q, k, tokens: Tokens) -> jax.Array:
    method = self.spec.prune
    if method == 'learned':
      return self.ranker(x)
    if method == 'attention':
      return pooled_attention(q, k, tokens, self.attention)
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), layer)
    return jax.random.uniform(key, x.shape[:2])

  def hook(self, layer: int) -> Optional[Hook]:
    """The hook of block `layer` (None when it reduces nothing)."""
    spec, extra = self.spec, self.extra(layer) if self.extra else None
    r = spec.merges_at(layer)
    prune = bool(spec.prune) and layer in spec.prune_layers and spec.keep < 1.0
    if not (r or prune or extra):
      return None

    def run(x, q, k, tokens):
      if extra:
        x, tokens = extra(x, q, k, tokens)
      if prune and (layer == spec.prune_layers[0] or tokens.score is None):
        # Scored before this layer's merge (q, k are of the unmerged rows); merged by max.
        tokens = tokens.replace(score=self._score(layer, x, q, k, tokens))
      if r:
        clipped = mergeable(x.shape[1], r, self.protected)
        if clipped:
          m = bipartite_soft_matching(k.mean(2), clipped, tokens.protect, tokens.dead)
          x, tokens = merge_tokens(x, tokens, m)
      if prune:
        x, tokens = prune_tokens(x, tokens, tokens.score, keep_count(x.shape[1], spec.keep))
      return x, tokens
    return run


def run_blocks(blocks: Sequence[nn.Module], x: jax.Array, tokens: Tokens, plan: Plan,
               train: bool = False) -> Tuple[jax.Array, Tokens]:
  """Runs transformer blocks (attention.TransformerBlock) with the plan's hooks."""
  for i, block in enumerate(blocks):
    x, tokens = block(x, train=train, tokens=tokens, hook=plan.hook(i))
  return x, tokens


# ----------------------------------------------------------------------------------------------
# Dynamic input resolution.


class ResolutionSelector(nn.Module):
  """DRNet-style selector: a small CNN on a low-resolution copy of the image predicts, for every
  candidate side, how far that side's embedding is from the full-size one.

  images [B, S, S, 3] (normalized; resized to `input_size` here) -> [B, num_sizes] float32,
  the predicted log(1 - cosine) (so a side is good enough for tau when the output is
  <= log(1 - tau)).
  """
  num_sizes: int
  input_size: int = 64
  widths: Tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize(images.astype(jnp.float32), self.input_size, 'bilinear')
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), strides=2, padding=1, name=f'conv_{i}')(x)
      x = jax.nn.gelu(nn.LayerNorm(name=f'norm_{i}')(x), approximate=False)
    x = jax.nn.gelu(nn.Dense(self.widths[-1], name='fc')(x.mean((1, 2))), approximate=False)
    return nn.Dense(self.num_sizes, name='head')(x)


def resize(images: jax.Array, size: int, method: str) -> jax.Array:
  """[B, S, S, C] -> [B, size, size, C], antialiased when shrinking (as PIL's resize)."""
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), method,
                          antialias=True)


def selector_target(cosines: jax.Array, floor: float = 1e-4) -> jax.Array:
  """The selector's regression target log(1 - cosine), floored (cosine 1 is not -inf)."""
  return jnp.log(jnp.maximum(1.0 - cosines, floor))


def choose_size(predicted: jax.Array, sizes: Sequence[int], tau: float) -> jax.Array:
  """Per row, the index of the smallest side whose predicted cosine is >= tau (the largest side,
  the model's own, when none is): predicted [B, R] from `ResolutionSelector`, sizes ascending."""
  good = predicted <= jnp.log(1.0 - tau)
  good = good.at[:, len(sizes) - 1].set(True)
  return jnp.argmax(good, axis=-1)

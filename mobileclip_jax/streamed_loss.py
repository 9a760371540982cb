"""The DR loss streamed over column blocks: memory O(rows x block) instead of O(rows x batch).

`losses.py` holds the objective and its reference form, which builds each [R, C] logit matrix
(R rows on this device, C columns: the global batch). At MobileCLIP2's batch of 65,536 on 8
devices one such fp32 matrix is 2 GiB and the DR loss needs several. Here every per-row sum is
accumulated over blocks of `block_size` columns, the way Inf-CL ("Breaking the Memory Barrier",
arXiv 2410.17243) and flash attention do:

- softmax with teachers, pass 1: each teacher's row log-sum-exp L^k_i = LSE_j(tau_k t^k_ij), merged
  online (lse <- logaddexp(lse, block lse)); the targets p_ij = (1/K) sum_k exp(tau_k t^k_ij - L^k_i)
  need them before any block can be scored ('logits' averaging: one LSE of the mean logits).
- pass 2: the student's LSE_j z_ij, its positive z_ii, sum_j p_ij, sum_j p_ij z'_ij (z' = the
  distillation logits, z unless a fixed student scale is set) and the running argmax of z and of p
  (the agreement metric). Per row: clip = LSE(z) - z_ii, distill = LSE(z') sum_j p - sum_j p z'.
- sigmoid: every term is a sum over pairs, so one pass (big_vision's chunked sigmoid loss).
- backward (a custom VJP): the blocks are recomputed from the inputs and the saved [R] statistics,
  never stored: dL/dz = g_clip (softmax(z) - onehot) and dL/dz' = g_distill (sum_j p softmax(z') -
  p) for softmax, -y sigmoid(-y z) for sigmoid; then d rows += dcos @ cols_block and
  d cols_block = dcos^T @ rows.

Under a mesh (inside `jax.shard_map`) the columns are not all-gathered: each device's own columns
travel around a ring of the batch devices (`lax.ppermute`; the next shard is sent while this one is
scored), and in the backward pass their gradient travels with them and arrives home complete.
Per device the loss then holds its rows, two column shards and a few [R, block] tiles. On the CPU
backend the shares are all-gathered once per sweep instead (their gradient comes home by a
reduce-scatter): XLA:CPU runs a blocking collective on a worker of a thread pool that can be smaller
than the device count, and a ring transfer in flight beside other collectives then deadlocks the
devices (fake CPU devices on 2 cores: "Termination timeout for collective permute ... Expected 8
threads"). The columns are [B, E] per device there, still no [R, B] matrix.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# Backends whose collectives block a pool thread: the columns are gathered, not circulated.
GATHER_PLATFORMS = frozenset({'cpu'})


@dataclasses.dataclass(frozen=True)
class Ring:
  """The devices the columns circulate over: the mesh's batch axes (inside shard_map).

  circulate=False gathers every share once per sweep instead (`GATHER_PLATFORMS`).
  """
  axes: tuple[str, ...]
  size: int
  circulate: bool = True

  @classmethod
  def of(cls, mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> 'Ring':
    size = int(np.prod([mesh.shape[a] for a in axes]))
    return cls(axes, size, mesh.devices.flat[0].platform not in GATHER_PLATFORMS)


def direction_row_sums(a_rows: Array, b_cols: Array, teacher_rows: Optional[Array],
                       teacher_cols: Optional[Array], scale: Array, bias: Array | float,
                       config: Any, losses: bool, ring: Optional[Ring]) -> dict[str, Array]:
  """The streamed form of `losses._direction_row_sums` (same terms, same sums).

  Args:
    a_rows: [R, E] unit student rows of one modality (this device's rows under a ring).
    b_cols: [S, E] unit student columns of the other modality: the whole batch without a ring,
      this device's own share (the same examples as a_rows) with one.
    teacher_rows: [R, sum(D_k)] stored teacher vectors of the rows (any float dtype, not
      normalized: each block is normalized per teacher as it is scored), or None without teachers.
    teacher_cols: [S, sum(D_k)] stored teacher vectors of the columns, or None.
    scale: [] student logit scale (exp'd and clamped).
    bias: [] student logit bias (ignored for softmax).
    config: the `losses.LossConfig` (kind, average, teacher scales and biases, student_scale,
      block_size > 0).
    losses: False computes only the agreement (without gradient).
    ring: the batch devices under shard_map, or None on one device.

  Returns:
    'clip', 'distill' (with teachers) when `losses`, 'agreement' (with teachers) -> [] sums.
  """
  has_teacher = teacher_rows is not None
  if not losses and not has_teacher:
    return {}
  bias = jnp.asarray(bias if config.kind == 'sigmoid' else 0.0, a_rows.dtype)
  args = (a_rows, b_cols, teacher_rows, teacher_cols, scale, bias)
  if not losses:
    _, sums = _forward(config, has_teacher, False, ring, *lax.stop_gradient(args))
    return {'agreement': sums[2]}
  clip, distill, agreement = _streamed(config, has_teacher, ring, *args)
  sums = {'clip': clip}
  if has_teacher:
    sums.update(distill=distill, agreement=agreement)
  return sums


# ------------------------------------------------------------------------------ row math
# Shared with the reference form in losses.py.

# F.normalize's eps: a zero vector stays zero instead of becoming NaN.
_NORM_EPS = 1e-12


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or the input dtype when wider (float64 under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def unit(x: Array) -> Array:
  """[N, D] -> [N, D] rows L2-normalized in float32 (F.normalize: x / max(|x|, eps))."""
  x = x.astype(compute_dtype(x.dtype))
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS**2))


def unit_slices(x: Array, dims: tuple[int, ...]) -> list[Array]:
  """[N, sum(dims)] -> per-teacher [N, dims[k]] slices, each row L2-normalized."""
  return [unit(s) for s in jnp.split(x, np.cumsum(dims)[:-1], axis=-1)]


def matmul_t(a: Array, b: Array) -> Array:
  """a [R, E] @ b[C, E]^T -> [R, C] at full float32 precision (TPUs default to one bf16 pass)."""
  return jnp.einsum('re,ce->rc', a, b, precision=lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------ one tile


def _teacher_logits(config, rows: Array, cols: Array) -> list[Array]:
  """[R, b] logits of each teacher ('probs') or their mean ('logits'), biases added (sigmoid).

  rows [R, sum(D_k)] and cols [b, sum(D_k)] are the stored vectors, normalized per teacher here.
  """
  biases = config.teacher_biases or (0.0,) * len(config.teacher_dims)
  rows, cols = (unit_slices(x, config.teacher_dims) for x in (rows, cols))
  logits = [tau * matmul_t(r, c) + b
            for tau, b, r, c in zip(config.teacher_scales, biases, rows, cols)]
  return logits if config.average == 'probs' else [sum(logits) / len(logits)]


@dataclasses.dataclass
class _Tile:
  cos: Array            # [R, b] student cosines.
  z: Array              # [R, b] logits with the learned scale (contrastive term, agreement).
  zd: Array             # [R, b] distillation logits (z itself unless a student scale is fixed).
  positive: Array       # [R, b] bool, the paired column of each row.
  target: Optional[Array]  # [R, b] teacher probabilities p (softmax) or labels 2P - 1 (sigmoid).


def _tile(config, has_teacher: bool, a: Array, teacher_a: Optional[Array], b: Array,
          teacher_b: Optional[Array], scale: Array, bias: Array,
          teacher_lse: Optional[list[Array]], columns: Array, rows: Array) -> _Tile:
  """Everything about rows a against one block of columns b (global indices `columns`)."""
  cos = matmul_t(a, b)
  sigmoid = config.kind == 'sigmoid'
  z = scale * cos + bias if sigmoid else scale * cos
  zd = z
  if config.student_scale is not None:
    zd = config.student_scale * cos + bias if sigmoid else config.student_scale * cos
  target = None
  if has_teacher and (sigmoid or teacher_lse is not None):
    logits = _teacher_logits(config, teacher_a, teacher_b)
    if sigmoid:
      target = 2.0 * (sum(jax.nn.sigmoid(x) for x in logits) / len(logits)) - 1.0
    else:
      target = sum(jnp.exp(x - lse[:, None]) for x, lse in zip(logits, teacher_lse)) / len(logits)
  return _Tile(cos, z, zd, columns[None, :] == rows[:, None], target)


def _argmax_update(best: tuple[Array, Array], values: Array, columns: Array):
  """Running (max, first argmax) per row over blocks seen in any order."""
  j = jnp.argmax(values, axis=1)
  value = jnp.take_along_axis(values, j[:, None], axis=1)[:, 0]
  index = columns[j]
  better = (value > best[0]) | ((value == best[0]) & (index < best[1]))
  return jnp.where(better, value, best[0]), jnp.where(better, index, best[1])


# ------------------------------------------------------------------------------ the sweep


def _sweep(body: Callable, carry: Any, cols: Any, grads: Any, block: int,
           ring: Optional[Ring]) -> tuple[Any, Any]:
  """Runs `body` over every block of every column, wherever the columns live.

  Args:
    body: (carry, column block pytree, global column indices [b]) -> (carry, gradient block
      pytree shaped like `grads`' blocks, or None).
    carry: per-row state kept on this device.
    cols: pytree of [S, ...] columns (all of them without a ring; this device's share with one).
    grads: pytree of [S, ...] gradient accumulators travelling with `cols`, or None.
    block: columns per block; a last, smaller block takes the remainder of S.
    ring: None, or the devices whose shares of the columns are visited one after the other (or
      gathered, with circulate=False).

  Returns:
    (carry, grads): grads summed over every device's rows, back on the device owning the columns.
  """
  def one_share(carry, grads, cols, first):
    size = jax.tree.leaves(cols)[0].shape[0]
    width = min(block, size)
    full, tail = divmod(size, width)

    def one_block(carry, grads, start, width):
      take = lambda x: lax.dynamic_slice_in_dim(x, start, width)
      columns = (first + start + jnp.arange(width)).astype(jnp.int32)
      carry, delta = body(carry, jax.tree.map(take, cols), columns)
      if grads is not None:
        grads = jax.tree.map(
            lambda g, d: lax.dynamic_update_slice_in_dim(g, take(g) + d, start, 0), grads, delta)
      return carry, grads

    carry, grads = lax.fori_loop(0, full, lambda k, s: one_block(*s, k * width, width),
                                 (carry, grads))
    return one_block(carry, grads, full * width, tail) if tail else (carry, grads)

  if ring is None:
    return one_share(carry, grads, cols, 0)
  if not ring.circulate:
    gather = lambda x: lax.all_gather(x, ring.axes, axis=0, tiled=True)
    every = jax.tree.map(gather, cols)
    zeros = None if grads is None else jax.tree.map(
        lambda g: lax.pcast(jnp.zeros((ring.size * g.shape[0],) + g.shape[1:], g.dtype),
                            ring.axes, to='varying'), grads)
    carry, summed = one_share(carry, zeros, every, 0)
    if grads is not None:
      grads = jax.tree.map(
          lambda g, s: g + lax.psum_scatter(s, ring.axes, scatter_dimension=0, tiled=True),
          grads, summed)
    return carry, grads
  me = lax.axis_index(ring.axes)
  perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
  size = jax.tree.leaves(cols)[0].shape[0]

  def step(t, state):
    carry, cols, grads = state
    following = lax.ppermute(cols, ring.axes, perm)  # In flight while this share is scored.
    carry, grads = one_share(carry, grads, cols, ((me - t) % ring.size) * size)
    if grads is not None:
      grads = lax.ppermute(grads, ring.axes, perm)
    return carry, following, grads

  carry, _, grads = lax.fori_loop(0, ring.size, step, (carry, cols, grads))
  return carry, grads


# ------------------------------------------------------------------------------ forward, VJP


def _row_positions(ring: Optional[Ring], num_rows: int) -> Array:
  """Global indices of this device's rows: row r's positive is the column of that index."""
  offset = 0 if ring is None else lax.axis_index(ring.axes) * num_rows
  return (offset + jnp.arange(num_rows)).astype(jnp.int32)


def _forward(config, has_teacher: bool, losses: bool, ring: Optional[Ring], a, b, teacher_a,
             teacher_b, scale, bias) -> tuple[tuple, tuple[Array, Array, Array]]:
  """(residuals for the backward pass, (clip, distill, agreement) sums); absent terms are 0."""
  dtype = a.dtype
  rows = _row_positions(ring, a.shape[0])
  softmax = config.kind == 'softmax'
  # Initial [R] accumulators, like a's rows (under shard_map: varying over the devices, as the
  # loops' results are).
  zeros = jnp.zeros_like(a[:, 0])
  minus_inf = jnp.full_like(a[:, 0], -jnp.inf)
  no_argmax = (minus_inf, jnp.full_like(a[:, 0], jnp.iinfo(jnp.int32).max, dtype=jnp.int32))

  teacher_lse = None
  if has_teacher and softmax:
    def teacher_pass(lse, teacher_b, columns):
      logits = _teacher_logits(config, teacher_a, teacher_b)
      return [jnp.logaddexp(l, jax.nn.logsumexp(x, axis=1)) for l, x in zip(lse, logits)], None

    families = len(config.teacher_dims) if config.average == 'probs' else 1
    teacher_lse, _ = _sweep(teacher_pass, [minus_inf] * families, teacher_b, None,
                            config.block_size, ring)

  def student_pass(acc, cols, columns):
    t = _tile(config, has_teacher, a, teacher_a, *cols, scale, bias, teacher_lse, columns, rows)
    acc = dict(acc)
    if losses and softmax:
      acc['lse'] = jnp.logaddexp(acc['lse'], jax.nn.logsumexp(t.z, axis=1))
      acc['positive'] += jnp.sum(jnp.where(t.positive, t.z, 0.0), axis=1)
      if has_teacher:
        if config.student_scale is not None:
          acc['lse_d'] = jnp.logaddexp(acc['lse_d'], jax.nn.logsumexp(t.zd, axis=1))
        acc['p'] += jnp.sum(t.target, axis=1)
        acc['pz'] += jnp.sum(t.target * t.zd, axis=1)
    elif losses:
      acc['clip'] -= jnp.sum(jax.nn.log_sigmoid(jnp.where(t.positive, t.z, -t.z)), axis=1)
      if has_teacher:
        acc['distill'] -= jnp.sum(jax.nn.log_sigmoid(t.target * t.zd), axis=1)
    if has_teacher:
      acc['argmax'] = _argmax_update(acc['argmax'], t.z, columns)
      acc['target_argmax'] = _argmax_update(acc['target_argmax'], t.target, columns)
    return acc, None

  acc = {}
  if losses and softmax:
    acc.update(lse=minus_inf, positive=zeros)
    if has_teacher:
      acc.update(p=zeros, pz=zeros, **({'lse_d': minus_inf} if config.student_scale is not None else {}))
  elif losses:
    acc.update(clip=zeros, **({'distill': zeros} if has_teacher else {}))
  if has_teacher:
    acc.update(argmax=no_argmax, target_argmax=no_argmax)
  acc, _ = _sweep(student_pass, acc, (b, teacher_b), None, config.block_size, ring)

  clip = distill = agreement = jnp.zeros((), dtype)
  lse = lse_d = p_sum = None
  if losses and softmax:
    lse = acc['lse']
    clip = jnp.sum(lse - acc['positive'])
    if has_teacher:
      lse_d, p_sum = acc.get('lse_d', lse), acc['p']
      distill = jnp.sum(lse_d * p_sum - acc['pz'])
  elif losses:
    clip = jnp.sum(acc['clip'])
    if has_teacher:
      distill = jnp.sum(acc['distill'])
  if has_teacher:
    agreement = jnp.sum((acc['argmax'][1] == acc['target_argmax'][1]).astype(dtype))
  residuals = (a, b, teacher_a, teacher_b, scale, bias, teacher_lse, lse, lse_d, p_sum)
  return residuals, (clip, distill, agreement)


def _backward(config, has_teacher: bool, ring: Optional[Ring], residuals, cotangents):
  """Recomputes each tile to turn the row statistics into gradients of the rows, columns, scalars."""
  a, b, teacher_a, teacher_b, scale, bias, teacher_lse, lse, lse_d, p_sum = residuals
  g_clip, g_distill, _ = cotangents
  rows = _row_positions(ring, a.shape[0])
  softmax = config.kind == 'softmax'
  fixed_scale = config.student_scale is not None

  def body(carry, cols, columns):
    d_a, d_scale, d_bias = carry
    t = _tile(config, has_teacher, a, teacher_a, *cols, scale, bias, teacher_lse, columns, rows)
    if softmax:
      dz = g_clip * (jnp.exp(t.z - lse[:, None]) - t.positive.astype(a.dtype))
    else:
      sign = jnp.where(t.positive, 1.0, -1.0).astype(a.dtype)
      dz = -g_clip * sign * jax.nn.sigmoid(-sign * t.z)
    dzd = None
    if has_teacher:
      if softmax:
        dzd = g_distill * (p_sum[:, None] * jnp.exp(t.zd - lse_d[:, None]) - t.target)
      else:
        dzd = -g_distill * t.target * jax.nn.sigmoid(-t.target * t.zd)
      if not fixed_scale:
        dz, dzd = dz + dzd, None
    d_cos = scale * dz if dzd is None else scale * dz + config.student_scale * dzd
    d_scale += jnp.sum(dz * t.cos)
    if not softmax:
      d_bias += jnp.sum(dz) + (0.0 if dzd is None else jnp.sum(dzd))
    d_a += jnp.einsum('rc,ce->re', d_cos, cols[0], precision=lax.Precision.HIGHEST)
    d_b = jnp.einsum('rc,re->ce', d_cos, a, precision=lax.Precision.HIGHEST)
    return (d_a, d_scale, d_bias), d_b

  scalar = jnp.zeros_like(a[0, 0])  # Varying under shard_map, as the sums added to it.
  carry = (jnp.zeros_like(a), scalar, scalar)
  (d_a, d_scale, d_bias), d_b = _sweep(body, carry, (b, teacher_b), jnp.zeros_like(b),
                                       config.block_size, ring)
  if ring is not None:  # The scalars are the same on every device: their gradient is the sum.
    d_scale, d_bias = lax.psum((d_scale, d_bias), ring.axes)
  no_teacher_grads = jax.tree.map(jnp.zeros_like, (teacher_a, teacher_b))
  return (d_a, d_b, *no_teacher_grads, d_scale, d_bias)


def _streamed_fwd(config, has_teacher, ring, *args):
  residuals, sums = _forward(config, has_teacher, True, ring, *args)
  return sums, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _streamed(config, has_teacher, ring, a, b, teacher_a, teacher_b, scale, bias):
  """(clip, distill, agreement) sums over this device's rows, with the streamed VJP."""
  return _forward(config, has_teacher, True, ring, a, b, teacher_a, teacher_b, scale, bias)[1]


_streamed.defvjp(_streamed_fwd, _backward)

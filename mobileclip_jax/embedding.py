"""One embedding engine, for evaluation and for reinforcement (the teachers).

A jitted encoder per (model, tower, mesh): uint8 images are normalized on the device with the
model's mean/std (the same float32 math as on the host), encoded, and L2-normalized in float32
(open_clip's F.normalize: x / max(|x|, 1e-12)); inputs and outputs are split over the mesh's
batch axes. Batches have a fixed size so that each tower compiles once; a short last batch is
padded and its rows dropped.

  embed_stream(...)  a stream of process-local batches with integer key columns (evaluation:
                     every process holds part of the data); gathered to every process, padding
                     (key -1) dropped, rows sorted by key.
  embed_array(...)   one local array, in fixed-size padded batches, dispatched asynchronously
                     (the teachers of launch/reinforce.py, each process on its local devices).

Cheaper inference (mobileclip_jax/inference.py): an encoder may take a `TowerPass`, which runs
the tower's reduced forward (models/reduce.py) on the same variables, at another image side, or
runs the resolution selector (tower SELECT). Learned parts travel in the variables: 'ranker'
(a Patch Ranking predictor's params) and 'selector'. Text batches of a pass with cut_padding
lose the padding columns past the longest text of the batch (in buckets of 8 columns).
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from mobileclip_jax import sharding
from mobileclip_jax.data import preprocess
from mobileclip_jax.models import layers
from mobileclip_jax.models import reduce as reduce_lib

IMAGE = 'encode_image'
TEXT = 'encode_text'
SELECT = 'select_resolution'
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps.
_PAD_BUCKET = 8    # Cut text batches to a multiple of this many columns (few compiled shapes).


@dataclasses.dataclass(frozen=True)
class TowerPass:
  """How one compiled encoder reduces its tower (static; None/0/() = not at all).

  Attributes:
    reduction: a reduce.TokenReduction for the tower's reduced forward.
    image_size: encode images resized (on the device) to this side.
    ranker: the reduce.Ranker's fields as (name, value) pairs, for prune='learned'; its
      parameters come as variables['ranker'].
    selector: SELECT only: the reduce.ResolutionSelector's fields as pairs; its parameters come
      as variables['selector'].
  """
  reduction: Optional[reduce_lib.TokenReduction] = None
  image_size: int = 0
  ranker: Tuple[Tuple[str, Any], ...] = ()
  selector: Tuple[Tuple[str, Any], ...] = ()


NO_PASS = TowerPass()


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm in float32 (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


@functools.lru_cache(maxsize=64)
def encoder(model, tower: str, mesh: Mesh,
            tower_pass: TowerPass = NO_PASS) -> Callable[[Any, jax.Array], jax.Array]:
  """jit(variables, inputs [B, ...]) -> unit embeddings [B, E] float32, split over the batch.

  `tower` is IMAGE (uint8 images [B, S, S, 3]), TEXT (int32 tokens [B, L]) or SELECT (uint8
  images -> the selector's [B, num_sizes] predictions, not normalized).
  """
  if tower not in (IMAGE, TEXT, SELECT):
    raise ValueError(f'tower must be {IMAGE!r}, {TEXT!r} or {SELECT!r}, got {tower!r}.')
  mean, std = model.config.mean, model.config.std
  p = tower_pass

  def encode(variables, inputs):
    variables = dict(variables)
    ranker, selector = variables.pop('ranker', None), variables.pop('selector', None)
    if tower != TEXT:
      inputs = preprocess.normalize(inputs, mean, std)
    if tower == SELECT:
      return reduce_lib.ResolutionSelector(**dict(p.selector)).apply({'params': selector}, inputs)
    if p.image_size:
      inputs = reduce_lib.resize(inputs, p.image_size, model.config.interpolation)
    kwargs = {}
    if p.reduction is not None:
      kwargs['reduction'] = p.reduction
    if p.ranker:
      kwargs['ranker'] = functools.partial(reduce_lib.Ranker(**dict(p.ranker)).apply,
                                           {'params': ranker})
    return unit_rows(model.apply(variables, inputs, method=tower, **kwargs))

  return jax.jit(layers.for_platform(encode, sharding.platform(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def global_max(values: Sequence[int], mesh: Mesh) -> List[int]:
  """The largest of every process's `values` (elementwise; all processes must call it)."""
  values = [int(v) for v in values]
  if jax.process_count() == 1:
    return values
  rows = sharding.num_batch_shards(mesh) // jax.process_count()
  local = np.broadcast_to(np.asarray(values, np.int32), (rows, len(values)))
  array = sharding.global_batch({'v': np.ascontiguousarray(local)}, mesh)['v']
  return [int(v) for v in to_host(array).max(0)]


def cut_padding(tokens: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Token rows [B, L] cut to the longest text of the batch on every process (EOT = the row's
  largest id), rounded up to a multiple of 8 columns."""
  need = int(np.argmax(tokens, axis=-1).max()) + 1 if len(tokens) else 1
  need = global_max([need], mesh)[0]
  return tokens[:, :min(tokens.shape[1], -(-need // _PAD_BUCKET) * _PAD_BUCKET)]


def to_host(x: jax.Array) -> np.ndarray:
  """A global array's whole value as numpy, on every process (explicit transfers only)."""
  if not x.is_fully_addressable:
    x = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
    return np.asarray(jax.device_get(x.addressable_data(0)))
  return np.asarray(jax.device_get(x))


def place_variables(variables: Mapping[str, Any], mesh: Mesh) -> Any:
  """Leaves that are not jax Arrays yet (numpy) are put on the mesh, replicated, once."""
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, replicated),
                      dict(variables))


def embed_stream(model, variables: Any, mesh: Mesh, tower: str,
                 batches: Iterable[Mapping[str, np.ndarray]], keys: Sequence[str],
                 tower_pass: TowerPass = NO_PASS) -> Dict[str, np.ndarray]:
  """Embeds a stream of process-local batches and gathers the result on every process.

  Args:
    model: a Flax module with `encode_image` / `encode_text` and a `config` (mean, std).
    variables: its variables, already on the mesh (`place_variables`).
    mesh: the device mesh.
    tower: IMAGE or TEXT.
    batches: dicts with 'inputs' (uint8 [Bl, S, S, 3] images or int32 [Bl, L] tokens) and int32
      columns with a leading [Bl] axis; a row is padding when `keys[0]` is -1.
    keys: the column names rows are sorted by (lexicographically).
    tower_pass: how to reduce the tower (`TowerPass`).

  Returns:
    'embeddings' float32 [N, D] (unit rows) and every column, padding rows dropped, sorted.
  """
  fn = encoder(model, tower, mesh, tower_pass)
  cut = tower == TEXT and tower_pass.reduction is not None and tower_pass.reduction.cut_padding
  embedded: List[Dict[str, jax.Array]] = []
  for batch in batches:
    if cut:
      batch = dict(batch, inputs=cut_padding(batch['inputs'], mesh))
    arrays = sharding.global_batch(batch, mesh)
    arrays['embeddings'] = fn(variables, arrays.pop('inputs'))
    embedded.append(arrays)  # Dispatched asynchronously; the host goes on loading.
  host = {name: np.concatenate([to_host(b[name]) for b in embedded]) for name in embedded[0]}
  valid = host[keys[0]] >= 0
  host = {name: value[valid] for name, value in host.items()}
  order = np.lexsort([host[k] for k in reversed(keys)])
  return {name: value[order] for name, value in host.items()}


class Pending:
  """Embeddings still being computed on the devices; `result()` waits and brings them back."""

  def __init__(self, chunks: List[jax.Array], count: int, width: int):
    self._chunks, self._count, self._width = chunks, count, width

  def result(self) -> np.ndarray:
    """float32 [N, E] unit rows, padding dropped."""
    if not self._chunks:
      return np.zeros((0, self._width), np.float32)
    return np.concatenate([np.asarray(c) for c in self._chunks])[:self._count]


def embed_array(model, variables: Any, mesh: Mesh, tower: str, inputs: np.ndarray,
                batch: int) -> Pending:
  """Starts embedding local `inputs` [N, ...] in batches of `batch` (the last one zero-padded)
  over a mesh of this process's devices; returns at once."""
  fn = encoder(model, tower, mesh)
  in_sharding = sharding.batch_sharding(mesh)
  chunks = []
  for start in range(0, len(inputs), batch):
    chunk = inputs[start:start + batch]
    if len(chunk) < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    chunks.append(fn(variables, jax.device_put(chunk, in_sharding)))
  return Pending(chunks, len(inputs), model.config.embed_dim)

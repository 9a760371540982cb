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
"""
import functools
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from mobileclip_jax import sharding
from mobileclip_jax.data import preprocess

IMAGE = 'encode_image'
TEXT = 'encode_text'
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps.


def unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm in float32 (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


@functools.lru_cache(maxsize=64)
def encoder(model, tower: str, mesh: Mesh) -> Callable[[Any, jax.Array], jax.Array]:
  """jit(variables, inputs [B, ...]) -> unit embeddings [B, E] float32, split over the batch.

  `tower` is IMAGE (uint8 images [B, S, S, 3]) or TEXT (int32 tokens [B, L]).
  """
  if tower not in (IMAGE, TEXT):
    raise ValueError(f'tower must be {IMAGE!r} or {TEXT!r}, got {tower!r}.')
  mean, std = model.config.mean, model.config.std

  def encode(variables, inputs):
    if tower == IMAGE:
      inputs = preprocess.normalize(inputs, mean, std)
    return unit_rows(model.apply(variables, inputs, method=tower))

  return jax.jit(encode, out_shardings=sharding.batch_sharding(mesh))


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
                 batches: Iterable[Mapping[str, np.ndarray]],
                 keys: Sequence[str]) -> Dict[str, np.ndarray]:
  """Embeds a stream of process-local batches and gathers the result on every process.

  Args:
    model: a Flax module with `encode_image` / `encode_text` and a `config` (mean, std).
    variables: its variables, already on the mesh (`place_variables`).
    mesh: the device mesh.
    tower: IMAGE or TEXT.
    batches: dicts with 'inputs' (uint8 [Bl, S, S, 3] images or int32 [Bl, L] tokens) and int32
      columns with a leading [Bl] axis; a row is padding when `keys[0]` is -1.
    keys: the column names rows are sorted by (lexicographically).

  Returns:
    'embeddings' float32 [N, D] (unit rows) and every column, padding rows dropped, sorted.
  """
  fn = encoder(model, tower, mesh)
  embedded: List[Dict[str, jax.Array]] = []
  for batch in batches:
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

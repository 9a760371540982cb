"""The device mesh and the partitioning rules for parameters, optimizer state and batches.

One mesh with axes ('data', 'fsdp'). Batches are split over both axes (every device holds
B / num_devices examples). Parameters and optimizer state are sharded over 'fsdp' (ZeRO-3
style): by default each array larger than `min_fsdp_size` elements is split along its largest
dimension divisible by the 'fsdp' size; ordered regex rules on the '/'-joined parameter path
override that (first match wins), as in big_vision / MaxText. 'data' replicates parameters.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from mobileclip_jax import rules as rules_lib

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = MESH_AXES


def create_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices; -1 means "the rest".

  Built with `jax.sharding.Mesh` (Auto axis types): `jax.make_mesh` defaults to Explicit axes,
  which Linen's implicit sharding propagation does not support.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got data={data}, fsdp={fsdp}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or n % known:
    raise ValueError(f'Mesh data={data} x fsdp={fsdp} does not divide the {n} devices.')
  sizes = [n // known if s == -1 else s for s in sizes]
  if sizes[0] * sizes[1] != n:
    raise ValueError(f'Mesh data={sizes[0]} x fsdp={sizes[1]} uses {sizes[0] * sizes[1]} devices, '
                     f'but {n} are available; set one axis to -1.')
  return Mesh(devices.reshape(sizes), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices: 'cpu', 'gpu' or 'tpu'."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays split over the batch axes.

  Every process passes its own slice (B_global / process_count examples, in process order);
  `jax.make_array_from_process_local_data` assembles the global arrays without a copy to host 0.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _fsdp_spec(shape: Tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def infer_shardings(tree: Any, mesh: Mesh, rules: Sequence[Any] = (),
                    min_fsdp_size: int = 2 ** 14) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

  `rules` (config `sharding.rules`, see rules.py) map paths to 'fsdp' (the default: split along
  the largest dimension the 'fsdp' axis divides, for arrays of at least `min_fsdp_size`
  elements), 'replicate', or a tuple of mesh-axis names / None per dimension. Scalars are
  replicated.
  """
  fsdp_size = mesh.shape['fsdp']

  def leaf_sharding(path, leaf, tactic):
    shape = tuple(getattr(leaf, 'shape', ()))
    if tactic == 'replicate' or not shape:
      spec = P()
    elif tactic == 'fsdp':
      spec = _fsdp_spec(shape, fsdp_size, min_fsdp_size)
    elif isinstance(tactic, (tuple, list)) and len(tactic) == len(shape):
      spec = P(*tactic)
    else:
      raise ValueError(f'sharding.rules: {path} {shape} got {tactic!r}; use \'fsdp\', '
                       f"'replicate' or one mesh axis of {MESH_AXES} (or None) per dimension.")
    return NamedSharding(mesh, spec)

  return rules_lib.tree_values(rules, tree, 'fsdp', 'sharding.rules', leaf_sharding)

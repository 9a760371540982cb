"""Memory and time of the DR loss and its gradient: streamed (column blocks) vs unstreamed.

  python launch/benchmark.py loss [--option=KEY=VALUE ...]

Options (all optional):
  cases=65536x8,16384x1   global batch x devices (fake CPU devices, one batch axis) of the
                          compile-only rows: XLA's per-device buffers of the loss + gradient
  run_cases=4096x1,4096x8 cases also run and timed (the sizes above take hours on 2 cores)
  block_sizes=0,1024      LossConfig.block_size values (0 = the unstreamed reference form)
  embed_dim=512           student embedding width (MobileCLIP2-S0..S2, B)
  teacher_dims=768,768    teacher widths (DataCompDR: two ViT-L/14), stored as teacher_dtype
  teacher_dtype=float16   dtype of the stored teacher embeddings in the batch
  repeats=3               timed calls after one warm-up
  quick=1                 one small case of each kind: 4096x8 compiled, 1024x1 run

What is measured, per (case, block_size), each in a fresh process with that many devices
(`common.isolated`): `jax.jit(jax.value_and_grad(dr_loss))` with respect to the student
embeddings and logit scale, the MobileCLIP2 DR objective (two caption kinds, two teachers
averaged after softmax, clip and distillation terms), batch sharded over a ('data', 'fsdp') mesh
of (devices, 1). `temp_mb` is XLA's temporary buffers of the compiled program per device
(`memory_analysis().temp_size_in_bytes`): everything the loss and its gradient hold beyond their
inputs and outputs (`argument_mb`, `output_mb`). `compile_s` is lower + compile without the
persistent cache. Run rows add the median wall time of a call (`step_s`) and the loss, so the
two forms can be seen to agree.
"""
import os
import time
from typing import Any, Dict, Iterator

from mobileclip_jax.benchmark import common

_OPTIONS = ('cases', 'run_cases', 'block_sizes', 'embed_dim', 'teacher_dims', 'teacher_dtype',
            'repeats', 'quick')
_CASES = ('65536x8', '16384x1')
_RUN_CASES = ('4096x1', '4096x8')
_QUICK_CASES, _QUICK_RUN_CASES = ('4096x8',), ('1024x1',)
_MIB = 2**20


def _parse_case(case: str) -> tuple[int, int]:
  try:
    batch, devices = (int(v) for v in case.lower().split('x'))
  except ValueError as e:
    raise ValueError(f'A loss benchmark case is BATCHxDEVICES such as 65536x8, got {case!r}.') from e
  if batch % devices:
    raise ValueError(f'Case {case}: the batch {batch} does not split over {devices} devices.')
  return batch, devices


def measure(batch: int, devices: int, block_size: int, embed_dim: int, teacher_dims: list[int],
            teacher_dtype: str, run: bool, repeats: int) -> Dict[str, Any]:
  """Runs in a fresh interpreter with `devices` fake CPU devices (set by the caller's env)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import keys  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import losses  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_enable_compilation_cache', False)
  if jax.device_count() != devices:
    raise RuntimeError(f'Expected {devices} devices, got {jax.device_count()}.')
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(devices, 1), losses.BATCH_AXES)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(losses.BATCH_AXES))
  scalar = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  config = losses.LossConfig(clip_weight=0.25, distill_weight=0.75, teacher_scales=(70.0, 60.0),
                             teacher_dims=tuple(teacher_dims), block_size=block_size)
  student_keys = (keys.IMAGE_EMB, keys.TEXT_EMB, keys.SYN_TEXT_EMB)
  teacher_keys = (keys.TEACHER_IMAGE, keys.TEACHER_TEXT, keys.TEACHER_SYN_TEXT)
  shapes = {k: jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32, sharding=rows)
            for k in student_keys}
  shapes[keys.LOGIT_SCALE] = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
  teacher_shapes = {k: jax.ShapeDtypeStruct((batch, sum(teacher_dims)), teacher_dtype,
                                            sharding=rows) for k in teacher_keys}

  def loss(student, teachers):
    return losses.dr_loss({**student, **teachers}, config, mesh=mesh if devices > 1 else None)

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(shapes, teacher_shapes).compile()
  result = {'compile_s': round(time.perf_counter() - start, 2)}
  analysis = compiled.memory_analysis()
  for name in ('temp', 'argument', 'output'):
    result[f'{name}_mb'] = round(getattr(analysis, f'{name}_size_in_bytes') / _MIB, 1)
  if not run:
    return result

  def make(key, shape):
    value = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), key), shape.shape)
    return jax.device_put(value.astype(shape.dtype), shape.sharding)

  student = {k: make(i, s) for i, (k, s) in enumerate(shapes.items())}
  student[keys.LOGIT_SCALE] = jax.device_put(jnp.log(jnp.float32(20.0)), scalar)
  teachers = {k: make(10 + i, s) for i, (k, s) in enumerate(teacher_shapes.items())}
  (total, _), _ = jax.block_until_ready(compiled(student, teachers))
  timing = common.time_calls(lambda: jax.block_until_ready(compiled(student, teachers)),
                             warmup=0, repeats=repeats)
  result.update(step_s=round(timing['median_s'], 3), loss=float(total),
                peak_rss_mb=round(common.peak_rss_mb(), 1))
  return result


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  quick, _ = common.common_options(options, _OPTIONS, 'loss', '{}')
  cases = common.option_list(options, 'cases', _QUICK_CASES if quick else _CASES)
  run_cases = common.option_list(options, 'run_cases', _QUICK_RUN_CASES if quick else _RUN_CASES)
  from mobileclip_jax import losses  # pylint: disable=g-import-not-at-top
  block_sizes = common.option_list(options, 'block_sizes', (0, losses.DEFAULT_BLOCK_SIZE), int)
  settings = dict(
      embed_dim=common.option_scalar(options, 'embed_dim', 512, int),
      teacher_dims=common.option_list(options, 'teacher_dims', (768, 768), int),
      teacher_dtype=common.option_scalar(options, 'teacher_dtype', 'float16', str),
      repeats=common.option_scalar(options, 'repeats', 3, int))
  # Every case is checked before any process starts.
  plan = [(_parse_case(c), False) for c in cases] + [(_parse_case(c), True) for c in run_cases]
  for (batch, devices), run_it in plan:
    reference = None
    for block_size in block_sizes:
      env = {'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} '
                          f'--xla_force_host_platform_device_count={devices}'}
      result = common.isolated(__name__, 'measure', dict(
          batch=batch, devices=devices, block_size=block_size, run=run_it, **settings), env=env)
      row = {'row': 'run' if run_it else 'compile', 'batch': batch, 'devices': devices,
             'local_batch': batch // devices, 'block_size': block_size,
             'form': 'streamed' if block_size else 'reference', **result}
      if reference is None and not block_size:
        reference = result
      elif reference is not None:
        row['temp_ratio_vs_reference'] = round(result['temp_mb'] / max(reference['temp_mb'], 1e-9),
                                               4)
        if 'step_s' in result:
          row['time_ratio_vs_reference'] = round(result['step_s'] / reference['step_s'], 3)
      yield row

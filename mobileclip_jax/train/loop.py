"""The trainer: one function, in sections, from a config to checkpoints and metrics.

  distributed init -> mesh -> input pipeline -> model, schedule, optimizer -> state shardings
  -> restore or init -> compiled step -> evaluators -> loop (log, evals, checkpoints,
  preemption, NaN guard) -> final save and evals.

Every host runs the same program on its own slice of the data; metrics and config files are
written by process 0, checkpoints by all processes (Orbax coordinates them).
"""
import logging
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from mobileclip_jax import checkpoint as ckpt_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import losses
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import data as train_data
from mobileclip_jax.train import reporting
from mobileclip_jax.train import optimizer as optimizer_lib
from mobileclip_jax.train import step as step_lib

log = logging.getLogger('mobileclip_jax')


class NonFiniteLossError(FloatingPointError):
  """The loss (or another metric) became NaN/Inf; the message names the step and the terms."""


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize when several processes are launched (explicitly or by a cluster)."""
  d = config.distributed
  explicit = d.coordinator_address is not None
  cluster = any(os.environ.get(v) for v in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
                                            'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS'))
  if not (explicit or cluster) or jax.distributed.is_initialized():
    return
  # Cross-process collectives on CPU (tests, CPU clusters) need gloo; GPU/TPU ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=d.initialization_timeout_s,
                heartbeat_timeout_seconds=d.heartbeat_timeout_s)
  if explicit:
    kwargs.update(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)


class _Preemption:
  """Turns SIGTERM into a flag that all processes agree on at the next step."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')
    self._flag.set()

  def reached(self) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    return bool(multihost_utils.process_allgather(np.asarray(local)).any())

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def model_config_from(config: ml_collections.ConfigDict) -> clip_lib.ModelConfig:
  m = config.model
  overrides = dict(attention=m.attention, qk_norm=m.qk_norm, dtype=m.dtype,
                   bn_group_size=m.bn_group_size)
  overrides.update(config_lib.overridden(ml_collections.ConfigDict(
      {'embed_dim': m.embed_dim, 'image_size': m.image_size})))
  for tower in ('image', 'text'):
    tower_overrides = config_lib.overridden(m[tower])
    if tower_overrides:
      overrides[tower] = tower_overrides
  return clip_lib.get_config(m.name, **overrides)


def _loss_config(config: ml_collections.ConfigDict, teacher_dims) -> losses.LossConfig:
  """The loss settings; teacher settings only matter (and are checked) for distillation."""
  loss = config.loss
  kwargs = dict(kind=loss.kind, clip_weight=loss.clip_weight, distill_weight=loss.distill_weight,
                gt_weight=loss.gt_weight, syn_weight=loss.syn_weight, average=loss.average,
                student_scale=loss.student_scale, block_size=loss.block_size)
  if teacher_dims:
    scales = config_lib.as_tuple(loss.teacher_scales)
    if len(scales) != len(teacher_dims):
      raise ValueError(f'loss.teacher_scales has {len(scales)} values but the dataset has '
                       f'{len(teacher_dims)} teachers (dims {tuple(teacher_dims)}); pass one '
                       'scale per teacher, e.g. --config.loss.teacher_scales=70,60.')
    kwargs.update(teacher_scales=scales, teacher_dims=tuple(teacher_dims),
                  teacher_biases=config_lib.as_tuple(loss.teacher_biases))
  return losses.LossConfig(**kwargs)


def _to_host(tree) -> Dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains per `config`, resuming from `workdir` if it holds checkpoints. Returns last metrics."""
  # ---------------------------------------------------------------- setup
  initialize_distributed(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
  if config.batch_size % sharding_lib.num_batch_shards(mesh):
    raise ValueError(f'batch_size {config.batch_size} does not divide over the '
                     f'{sharding_lib.num_batch_shards(mesh)} devices of the mesh.')
  if config.batch_size % (config.accum_steps * sharding_lib.num_batch_shards(mesh)):
    raise ValueError(f'batch_size {config.batch_size} must split into {config.accum_steps} '
                     f'micro-batches over {sharding_lib.num_batch_shards(mesh)} devices.')
  log.info('Processes: %d, devices: %d (%s), mesh %s', jax.process_count(), jax.device_count(),
           jax.devices()[0].device_kind, dict(mesh.shape))

  # ---------------------------------------------------------------- input
  model_config = model_config_from(config)
  data = train_data.open_input(config, model_config)
  use_syn, use_teachers = step_lib.select_objective(data.batch_keys, config.loss.objective)
  objective = 'DR (CLIP + distillation, gt + synthetic captions)' if use_teachers else (
      'CLIP (ground-truth captions)')
  log.info('Dataset %s (%s, %d examples): objective %s.', data.name, data.kind,
           data.num_examples, objective)
  total_steps = config_lib.parse_duration(config.schedule.total, config.batch_size,
                                          data.num_examples, 'schedule.total')
  warmup_steps = config_lib.parse_duration(config.schedule.warmup, config.batch_size,
                                           data.num_examples, 'schedule.warmup')
  constant_steps = config_lib.parse_duration(config.schedule.constant, config.batch_size,
                                             data.num_examples, 'schedule.constant')
  ckpt_every = config_lib.parse_duration(config.checkpoint.every, config.batch_size,
                                         data.num_examples, 'checkpoint.every')
  keep_every = (config_lib.parse_duration(config.checkpoint.keep_every, config.batch_size,
                                          data.num_examples, 'checkpoint.keep_every')
                if config.checkpoint.keep_every else None)

  # ---------------------------------------------------------------- model and optimizer
  model = clip_lib.CLIP(model_config)
  schedule = optimizer_lib.lr_schedule(config.optim.lr, total_steps, warmup_steps,
                                       config.schedule.kind, constant_steps)
  abstract_vars = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                 *clip_lib.dummy_inputs(model_config))
  tx = optimizer_lib.make_optimizer(
      model_config, abstract_vars['params'], schedule, b1=config.optim.b1, b2=config.optim.b2,
      eps=config.optim.eps, weight_decay=config.optim.weight_decay,
      grad_clip=config.optim.grad_clip)

  def init_state(rng):
    variables = model.init(rng, *clip_lib.dummy_inputs(model_config))
    params = variables['params']
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables.get('batch_stats', {}),
                               opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
  state_shardings = sharding_lib.infer_shardings(
      abstract_state, mesh, min_fsdp_size=config.sharding.min_fsdp_size)
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_vars['params'][k]))
            for k in ('visual', 'text')}
  log.info('Model %s: image %s, text %s parameters; %s compute.', model_config.name,
           reporting.human_count(counts['visual']), reporting.human_count(counts['text']),
           model_config.dtype)

  # ---------------------------------------------------------------- restore or init
  checkpointer = ckpt_lib.TrainCheckpointer(
      os.path.join(workdir, 'checkpoints'), every_steps=ckpt_every,
      keep_last=config.checkpoint.keep_last, keep_every=keep_every,
      async_save=config.checkpoint.async_save)
  start_step = checkpointer.latest_step()
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, state_shardings)
  if start_step is not None and start_step >= total_steps:
    # Before restoring or compiling: rerunning a finished run (e.g. a pod job restarted after
    # its last save) costs seconds, not a compile.
    checkpointer.close()
    log.info('Nothing to do: %s holds the final step %d of %d.', checkpointer.directory,
             start_step, total_steps)
    return {}
  if start_step is not None:
    state, _ = checkpointer.restore(start_step, target, data.iterator)
    log.info('Resumed from %s at step %d.', checkpointer.directory, start_step)
  else:
    start_step = 0
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
    if config.model.init_from:
      state = _init_from(state, config.model.init_from, state_shardings, model_config)

  # ---------------------------------------------------------------- compiled step
  loss_config = _loss_config(config, data.teacher_dims if use_teachers else None)
  step_fn = step_lib.make_train_step(model, tx, loss_config, mesh=mesh,
                                     accum_steps=config.accum_steps, use_syn=use_syn,
                                     use_teachers=use_teachers, seed=config.seed)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + shape, dtype,
                                            sharding=batch_sharding)
                    for k, (shape, dtype) in data.element_spec.items()}
  t0 = time.perf_counter()
  compiled = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                     donate_argnums=(0,)).lower(target, abstract_batch).compile()
  log.info('Compiled the train step in %.1f s; memory %s.', time.perf_counter() - t0,
           reporting.memory_summary(compiled))

  # ---------------------------------------------------------------- evaluators
  evaluators = train_data.build_evaluators(config, model_config, mesh)

  def run_evals(step: int, final: bool = False):
    for evaluator in evaluators:
      due = final or step == 0 or (evaluator.every_steps and step % evaluator.every_steps == 0)
      if due:
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        results = evaluator.run(model, variables)
        writer.write(step, results)
        log.info('eval %s @%d: %s', evaluator.name, step,
                 ', '.join(f'{k}={v:.4f}' for k, v in results.items()))

  # ---------------------------------------------------------------- loop
  writer = reporting.MetricWriter(workdir)
  progress = reporting.Progress(total_steps, config.batch_size, start_step)
  preemption = _Preemption()
  meta = {'model_config': clip_lib.config_to_dict(model_config), 'dataset': data.name,
          'objective': objective}
  last_saved = start_step if start_step else None
  pending = None  # (step, metrics) of the previous step, read after the next one is dispatched.
  last = {}
  try:
    if start_step == 0:
      with progress.pause():
        run_evals(0)
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding_lib.global_batch(next(data.iterator), mesh)
      state, metrics = compiled(state, batch)
      if pending is not None:  # Read the previous step's metrics while this one runs.
        last = _check_and_log(pending, writer, progress, config, schedule, data, last_saved)
      pending = (step, metrics)

      preempted = preemption.reached()
      if step % ckpt_every == 0 or preempted or step == total_steps:
        # Never checkpoint a state whose step produced NaNs: check it first.
        last = _check_and_log(pending, writer, progress, config, schedule, data, last_saved)
        pending = None
        with progress.pause():
          if checkpointer.save(step, state, data.iterator, {**meta, 'step': step, **last},
                               force=preempted or step == total_steps):
            last_saved = step
      if preempted:
        log.warning('Preempted: the checkpoint of step %d is being written; exiting.', step)
        break
      if step < total_steps:
        with progress.pause():
          run_evals(step)
    else:
      with progress.pause():
        run_evals(total_steps, final=True)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    preemption.close()
  return last


def _check_and_log(pending, writer, progress, config, schedule, data,
                   last_saved) -> Dict[str, float]:
  """NaN guard on the step's metrics (one step behind, to keep the device busy) and logging."""
  step, metrics = pending
  host = _to_host(metrics)
  bad = reporting.non_finite(host)
  if bad:
    where = (f'the last complete checkpoint is step {last_saved}' if last_saved
             else 'no checkpoint was written yet')
    raise NonFiniteLossError(
        f'Non-finite metrics at step {step}: {bad}; {where}. Lower optim.lr, raise '
        'schedule.warmup or check the data (corrupt teacher embeddings?) before resuming.')
  if step % config.log_every == 0 or step == progress.total:
    lr = float(schedule(step - 1))
    writer.write(step, {**host, **progress.report(step, host['loss'], lr), 'lr': lr,
                        **data.counters()})
  return host


def _init_from(state, path: str, shardings, model_config) -> step_lib.TrainState:
  """Starts the weights from a model checkpoint or another run (fine-tuning, inheritance)."""
  variables, source_config = ckpt_lib.load_variables(path)
  got = jax.tree.map(lambda x: x.shape, variables['params'])
  want = jax.tree.map(lambda x: x.shape, state.params)
  if got != want:
    raise ValueError(f'model.init_from={path} holds {source_config.name} parameters whose shapes '
                     f'differ from {model_config.name} with these overrides.')
  params = jax.device_put(variables['params'], shardings.params)
  batch_stats = jax.device_put(variables.get('batch_stats', {}), shardings.batch_stats)
  log.info('Initialized the weights from %s (%s).', path, source_config.name)
  return state.replace(params=params, batch_stats=batch_stats)

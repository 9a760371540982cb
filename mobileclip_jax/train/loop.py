"""The trainer: one function, in sections, from a config to checkpoints and metrics.

  distributed init -> workdir lock and config check -> mesh -> the run (train/setup.py: input,
  model, optimizer, shardings) -> restore (falling back past damaged steps) or init -> compiled step -> evaluators -> loop (log, evals, checkpoints,
  preemption, NaN guard) -> final save and evals.

Every host runs the same program on its own slice of the data; metrics and config files are
written by process 0, checkpoints by all processes (Orbax coordinates them).
"""
import logging
import os
import signal
import threading
from typing import Dict, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mobileclip_jax import checkpoint as ckpt_lib
from mobileclip_jax import distributed
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import reporting
from mobileclip_jax.train import setup
from mobileclip_jax.train import workdir as workdir_lib

log = logging.getLogger('mobileclip_jax')


class NonFiniteLossError(FloatingPointError):
  """The loss (or another metric) became NaN/Inf; the message names the step and the terms."""


class _Preemption:
  """When to save and stop because the job is being preempted (SIGTERM).

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  jax.distributed) receives the notice and agrees on a step at which every process saves; asking
  it is a local, non-blocking check, so no collective runs per step.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_host(tree) -> Dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(config: ml_collections.ConfigDict, workdir: str,
          take_over_lock: bool = False) -> Dict[str, float]:
  """Trains per `config`, resuming from `workdir` if it holds checkpoints. Returns last metrics.

  The workdir belongs to one run at a time (train/workdir.py): it is locked, and a rerun whose
  config differs in keys that are unsafe on resume is refused before anything is written.
  """
  distributed.initialize(distributed.Settings.from_config(config.distributed))
  lock = _claim(workdir, config, take_over_lock)
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _claim(workdir: str, config: ml_collections.ConfigDict,
           take_over: bool) -> Optional[workdir_lib.Lock]:
  """Process 0 locks the workdir and checks/writes config.json; every process learns the outcome."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lib.Lock(workdir, take_over)
      workdir_lib.check_and_write_config(workdir, config)
    except workdir_lib.WorkdirError as e:
      error = e
      if lock is not None:
        lock.release()
  refused = error is not None
  if jax.process_count() > 1:
    refused = bool(multihost_utils.broadcast_one_to_all(np.asarray(refused)))
  if refused:
    raise error or workdir_lib.WorkdirError(
        f'Process 0 refused {workdir} (its log says why).')
  return lock


def _train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  # ---------------------------------------------------------------- setup
  mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp)
  log.info('Processes: %d, devices: %d (%s), mesh %s', jax.process_count(), jax.device_count(),
           jax.devices()[0].device_kind, dict(mesh.shape))
  run = setup.build(config, mesh, skipped_log=os.path.join(
      workdir, f'skipped_records.p{jax.process_index()}.jsonl'))
  data, steps = run.data, run.durations
  log.info('Dataset %s (%s, %d examples): objective %s.', data.name, data.iterator.kind,
           data.spec.num_examples, run.objective.description)
  counts = run.param_counts()
  log.info('Model %s: image %s, text %s parameters; %s compute.', run.model_config.name,
           reporting.human_count(counts['image']), reporting.human_count(counts['text']),
           run.model_config.dtype)

  # ---------------------------------------------------------------- restore or init
  checkpointer = ckpt_lib.TrainCheckpointer(
      os.path.join(workdir, 'checkpoints'), every_steps=steps.checkpoint_every,
      keep_last=config.checkpoint.keep_last, keep_every=steps.keep_every,
      async_save=config.checkpoint.async_save)
  latest = checkpointer.latest_step()
  if latest is not None and latest >= steps.total:
    # Before restoring or compiling: rerunning a finished run (e.g. a pod job restarted after
    # its last save) costs seconds, not a compile.
    checkpointer.close()
    log.info('Nothing to do: %s holds the final step %d of %d.', checkpointer.directory,
             latest, steps.total)
    return {}
  state, start_step = checkpointer.restore_newest(run.abstract_state, data.iterator)
  if state is not None:
    log.info('Resumed from %s at step %d.', checkpointer.directory, start_step)
    if jax.process_index() == 0:
      dropped = workdir_lib.truncate_metrics(workdir, start_step)
      if dropped:
        log.info('Dropped %d metrics rows logged after step %d by the previous run.', dropped,
                 start_step)
  else:
    start_step = 0
    state = run.init_state()

  # ---------------------------------------------------------------- compiled step
  step_fn = run.step
  log.info('Train step: traced and lowered in %.1f s, compiled (or read from the compilation '
           'cache) in %.1f s; memory %s.', run.lower_seconds, run.compile_seconds, run.memory())

  # ---------------------------------------------------------------- evaluators
  evaluators = setup.build_evaluators(config, run.model_config, mesh)

  def run_evals(step: int):
    for evaluator in evaluators:
      if evaluator.due(step, steps.total):
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        results = evaluator.run(run.model, variables)
        writer.write(step, results)
        log.info('eval %s @%d: %s', evaluator.name, step,
                 ', '.join(f'{k}={v:.4f}' for k, v in results.items()))

  # ---------------------------------------------------------------- loop
  writer = reporting.MetricWriter(workdir, purge_step=start_step + 1 if start_step else None)
  progress = reporting.Progress(steps.total, config.batch_size, start_step)
  preemption = _Preemption()
  meta = {'model_config': clip_lib.config_to_dict(run.model_config), 'dataset': data.name,
          'objective': run.objective.description}
  last_saved = start_step if start_step else None
  pending = None  # (step, metrics) of the previous step, read after the next one is dispatched.
  last = {}
  log_step = lambda pending: _check_and_log(pending, writer, progress, config, run, last_saved)
  try:
    if start_step == 0:
      with progress.pause():
        run_evals(0)
    for step in range(start_step + 1, steps.total + 1):
      batch = sharding_lib.global_batch(next(data.iterator), mesh)
      state, metrics = step_fn(state, batch)
      if pending is not None:  # Read the previous step's metrics while this one runs.
        last = log_step(pending)
      pending = (step, metrics)

      preempted = preemption.reached(step)
      if step % steps.checkpoint_every == 0 or preempted or step == steps.total:
        # Never checkpoint a state whose step produced NaNs: check it first.
        last = log_step(pending)
        pending = None
        with progress.pause():
          if checkpointer.save(step, state, data.iterator, {**meta, 'step': step, **last},
                               force=preempted or step == steps.total):
            last_saved = step
      if preempted:
        log.warning('Preempted: the checkpoint of step %d is being written; exiting.', step)
        break
      if step < steps.total:
        with progress.pause():
          run_evals(step)
    else:
      with progress.pause():
        run_evals(steps.total)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    preemption.close()
  return last


def _check_and_log(pending, writer, progress, config, run, last_saved) -> Dict[str, float]:
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
    lr = float(run.schedule(step - 1))
    writer.write(step, {**host, **progress.report(step, host['loss'], lr), 'lr': lr,
                        **run.data.counters()})
  return host

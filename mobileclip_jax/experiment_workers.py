"""Runs of an experiment side by side on one CPU host (`experiment.run(..., workers=N)`).

A demo-sized XLA:CPU step keeps about one core busy, so one run at a time leaves the other cores
idle; each worker is a spawned process running `experiment.run_one`, with the parent's
compilation cache and its log in <run>/log.txt (the parent prints progress). On accelerators and
clusters a run takes the whole mesh, so there runs go one after another.
"""
import logging
import multiprocessing
import os
import time
from concurrent import futures
from typing import Any, Callable, Dict, Optional

import ml_collections

LOG_FILE = 'log.txt'  # Per run trained in a worker process: its log.


def eta_text(seconds: float, trained: int, left: int) -> str:
  """', ETA ...' from the `seconds` that `trained` runs took, for `left` runs; '' without
  either (skipped runs say nothing of the time left)."""
  if not (trained and left):
    return ''
  eta = int(max(seconds / trained * left, 0))
  return ', ETA ' + (f'{eta // 3600}h{eta // 60 % 60:02d}m' if eta >= 3600 else
                     f'{eta // 60}m{eta % 60:02d}s')


def resolve_workers(workers: int, num_jobs: int) -> int:
  """How many runs go side by side: `workers` (0: one per CPU core), at most `num_jobs`; 1 where
  each run needs the whole mesh (an accelerator, or several hosts)."""
  import jax  # pylint: disable=g-import-not-at-top
  if workers < 0:
    raise ValueError(f'workers must be >= 0 (0: one per CPU core), got {workers}.')
  single_cpu_host = jax.default_backend() == 'cpu' and jax.process_count() == 1
  if workers > 1 and not single_cpu_host:
    raise ValueError(
        f'workers={workers} runs side by side in processes of one CPU host; this is '
        f'{jax.process_count()} process(es) on {jax.default_backend()}, where each run takes '
        'the whole mesh: use workers=1.')
  if not single_cpu_host:
    return 1
  return max(1, min(workers or os.cpu_count() or 1, num_jobs))


def run_side_by_side(jobs, workers: int, runs: Dict[str, Dict[int, Dict[str, Any]]],
                     print_fn: Callable[[str], None]) -> None:
  """`jobs` (variant, seed, config, directory) in `workers` spawned processes into `runs`. On a
  failure the runs not started are cancelled, those running finish (their results are on disk),
  then the first error is raised."""
  import jax  # pylint: disable=g-import-not-at-top
  print_fn(f'{len(jobs)} runs, {workers} side by side (each logs to <run>/{LOG_FILE}).')
  start, done, trained, error = time.perf_counter(), 0, 0, None
  pool_start = time.time() - 1  # A log older than the pool is an earlier attempt's.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')
                                   ) as pool:
    pending = {pool.submit(_run_in_worker, config, directory,
                           jax.config.jax_compilation_cache_dir): (variant, seed, directory)
               for variant, seed, config, directory in jobs}
    for future in futures.as_completed(pending):
      variant, seed, directory = pending[future]
      done += 1
      try:
        runs[variant][seed] = future.result()
      except futures.process.BrokenProcessPool as e:
        if error is None:
          log = os.path.join(directory, LOG_FILE)
          if os.path.exists(log) and os.path.getmtime(log) >= pool_start:
            error = RuntimeError(f'A worker process died (out of memory?) while running '
                                 f'{directory}; rerun with fewer workers (its log: {log}).')
          else:  # Workers are spawned: each imports the caller's main module first.
            error = RuntimeError(
                f'A worker process died before it started {directory} (see its error above); '
                "a script that runs experiments must call them under `if __name__ == '__main__':`"
                ', since each spawned worker imports it.')
          error.__cause__ = e
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
      if error is not None:
        pool.shutdown(wait=False, cancel_futures=True)
        continue
      trained += runs[variant][seed]['trained']
      eta = eta_text(time.perf_counter() - start, trained, len(jobs) - done)
      print_fn(f'[{done}/{len(jobs)}] {variant} seed {seed} done{eta}  ({directory})')
  if error is not None:
    raise error


def _run_in_worker(config: ml_collections.ConfigDict, directory: str,
                   cache_dir: Optional[str]) -> Dict[str, Any]:
  """`experiment.run_one` in a worker process: the parent's compilation cache, the log in
  <run>/log.txt."""
  # pylint: disable=g-import-not-at-top
  import jax
  from mobileclip_jax import cli
  from mobileclip_jax import compilation_cache
  from mobileclip_jax import experiment
  from mobileclip_jax import utils
  # pylint: enable=g-import-not-at-top
  utils.run_cpu_programs_inline()
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    compilation_cache.enable()
  os.makedirs(directory, exist_ok=True)
  handler = logging.FileHandler(os.path.join(directory, LOG_FILE), encoding='utf-8')
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s] %(message)s'))
  logging.getLogger().handlers = [handler]  # Instead of absl's stderr handler.
  cli.set_log_levels()
  try:
    return experiment.run_one(config, directory)
  finally:
    handler.close()

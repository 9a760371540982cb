"""One workdir, one run: the lock, the config check on rerun, and metrics without duplicates.

- Lock: process 0 creates `<workdir>/lock.json` (host, pid, start time, heartbeat) exclusively
  before anything else is written, refreshes the heartbeat every minute and removes it at exit.
  A second run on a locked workdir stops with one line naming the holder. A lock is stale when
  its pid is dead on this host, or its heartbeat is older than `STALE_AFTER_S` (another host);
  a stale lock is reported and taken over only with `take_over=True` (launch/train.py
  --take_over_lock).
- Config: a rerun of a run that has checkpoints is compared with `<workdir>/config.json` before
  anything is written. Keys that change the run's math or its checkpoints' shapes differ ->
  refused, listing them; keys in `SAFE_ON_RESUME` (length, cadences, evaluations, logging, data
  location and loading, mesh and sharding, multi-host settings, XLA:CPU's scheduler) may change.
  config.json is (re)written only after the check.
- Metrics: on resume from step S, rows of metrics.jsonl after S (logged after the last
  checkpoint of the previous run) are dropped, so each logged step has one row; TensorBoard gets
  a purge step (reporting.MetricWriter).
"""
import datetime
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import ml_collections

from mobileclip_jax import config as config_lib
from mobileclip_jax import utils

log = logging.getLogger('mobileclip_jax')
LOCK_FILE = 'lock.json'
CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
HEARTBEAT_S = 60
STALE_AFTER_S = 10 * 60
# Dotted-key prefixes a rerun may change (the rest must match config.json).
SAFE_ON_RESUME = ('schedule.total', 'checkpoint.', 'log_every', 'norm_metrics', 'evals',
                  'data.data_dir', 'data.workers', 'data.prefetch', 'data.build_hint', 'mesh.',
                  'sharding.', 'distributed.', 'cpu_scheduler', 'update_program')


class WorkdirError(RuntimeError):
  """The workdir is busy or was made by a different run; the message says what to do."""


def _now() -> float:
  return time.time()


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).isoformat(timespec='seconds')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


class Lock:
  """The workdir's lock, held by this process until `release` (see the module docstring)."""

  def __init__(self, workdir: str, take_over: bool = False):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now()}
    self._stop = threading.Event()
    os.makedirs(workdir, exist_ok=True)
    while not self._create():
      holder = self._read()
      if holder is None:  # Removed between our attempt and the read: try again.
        continue
      stale = self._stale_reason(holder)
      where = (f"{holder.get('host')} pid {holder.get('pid')}, started "
               f"{_iso(holder.get('started', 0))}")
      if stale is None:
        raise WorkdirError(f'{workdir} is in use by the run of {where} (heartbeat '
                           f"{_iso(holder.get('heartbeat', 0))}); wait for it to finish or use "
                           'another --workdir.')
      if not take_over:
        raise WorkdirError(f'{workdir} has a stale lock from {where} ({stale}); if no run uses '
                           'this workdir, rerun with --take_over_lock.')
      log.warning('Taking over the stale lock of %s (%s).', where, stale)
      os.remove(self.path)
    self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-heartbeat')
    self._thread.start()

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, utils.FILE_MODE)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump({**self._info, 'heartbeat': _now()}, f)
    return True

  def _read(self) -> Optional[Dict[str, Any]]:
    try:
      with open(self.path, encoding='utf-8') as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:  # Cut while being written: as stale as it gets.
      return {'host': '?', 'pid': -1, 'started': 0, 'heartbeat': 0}

  def _stale_reason(self, holder: Dict[str, Any]) -> Optional[str]:
    age = _now() - holder.get('heartbeat', 0)
    if holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1))):
      return 'its process is no longer running'
    if age > STALE_AFTER_S:
      return f'no heartbeat for {age / 60:.0f} min'
    return None

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      utils.write_json_atomic(self.path, {**self._info, 'heartbeat': _now()})

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    holder = self._read()
    if holder and holder.get('pid') == self._info['pid'] and holder.get('host') == self._info[
        'host']:
      os.remove(self.path)


def _flat(config: Any, prefix: str = '') -> Dict[str, Any]:
  if isinstance(config, dict):
    out = {}
    for key, value in config.items():
      out.update(_flat(value, f'{prefix}{key}.'))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: config}


def _plain(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())  # Tuples -> lists, as config.json holds them.


def changed_keys(workdir: str, config: ml_collections.ConfigDict) -> Optional[List[str]]:
  """Keys whose values differ from the config.json of the run whose checkpoints the workdir
  holds (None if it holds none: a run that never saved may start over with any config)."""
  path = os.path.join(workdir, CONFIG_FILE)
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not os.path.exists(path) or not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
    return None
  with open(path, encoding='utf-8') as f:
    old = _flat(json.load(f))
  # A key the older run's config did not have yet had its default's effect; a key this config
  # no longer has no longer matters.
  old = {**_flat(_plain(config_lib.base_config())), **old}
  new = _flat(_plain(config))
  return sorted(k for k in new if old.get(k, '<absent>') != new[k])


def check_and_write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a rerun whose config differs in keys that are unsafe on resume; then writes it."""
  changed = changed_keys(workdir, config)
  if changed:
    unsafe = [k for k in changed if not k.startswith(SAFE_ON_RESUME)]
    if unsafe:
      raise WorkdirError(
          f'{workdir} holds a run with another config: {", ".join(unsafe)} differ from its '
          f'{CONFIG_FILE}. Resume with the same values, or use a new --workdir (safe to change '
          f'on resume: {", ".join(p.rstrip(".") for p in SAFE_ON_RESUME)}).')
    log.warning('Config changes on resume (safe): %s.', ', '.join(changed))
  if changed is None or changed:
    with utils.atomic_write(os.path.join(workdir, CONFIG_FILE), encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1))


def truncate_metrics(workdir: str, last_step: int) -> int:
  """Drops metrics.jsonl rows after `last_step` (the resumed checkpoint); returns how many."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get('step', 0) <= last_step]
  if len(kept) != len(lines):
    with utils.atomic_write(path, encoding='utf-8') as f:
      f.writelines(kept)
  return len(lines) - len(kept)

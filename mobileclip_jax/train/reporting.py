"""What a training run reports: TensorBoard events, metrics.jsonl and a progress line (process 0)."""
import json
import logging
import os
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

log = logging.getLogger('mobileclip_jax')


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return f'{d}d{h:02d}h' if d else (f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s')


class MetricWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and `<workdir>/metrics.jsonl`, from process 0 only."""

  def __init__(self, workdir: str, purge_step: Optional[int] = None):
    """`purge_step`: on resume, TensorBoard drops the earlier run's events from this step on."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=purge_step)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Throughput and ETA over the steps since the last report, pausing during evals and saves."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total, self.batch = total_steps, batch_size
    self._mark_step, self._mark_time = start_step, time.perf_counter()
    self._paused = 0.0

  def pause(self):
    return _Pause(self)

  def report(self, step: int, loss: float, lr: float) -> Dict[str, float]:
    now = time.perf_counter()
    elapsed = max(now - self._mark_time - self._paused, 1e-9)
    steps = step - self._mark_step
    rate = steps / elapsed
    stats = {'examples_per_s': rate * self.batch, 'step_time_s': elapsed / max(steps, 1),
             'eta_s': (self.total - step) / rate if rate > 0 else float('inf')}
    log.info('step %d/%d | %.1f ex/s | %.3f s/step | loss %.4f | lr %.3g | ETA %s', step,
             self.total, stats['examples_per_s'], stats['step_time_s'], loss, lr,
             _format_duration(stats['eta_s']))
    self._mark_step, self._mark_time, self._paused = step, now, 0.0
    return stats


class _Pause:

  def __init__(self, progress: Progress):
    self._progress = progress

  def __enter__(self):
    self._start = time.perf_counter()

  def __exit__(self, *exc):
    self._progress._paused += time.perf_counter() - self._start  # pylint: disable=protected-access


def non_finite(metrics: Mapping[str, Any]) -> Dict[str, float]:
  """The metrics that are NaN or Inf."""
  out = {}
  for k, v in metrics.items():
    v = float(np.asarray(v))
    if not np.isfinite(v):
      out[k] = v
  return out


def human_count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e6 else f'{n / 1e3:.1f}K'


def memory_summary(compiled: Any) -> Optional[str]:
  """Per-device memory estimate of a compiled step (arguments, outputs, temporaries)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  gib = lambda b: b / 2 ** 30
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - \
      m.alias_size_in_bytes
  return (f'{gib(total):.2f} GiB per device (arguments {gib(m.argument_size_in_bytes):.2f}, '
          f'outputs {gib(m.output_size_in_bytes):.2f}, temporaries {gib(m.temp_size_in_bytes):.2f}, '
          f'donated/aliased {gib(m.alias_size_in_bytes):.2f})')

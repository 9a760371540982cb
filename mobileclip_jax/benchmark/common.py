"""Timing, memory and machine-description helpers shared by the benchmarks.

Every measured configuration runs in a fresh Python process (`isolated`), so that peak memory
is that configuration's own and one framework's thread pools and caches do not slow the other.
"""
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# A child process prints exactly one line starting with this marker, followed by its JSON result.
_RESULT_MARKER = 'BENCHMARK_RESULT '


def time_calls(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> Dict[str, float]:
  """Median / min wall seconds of `fn()` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'repeats': repeats}


def busy_cpu_s() -> Optional[float]:
  """Seconds all CPUs of the machine spent busy since boot (Linux), None elsewhere."""
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:9]]
  except OSError:
    return None
  return (sum(fields) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')  # Minus idle, iowait.


def time_with_contention(fn: Callable[[], Any], repeats: int, warmup: int = 2,
                         min_window_s: float = 1.0, max_repeats: int = 1000) -> Dict[str, Any]:
  """`time_calls(fn)` plus the share of all CPUs that other processes used meanwhile.

  Calls shorter than `min_window_s / repeats` (timed by one untimed call first; none when
  min_window_s is 0) get more repeats, so that the timed section is long enough for
  /proc/stat's 10 ms ticks to say whether it was contended.
  """
  if min_window_s > 0:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    repeats = max(repeats, min(max_repeats, math.ceil(min_window_s / max(once, 1e-6))))
  busy, own, wall = busy_cpu_s(), cpu_time_s(), time.perf_counter()
  timing = time_calls(fn, warmup=warmup, repeats=repeats)
  busy_after, own_after, wall_after = busy_cpu_s(), cpu_time_s(), time.perf_counter()
  others = None
  if busy is not None:
    others = max(0.0, (busy_after - busy) - (own_after - own)) / (
        (wall_after - wall) * os.cpu_count())
    others = round(others, 3)
  # This process's CPU seconds per call (all its threads): with one thread, the call's latency on
  # an idle core, which the other processes' load does not inflate as it does wall time.
  cpu_per_call = (own_after - own) / (warmup + timing['repeats'])
  return {**timing, 'others_cpu_frac': others, 'cpu_s_per_call': cpu_per_call}


def significant(x: float, digits: int = 4) -> float:
  return float(f'{x:.{digits}g}')


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_process_fields(device) -> Dict[str, Any]:
  """What a torch measurement reports about its process: memory, device, threads, versions."""
  import torch  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip, timm = torch_compat.import_open_clip(), torch_compat.import_timm()
  fields = {'peak_rss_mb': round(peak_rss_mb(), 1), 'device': 'cpu'}
  if device.type == 'cuda':
    fields['peak_device_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    fields['device'] = f'cuda:{torch.cuda.get_device_name()}'
  fields['threads'] = torch.get_num_threads()
  fields['versions'] = {'torch': torch.__version__, 'open_clip': open_clip.__version__,
                        'timm': timm.__version__}
  return fields


def cpu_time_s() -> float:
  """CPU seconds used by this process (all threads): wall time is unreliable on a shared machine."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def provenance(jax_r: Dict[str, Any], torch_r: Dict[str, Any]) -> Dict[str, Any]:
  """The fields every JAX-vs-PyTorch row ends with: repeats, devices, threads, contention,
  attempts, machine load and library versions of the two measured processes."""
  return {'repeats': {'jax': jax_r['repeats'], 'torch': torch_r['repeats']},
          'jax_device': jax_r['device'], 'torch_device': torch_r['device'],
          'torch_threads': torch_r['threads'],
          'jax_others_cpu_frac': jax_r['others_cpu_frac'],
          'torch_others_cpu_frac': torch_r['others_cpu_frac'],
          'attempts': {'jax': jax_r['attempts'], 'torch': torch_r['attempts']},
          'load_avg_1m': machine().get('load_avg_1m'),
          'versions': {**jax_r['versions'], **torch_r['versions']}}


def machine() -> Dict[str, Any]:
  """What the numbers were measured on."""
  info = {'host': platform.node(), 'cpu': platform.processor() or platform.machine(),
          'cpu_count': os.cpu_count(), 'python': platform.python_version()}
  try:
    with open('/proc/loadavg') as f:
      info['load_avg_1m'] = float(f.read().split()[0])
  except OSError:
    pass
  return info


# Dense (no sparsity) bfloat16 peak FLOP/s per chip, from the vendors' data sheets, matched
# case-insensitively as a substring of the device kind (jax `device_kind`, torch
# `get_device_name()`); the longest matching key wins.
PEAK_BF16_FLOPS = {
    'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'GH200': 989e12,
    'B200': 2250e12, 'A100': 312e12, 'A10G': 70e12, 'L40S': 362e12, 'L4': 121e12,
    'TPU v2': 45e12, 'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def peak_flops(device_kind: str) -> Optional[float]:
  """The chip's dense bf16 peak FLOP/s from `PEAK_BF16_FLOPS`, None when unknown (e.g. a CPU)."""
  kind = device_kind.lower()
  matches = [k for k in PEAK_BF16_FLOPS if k.lower() in kind]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def isolated(module: str, function: str, kwargs: Dict[str, Any], timeout: float = 1800,
             env: Dict[str, str] = None) -> Dict[str, Any]:
  """Runs `module.function(**kwargs)` in a fresh interpreter and returns its dict result."""
  code = (f'import json, sys\nfrom {module} import {function}\n'
          f'result = {function}(**json.loads(sys.argv[1]))\n'
          f'print({_RESULT_MARKER!r} + json.dumps(result), flush=True)\n')
  proc = subprocess.run([sys.executable, '-c', code, json.dumps(kwargs)], capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})})
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT_MARKER):
      return json.loads(line[len(_RESULT_MARKER):])
  raise RuntimeError(f'{module}.{function}({kwargs}) failed (exit {proc.returncode}):\n'
                     f'{proc.stderr[-3000:]}')


def quietest(module: str, function: str, kwargs: Dict[str, Any], max_others_cpu: float,
             attempts: int, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """`isolated(module, function, kwargs)` in fresh processes until one was quiet enough.

  The result must carry `others_cpu_frac` (from `time_with_contention`); returns the quietest
  one with `attempts` set to the number of processes run.
  """
  best = None
  for attempt in range(1, attempts + 1):
    result = isolated(module, function, kwargs, env=env)
    others = result['others_cpu_frac']
    if best is None or (others is not None and others < best['others_cpu_frac']):
      best = result
    if others is None or others <= max_others_cpu:
      break
  return {**best, 'attempts': attempt}


# ---------------------------------------------------------------- `--option=KEY=VALUE` parsing


def _cast(key: str, value: Any, cast):
  try:
    return cast(value)
  except ValueError as e:
    raise ValueError(f'Option {key}={value!r} is not a valid {cast.__name__}.') from e


def option_list(options: Dict[str, Any], key: str, default: Sequence[Any], cast=str) -> List[Any]:
  """A comma-separated option as a list of `cast` values (`default` when absent)."""
  value = options.get(key)
  if value is None:
    return list(default)
  items = value.split(',') if isinstance(value, str) else list(value)
  return [_cast(key, v, cast) for v in items if str(v).strip()]


def option_scalar(options: Dict[str, Any], key: str, default: Any, cast):
  """One option as a `cast` value (`default` when absent)."""
  return _cast(key, options[key], cast) if key in options else default


def common_options(options: Dict[str, Any], valid: Sequence[str], benchmark: str,
                   example: str) -> Tuple[bool, Dict[str, Any]]:
  """(quick, overrides) after refusing unknown option names; `overrides` is JSON text or a dict."""
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} for the {benchmark} benchmark; valid: '
                     f'{", ".join(valid)}.')
  quick = str(options.get('quick', '0')).lower() in ('1', 'true', 'yes')
  overrides = options.get('overrides', {})
  if isinstance(overrides, str):
    try:
      overrides = json.loads(overrides)
    except json.JSONDecodeError as e:
      raise ValueError(f'overrides must be a JSON object such as {example}, got '
                       f'{overrides!r}: {e}') from e
  return quick, overrides

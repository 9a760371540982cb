"""Experiments: variants x seeds through the one trainer and evaluator, with mean and std.

  python launch/experiment.py --config=configs/demo.py:student_dr --sweep=distill_weight \
      --seeds=3 --workdir=/tmp/exp
  python launch/experiment.py --config=configs/demo.py:student_dr --seeds=3 --workdir=/tmp/exp \
      --grid='loss.distill_weight=0,0.5,1' --grid='optim.lr=1e-3,2e-3'     # 6 variants

A variant is the config with some keys overridden (dotted names, as on launch/train.py's command
line); named sweeps live beside the config they vary, as `get_sweeps(arg)` in its config file
(big_vision keeps its sweeps in the config file too, `get_hyper`): a dict name -> `Sweep`.
`METRICS` in the config file, if there, names the metrics of the table (column -> metric key).

Each (variant, seed) trains in <workdir>/runs/<variant>/seed<seed> with `train.loop.train`
(config.seed = seed; the config's evals off during training), then its final weights are
evaluated once with the config's `evals` (`evaluation.build_evaluators`). A run whose final
checkpoint and evaluation exist is skipped; an interrupted one resumes from its last checkpoint
(the trainer's own resume). Runs go one after another, every variant's first seed before any
second one, each on the whole mesh; on a cluster every host runs the same command, and process 0
writes the summary. On one CPU host `workers` runs go side by side, each in its own process (a
small model's XLA:CPU step keeps about one core busy), logging to <run>/log.txt
(mobileclip_jax/experiment_workers.py); the results are the same as one after another.

  results.json   {"variants": {NAME: {METRIC: {"mean", "std", "values"}}}, "seeds": {NAME: [...]},
                  "overrides": {NAME: {key: value}}, "runs": {NAME: {SEED: {...}}}}; metrics
                 are the evaluators' ('zeroshot/<eval>_<task>/top1', ...), per zero-shot
                 evaluator with several tasks their mean ('zeroshot/<eval>/mean_top1'), the
                 config file's METRICS names, and 'train/loss' (the last logged training loss);
                 std is the sample standard deviation over seeds (0 for one seed)
  results.md     the table: mean +- std per variant and metric
  metrics.png    each table metric against the swept value, with std error bars (one swept
                 numeric key), or per variant
  losses.png     training loss curves, mean over seeds per variant
"""
import ast
import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from mobileclip_jax import experiment_workers
from mobileclip_jax import utils

log = logging.getLogger('mobileclip_jax')
RESULTS_FILE, TABLE_FILE = 'results.json', 'results.md'
METRICS_PLOT, LOSS_PLOT = 'metrics.png', 'losses.png'
RUN_FILE = 'experiment_run.json'  # Per run: seconds spent and the final evaluation.
LOSS_KEY = 'train/loss'


class Interrupted(ValueError):
  """A run's training stopped before its last step (preempted): rerun to resume it (a user
  error for cli.run: one line, not a traceback)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Named variants of a config.

  Attributes:
    variants: name -> overrides ({dotted key: value}); {} is the config as it is.
    description: one line for the table's heading.
  """
  variants: Mapping[str, Mapping[str, Any]]
  description: str = ''

  @classmethod
  def grid(cls, axes: Mapping[str, Sequence[Any]], description: str = '') -> 'Sweep':
    """The product of the values of each key; variants are named 'key=value,key=value'."""
    keys = list(axes)
    variants = {}
    for values in itertools.product(*(axes[k] for k in keys)):
      overrides = dict(zip(keys, values))
      variants[','.join(f'{k}={_show(v)}' for k, v in overrides.items())] = overrides
    return cls(variants, description)


def _show(value: Any) -> str:
  return ','.join(map(_show, value)) if isinstance(value, (tuple, list)) else str(value)


# ----------------------------------------------------------------------------------------------
# Config files, overrides and --grid.


def load_config_module(path: str):
  """The module of a config file (`get_config`, and optionally `get_sweeps`, `METRICS`)."""
  path = os.path.expanduser(path)
  spec = importlib.util.spec_from_file_location('_mobileclip_experiment_config', path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'Config file {path!r} not found.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _split_top_level(text: str) -> List[str]:
  """'0,(1,2),x' -> ['0', '(1,2)', 'x']: commas outside brackets and quotes."""
  parts, depth, quote, current = [], 0, '', ''
  for ch in text:
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      parts.append(current)
      current = ''
      continue
    current += ch
  return parts + [current]


def parse_value(text: str) -> Any:
  """A Python literal ('0.5', '(70, 60)', 'True', "'x'") or else the bare string."""
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def parse_grid(specs: Sequence[str]) -> Sweep:
  """--grid 'key=v1,v2' (repeatable: the product) -> a Sweep."""
  axes = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not re.fullmatch(r'[A-Za-z_][\w.]*', key.strip()) or not values.strip():
      raise ValueError(f"--grid {spec!r}: expected 'dotted.key=value1,value2,...', e.g. "
                       "'loss.distill_weight=0,0.5,1'.")
    if key.strip() in axes:
      raise ValueError(f'--grid names {key.strip()!r} twice; give its values in one --grid.')
    axes[key.strip()] = [parse_value(v) for v in _split_top_level(values)]
  return Sweep.grid(axes, 'grid ' + ' x '.join(specs))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set; an unknown key fails naming the nearest ones."""
  from mobileclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  valid = config_lib.flat_keys(config)
  for key, value in overrides.items():
    if key not in valid and not key.startswith('evals.'):
      raise ValueError(f'Unknown config key {key!r} in a variant.'
                       f'{utils.did_you_mean(key, valid, cutoff=0.4)}')
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = list(value) if isinstance(value, tuple) and isinstance(
        node.get(leaf), list) else value
  return config


# ----------------------------------------------------------------------------------------------
# One run.


def _read_json(path: str) -> Optional[Any]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None


class Clock:
  """Wall and CPU seconds since construction; CPU is user + system of every thread of this
  process and of its finished child processes (e.g. data or generation workers)."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

  def seconds(self) -> Dict[str, float]:
    return {'wall_s': round(time.perf_counter() - self.wall, 2),
            'cpu_s': round(_cpu_seconds() - self.cpu, 2)}


def _cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system + times.children_user + times.children_system


def total_steps(config: ml_collections.ConfigDict) -> int:
  """The run's step count, as the trainer resolves it (the dataset is opened only for a
  duration in epochs)."""
  from mobileclip_jax.train import setup  # pylint: disable=g-import-not-at-top
  size = None
  durations = (config.schedule.total, config.schedule.warmup, config.schedule.constant,
               config.checkpoint.every, config.checkpoint.keep_every)
  if any('_epochs' in str(d) for d in durations):
    from mobileclip_jax.data import reinforced_tfds  # pylint: disable=g-import-not-at-top
    source, _ = reinforced_tfds.open_reinforced(config.data.name, config.data.data_dir,
                                                config.data.split)
    size = len(source)
  return setup.durations(config, size).total


def _evals_spec(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return json.loads(json.dumps(config.evals.to_dict()))


def derived_metrics(metrics: Mapping[str, float],
                    evaluators: Sequence[Any]) -> Dict[str, float]:
  """Per zero-shot evaluator with several tasks, the mean top-1 over its tasks."""
  out = {}
  for evaluator in evaluators:
    tasks = getattr(evaluator.data, 'tasks', ())
    if len(tasks) > 1:
      group = f'{evaluator.prefix}/{evaluator.name}'
      out[f'{group}/mean_top1'] = float(np.mean(
          [metrics[f'{group}_{t.name}/top1'] for t in tasks]))
  return out


def evaluate_run(config: ml_collections.ConfigDict, directory: str,
                 step: int) -> Dict[str, float]:
  """The config's evals on the run's weights at `step`, plus `derived_metrics`."""
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding
  from mobileclip_jax.evaluation import evaluator as evaluator_lib
  from mobileclip_jax.evaluation import runner
  # pylint: enable=g-import-not-at-top
  if not config.evals:
    return {}
  model, variables = runner.load_model(checkpoint_dir=directory, step=step)
  evaluators = evaluator_lib.build_evaluators(config.evals, model.config, sharding.create_mesh())
  metrics = runner.run_evaluators(model, variables, evaluators)['metrics']
  return {**metrics, **derived_metrics(metrics, evaluators)}


def last_loss(directory: str) -> Optional[float]:
  """The last logged training loss of a run (training rows carry the learning rate)."""
  curve = loss_curve(directory)
  return curve[1][-1] if curve[1] else None


def loss_curve(directory: str, key: str = 'loss') -> Tuple[List[int], List[float]]:
  """(steps, values) of a training metric from the run's metrics.jsonl."""
  steps, values = [], []
  try:
    with open(os.path.join(directory, 'metrics.jsonl'), encoding='utf-8') as f:
      for line in f:
        row = json.loads(line)
        if key in row and 'lr' in row:  # Training rows (evaluation rows carry no lr).
          steps.append(row['step'])
          values.append(row[key])
  except FileNotFoundError:
    pass
  return steps, values


def run_one(config: ml_collections.ConfigDict, directory: str) -> Dict[str, Any]:
  """Trains (or resumes, or skips) one run and evaluates its final weights (cached).

  Returns {'metrics': {...}, 'train': {'wall_s', 'cpu_s'}, 'eval': {...}, 'step', 'trained'}:
  seconds are summed over every call that trained or evaluated (interrupted ones included).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mobileclip_jax import checkpoint
  from mobileclip_jax.train import loop
  # pylint: enable=g-import-not-at-top
  path = os.path.join(directory, RUN_FILE)
  record = _read_json(path) or {'train': {'wall_s': 0.0, 'cpu_s': 0.0},
                                'eval': {'wall_s': 0.0, 'cpu_s': 0.0}}
  steps = total_steps(config)
  evals = _evals_spec(config)
  trained = False
  if steps not in checkpoint.training_steps(os.path.join(directory, 'checkpoints')):
    train_config = ml_collections.ConfigDict(config.to_dict())
    train_config.evals = ml_collections.ConfigDict()
    clock = Clock()
    try:
      loop.train(train_config, directory)
    finally:
      record['train'] = _add(record['train'], clock.seconds())
      if jax.process_index() == 0:
        utils.write_json_atomic(path, record)
    if steps not in checkpoint.training_steps(os.path.join(directory, 'checkpoints')):
      raise Interrupted(f'{directory}: training stopped before step {steps} (preempted?); '
                        'rerun the same command to resume it.')
    trained = True
  if record.get('step') != steps or record.get('evals') != evals or 'metrics' not in record:
    clock = Clock()
    metrics = evaluate_run(config, directory, steps)
    loss = last_loss(directory)
    if loss is not None:
      metrics[LOSS_KEY] = loss
    record.update(step=steps, evals=evals, metrics=metrics,
                  eval=_add(record['eval'], clock.seconds()))
    if jax.process_index() == 0:
      utils.write_json_atomic(path, record)
  return {**record, 'trained': trained}


def _add(a: Mapping[str, float], b: Mapping[str, float]) -> Dict[str, float]:
  return {k: round(a[k] + b[k], 2) for k in a}


# ----------------------------------------------------------------------------------------------
# Variants x seeds.


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', _safe(variant), f'seed{seed}')


def _safe(name: str) -> str:
  """A variant name as a folder name (keys and values keep their look, '/' does not pass)."""
  return re.sub(r'[^\w.,=+-]', '_', name)


def stats(values: Sequence[float]) -> Dict[str, Any]:
  """{'mean', 'std' (sample std over seeds; 0 for one), 'values'}."""
  array = np.asarray(values, np.float64)
  return {'mean': float(array.mean()),
          'std': float(array.std(ddof=1)) if len(array) > 1 else 0.0,
          'values': [float(v) for v in values]}


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]],
              metrics: Optional[Mapping[str, str]] = None) -> Dict[str, Dict[str, Any]]:
  """Per variant and metric, `stats` over seeds (metrics every seed has); `metrics` adds
  named copies (column -> metric key)."""
  out = {}
  for variant, by_seed in runs.items():
    per_seed = [r['metrics'] for r in by_seed.values()]
    keys = sorted(set.intersection(*(set(m) for m in per_seed))) if per_seed else []
    out[variant] = {k: stats([m[k] for m in per_seed]) for k in keys}
    for name, key in (metrics or {}).items():
      if key in out[variant]:
        out[variant][name] = out[variant][key]
  return out


def run(configs: Mapping[str, ml_collections.ConfigDict], num_seeds: int, workdir: str,
        metrics: Optional[Mapping[str, str]] = None, overrides: Optional[Mapping[str, Any]] = None,
        description: str = '', print_fn: Callable[[str], None] = print,
        workers: int = 1) -> Dict[str, Any]:
  """Runs every (variant, seed); writes the summary (module docstring).

  Args:
    configs: variant name -> its full training config (evals included).
    num_seeds: runs per variant, with config.seed = the variant's config.seed + 0, 1, ...
    workdir: where runs/ and the summary go.
    metrics: table columns (name -> metric key); None: every metric.
    overrides: variant name -> its overrides, recorded in results.json and used for the plots'
      x axis.
    description: the table's heading.
    print_fn: progress and table output.
    workers: runs side by side (`experiment_workers.resolve_workers`; 1: one after another
      in this process).

  Returns:
    What results.json holds.
  """
  import jax  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(os.path.expanduser(workdir))
  seeds = {v: [c.seed + i for i in range(num_seeds)] for v, c in configs.items()}
  # Seed-major: every variant's first seed before any repeat. A repeat compiles the same
  # programs as its variant's first seed (the seed is data, not code), so side by side it reads
  # them from the persistent cache instead of compiling them again beside it.
  jobs = []
  for i in range(num_seeds):
    for variant in configs:
      config = ml_collections.ConfigDict(configs[variant].to_dict())
      config.seed = seeds[variant][i]
      jobs.append((variant, config.seed, config, run_dir(workdir, variant, config.seed)))
  workers = experiment_workers.resolve_workers(workers, len(jobs))
  runs: Dict[str, Dict[int, Dict[str, Any]]] = {v: {} for v in configs}
  if workers == 1:
    spent, trained = 0.0, 0
    for i, (variant, seed, config, directory) in enumerate(jobs):
      eta = experiment_workers.eta_text(spent, trained, len(jobs) - i)
      print_fn(f'[{i + 1}/{len(jobs)}] {variant} seed {seed}{eta}  ({directory})')
      clock = time.perf_counter()
      runs[variant][seed] = run_one(config, directory)
      if runs[variant][seed]['trained']:
        spent += time.perf_counter() - clock
        trained += 1
  else:
    experiment_workers.run_side_by_side(jobs, workers, runs, print_fn)
    runs = {v: {s: runs[v][s] for s in seeds[v]} for v in configs}  # Seed order, not finish.
  results = {
      'description': description, 'seeds': seeds,
      'variants': summarize(runs, metrics),
      'overrides': {v: dict((overrides or {}).get(v, {})) for v in configs},
      'runs': {v: {str(s): {'dir': run_dir(workdir, v, s), 'train': r['train'],
                            'eval': r['eval'], 'step': r['step']}
                   for s, r in by_seed.items()} for v, by_seed in runs.items()},
  }
  if jax.process_index() == 0:
    utils.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
    table = format_table(results, metrics)
    with open(os.path.join(workdir, TABLE_FILE), 'w', encoding='utf-8') as f:
      f.write(table + '\n')
    plot_metrics(results, metrics, os.path.join(workdir, METRICS_PLOT))
    plot_losses({v: [run_dir(workdir, v, s) for s in seeds[v]] for v in configs},
                os.path.join(workdir, LOSS_PLOT))
    print_fn(table)
  return results


# ----------------------------------------------------------------------------------------------
# Table and plots.


def _columns(results: Mapping[str, Any], metrics: Optional[Mapping[str, str]]) -> List[str]:
  if metrics:
    return list(metrics)
  keys = set()
  for values in results['variants'].values():
    keys |= set(values)
  return sorted(keys)


def _lookup(values: Mapping[str, Any], column: str,
            metrics: Optional[Mapping[str, str]]) -> Optional[Mapping[str, Any]]:
  """A column's stats: under its own name, or under the metric key it names."""
  if column in values:
    return values[column]
  return values.get(metrics[column]) if metrics else None


def _cell(s: Optional[Mapping[str, Any]], key: str) -> str:
  if s is None:
    return '-'
  scale = 1.0 if key == LOSS_KEY else 100.0  # Fractions as percent; the loss as it is.
  return f"{scale * s['mean']:.1f} ± {scale * s['std']:.1f}"


def format_table(results: Mapping[str, Any], metrics: Optional[Mapping[str, str]] = None) -> str:
  """Markdown: one row per variant, mean ± std over seeds per metric (percent)."""
  columns = _columns(results, metrics)
  lines = []
  if results.get('description'):
    num_seeds = max(len(s) for s in results['seeds'].values())
    lines += [f"{results['description']} ({num_seeds} seeds; mean ± std, %)", '']
  lines += ['| variant | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
  for variant, values in results['variants'].items():
    lines.append(f'| {variant} | ' + ' | '.join(
        _cell(_lookup(values, c, metrics), metrics[c] if metrics else c) for c in columns) + ' |')
  return '\n'.join(lines)


def _swept_axis(results: Mapping[str, Any]) -> Optional[Tuple[str, List[float]]]:
  """(key, numeric value per variant): the first key (in the first variant's order) that every
  variant sets to a different number, e.g. loss.distill_weight beside its loss.clip_weight =
  1 - lambda; None when no key does (then the plot is per variant)."""
  overrides = list(results['overrides'].values())
  for key in (overrides[0] if overrides else {}):
    values = [o.get(key) for o in overrides]
    if (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and len(set(values)) == len(values)):
      return key, [float(v) for v in values]
  return None


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> None:
  """Saves a figure as PNG through a temporary file and a rename."""
  plt = pyplot()
  tmp = f'{path}.{os.getpid()}.tmp.png'
  fig.tight_layout()
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def plot_metrics(results: Mapping[str, Any], metrics: Optional[Mapping[str, str]],
                 path: str) -> None:
  """Each table metric against the swept value (or per variant), with std error bars."""
  plt = pyplot()
  columns = [c for c in _columns(results, metrics) if c != LOSS_KEY][:8]
  if not columns:
    return
  names = list(results['variants'])
  axis = _swept_axis(results)
  fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.4), squeeze=False)
  for ax, column in zip(axes[0], columns):
    cells = [_lookup(results['variants'][v], column, metrics) for v in names]
    mean = [100 * c['mean'] if c else np.nan for c in cells]
    std = [100 * c['std'] if c else 0.0 for c in cells]
    if axis:
      order = np.argsort(axis[1])
      ax.errorbar(np.asarray(axis[1])[order], np.asarray(mean)[order],
                  yerr=np.asarray(std)[order], marker='o', capsize=3)
      ax.set_xlabel(axis[0])
    else:
      ax.errorbar(range(len(names)), mean, yerr=std, marker='o', linestyle='none', capsize=3)
      ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=7)
    ax.set_title(column, fontsize=9)
    ax.set_ylabel('%')
    ax.grid(alpha=0.3)
  save_figure(fig, path)


def plot_mean_curve(ax, directories: Sequence[str], key: str, label: str, **kwargs) -> None:
  """The mean over runs of a training metric's curve (shaded: min to max)."""
  curves = [c for c in (loss_curve(d, key) for d in directories) if c[0]]
  if not curves:
    return
  length = min(len(c[0]) for c in curves)
  steps = curves[0][0][:length]
  values = np.array([c[1][:length] for c in curves])
  line, = ax.plot(steps, values.mean(0), label=label, **kwargs)
  if len(curves) > 1:
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())


def plot_losses(run_dirs: Mapping[str, Sequence[str]], path: str, key: str = 'loss') -> None:
  """Training loss per variant: the mean over its seeds (shaded: min to max)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for variant, directories in run_dirs.items():
    plot_mean_curve(ax, directories, key, variant)
  ax.set(xlabel='step', ylabel=key, title='Training loss (mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save_figure(fig, path)

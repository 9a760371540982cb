"""The experiment runner: grids and overrides, statistics, and variants x seeds end to end
(results.json layout, table, plots, skipping finished runs, resuming a preempted one)."""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mobileclip_jax import config as config_lib
from mobileclip_jax import experiment
from mobileclip_jax import experiment_workers
from mobileclip_jax.demo import training_sets as demo_datasets
from mobileclip_jax.demo import world as demo_world
from mobileclip_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch', 'experiment.py')

# A tiny CLIP on the plain demo world; zero-shot on two demo tasks and retrieval, with sweeps.
CONFIG = '''
from mobileclip_jax import config as config_lib
from mobileclip_jax import experiment

METRICS = {{'zs': 'zeroshot/demo/mean_top1', 'i2t': 'retrieval/pairs/i2t_R@1'}}


def get_config(arg=None):
  c = config_lib.base_config()
  c.model.name = 'MobileCLIP2-B'
  c.model.embed_dim = 16
  c.model.image_size = 32
  c.model.image.width = 32
  c.model.image.depth = 1
  c.model.image.heads = 2
  c.model.text.layers = 1
  c.model.text.width = 32
  c.model.text.heads = 2
  c.model.text.context_length = 32
  c.data.name = 'demo_world'
  c.data.data_dir = {data_dir!r}
  c.batch_size = 8
  c.schedule.total = '{total}_steps'
  c.schedule.warmup = '1_steps'
  c.checkpoint.every = '{every}_steps'
  c.log_every = 1
  c.evals.demo = dict(type='zeroshot', source=dict(kind='demo', split='val', num_samples=16,
                                                   tasks='shape,color'))
  c.evals.pairs = dict(type='retrieval', source=dict(kind='demo', split='val', num_samples=16,
                                                     num_captions=2))
  return c


def get_sweeps(arg=None):
  return {{'lr': experiment.Sweep.grid({{'optim.lr': [1e-3, 3e-3]}}, 'learning rate')}}
'''


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  demo_datasets.build_plain('demo_world', path, 64, 32, 0, 64, demo_world.DemoWorldConfig())
  return path


def _config_file(tmp_path, data_dir, total=3, every=3):
  path = tmp_path / f'tiny_{total}_{every}.py'
  path.write_text(CONFIG.format(data_dir=data_dir, total=total, every=every))
  return str(path)


def _launch(config_path, workdir, *extra, wait=True):
  proc = subprocess.Popen(
      [sys.executable, LAUNCH, f'--config={config_path}', f'--workdir={workdir}', *extra],
      env=dict(os.environ, PYTHONUNBUFFERED='1'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  return proc.returncode, out


# ----------------------------------------------------------------------------------------------
# Grids, overrides, statistics.


def test_grid_is_the_product_of_its_keys_with_literal_values():
  sweep = experiment.parse_grid(['loss.distill_weight=0,0.5,1',
                                 "loss.teacher_scales=(70,60),(50,50)"])
  assert list(sweep.variants) == [
      f'loss.distill_weight={w},loss.teacher_scales={s}'
      for w in ('0', '0.5', '1') for s in ('70,60', '50,50')]
  assert sweep.variants['loss.distill_weight=0.5,loss.teacher_scales=50,50'] == {
      'loss.distill_weight': 0.5, 'loss.teacher_scales': (50, 50)}
  assert experiment.parse_grid(['model.attention=softmax,sigmoid']).variants[
      'model.attention=sigmoid'] == {'model.attention': 'sigmoid'}


@pytest.mark.parametrize('spec', ['loss.distill_weight', 'loss.distill_weight=', '=1,2',
                                  'bad key=1'])
def test_grid_rejects_malformed_specs(spec):
  with pytest.raises(ValueError, match="dotted.key=value1,value2"):
    experiment.parse_grid([spec])


def test_grid_rejects_a_key_given_twice():
  with pytest.raises(ValueError, match='twice'):
    experiment.parse_grid(['optim.lr=1', 'optim.lr=2'])


def test_overrides_set_keys_on_a_copy_and_name_the_nearest_on_a_typo():
  base = config_lib.base_config()
  changed = experiment.apply_overrides(base, {'loss.distill_weight': 0.25,
                                              'loss.teacher_scales': (50.0, 40.0)})
  assert changed.loss.distill_weight == 0.25 and tuple(changed.loss.teacher_scales) == (50, 40)
  assert base.loss.distill_weight == 1.0  # The base is untouched.
  with pytest.raises(ValueError, match='loss.distill_weight'):
    experiment.apply_overrides(base, {'loss.distil_weight': 0.5})


def test_stats_are_mean_and_sample_std_over_seeds():
  values = [0.31, 0.35, 0.30]
  s = experiment.stats(values)
  assert s['mean'] == pytest.approx(statistics.mean(values))
  assert s['std'] == pytest.approx(statistics.stdev(values))  # n - 1, as over seeds
  assert s['values'] == values
  assert experiment.stats([0.5])['std'] == 0.0


def test_summary_keeps_metrics_every_seed_has_and_adds_named_ones():
  runs = {'a': {0: {'metrics': {'x': 0.1, 'y': 1.0}}, 1: {'metrics': {'x': 0.3}}}}
  summary = experiment.summarize(runs, {'X': 'x', 'missing': 'z'})
  assert set(summary['a']) == {'x', 'X'}
  assert summary['a']['X']['mean'] == pytest.approx(0.2)


def test_table_shows_mean_and_std_in_percent():
  results = {'description': 'd', 'seeds': {'a': [0, 1]},
             'variants': {'a': {'m': experiment.stats([0.5, 0.7])}}}
  table = experiment.format_table(results, {'M': 'm'})
  assert '| a | 60.0 ± 14.1 |' in table and table.startswith('d (2 seeds')


def test_plot_axis_is_the_first_key_every_variant_sets_to_a_distinct_number():
  # pylint: disable-next=protected-access
  axis = lambda overrides: experiment._swept_axis({'overrides': overrides})
  lam = {f'l={l}': {'loss.distill_weight': l, 'loss.clip_weight': 1 - l} for l in (0, 0.5, 1)}
  assert axis(lam) == ('loss.distill_weight', [0.0, 0.5, 1.0])
  assert axis({'a': {'optim.lr': 1e-3}, 'b': {'optim.lr': 3e-3}}) == ('optim.lr', [1e-3, 3e-3])
  # gt_weight repeats (1, 1, 0), syn_weight too: no axis, the plot is per variant.
  weights = {n: {'loss.gt_weight': g, 'loss.syn_weight': s}
             for n, g, s in (('a', 1, 0), ('b', 1, 1), ('c', 0, 1))}
  assert axis(weights) is None
  assert axis({'a': {'model.attention': 'softmax'}, 'b': {'model.attention': 'sigmoid'}}) is None
  assert axis({'a': {'x': True}, 'b': {'x': False}}) is None


# ----------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope='module')
def swept(tmp_path_factory, data_dir):
  tmp = tmp_path_factory.mktemp('swept')
  workdir = str(tmp / 'exp')
  code, out = _launch(_config_file(tmp, data_dir), workdir, '--sweep=lr', '--seeds=2')
  assert code == 0, out[-4000:]
  return tmp, workdir, out


def test_sweep_runs_every_variant_and_seed_and_writes_the_summary(swept):
  _, workdir, out = swept
  with open(os.path.join(workdir, experiment.RESULTS_FILE)) as f:
    results = json.load(f)
  assert set(results['variants']) == {'optim.lr=0.001', 'optim.lr=0.003'}
  assert results['seeds'] == {'optim.lr=0.001': [0, 1], 'optim.lr=0.003': [0, 1]}
  for name, variant in results['variants'].items():
    for key in ('zs', 'i2t', 'zeroshot/demo_shape/top1', 'zeroshot/demo/mean_top1',
                'retrieval/pairs/i2t_R@1', experiment.LOSS_KEY):
      assert len(variant[key]['values']) == 2, (name, key)
      assert variant[key]['mean'] == pytest.approx(np.mean(variant[key]['values']))
    shape, color = (variant[f'zeroshot/demo_{t}/top1']['values'] for t in ('shape', 'color'))
    assert variant['zs']['values'] == pytest.approx([(a + b) / 2 for a, b in zip(shape, color)])
    for seed in (0, 1):
      run = results['runs'][name][str(seed)]
      assert run['step'] == 3 and run['train']['wall_s'] > 0 and run['train']['cpu_s'] > 0
      with open(os.path.join(run['dir'], 'config.json')) as f:
        trained = json.load(f)
      assert trained['seed'] == seed and trained['optim']['lr'] == results['overrides'][name][
          'optim.lr']
      assert trained['evals'] == {}  # Evaluated once, on the final weights, by the runner.
  # Seeds differ; the two variants differ.
  losses = results['variants']['optim.lr=0.001'][experiment.LOSS_KEY]['values']
  assert losses[0] != losses[1]
  with open(os.path.join(workdir, experiment.TABLE_FILE)) as f:
    table = f.read()
  assert '| variant | zs | i2t |' in table and '| optim.lr=0.003 |' in table
  for plot in (experiment.METRICS_PLOT, experiment.LOSS_PLOT):
    with open(os.path.join(workdir, plot), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Seed-major: each variant's first seed before any repeat (repeats then read its programs
  # from the compilation cache rather than compiling them beside it).
  assert '[2/4] optim.lr=0.003 seed 0, ETA' in out and '[4/4] optim.lr=0.003 seed 1, ETA' in out


def test_rerun_skips_finished_runs(swept, data_dir, monkeypatch):
  tmp, workdir, _ = swept

  def refuse(*args, **kwargs):
    raise AssertionError('a finished run trained or evaluated again')

  monkeypatch.setattr(loop, 'train', refuse)
  monkeypatch.setattr(experiment, 'evaluate_run', refuse)
  with open(os.path.join(workdir, experiment.RESULTS_FILE)) as f:
    before = json.load(f)
  module = experiment.load_config_module(_config_file(tmp, data_dir))
  sweep = module.get_sweeps()['lr']
  configs = {n: experiment.apply_overrides(module.get_config(), o)
             for n, o in sweep.variants.items()}
  again = experiment.run(configs, 2, workdir, metrics=module.METRICS, overrides=sweep.variants,
                         description=sweep.description, print_fn=lambda _: None)
  assert again['variants'] == before['variants']


def test_runs_side_by_side_equal_runs_one_after_another(swept, data_dir):
  """Two worker processes: every run's metrics and loss equal the sequential sweep's (the
  seeds and overrides reach the right run), each run logs to its own file."""
  tmp, workdir, _ = swept
  module = experiment.load_config_module(_config_file(tmp, data_dir))
  sweep = module.get_sweeps()['lr']
  configs = {n: experiment.apply_overrides(module.get_config(), o)
             for n, o in sweep.variants.items()}
  printed = []
  parallel = experiment.run(configs, 2, str(tmp / 'parallel'), metrics=module.METRICS,
                            overrides=sweep.variants, print_fn=printed.append, workers=2)
  with open(os.path.join(workdir, experiment.RESULTS_FILE)) as f:
    sequential = json.load(f)
  assert parallel['variants'] == sequential['variants']
  for name, by_seed in parallel['runs'].items():
    for seed, run in by_seed.items():
      assert run['step'] == 3 and run['train']['wall_s'] > 0
      with open(os.path.join(run['dir'], experiment_workers.LOG_FILE)) as f:
        assert 'step 3/3' in f.read(), run['dir']
      with open(os.path.join(run['dir'], 'config.json')) as f:
        assert json.load(f)['seed'] == int(seed)
  assert printed[0] == '4 runs, 2 side by side (each logs to <run>/log.txt).'
  assert sum(' done' in line for line in printed) == 4


def test_workers_are_refused_where_runs_need_the_whole_mesh(monkeypatch):
  assert experiment_workers.resolve_workers(0, 3) == min(os.cpu_count(), 3)
  assert experiment_workers.resolve_workers(5, 2) == 2
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert experiment_workers.resolve_workers(0, 3) == 1
  with pytest.raises(ValueError, match='use workers=1'):
    experiment_workers.resolve_workers(2, 3)


def test_preempted_run_resumes_where_it_stopped(tmp_path, data_dir):
  """The runner reports a preempted run and resumes it on rerun (that the trainer's resume is
  bit-exact is tests/test_train_loop.py's). The tiny steps take ~0.04 s: 64 of them leave the
  signal time to land before the last step (with 8, a run once finished before it did)."""
  total = 64
  config_path = _config_file(tmp_path, data_dir, total=total, every=100)
  grid = '--grid=optim.lr=0.002'
  workdir = str(tmp_path / 'preempted')
  run = experiment.run_dir(workdir, 'optim.lr=0.002', 0)
  proc = _launch(config_path, workdir, grid, '--seeds=1', wait=False)
  deadline = time.time() + 600
  while not experiment.loss_curve(run)[0] or experiment.loss_curve(run)[0][-1] < 2:
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0 and 'rerun the same command to resume' in out, out[-3000:]
  assert not os.path.exists(os.path.join(workdir, experiment.RESULTS_FILE))
  code, out = _launch(config_path, workdir, grid, '--seeds=1')
  assert code == 0, out[-4000:]
  resumed = re.search(r'Resumed from \S+ at step (\d+)\.', out)  # Not restarted from step 0.
  assert resumed and 2 <= int(resumed.group(1)) < total, out[-3000:]
  assert experiment.loss_curve(run)[0] == list(range(1, total + 1))
  with open(os.path.join(workdir, experiment.RESULTS_FILE)) as f:
    assert json.load(f)['runs']['optim.lr=0.002']['0']['step'] == total


def test_command_line_errors_name_the_fix(tmp_path, data_dir):
  config_path = _config_file(tmp_path, data_dir)
  code, out = _launch(config_path, str(tmp_path / 'x'), '--sweep=nope')
  assert code != 0 and "has no sweep 'nope'; sweeps: lr" in out
  code, out = _launch(config_path, str(tmp_path / 'x'), '--grid=optim.lrr=1')
  assert code != 0 and 'optim.lr' in out
  code, out = _launch(config_path, str(tmp_path / 'x'), '--list_sweeps')
  assert code == 0 and 'lr: learning rate (optim.lr=0.001, optim.lr=0.003)' in out


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path, data_dir):
  """Spawned workers import the calling script; unguarded, each dies starting up, before any
  run: the line names the guard, not memory."""
  script = tmp_path / 'unguarded.py'
  script.write_text(
      'from mobileclip_jax import experiment\n'
      f'module = experiment.load_config_module({_config_file(tmp_path, data_dir)!r})\n'
      "experiment.run({'a': module.get_config()}, 2, "
      f'{str(tmp_path / "work")!r}, workers=2)\n')
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert "under `if __name__ == '__main__':`" in last and 'died before it started' in last, last

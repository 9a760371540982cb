"""launch/train.py end to end on the demo world: resume, preemption, crashes mid-save, NaN, errors."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import config as config_lib
from mobileclip_jax.demo import training_sets as demo_datasets
from mobileclip_jax.demo import world as demo_world
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import loop
from mobileclip_jax.train import setup

import test_reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'launch', 'train.py')

# MobileCLIP2-B's conv-stem ViT at one 32-wide layer (BatchNorm in the stem, so batch statistics
# travel through checkpoints) and a one-layer text tower on 32 px demo images. The trainer does
# not care which tower it trains, and this one compiles several times faster than a reduced MCi.
TINY_CONFIG = '''
from mobileclip_jax import config as config_lib


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
  c.schedule.warmup = '{warmup}_steps'
  c.checkpoint.every = '{every}_steps'
  c.log_every = 1
  return config_lib.apply_presets(c, arg)
'''


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  demo_datasets.build_plain('demo_world', path, 256, 32, 0, 128,
                            demo_world.DemoWorldConfig())
  return path


def _config_file(tmp_path, data_dir, total=6, every=2, warmup=2):
  path = tmp_path / f'tiny_{total}_{every}_{warmup}.py'
  path.write_text(TINY_CONFIG.format(data_dir=data_dir, total=total, every=every, warmup=warmup))
  return str(path)


def _config(tmp_path, data_dir, **kw):
  return config_lib.load_config_file(_config_file(tmp_path, data_dir, **kw))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {row['step']: row['loss'] for row in rows if 'loss' in row}


def _run(config_path, workdir, *extra, wait=True, env=None):
  env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
  proc = subprocess.Popen([sys.executable, TRAIN, f'--config={config_path}', f'--workdir={workdir}',
                           *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if wait:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out
  return proc


def _wait_for_step(proc, workdir, step, timeout=600):
  """Returns once `step`'s metrics are written. Polls every 10 ms: the tiny run takes a few tens
  of ms a step, and a test that signals the run must find it near `step`, not at its end."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'training ended early:\n{proc.stdout.read()[-4000:]}')
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
      return
    time.sleep(0.01)
  raise TimeoutError(f'step {step} not reached')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  tmp = tmp_path_factory.mktemp('uninterrupted')
  workdir = str(tmp / 'work')
  _run(_config_file(tmp, data_dir, total=8, every=2), workdir)
  return workdir


def test_run_writes_checkpoints_metrics_and_config(uninterrupted):
  assert sorted(os.listdir(os.path.join(uninterrupted, 'checkpoints'))) == ['4', '6', '8']
  assert sorted(_losses(uninterrupted)) == list(range(1, 9))
  assert os.path.exists(os.path.join(uninterrupted, 'config.json'))
  [events] = os.listdir(os.path.join(uninterrupted, 'tb'))
  logged = {e.step: v.simple_value for e in test_reporting.read_events(
      os.path.join(uninterrupted, 'tb', events)) for v in e.summary.value if v.tag == 'loss'}
  assert logged == pytest.approx(_losses(uninterrupted), rel=1e-6)  # float32 in TensorBoard.


def test_reading_a_run_s_weights_warns_of_nothing(uninterrupted, caplog):
  with caplog.at_level(logging.WARNING):
    variables, _ = checkpoint.load_variables(uninterrupted)
  assert 'params' in variables
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_rerunning_a_finished_run_does_nothing(tmp_path, data_dir, uninterrupted):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(uninterrupted, workdir)
  metrics_before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  assert loop.train(_config(tmp_path, data_dir, total=8, every=2), workdir) == {}
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == metrics_before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6', '8']


def _compiled_steps(cache_dir):
  """The cache's entries of the step's programs (on CPU: the gradients', then the update's)."""
  return {f for f in os.listdir(cache_dir) if f.startswith(('jit_grad_fn-', 'jit_update-'))}


def test_preempted_run_resumes_bit_exactly_from_the_cached_step(tmp_path, data_dir, uninterrupted):
  workdir, cache_dir = str(tmp_path / 'work'), str(tmp_path / 'jax_cache')
  cache = {'JAX_COMPILATION_CACHE_DIR': cache_dir}  # This test's own persistent cache.
  config_path = _config_file(tmp_path, data_dir, total=8, every=100)
  proc = _run(config_path, workdir, wait=False, env=cache)
  _wait_for_step(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert len(saved) == 1 and 2 <= saved[0] < 8, (saved, out[-3000:])
  compiled = _compiled_steps(cache_dir)
  assert len(compiled) == 2, compiled
  _run(config_path, workdir, env=cache)
  # The resumed process lowers the same step program: it reads the executable, writes none.
  assert _compiled_steps(cache_dir) == compiled
  want, got = _losses(uninterrupted), _losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for step in range(saved[0] + 1, 9):
    assert got[step] == want[step], (step, got[step], want[step])  # Bitwise: same XLA program.


def test_the_cache_keeps_sub_second_programs_unless_the_environment_sets_a_threshold(tmp_path):
  script = ('import jax; from mobileclip_jax import compilation_cache; compilation_cache.enable(); '
            'jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()')
  for threshold, kept in ((None, True), ('60', False)):
    cache_dir = tmp_path / str(threshold)
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'}
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
    if threshold:
      env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = threshold
    subprocess.run([sys.executable, '-c', script], env=env, check=True)
    entries = [f.name for f in cache_dir.glob('jit_*')]
    assert bool(entries) == kept, (threshold, entries)


@pytest.mark.slow
def test_a_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, data_dir,
                                                                        uninterrupted):
  workdir = str(tmp_path / 'work')
  config_path = _config_file(tmp_path, data_dir, total=8, every=2)
  proc = _run(config_path, workdir, wait=False)
  _wait_for_step(proc, workdir, 4)  # Step 4's async save is in flight about now.
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  complete = [s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()]
  out = _run(config_path, workdir, '--take_over_lock')  # The killed run's lock is left behind.
  assert 'Taking over the stale lock' in out and 'no longer running' in out
  got, want = _losses(workdir), _losses(uninterrupted)
  resumed_from = max(int(s) for s in complete) if complete else 0
  for step in range(resumed_from + 1, 9):
    assert got[step] == want[step]


def test_non_finite_loss_stops_with_step_terms_and_last_checkpoint(tmp_path, data_dir):
  config = _config(tmp_path, data_dir, total=6, every=2)
  config.optim.lr = 1e12
  config.optim.grad_clip = 0.0
  with pytest.raises(loop.NonFiniteLossError, match=r'Non-finite metrics at step \d+: .*loss'):
    loop.train(config, str(tmp_path / 'work'))


def test_missing_dataset_says_where_it_looked_and_how_to_build_it(tmp_path):
  config = _config(tmp_path, str(tmp_path / 'empty'))
  config.data.name = 'datacompdr_12m'
  with pytest.raises(FileNotFoundError, match=r'(?s)datacompdr_12m.*build_dataset'):
    loop.train(config, str(tmp_path / 'work'))


def test_unknown_override_names_the_nearest_keys(tmp_path, data_dir):
  path = _config_file(tmp_path, data_dir)
  with pytest.raises(SystemExit, match=r"Unknown config key 'optim.lrr'.*optim\.lr"):
    config_lib.check_overrides([TRAIN, f'--config={path}', '--config.optim.lrr=1'])
  config_lib.check_overrides([TRAIN, f'--config={path}', '--config.loss.teacher_scales=70,60'])


def test_durations_in_steps_epochs_and_examples():
  assert config_lib.parse_duration('200000_steps', 65536) == 200000
  assert config_lib.parse_duration('13.1e9_examples', 65536) == 199891
  assert config_lib.parse_duration('2_epochs', 1000, dataset_size=12_800) == 26
  assert config_lib.parse_duration(7, 8) == 7
  with pytest.raises(ValueError, match='dataset size is unknown'):
    config_lib.parse_duration('1_epochs', 8)
  with pytest.raises(ValueError, match="use an int"):
    config_lib.parse_duration('3 weeks', 8)


def test_every_recipe_loads_with_its_presets():
  specs = config_lib.recipe_specs()
  assert sorted(specs) == sorted(n for n in clip_lib.MODEL_CONFIGS if 'MobileCLIP' in n)
  for name, spec in specs.items():
    for presets in ('', ',runlocal', ',ablation_12m'):
      config = config_lib.load_config_file(spec + presets)
      assert setup.model_config(config).name == config.model.name == name
  s4 = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'mobileclip2.py:s4'))
  assert (s4.batch_size, s4.schedule.total, s4.optim.lr, s4.optim.b2) == (65536, '200000_steps',
                                                                          1e-3, 0.95)
  assert tuple(s4.loss.teacher_scales) == (70.0, 60.0) and s4.loss.distill_weight == 1.0
  b = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'mobileclip.py:b'))
  np.testing.assert_allclose((b.loss.distill_weight, b.loss.clip_weight), (0.75, 0.25))
  b_lt = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'mobileclip.py:b_lt'))
  assert (b_lt.schedule.kind, b_lt.schedule.total) == ('constant_cosine', '600000_steps')
  with pytest.raises(ValueError, match=r'needs a variant first, one of s0, s2, s3, s4, b, l14'):
    config_lib.load_config_file(os.path.join(ROOT, 'configs', 'mobileclip2.py:runlocal'))
  with pytest.raises(ValueError, match="Unknown config preset 'runlokal'"):
    config_lib.load_config_file(os.path.join(ROOT, 'configs', 'mobileclip2.py:s0,runlokal'))


def test_evaluators_are_added_from_the_command_line():
  argv = ['train.py', '--config=c.py', '--config.evals.demo=demo',
          '--config.evals.demo.every_steps=100', "--config.evals.coco.source='coco'",
          '--config.optim.lr=1']
  rest, entries = config_lib.pop_eval_overrides(argv)
  assert rest == ['train.py', '--config=c.py', '--config.optim.lr=1']
  assert entries == {'demo': {'source': 'demo', 'every_steps': 100}, 'coco': {'source': 'coco'}}
  config = config_lib.base_config()
  config.lock()
  config_lib.add_evals(config, entries)
  assert config.evals.demo.every_steps == 100 and config.evals.coco.source == 'coco'


def test_restore_onto_a_different_mesh(tmp_path, data_dir):
  config = _config(tmp_path, data_dir, total=4, every=2)
  config.mesh.data, config.mesh.fsdp = 8, 1
  config.sharding.min_fsdp_size = 64  # Shard the tiny model's parameters for real.
  workdir = str(tmp_path / 'work')
  loop.train(config, workdir)
  first = _losses(workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # As if the run had stopped at 2.
  config.mesh.data, config.mesh.fsdp = 2, 4
  loop.train(config, workdir)  # Resumes at step 2 with parameters sharded 4-way.
  resumed = _losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    assert resumed[step] == pytest.approx(first[step], rel=1e-5)


def test_a_single_process_save_compiles_nothing_and_restores_every_array(tmp_path):
  # Orbax's replica-parallel save cut every replicated array into one slice per replica with an
  # eager slice_in_dim, each slice its own compiled program (8 of a tiny run's 17 s).
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {f'w{n}': jax.device_put(np.arange(n * 8, dtype=np.float32).reshape(n, 8), replicated)
           for n in (8, 16, 24)}
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  compiles = []
  def listen(event, secs, **_):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(secs)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    saver = checkpoint.TrainCheckpointer(str(tmp_path), every_steps=1, keep_last=1)
    assert saver.save(1, state, iterator, {'step': 1})
    saver.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharded) for k, v in state.items()}
  restored, meta = saver.restore(1, target, iter(grain.MapDataset.range(4).to_iter_dataset()))
  saver.close()
  assert meta == {'step': 1}
  for key, value in state.items():
    assert restored[key].sharding == sharded
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))

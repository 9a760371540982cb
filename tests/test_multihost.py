"""Multi-host training: 2 local CPU processes (jax.distributed over localhost) agree with one process,
and a dead peer ends the run with an error instead of a hang."""
import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

import conftest
import test_train_loop as single

TRAIN = single.TRAIN


def _launch(config_path, workdir, devices, process_id=None, num_processes=None, port=None,
            extra=()):
  env = dict(os.environ, PYTHONUNBUFFERED='1', XLA_FLAGS=conftest.xla_flags(devices))
  args = [sys.executable, TRAIN, f'--config={config_path}', f'--workdir={workdir}', *extra]
  if process_id is not None:
    args += [f'--config.distributed.coordinator_address=localhost:{port}',
             f'--config.distributed.num_processes={num_processes}',
             f'--config.distributed.process_id={process_id}',
             '--config.distributed.heartbeat_timeout_s=10']
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=900):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multihost')
  data_dir = str(tmp / 'tfds')
  single.demo_datasets.build_plain('demo_world', data_dir, 256, 32, 0, 128,
                                   single.demo_world.DemoWorldConfig())
  return tmp, single._config_file(tmp, data_dir, total=2, every=1, warmup=1)  # pylint: disable=protected-access


def test_two_processes_train_like_one(setup):
  tmp, config_path = setup
  one = str(tmp / 'one')
  _finish(_launch(config_path, one, devices=4))
  two = str(tmp / 'two')
  port = portpicker.pick_unused_port()
  procs = [_launch(config_path, two, devices=2, process_id=i, num_processes=2, port=port)
           for i in range(2)]
  outs = [_finish(p) for p in procs]
  assert 'Processes: 2, devices: 4' in outs[0]
  want, got = _losses(one), _losses(two)
  # Two steps: gloo's loopback all-reduce of the gradients takes ~6 s per step here (README).
  assert sorted(got) == sorted(want) == [1, 2]
  # Same global batch on the same 4 devices; only reduction order may differ: the first loss
  # (no update yet) to float32 rounding; the second also carries the order in which the streamed
  # loss's gradient reduce-scatter summed (gloo across processes vs in-process), which AdamW's
  # first, sign-like update amplifies (measured at XLA's default code: 4e-5, the unstreamed loss
  # < 1e-5; at the fast suite's -O0 code: 1.1e-4, and 9e-5, 2.2e-4 at steps 3-4). A step moves
  # the loss by 0.2-0.3 here.
  assert got[1] == pytest.approx(want[1], rel=1e-6)
  assert got[2] == pytest.approx(want[2], rel=1e-3)
  assert sorted(os.listdir(os.path.join(two, 'checkpoints'))) == ['1', '2']


def test_a_dead_peer_ends_the_run_with_an_error(setup):
  tmp, config_path = setup
  workdir = str(tmp / 'dead')
  port = portpicker.pick_unused_port()
  long_run = ['--config.schedule.total=1000_steps']
  procs = [_launch(config_path, workdir, devices=2, process_id=i, num_processes=2, port=port,
                   extra=long_run) for i in range(2)]
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and time.time() < deadline:
    assert procs[0].poll() is None, procs[0].stdout.read()[-3000:]
    time.sleep(0.5)
  procs[1].kill()
  start = time.time()
  out, _ = procs[0].communicate(timeout=180)  # A hang would time out here.
  assert procs[0].returncode != 0
  assert time.time() - start < 180
  assert any(word in out.lower() for word in ('heartbeat', 'unavailable', 'coordination',
                                              'distributed', 'connection')), out[-3000:]


@pytest.mark.slow  # Three two-process launches.
def test_preempted_processes_agree_on_a_step_save_it_and_resume(setup):
  # SIGTERM to one process: JAX's preemption service makes every process save the same step
  # and exit cleanly, with no collective in the loop; rerunning both resumes from it.
  tmp, data_dir = setup[0], str(setup[0] / 'tfds')
  config_path = single._config_file(tmp, data_dir, total=16, every=100)  # pylint: disable=protected-access
  one = str(tmp / 'preempt_one')
  _finish(_launch(config_path, one, devices=4))
  workdir = str(tmp / 'preempt_two')
  port = portpicker.pick_unused_port()
  procs = [_launch(config_path, workdir, devices=2, process_id=i, num_processes=2, port=port)
           for i in range(2)]
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and max(_losses(workdir), default=0) >= 3):
    assert procs[0].poll() is None and time.time() < deadline, procs[0].stdout.read()[-3000:]
    time.sleep(0.01)  # Near step 3, not at the end (test_train_loop.py's _wait_for_step).
  procs[1].send_signal(signal.SIGTERM)
  outs = [_finish(p, timeout=300) for p in procs]
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert len(saved) == 1 and 3 <= saved[0] < 16, (saved, outs[0][-2000:])
  assert all(f'checkpoint of step {saved[0]}' in out for out in outs)
  port = portpicker.pick_unused_port()
  for out in [_finish(p) for p in [_launch(config_path, workdir, devices=2, process_id=i,
                                           num_processes=2, port=port) for i in range(2)]]:
    assert f'at step {saved[0]}' in out and 'Resumed from' in out
  want, got = _losses(one), _losses(workdir)
  assert sorted(got) == list(range(1, 17))
  for step in range(saved[0] + 1, 17):  # Reduction order only (test_two_processes_train_like_one).
    assert got[step] == pytest.approx(want[step], rel=2e-4)

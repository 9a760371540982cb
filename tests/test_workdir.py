"""One workdir, one run: the lock, concurrent runs, config changes on rerun, damaged checkpoints,
metrics without duplicates (mobileclip_jax/train/workdir.py, checkpoint.py, the loop)."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax.train import loop
from mobileclip_jax.train import workdir as workdir_lib

import test_train_loop as tl  # The tiny config, its demo data and the run helpers.

data_dir = tl.data_dir  # pytest fixture, shared


def _lock_file(workdir, **fields):
  os.makedirs(workdir, exist_ok=True)
  info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
          'heartbeat': time.time(), **fields}
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
    json.dump(info, f)


def test_lock_refuses_a_second_holder_and_reports_stale_ones(tmp_path):
  workdir = str(tmp_path / 'w')
  lock = workdir_lib.Lock(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=rf'in use by the run of .* pid {os.getpid()}'):
    workdir_lib.Lock(workdir)
  lock.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  # A dead process on this host, or a silent one elsewhere: stale, taken over only on request.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  for fields, reason in (({'pid': int(dead)}, 'no longer running'),
                         ({'host': 'elsewhere', 'heartbeat': time.time() - 3600}, 'no heartbeat')):
    _lock_file(workdir, **fields)
    with pytest.raises(workdir_lib.WorkdirError, match=rf'stale lock .*{reason}.*--take_over_lock'):
      workdir_lib.Lock(workdir)
    workdir_lib.Lock(workdir, take_over=True).release()
  _lock_file(workdir, host='elsewhere', pid=1)  # Alive elsewhere (recent heartbeat): busy.
  with pytest.raises(workdir_lib.WorkdirError, match='in use'):
    workdir_lib.Lock(workdir, take_over=True)


def test_two_runs_started_together_one_refuses_and_the_other_is_intact(tmp_path, data_dir):
  config_path = tl._config_file(tmp_path, data_dir, total=6, every=2)  # pylint: disable=protected-access
  workdir = str(tmp_path / 'work')
  procs = [tl._run(config_path, workdir, wait=False) for _ in range(2)]  # pylint: disable=protected-access
  outs = [p.communicate(timeout=900)[0] for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], outs
  refused = outs[[p.returncode for p in procs].index(2)]
  assert 'is in use by the run of' in refused and 'Traceback' not in refused
  assert sorted(tl._losses(workdir)) == list(range(1, 7))  # pylint: disable=protected-access
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if '"loss"' in line]
  assert steps == list(range(1, 7))  # One writer: no interleaved rows.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


@pytest.fixture(scope='module')
def six_steps(tmp_path_factory, data_dir):
  tmp = tmp_path_factory.mktemp('six')
  workdir = str(tmp / 'work')
  loop.train(tl._config(tmp, data_dir, total=6, every=2), workdir)  # pylint: disable=protected-access
  return workdir


def _copy_stopped_at(done, workdir, step):
  """A copy of the finished run as if it had stopped after saving `step`."""
  shutil.copytree(done, workdir)
  for saved in os.listdir(os.path.join(workdir, 'checkpoints')):
    if int(saved) > step:
      shutil.rmtree(os.path.join(workdir, 'checkpoints', saved))


def test_rerun_with_another_model_is_refused_before_anything_is_written(tmp_path, data_dir,
                                                                        six_steps):
  workdir = str(tmp_path / 'work')
  _copy_stopped_at(six_steps, workdir, 4)
  before = open(os.path.join(workdir, 'config.json')).read()
  config = tl._config(tmp_path, data_dir, total=6, every=2)  # pylint: disable=protected-access
  config.model.text.layers = 2
  config.optim.lr = 5e-4
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r'model\.text\.layers, optim\.lr differ .*safe to change'):
    loop.train(config, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  # A config.json from before a key existed (here the rule keys) reads as that key's default.
  old = json.load(open(os.path.join(workdir, 'config.json')))
  del old['optim']['wd_rules'], old['sharding']['rules']
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(old, f)
  # Longer, with other cadences and logged norms: safe; it resumes and the config records them.
  config = tl._config(tmp_path, data_dir, total=8, every=3)  # pylint: disable=protected-access
  config.log_every, config.norm_metrics = 2, ('param',)
  loop.train(config, workdir)
  recorded = json.load(open(os.path.join(workdir, 'config.json')))
  assert recorded['schedule']['total'] == '8_steps' and recorded['norm_metrics'] == ['param']


def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, data_dir, six_steps,
                                                                   caplog):
  workdir = str(tmp_path / 'work')
  _copy_stopped_at(six_steps, workdir, 4)
  state_dir = os.path.join(workdir, 'checkpoints', '4', 'state')
  files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs
           if 'ocdbt' in d or f.startswith('d')]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:  # Cut the largest data file in half.
    f.truncate(os.path.getsize(biggest) // 2)
  with caplog.at_level(logging.INFO, logger='mobileclip_jax'):
    variables, _ = checkpoint.load_variables(workdir)  # convert / evaluate: step 2, warned.
  assert variables['params']
  assert 'Checkpoint step 4 of' in caplog.text and 'Read step 2 of' in caplog.text
  # The trainer sets step 4 aside (nothing deleted), resumes at 2 and recomputes 3 to 6.
  loop.train(tl._config(tmp_path, data_dir, total=6, every=2), workdir)  # pylint: disable=protected-access
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '4', 'state'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
  want, got = tl._losses(six_steps), tl._losses(workdir)  # pylint: disable=protected-access
  assert got == want  # One row per step, and steps 3-6 bit-equal to the first run.


def test_metrics_have_one_row_per_step_after_resumes(tmp_path, data_dir, six_steps):
  workdir = str(tmp_path / 'work')
  _copy_stopped_at(six_steps, workdir, 2)  # As if it had died after logging steps 3-6.
  for _ in range(2):  # Resumed twice: the second finds nothing left to do.
    loop.train(tl._config(tmp_path, data_dir, total=6, every=2), workdir)  # pylint: disable=protected-access
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert tl._losses(workdir) == tl._losses(six_steps)  # pylint: disable=protected-access

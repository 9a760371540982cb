"""launch/demo.py's pipeline at toy sizes (`demo.quick()`): every stage, results, reuse, export.

The toy numbers are noise; the real run's table is in the demo's docstring and README.
"""
import dataclasses
import json
import os

import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import config as config_lib
from mobileclip_jax import demo
from mobileclip_jax.convert import files
from mobileclip_jax.data import demo_dataset
from mobileclip_jax.data import demo_world
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.evaluation import runner
from mobileclip_jax.reinforce import generate
from mobileclip_jax.train import setup
from mobileclip_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = demo.quick()


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  printed = []
  results = demo.run(workdir, SETTINGS, print_fn=printed.append)
  return workdir, results, '\n'.join(printed)


def _metrics(workdir, role):
  with open(os.path.join(demo.run_dir(workdir, role), 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_results_json_holds_every_model_and_stage(first_run):
  workdir, results, printed = first_run
  with open(os.path.join(workdir, demo.RESULTS_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert results['settings'] == SETTINGS.to_dict()
  assert list(results['models']) == list(demo.ROLES)
  tasks = set(demo_world.zero_shot_tasks(demo_world.DemoWorldConfig()))
  for role, m in results['models'].items():
    assert set(m['zeroshot']) == tasks
    for key in ('zeroshot_mean', 'heldout_object', 'i2t_R@1', 't2i_R@1'):
      assert 0.0 <= m[key] <= 1.0, (role, key)
    assert m['train_wall_s'] > 0 and m['train_cpu_s'] > 0
    assert demo.LABELS[role] in printed
  expected_stages = {'data', 'reinforce', 'export', 'plot', *demo.ROLES,
                     *(f'evaluate_{r}' for r in demo.ROLES)}
  assert set(results['this_run']['stages']) == expected_stages
  with open(os.path.join(workdir, demo.PLOT_FILE), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_models_trained_their_steps_on_their_data(first_run):
  workdir, _, _ = first_run
  for role in demo.ROLES:
    steps = SETTINGS.teacher_steps if role in demo.TEACHERS else SETTINGS.student_steps
    assert checkpoint.training_steps(
        os.path.join(demo.run_dir(workdir, role), 'checkpoints'))[-1] == steps
  # Both students are the same model; only the DR one distills, from both teachers.
  configs = [checkpoint.load_variables(demo.run_dir(workdir, r))[1] for r in demo.STUDENTS]
  assert configs[0] == configs[1]
  assert not any('gt/distill' in row for row in _metrics(workdir, 'student_clip'))
  assert any('syn/distill' in row for row in _metrics(workdir, 'student_dr'))
  data_dir = os.path.join(workdir, 'tfds')
  source, meta = reinforced_tfds.open_reinforced(demo_dataset.REINFORCED_NAME, data_dir)
  assert len(source) == SETTINGS.num_samples
  assert (meta.k, meta.num_syn, len(meta.teachers)) == (SETTINGS.k, SETTINGS.num_syn, 2)
  assert meta.teacher_dims == (SETTINGS.embed_dim,) * 2
  teachers_source, teachers_meta = reinforced_tfds.open_reinforced(demo.TEACHERS_NAME, data_dir)
  assert (len(teachers_source), teachers_meta.kind) == (SETTINGS.teacher_samples, 'plain')


def test_export_matches_jax_in_open_clip(first_run):
  pytest.importorskip('torch')
  _, results, printed = first_run
  check = results['export']['check']
  assert check['tokens_equal']
  assert check['image_rel_l2'] < 1e-5 and check['text_rel_l2'] < 1e-5, check
  assert os.path.exists(results['export']['weights']) and 'rel. L2' in printed


def test_second_run_reuses_every_stage(first_run, monkeypatch):
  workdir, results, _ = first_run

  def refuse(*args, **kwargs):
    raise AssertionError('a finished stage ran again')

  for module, name in ((loop, 'train'), (generate, 'reinforce'),
                       (dataset_build, 'build_dataset'), (demo_world, 'write_split'),
                       (runner, 'run_evaluators'), (files, 'export_checkpoint')):
    monkeypatch.setattr(module, name, refuse)
  again = demo.run(workdir, SETTINGS, print_fn=lambda _: None)
  assert again['models'] == results['models']
  assert again['export'] == results['export']


def test_other_settings_in_the_same_workdir_are_refused(first_run):
  workdir, _, _ = first_run
  with pytest.raises(ValueError, match='student_steps'):
    demo.run(workdir, dataclasses.replace(SETTINGS, student_steps=SETTINGS.student_steps + 1))


@pytest.mark.parametrize('arg', ['teacher_a', 'teacher_b', 'student_clip', 'student_dr,quick'])
def test_config_file_gives_each_role(arg):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'demo.py:{arg}'))
  role, _, quick = arg.partition(',')
  settings = demo.quick() if quick else demo.DemoSettings()
  workdir = demo.QUICK_WORKDIR if quick else demo.DEFAULT_WORKDIR
  assert config == demo.train_config(role, settings, os.path.join(workdir, 'tfds'))
  assert config.data.name == {'teacher_a': demo.TEACHERS_NAME, 'teacher_b': demo.TEACHERS_NAME,
                              'student_clip': demo_dataset.PLAIN_NAME,
                              'student_dr': demo_dataset.REINFORCED_NAME}[role]


def test_config_file_names_the_roles_on_a_bad_argument():
  with pytest.raises(ValueError, match='student_dr'):
    config_lib.load_config_file(os.path.join(ROOT, 'configs', 'demo.py:student'))


@pytest.mark.parametrize('spec', sorted(config_lib.recipe_specs().values()))
def test_every_recipe_runlocal_reads_the_reinforced_demo_data(first_run, spec):
  """`configs/<name>:runlocal` after the demo: the DR objective on demo_world_reinforced, whatever
  the recipe's own data settings (e.g. DataCompDR's synthetic-caption key names)."""
  workdir, _, _ = first_run
  config = config_lib.load_config_file(spec + ',runlocal')
  config.data.data_dir = os.path.join(workdir, 'tfds')  # Instead of the default demo workdir.
  model_config = setup.model_config(config)
  data = setup.open_input(config, model_config)
  assert (data.name, data.iterator.kind) == (demo_dataset.REINFORCED_NAME, 'reinforced')
  batch = next(data.iterator)
  size = model_config.image_size
  assert batch['image'].shape == (config.batch_size, size, size, 3)
  assert {'syn_text', 'teacher_image_emb', 'teacher_syn_text_emb'} <= set(batch)
  assert batch['teacher_image_emb'].shape == (config.batch_size, 2 * SETTINGS.embed_dim)

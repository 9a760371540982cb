"""launch/demo.py's pipeline at toy sizes (`settings.quick()`, two student seeds): every stage,
results, reuse, export, inspection.

The toy numbers are noise; the real run's table is in README.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import config as config_lib
from mobileclip_jax import experiment
from mobileclip_jax import sharding
from mobileclip_jax.convert import files
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.demo import inspection
from mobileclip_jax.demo import recipe
from mobileclip_jax.demo import report
from mobileclip_jax.demo import samples
from mobileclip_jax.demo import hparams as settings_lib
from mobileclip_jax.demo import tasks
from mobileclip_jax.demo import world
from mobileclip_jax.reinforce import generate
from mobileclip_jax.train import loop
from mobileclip_jax.train import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two student seeds instead of quick()'s three: every per-seed path, two fewer training runs.
SETTINGS = dataclasses.replace(settings_lib.quick(), student_seeds=2)


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  printed = []
  results = recipe.run(workdir, SETTINGS, print_fn=printed.append, regeneration_ablation=True)
  return workdir, results, '\n'.join(printed)


def _metrics(directory):
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_results_json_has_the_stated_layout(first_run):
  workdir, results, printed = first_run
  with open(os.path.join(workdir, recipe.RESULTS_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert results['settings'] == SETTINGS.to_dict()
  assert list(results['models']) == list(settings_lib.ROLES)
  task_names = set(tasks.zero_shot_tasks(world.DemoWorldConfig()))
  for role, m in results['models'].items():
    seeds = 1 if role in settings_lib.TEACHERS else SETTINGS.student_seeds
    for key in ('zero_shot_mean', 'heldout', 'i2t_r1', 't2i_r1'):
      s = m[key]
      assert len(s['values']) == seeds and all(0.0 <= v <= 1.0 for v in s['values']), (role, key)
      assert s['mean'] == pytest.approx(sum(s['values']) / seeds)
    assert set(m['zeroshot']) == task_names
    # The headline zero-shot mean is the mean of the per-task accuracies, seed by seed.
    for i in range(seeds):
      per_task = [m['zeroshot'][t]['values'][i] for t in task_names]
      assert m['zero_shot_mean']['values'][i] == pytest.approx(sum(per_task) / len(per_task))
    assert m['train']['wall_s'] > 0 and m['train']['cpu_s'] > 0
    assert settings_lib.LABELS[role] in printed
  assert results['seconds'] == results['this_run']['wall_s'] > 0
  assert set(results['this_run']['stages']) == {'data', 'teachers', 'reinforce',
                                                 'reinforce_noregen', 'students', 'export',
                                                 'plot'}
  with open(os.path.join(workdir, recipe.PLOT_FILE), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_models_trained_their_steps_on_their_data_with_their_seeds(first_run):
  workdir, _, _ = first_run
  for role in settings_lib.ROLES:
    dirs = recipe.run_dirs(workdir, role, SETTINGS)
    assert len(dirs) == (1 if role in settings_lib.TEACHERS else SETTINGS.student_seeds)
    steps = SETTINGS.teacher_steps if role in settings_lib.TEACHERS else SETTINGS.student_steps
    seeds = []
    for directory in dirs:
      assert checkpoint.training_steps(os.path.join(directory, 'checkpoints'))[-1] == steps
      with open(os.path.join(directory, 'config.json')) as f:
        seeds.append(json.load(f)['seed'])
    first = settings_lib.role_seed(role, SETTINGS)
    assert seeds == list(range(first, first + len(dirs)))
  # Both students are the same model; only the DR one distills, from both teachers.
  configs = [checkpoint.load_variables(recipe.run_dirs(workdir, r, SETTINGS)[0])[1]
             for r in settings_lib.STUDENTS]
  assert configs[0] == configs[1]
  clip_dir, dr_dir = (recipe.run_dirs(workdir, r, SETTINGS)[0] for r in settings_lib.STUDENTS)
  assert not any('gt/distill' in row for row in _metrics(clip_dir))
  assert any('syn/distill' in row for row in _metrics(dr_dir))
  data_dir = os.path.join(workdir, 'tfds')
  source, meta = reinforced_tfds.open_reinforced(settings_lib.REINFORCED_NAME, data_dir)
  assert len(source) == SETTINGS.num_samples
  assert (meta.k, meta.num_syn, len(meta.teachers)) == (SETTINGS.k, SETTINGS.num_syn, 2)
  assert meta.teacher_dims == (SETTINGS.embed_dim,) * 2
  teachers_source, teachers_meta = reinforced_tfds.open_reinforced(settings_lib.TEACHERS_NAME,
                                                                   data_dir)
  assert (len(teachers_source), teachers_meta.kind) == (SETTINGS.teacher_samples, 'plain')


def test_students_went_through_the_experiment_runner(first_run):
  workdir, results, _ = first_run
  with open(os.path.join(recipe.group_dir(workdir, 'student_dr'), experiment.RESULTS_FILE)) as f:
    runner = json.load(f)
  for role in settings_lib.STUDENTS:
    for name, key in report.METRICS.items():
      assert runner['variants'][role][key] == results['models'][role][name]


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
                       (dataset_build, 'build_dataset'), (generate, 'build_tfds'),
                       (samples, 'write_split'),
                       (experiment, 'evaluate_run'), (files, 'export_checkpoint')):
    monkeypatch.setattr(module, name, refuse)
  again = recipe.run(workdir, SETTINGS, print_fn=lambda _: None)
  assert again['models'] == results['models']
  assert again['export'] == results['export']


def test_other_settings_in_the_same_workdir_are_refused(first_run):
  workdir, _, _ = first_run
  with pytest.raises(ValueError, match='student_steps'):
    recipe.run(workdir, dataclasses.replace(SETTINGS, student_steps=SETTINGS.student_steps + 1))


def test_inspection_writes_its_outputs(first_run):
  workdir, _, printed = first_run
  lines = []
  stats = inspection.inspect(workdir, SETTINGS, print_fn=lines.append)
  out = os.path.join(workdir, inspection.INSPECT_DIR)
  names = set(os.listdir(out))
  assert {'data.json', 'models.json', 'eval_vs_train.png'} <= names
  assert {f'crops_{r}.png' for r in settings_lib.ROLES} <= names
  assert {f'confusion_{r}.png' for r in settings_lib.ROLES} <= names
  assert set(stats['data']) == {settings_lib.PLAIN_NAME, settings_lib.REINFORCED_NAME,
                                settings_lib.TEACHERS_NAME}
  assert set(stats['data'][settings_lib.REINFORCED_NAME]['captions']) == {'gt', 'syn'}
  for role, per_task in stats['models'].items():
    assert set(per_task) == set(tasks.zero_shot_tasks(world.DemoWorldConfig()))
    for s in per_task.values():
      n = len(s['classes'])
      assert len(s['confusion']) == n and sum(map(sum, s['confusion'])) == SETTINGS.eval_samples
  # The inspection's zero-shot accuracy is the evaluator's (same prompts, same renders).
  with open(os.path.join(recipe.run_dirs(workdir, 'teacher_a', SETTINGS)[0],
                         experiment.RUN_FILE)) as f:
    evaluated = json.load(f)['metrics']
  for task, s in stats['models']['teacher_a'].items():
    assert s['zero_shot_top1'] == pytest.approx(evaluated[f'zeroshot/demo_{task}/top1'])
  assert 'main object fully in the crop' in '\n'.join(lines)


@pytest.mark.parametrize('arg', ['teacher_a', 'teacher_b', 'student_clip', 'student_dr,quick'])
def test_config_file_gives_each_role(arg):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'demo.py:{arg}'))
  role, _, quick = arg.partition(',')
  settings = settings_lib.quick() if quick else settings_lib.DemoSettings()
  workdir = settings_lib.QUICK_WORKDIR if quick else settings_lib.DEFAULT_WORKDIR
  assert config == settings_lib.train_config(role, settings,
                                             os.path.join(os.path.expanduser(workdir), 'tfds'))
  assert config.data.name == {'teacher_a': settings_lib.TEACHERS_NAME,
                              'teacher_b': settings_lib.TEACHERS_NAME,
                              'student_clip': settings_lib.PLAIN_NAME,
                              'student_dr': settings_lib.REINFORCED_NAME}[role]


def test_config_file_sweep_objective_gives_the_two_students():
  module = experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py'))
  sweep = module.get_sweeps('student_dr')['objective']
  base = module.get_config('student_dr')
  for name, role in (('clip', 'student_clip'), ('dr', 'student_dr')):
    assert experiment.apply_overrides(base, sweep.variants[name]) == module.get_config(role)


def test_regeneration_ablation_keeps_the_captions_as_first_made(first_run):
  """demo_world_reinforced_noregen: the same seed, so the same captions before regeneration as
  the demo's set, and none regenerated after."""
  workdir, results, _ = first_run
  regenerated = results['reinforcement']['captions']  # Per synthetic-caption key.
  kept = results['reinforcement_noregen']['captions']
  assert list(kept) == list(regenerated) and kept
  for key, report in kept.items():
    assert report['before'] == regenerated[key]['before'], key
    assert report['after'] == report['before'] and report['regenerated'] == 0, key
  assert results['reinforcement_noregen']['samples'] == results['reinforcement']['samples']
  source, meta = reinforced_tfds.open_reinforced(settings_lib.REINFORCED_NOREGEN_NAME,
                                                 os.path.join(workdir, 'tfds'))
  assert (len(source), meta.num_syn, meta.k) == (SETTINGS.num_samples, SETTINGS.num_syn,
                                                 SETTINGS.k)


def _sweeps(arg):
  return experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py')).get_sweeps(arg)


def test_config_file_lists_the_ablation_sweeps():
  dr, clip = _sweeps('student_dr'), _sweeps('student_clip')
  assert list(dr) == ['objective', 'teacher_scales', 'teachers', 'distill_weight',
                      'caption_weights', 'num_syn', 'regeneration', 'captioners', 'attention',
                      'loss_kind']
  assert list(clip) == ['objective', 'attention', 'loss_kind']  # Distillation needs DR.
  assert all(s.description for s in dr.values())
  for variant in dr['distill_weight'].variants.values():
    assert variant['loss.clip_weight'] + variant['loss.distill_weight'] == 1.0
  # Captions per image: the paper's 1, 2, 5 where stored, and all of them.
  assert list(dr['num_syn'].variants) == ['num_syn=1', 'num_syn=2', 'num_syn=4']
  assert list(_sweeps('student_dr,quick')['num_syn'].variants) == ['num_syn=1', 'num_syn=2']
  assert 'loss.teacher_biases' not in clip['loss_kind'].variants['sigmoid']
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'experiment.py'),
                        '--config=configs/demo.py:student_dr', '--list_sweeps'], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  assert [line.split(':')[0] for line in out.splitlines()] == list(dr)


@pytest.mark.parametrize('role', settings_lib.STUDENTS)
def test_every_sweep_variant_builds_on_the_quick_demo_data(first_run, role):
  """Each variant opens its data and builds its run (model, loss, optimizer; no step compiled):
  the loader's selections (teachers, captions per image) and the loss see what they set."""
  workdir, _, _ = first_run
  module = experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py'))
  base = module.get_config(f'{role},quick')
  mesh = sharding.create_mesh()
  for name, sweep in module.get_sweeps(f'{role},quick').items():
    for variant, overrides in sweep.variants.items():
      if name == 'captioners' and variant != 'oracle':
        continue  # The CoCa's sets (--captioner_ablation): tests/test_demo_captioner.py (slow).
      config = experiment.apply_overrides(base, overrides)
      config.data.data_dir = os.path.join(workdir, 'tfds')
      run = setup.build(config, mesh)
      what = (name, variant)
      teachers = overrides.get('data.teachers')
      if run.objective.use_teachers:
        dims = (SETTINGS.embed_dim,) * (len(teachers) if teachers else 2)
        assert run.spec.teacher_dims == run.loss_config.teacher_dims == dims, what
        assert run.spec.element_spec['teacher_image_emb'][0] == (sum(dims),), what
        if 'loss.teacher_scales' in overrides:
          assert run.loss_config.teacher_scales == tuple(overrides['loss.teacher_scales']), what
      if 'data.num_syn' in overrides:
        # pylint: disable-next=protected-access
        assert run.data.iterator._loader._choices.syn_counts == (overrides['data.num_syn'],)
      assert run.data.name == config.data.name
      assert run.model_config.attention == config.model.attention, what
      assert run.model_config.text.hybrid_norm == bool(config.model.text.hybrid_norm), what
      assert run.loss_config.kind == config.loss.kind, what
      assert ('logit_bias' in run.abstract_state.params) == (config.loss.kind == 'sigmoid'), what
      run.data.iterator.close()


@pytest.mark.parametrize('role', settings_lib.STUDENTS)
def test_model_sweeps_build_at_the_demo_sizes(role):
  """The full-size models of the sweeps that change the model or the loss kind (no data: the
  input's layout as the demo's datasets give it); the quick test above builds every variant."""
  module = experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py'))
  base, mesh = module.get_config(role), sharding.create_mesh()
  for name, sweep in module.get_sweeps(role).items():
    for variant, overrides in sweep.variants.items():
      if not any(k.startswith('model.') or k == 'loss.kind' for k in overrides):
        continue
      config = experiment.apply_overrides(base, overrides)
      reinforced = config.data.name != settings_lib.PLAIN_NAME
      dims = (settings_lib.DemoSettings().embed_dim,) * len(config.data.teachers or (0, 1))
      spec = setup.InputSpec.synthetic(setup.model_config(config), dims if reinforced else ())
      run = setup.build(config, mesh, spec=spec)
      assert run.objective.use_teachers == (config.loss.objective == 'dr'), (name, variant)
      assert run.loss_config.kind == config.loss.kind, (name, variant)


def test_a_sweep_runs_through_the_runner_at_quick_sizes(first_run, tmp_path):
  """The regeneration sweep end to end (one seed): both reinforced sets, trained and evaluated,
  side by side in two processes of one CPU device each, as `launch/experiment.py` runs them (in
  this process they would train on its 8 fake devices)."""
  workdir, _, _ = first_run
  module = experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py'))
  base = module.get_config('student_dr,quick')
  base.data.data_dir = os.path.join(workdir, 'tfds')
  sweep = module.get_sweeps('student_dr,quick')['regeneration']
  configs = {n: experiment.apply_overrides(base, o) for n, o in sweep.variants.items()}
  results = experiment.run(configs, 1, str(tmp_path), metrics=module.METRICS,
                           overrides=sweep.variants, description=sweep.description,
                           print_fn=lambda _: None, workers=2)
  assert list(results['variants']) == ['regenerated', 'not_regenerated']
  for variant, values in results['variants'].items():
    assert set(module.METRICS) <= set(values), variant
    with open(os.path.join(results['runs'][variant]['0']['dir'], 'config.json')) as f:
      assert json.load(f)['data']['name'] == configs[variant].data.name
  assert 'near-duplicates regenerated' in (tmp_path / experiment.TABLE_FILE).read_text()


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
  assert (data.name, data.iterator.kind) == (settings_lib.REINFORCED_NAME, 'reinforced')
  batch = next(data.iterator)
  size = model_config.image_size
  assert batch['image'].shape == (config.batch_size, size, size, 3)
  assert {'syn_text', 'teacher_image_emb', 'teacher_syn_text_emb'} <= set(batch)
  assert batch['teacher_image_emb'].shape == (config.batch_size, 2 * SETTINGS.embed_dim)

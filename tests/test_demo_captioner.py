"""The demo with a learned captioner at toy sizes (`settings.quick()`): a CoCa trained by the one
trainer on the teachers' set writes the students' synthetic captions, alone or beside the oracle
(each its own key); every captioner choice's reinforced set (--captioner_ablation) with its
captions checked against the scene labels; the DR student of the captioners sweep trains on the
CoCa-only set through the experiment runner (slow: the CoCa's generation over the 49,408-token
vocabulary dominates). Fast: the settings, names and the captioner's training config."""
import dataclasses
import json
import os

import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import experiment
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.demo import hparams as settings_lib
from mobileclip_jax.demo import recipe
from mobileclip_jax.reinforce import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One student seed: the three seeds of the quick demo test nothing more here.
SETTINGS = dataclasses.replace(settings_lib.quick(), captioner='coca+demo', student_seeds=1)
KEYS = {'demo': ('syn_text',), 'coca': ('syn_text_coca',),
        'coca+demo': ('syn_text_coca', 'syn_text_demo')}


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo_coca'))
  printed = []
  results = recipe.run(workdir, SETTINGS, print_fn=printed.append, captioner_ablation=True)
  return workdir, results, '\n'.join(printed)


@pytest.mark.slow  # The quick demo with a CoCa: ~4 min on 2 shared cores.
def test_the_captioner_is_a_coca_trained_on_the_teachers_set(demo_run):
  workdir, results, printed = demo_run
  captioner = results['captioner']
  assert captioner['steps'] == SETTINGS.coca_steps
  assert captioner['train']['cpu_s'] > 0 and captioner['caption_loss'] > 0
  assert checkpoint.training_steps(os.path.join(recipe.captioner_dir(workdir), 'checkpoints')
                                   )[-1] == SETTINGS.coca_steps
  with open(os.path.join(recipe.captioner_dir(workdir), 'config.json')) as f:
    config = json.load(f)
  assert (config['data']['name'], config['loss']['objective']) == (
      settings_lib.TEACHERS_NAME, 'coca')
  assert config['model']['name'] == 'coca_ViT-B-32' and config['model']['text']['width'] == 32
  assert 'CoCa captioner:' in printed


def _syn_keys(workdir, captioner):
  _, meta = reinforced_tfds.open_reinforced(settings_lib.reinforced_name(captioner),
                                            os.path.join(workdir, 'tfds'))
  return meta.syn_keys


@pytest.mark.slow
def test_each_captioner_choice_has_its_set_keys_and_measures(demo_run):
  workdir, results, printed = demo_run
  entries = {results['reinforcement']['captioner']: results['reinforcement'],
             **results['captioner_ablation']}
  assert set(entries) == set(settings_lib.CAPTIONERS)
  assert results['reinforcement']['captioner'] == 'coca+demo'
  for choice, entry in entries.items():
    assert entry['dataset'] == settings_lib.reinforced_name(choice)
    assert _syn_keys(workdir, choice) == KEYS[choice]
    quality = entry['caption_quality']
    assert tuple(quality) == KEYS[choice]
    for key, rates in quality.items():
      assert rates['captions'] == SETTINGS.num_samples * SETTINGS.num_syn
      assert all(0.0 <= v <= 1.0 for k, v in rates.items() if k != 'captions'), (choice, key)
      if key in ('syn_text', 'syn_text_demo'):  # The oracle.
        assert (rates['shape_correct'], rates['color_correct'], rates['hallucinated_rate']) == (
            1.0, 1.0, 0.0)
      assert f'{choice}: {key}' in printed
    # The generation's own summary holds the same measures.
    with open(os.path.join(recipe.reinforced_dir(workdir, choice), generate.SUMMARY_FILE)) as f:
      assert json.load(f)['caption_quality'] == quality
  # The CoCa wrote its captions with the settings' sampler, from the demo's captioner run.
  with open(os.path.join(recipe.reinforced_dir(workdir, 'coca+demo'),
                         'reinforce_config.json')) as f:
    described = json.load(f)['generation']['captioners']
  assert [c['name'] for c in described] == ['coca', 'demo']
  assert (described[0]['path'], described[0]['sampler']) == (recipe.captioner_dir(workdir),
                                                             SETTINGS.coca_sampler)
  assert 'Synthetic captions vs the scene labels' in printed


@pytest.mark.slow
def test_the_dr_student_trains_on_the_chosen_captions(demo_run):
  workdir, _, _ = demo_run
  directory = recipe.run_dirs(workdir, 'student_dr', SETTINGS)[0]
  with open(os.path.join(directory, 'config.json')) as f:
    assert json.load(f)['data']['name'] == settings_lib.reinforced_name('coca+demo')
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    assert any('syn/distill' in json.loads(line) for line in f)


@pytest.mark.slow
def test_the_captioners_sweep_runs_the_student_on_the_coca_set(demo_run, tmp_path):
  workdir, _, _ = demo_run
  module = experiment.load_config_module(os.path.join(ROOT, 'configs', 'demo.py'))
  sweep = module.get_sweeps('student_dr,quick')['captioners']
  assert set(sweep.variants) == {'oracle', 'coca', 'coca+demo'}
  assert '--captioner_ablation' in sweep.variants['coca']['data.build_hint']
  config = settings_lib.train_config('student_dr', SETTINGS, os.path.join(workdir, 'tfds'))
  overrides = {'data.name': sweep.variants['coca']['data.name']}
  results = experiment.run({'coca': experiment.apply_overrides(config, overrides)}, 1,
                           str(tmp_path), metrics=module.METRICS, print_fn=lambda _: None)
  run = results['runs']['coca'][str(SETTINGS.seed)]
  with open(os.path.join(run['dir'], 'config.json')) as f:
    assert json.load(f)['data']['name'] == settings_lib.reinforced_name('coca')
  assert 0.0 <= results['variants']['coca']['heldout']['mean'] <= 1.0


def test_settings_and_names_refuse_unknown_captioners(tmp_path):
  with pytest.raises(ValueError, match="captioner must be one of demo, coca, coca[+]demo"):
    dataclasses.replace(SETTINGS, captioner='blip')
  with pytest.raises(ValueError, match='Unknown demo captioner'):
    settings_lib.reinforced_name('coca+coca')
  # A workdir made before the captioner settings existed keeps working with their defaults.
  recipe.check_settings(str(tmp_path), settings_lib.quick())
  path = os.path.join(str(tmp_path), recipe.SETTINGS_FILE)
  with open(path) as f:
    old = {k: v for k, v in json.load(f).items() if k not in ('captioner', 'coca_steps')}
  with open(path, 'w') as f:
    json.dump(old, f)
  recipe.check_settings(str(tmp_path), settings_lib.quick())
  with pytest.raises(ValueError, match='captioner'):
    recipe.check_settings(str(tmp_path), dataclasses.replace(settings_lib.quick(),
                                                             captioner='coca'))


def test_the_captioner_config_is_a_coca_on_the_teachers_set_with_the_students_tokenizer():
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.models import coca as coca_lib
  from mobileclip_jax.train import setup
  # pylint: enable=g-import-not-at-top
  settings = settings_lib.DemoSettings()
  config = settings_lib.captioner_config(settings, '/data')
  model = setup.model_config(config)
  assert isinstance(model, coca_lib.CoCaConfig)
  student = setup.model_config(settings_lib.train_config('student_dr', settings, '/data'))
  # Reinforcement refuses a captioner whose tokenizer is not the student's.
  assert model.tokenizer == student.tokenizer
  assert model.text.context_length == model.decoder.context_length == settings.context_length
  assert (model.image.width, model.text.width, model.image.attn_pool_queries) == (
      settings.coca.image_width, settings.coca.width, settings.coca.pool_queries)
  assert (config.data.name, config.loss.objective, config.loss.caption_weight) == (
      settings_lib.TEACHERS_NAME, 'coca', 2.0)
  assert not config.evals and config.schedule.total == f'{settings.coca_steps}_steps'
  # The students' DR data follows the captioner choice.
  for choice in settings_lib.CAPTIONERS:
    dr = settings_lib.train_config(
        'student_dr', dataclasses.replace(settings, captioner=choice), '/data')
    assert dr.data.name == settings_lib.reinforced_name(choice)
  assert settings_lib.reinforced_name('demo') == settings_lib.REINFORCED_NAME

"""The whole MobileCLIP recipe on the demo world, on one CPU in minutes (launch/demo.py).

  1. data       `demo_world`: the students' image-caption set (DataCompDR-style tars -> TFDS),
                and `demo_world_teachers`: more images with cleaner captions for the teachers
  2. teachers   two small CLIP models (MCi image tower, wider and deeper than the students'; one
                architecture, two seeds) trained with the CLIP loss, once each, through the
                experiment runner (mobileclip_jax/experiment.py)
  3. captioner  (`captioner` 'coca' or 'coca+demo') a small CoCa trained with the CoCa objective
                on the teachers' set, through the runner's `run_one` -> <workdir>/captioner
     reinforce  k stored augmentations per student image embedded by both teachers, synthetic
                captions from `DemoSettings.captioner` (the procedural oracle, the CoCa, or
                both under their own keys; near-duplicates regenerated), teacher text
                embeddings of every caption -> `demo_world_reinforced` (oracle) or
                `demo_world_reinforced_<coca|coca_demo>`; every caption is checked against its
                scene's labels (caption_quality.py); `captioner_ablation` builds the other
                choices' sets too (configs/demo.py's captioners sweep); with
                `regeneration_ablation` also the oracle's set without regeneration (the
                captions as first made) -> `demo_world_reinforced_noregen`, for configs/demo.py's
                regeneration sweep
  4. students   one reduced MobileCLIP2-S0 (MCi image tower, text transformer) trained with the
                same steps, batch and schedule with the CLIP loss on `demo_world` (the baseline)
                and the DR objective on `demo_world_reinforced`, `student_seeds` seeds each,
                through the same runner
  5. evaluate   (by the runner, per run) zero-shot top-1 on the 'val' tasks, the held-out
                colour-shape pairs ('heldout' split, 'object' task: compositional
                generalization), retrieval R@1 on 'val'
  6. export     the DR student (first seed) in open_clip's names, loaded by open_clip (torch) and
                compared with JAX
  7. report     a table, <workdir>/results.json and <workdir>/loss_curves.png

Why the teachers see another variant of the world: real teachers (OpenAI CLIP, DFN-2B) are
trained on far more, and filtered, data than the students' dataset; `DemoSettings.teacher_samples`
and `teacher_caption_noise` stand for that. Held-out pairs stay held out for every model.

Every stage skips what is complete (datasets and the reinforcement are found on disk, the runner
skips finished runs and resumes interrupted ones), so a rerun only redoes what is missing. The
settings of a workdir are recorded in <workdir>/demo_settings.json; a run with other settings
there is refused.

Layout of <workdir>: tfds/ (datasets), reinforced/ (DataCompDR-format shards;
reinforced_<coca|coca_demo>/ for the other captioners, reinforced_noregen/ with
`regeneration_ablation`), captioner/ (the CoCa's run), teachers/ and
students/ (the runner's workdirs: runs/<role>/seed<N>/, results.json, results.md, plots), export/
(the PyTorch export), results.json, loss_curves.png, inspect/ (`--inspect`).
"""
import json
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional

from mobileclip_jax import experiment
from mobileclip_jax import utils
from mobileclip_jax.demo import caption_quality
from mobileclip_jax.demo import training_sets
from mobileclip_jax.demo import report
from mobileclip_jax.demo import hparams as settings_lib
from mobileclip_jax.demo import torch_check
from mobileclip_jax.demo.hparams import DemoSettings, STUDENTS, TEACHERS
from mobileclip_jax.demo.world import DemoWorldConfig

log = logging.getLogger('mobileclip_jax')
SETTINGS_FILE = 'demo_settings.json'
RESULTS_FILE = 'results.json'
PLOT_FILE = 'loss_curves.png'
FORMAT = 'mobileclip_jax.demo/2'
CAPTIONER_DIR = 'captioner'


def _read_json(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def check_settings(workdir: str, settings: DemoSettings) -> None:
  """Records the settings of a new workdir; refuses a workdir made with other settings.

  A setting added since the workdir was made counts as its default (full or --quick sizes).
  """
  path = os.path.join(workdir, SETTINGS_FILE)
  recorded, new = _read_json(path), settings.to_dict()
  old = recorded
  if recorded is not None:
    defaults = (DemoSettings().to_dict(), settings_lib.quick().to_dict())
    old = {**{k: new[k] for k in set(new) - set(recorded)
              if any(d[k] == new[k] for d in defaults)}, **recorded}
  if old is None or (old == new and old != recorded):
    utils.write_json_atomic(path, new)
  elif old != new:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f'{workdir} holds a demo run with other settings ({", ".join(changed)} '
                     f'differ; see {path}). Use another --workdir, or delete this one to start '
                     'over.')


def group_dir(workdir: str, role: str) -> str:
  """The runner's workdir of a role's group (teachers/ or students/)."""
  return os.path.join(workdir, 'teachers' if role in TEACHERS else 'students')


def run_dirs(workdir: str, role: str, settings: DemoSettings) -> list:
  """The role's training runs, one per seed (`experiment.run_dir`)."""
  seed = settings_lib.role_seed(role, settings)
  count = 1 if role in TEACHERS else settings.student_seeds
  return [experiment.run_dir(group_dir(workdir, role), role, seed + i) for i in range(count)]


def train_group(roles, settings: DemoSettings, data_dir: str, workdir: str,
                print_fn: Callable[[str], None], workers: int = 0) -> Dict[str, Any]:
  """Trains and evaluates `roles` through the experiment runner (teachers once, students
  `student_seeds` times; `workers` side by side); returns the runner's results."""
  num_seeds = 1 if roles == TEACHERS else settings.student_seeds
  configs = {role: settings_lib.train_config(role, settings, data_dir) for role in roles}
  return experiment.run(configs, num_seeds, group_dir(workdir, roles[0]),
                        metrics=report.METRICS, description=', '.join(roles),
                        print_fn=print_fn, workers=workers)


def captioner_dir(workdir: str) -> str:
  """The CoCa captioner's training run."""
  return os.path.join(workdir, CAPTIONER_DIR)


def train_captioner(settings: DemoSettings, data_dir: str, workdir: str) -> Dict[str, Any]:
  """Trains the CoCa captioner on the teachers' set (skipped when done, resumed when
  interrupted: `experiment.run_one`); returns its cost and last caption / total loss."""
  directory = captioner_dir(workdir)
  result = experiment.run_one(settings_lib.captioner_config(settings, data_dir), directory)
  _, caption_loss = experiment.loss_curve(directory, 'caption/loss')
  return {'dir': directory, 'steps': settings.coca_steps, 'train': result['train'],
          'caption_loss': caption_loss[-1] if caption_loss else None,
          'loss': result['metrics'].get(experiment.LOSS_KEY)}


def captioner_specs(captioner: str, settings: DemoSettings, workdir: str) -> List[str]:
  """The reinforcement's captioner specs of a `DemoSettings.captioner` choice: the oracle alone
  writes DataCompDR's `syn_text`; with the CoCa each writes its own `syn_text_<TAG>`."""
  demo = f'temperature={settings.captioner_temperature}'
  coca = f'coca:coca={captioner_dir(workdir)}:sampler={settings.coca_sampler!r}'
  return {'demo': [f'demo:{demo}'], 'coca': [coca],
          'coca+demo': [coca, f'demo:demo:{demo}']}[captioner]


def reinforced_dir(workdir: str, captioner: str) -> str:
  """The generated shards of a captioner choice's reinforced set (reinforced/ for the oracle)."""
  suffix = settings_lib.reinforced_name(captioner)[len(settings_lib.REINFORCED_NAME):]
  return os.path.join(workdir, 'reinforced' + suffix)


def reinforce(settings: DemoSettings, data_dir: str, workdir: str,
              captioner: Optional[str] = None, regenerate: bool = True) -> Dict[str, Any]:
  """Makes the students' reinforced set with `captioner`'s synthetic captions (default
  `settings.captioner`; `settings_lib.reinforced_name`) from the students' tars and the two
  teachers (if not built), and measures its captions against the scene labels. With
  `regenerate` False `demo_world_reinforced_noregen`: the same seed, so the same captions as
  first made, near-duplicates measured but kept.

  Returns the generation's summary (duplicate measures per caption key, counts, and
  'caption_quality': `caption_quality.dataset_quality`) as written next to the shards.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mobileclip_jax.data import reinforced_tfds
  from mobileclip_jax.reinforce import captioners
  from mobileclip_jax.reinforce import generate
  from mobileclip_jax.reinforce import inputs
  from mobileclip_jax.reinforce import settings as reinforce_settings
  from mobileclip_jax.reinforce import teachers as teachers_lib
  # pylint: enable=g-import-not-at-top
  captioner = captioner or settings.captioner
  name, out = settings_lib.reinforced_name(captioner), reinforced_dir(workdir, captioner)
  if not regenerate:
    name, out = settings_lib.REINFORCED_NOREGEN_NAME, os.path.join(workdir, 'reinforced_noregen')
  generation = reinforce_settings.GenerationConfig(
      k=settings.k, num_syn=settings.num_syn, augmentation=settings_lib.augmentation(settings),
      seed=settings.seed, chunk_size=128,
      **({} if regenerate else {'max_regenerate': 0}))  # 0: measured, not regenerated.
  if not training_sets.exists(name, data_dir):
    _, meta = reinforced_tfds.open_reinforced(settings_lib.PLAIN_NAME, data_dir)
    shards = inputs.resolve('::'.join(meta.source_shards))
    per_device = max(1, 128 // jax.local_device_count())
    ensemble = teachers_lib.TeacherEnsemble(
        [teachers_lib.load_checkpoint_teacher(run_dirs(workdir, role, settings)[0])
         for role in TEACHERS],
        images_per_device=per_device, texts_per_device=per_device)
    made = captioners.make_captioners(captioner_specs(captioner, settings, workdir))
    summary = generate.reinforce(shards, out, ensemble, made, generation, progress=False)
    log.info('%s', summary.summary())
    build = generate.build_tfds(out, name, data_dir, overwrite=True, progress=False)
    log.info('%s', build.summary())
  training_sets.check_size(name, data_dir, settings.num_samples)
  summary = _read_json(os.path.join(out, generate.SUMMARY_FILE)) or {}
  if summary and 'caption_quality' not in summary:
    quality = caption_quality.dataset_quality(name, data_dir, DemoWorldConfig(),
                                              generation.dedup_threshold)
    summary = caption_quality.write_into_summary(out, generate.SUMMARY_FILE, quality)
  return summary


def _reinforcement_entry(summary: Mapping[str, Any], captioner: str,
                         dataset: Optional[str] = None) -> Dict[str, Any]:
  """results.json's view of a reinforcement: its dataset, caption measures (near-duplicate
  rates before/after regeneration, quality against the labels) and counts."""
  return {'captioner': captioner, 'dataset': dataset or settings_lib.reinforced_name(captioner),
          'caption_quality': summary.get('caption_quality'),
          'captions': summary.get('captions'), 'samples': summary.get('samples')}


def run(workdir: str, settings: DemoSettings = DemoSettings(),
        print_fn: Callable[[str], None] = print, regeneration_ablation: bool = False,
        captioner_ablation: bool = False, workers: int = 0) -> Dict[str, Any]:
  """Runs (or completes) the demo in `workdir`; returns what results.json holds.

  `regeneration_ablation` also builds `demo_world_reinforced_noregen` (one more reinforcement
  of the students' set, the oracle's captions) and `captioner_ablation` the students'
  reinforced sets of the other captioner choices (`settings_lib.CAPTIONERS`, for configs/demo.py's
  captioners sweep); their caption measures go to results.json. `workers`: training runs side
  by side (`experiment_workers.resolve_workers`; 0: one per CPU core).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  check_settings(workdir, settings)
  data_dir = os.path.join(workdir, 'tfds')
  stages: Dict[str, Dict[str, float]] = {}
  total = experiment.Clock()

  def stage(name: str, fn: Callable[[], Any]) -> Any:
    clock = experiment.Clock()
    value = fn()
    stages[name] = clock.seconds()
    log.info('Stage %s: %.1f s wall, %.1f s CPU.', name, stages[name]['wall_s'],
             stages[name]['cpu_s'])
    return value

  progress = lambda line: log.info('%s', line)
  stage('data', lambda: training_sets.build_data(settings, data_dir))
  teachers = stage('teachers', lambda: train_group(TEACHERS, settings, data_dir, workdir,
                                                   progress, workers))
  captioner = None
  if 'coca' in settings.captioner or captioner_ablation:
    captioner = stage('captioner', lambda: train_captioner(settings, data_dir, workdir))
  reinforcement = stage('reinforce', lambda: reinforce(settings, data_dir, workdir))
  ablation = {}
  for choice in settings_lib.CAPTIONERS if captioner_ablation else ():
    if choice != settings.captioner:
      ablation[choice] = _reinforcement_entry(stage(
          f'reinforce_{choice}', lambda c=choice: reinforce(settings, data_dir, workdir, c)),
          choice)
  without = None
  if regeneration_ablation:
    without = stage('reinforce_noregen', lambda: reinforce(settings, data_dir, workdir, 'demo',
                                                           regenerate=False))
  students = stage('students', lambda: train_group(STUDENTS, settings, data_dir, workdir,
                                                   progress, workers))
  models = {}
  for group in (teachers, students):
    for role, variant in group['variants'].items():
      runs = {seed: {'train': r['train']} for seed, r in group['runs'][role].items()}
      models[role] = report.model_entry(variant, runs)
  exported = stage('export', lambda: torch_check.export(
      workdir, run_dirs(workdir, 'student_dr', settings)[0]))
  stage('plot', lambda: report.plot_losses(
      {r: run_dirs(workdir, r, settings) for r in TEACHERS},
      {r: run_dirs(workdir, r, settings) for r in STUDENTS}, os.path.join(workdir, PLOT_FILE)))
  this_run = {'stages': stages, **total.seconds()}
  results = {'format': FORMAT, 'workdir': workdir, 'settings': settings.to_dict(),
             'models': models, 'export': exported, 'seconds': this_run['wall_s'],
             'this_run': this_run,
             'reinforcement': _reinforcement_entry(reinforcement, settings.captioner)}
  if captioner is not None:
    results['captioner'] = captioner
  if ablation:
    results['captioner_ablation'] = ablation
  if without is not None:
    results['reinforcement_noregen'] = _reinforcement_entry(
        without, 'demo', settings_lib.REINFORCED_NOREGEN_NAME)
  utils.write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)
  report.print_summary(results, workdir, print_fn)
  return results

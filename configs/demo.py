"""The models of the demo (launch/demo.py), one role at a time, and its sweeps.

  python launch/train.py --config=configs/demo.py:student_dr --workdir=/tmp/student_dr
  python launch/train.py --config=configs/demo.py:teacher_a,quick --workdir=/tmp/teacher_a
  python launch/experiment.py --config=configs/demo.py:student_dr --sweep=objective --seeds=3 \
      --workdir=/tmp/objective

Roles: teacher_a, teacher_b, student_clip, student_dr; add `quick` for the --quick sizes. The
datasets are read from the demo's workdir (~/.cache/mobileclip_jax/demo/tfds, or demo_quick/tfds
with quick), where launch/demo.py makes them (the captioners sweep's with
--captioner_ablation). Sweeps (`get_sweeps`) vary the role's config for launch/experiment.py;
METRICS are the columns of its table.
"""
import os

from mobileclip_jax import experiment
from mobileclip_jax.demo import report
from mobileclip_jax.demo import hparams as settings_lib

METRICS = report.METRICS


def _parse(arg):
  parts = [p for p in (arg or '').split(',') if p]
  quick = 'quick' in parts
  roles = [p for p in parts if p != 'quick']
  if len(roles) != 1 or roles[0] not in settings_lib.ROLES:
    raise ValueError(f'configs/demo.py needs one role ({", ".join(settings_lib.ROLES)}) and '
                     f"optionally 'quick', e.g. configs/demo.py:student_dr; got {arg!r}.")
  settings = settings_lib.quick() if quick else settings_lib.DemoSettings()
  workdir = settings_lib.QUICK_WORKDIR if quick else settings_lib.DEFAULT_WORKDIR
  return roles[0], settings, os.path.join(os.path.expanduser(workdir), 'tfds')


def get_config(arg=None):
  role, settings, data_dir = _parse(arg)
  return settings_lib.train_config(role, settings, data_dir)


def get_sweeps(arg=None):
  role, settings, data_dir = _parse(arg)
  sweeps = {}
  if role == 'student_dr':
    sweeps.update(_captioner_sweeps(settings, data_dir))
  if role in settings_lib.STUDENTS:
    sweeps['objective'] = experiment.Sweep(
        {'clip': {'data.name': settings_lib.PLAIN_NAME, 'loss.objective': 'clip'},
         'dr': {'data.name': settings_lib.REINFORCED_NAME, 'loss.objective': 'dr'}},
        'The demo students: CLIP loss on the plain set vs DR on the reinforced set')
  return sweeps


def _captioner_sweeps(settings, data_dir):
  """The DR student with learned vs oracle synthetic captions, and one vs two captioners: each
  variant reads the reinforced set of a `DemoSettings.captioner` choice (the same teachers,
  augmentations and seed; `launch/demo.py --captioner_ablation` builds them)."""
  quick_flag = ' --quick' if settings == settings_lib.quick() else ''
  hint = (f'python launch/demo.py{quick_flag} --workdir={os.path.dirname(data_dir)} '
          "--captioner_ablation (it builds every captioner choice's reinforced set).")
  variants = {'oracle' if c == 'demo' else c: {'data.name': settings_lib.reinforced_name(c),
                                                'data.build_hint': hint}
              for c in settings_lib.CAPTIONERS}
  return {'captioners': experiment.Sweep(
      variants, 'Synthetic captions from the procedural oracle, a CoCa trained on the teachers\' '
      'set, or both (two keys: twice the captions per image; MobileCLIP2: captioners add up)')}

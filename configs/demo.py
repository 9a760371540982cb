"""The models of the demo (launch/demo.py), one role at a time, and its sweeps.

  python launch/train.py --config=configs/demo.py:student_dr --workdir=/tmp/student_dr
  python launch/train.py --config=configs/demo.py:teacher_a,quick --workdir=/tmp/teacher_a
  python launch/experiment.py --config=configs/demo.py:student_dr --sweep=objective --seeds=3 \
      --workdir=/tmp/objective
  python launch/experiment.py --config=configs/demo.py:student_dr --list_sweeps

Roles: teacher_a, teacher_b, student_clip, student_dr; add `quick` for the --quick sizes. The
datasets are read from the demo's workdir (~/.cache/mobileclip_jax/demo/tfds, or demo_quick/tfds
with quick), where launch/demo.py makes them (the regeneration sweep's second reinforced set with
`launch/demo.py --regeneration_ablation`, the captioners sweep's with --captioner_ablation).
Sweeps (`get_sweeps`) vary the role's config for launch/experiment.py; METRICS are the columns of
its table. The DR ablations (teacher scales, teachers, lambda, caption kinds, captions per image,
regeneration, captioners) are sweeps of student_dr; the architecture and loss ones (attention,
loss_kind) of either student.
"""
import math
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
  if role in settings_lib.STUDENTS:
    sweeps['objective'] = experiment.Sweep(
        {'clip': {'data.name': settings_lib.PLAIN_NAME, 'loss.objective': 'clip'},
         'dr': {'data.name': settings_lib.REINFORCED_NAME, 'loss.objective': 'dr'}},
        'The demo students: CLIP loss on the plain set vs DR on the reinforced set')
  if role == 'student_dr':
    sweeps.update(_distillation_sweeps(settings, data_dir))
    sweeps.update(_captioner_sweeps(settings, data_dir))
  if role in settings_lib.STUDENTS:
    sweeps.update(_model_sweeps(role))
  return sweeps


def _distillation_sweeps(settings, data_dir):
  """The DR student's ablations: teachers, their temperatures, lambda, caption kinds and counts,
  caption regeneration."""
  scale_a, scale_b = settings.teacher_scales
  pairs = [(s, s) for s in (10.0, 30.0, 50.0, 100.0)] + [(30.0, 100.0), (100.0, 30.0)]
  stored = settings.num_syn
  counts = sorted({n for n in (1, 2, 5) if n <= stored} | {stored})
  return {
      'teacher_scales': experiment.Sweep(
          {f'{a:g},{b:g}': {'loss.teacher_scales': (a, b)} for a, b in pairs},
          'Logit scale of each teacher in the distillation targets (teacher A, teacher B): '
          'each teacher may have its own best temperature (MobileCLIP2)'),
      'teachers': experiment.Sweep(
          {'teacher_a': {'data.teachers': (0,), 'loss.teacher_scales': (scale_a,)},
           'teacher_b': {'data.teachers': (1,), 'loss.teacher_scales': (scale_b,)},
           'ensemble': {'data.teachers': (0, 1), 'loss.teacher_scales': (scale_a, scale_b)}},
          'Distilling from one teacher vs the ensemble of both (targets averaged after softmax)'),
      'distill_weight': experiment.Sweep(
          {f'lambda={w:g}': {'loss.distill_weight': w, 'loss.clip_weight': 1.0 - w}
           for w in (0.0, 0.25, 0.5, 0.75, 1.0)},
          'lambda, the distillation weight (clip_weight = 1 - lambda): 0 is the CLIP loss on '
          'the reinforced set (its synthetic captions and stored augmentations), 1 pure '
          'distillation'),
      'caption_weights': experiment.Sweep(
          {f'gt={g:g},syn={s:g}': {'loss.gt_weight': g, 'loss.syn_weight': s}
           for g, s in ((1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, 1.0))},
          'Weight of the ground-truth vs the synthetic caption kind in the DR loss'),
      'num_syn': experiment.Sweep(
          {f'num_syn={n}': {'data.num_syn': n} for n in counts},
          f'Synthetic captions used per image (the first N of the {stored} the demo stores'
          + ('' if stored >= 5 else '; the paper\'s 5 needs DemoSettings.num_syn >= 5') + ')'),
      'regeneration': experiment.Sweep(
          {'regenerated': {'data.name': settings_lib.REINFORCED_NAME},
           'not_regenerated': {
               'data.name': settings_lib.REINFORCED_NOREGEN_NAME,
               'data.build_hint': (f'{settings_lib.demo_command(settings, data_dir)} '
                                   '--regeneration_ablation (it builds '
                                   f'{settings_lib.REINFORCED_NOREGEN_NAME} beside the demo).')}},
          'Synthetic captions with near-duplicates regenerated (the demo\'s set) vs as first '
          'made (near-duplicate rates before/after: the demo results.json "reinforcement")'),
  }


def _model_sweeps(role):
  """Architecture and loss ablations of either student."""
  sigmoid = {'model.attention': 'sigmoid'}
  # SigLIP's initialization (t = log 10, b = -10) for the student. Distillation needs the
  # teachers' biases too: the demo teachers, trained with the softmax loss, put negative pairs at
  # cosine 0.28 +- 0.17 (matches 0.51), so at their scale 50 SigLIP's b = -10 calls 98% of
  # negatives matches (targets near +1 off the diagonal) and the student collapses. -33 is the
  # bias that minimizes each teacher's own sigmoid loss on 1,024 of its stored pairs in batches
  # of 128 (-31.7 to -34.3 over the two teachers and caption kinds; its loss 3.5-8.5 vs 470-760
  # at -10); the -10 variant stays to show why.
  siglip = {'loss.kind': 'sigmoid', 'model.init_logit_scale': math.log(10.0),
            'model.init_logit_bias': -10.0}
  loss_kinds = {'softmax': {'loss.kind': 'softmax'}, 'sigmoid': siglip}
  if role == 'student_dr':
    loss_kinds['sigmoid'] = {**siglip, 'loss.teacher_biases': (-33.0, -33.0)}
    loss_kinds['sigmoid,teacher_b=-10'] = {**siglip, 'loss.teacher_biases': (-10.0, -10.0)}
  return {
      'attention': experiment.Sweep(
          {'softmax': {'model.attention': 'softmax'},
           'sigmoid': sigmoid,
           'sigmoid+layerscale': {**sigmoid, 'model.text.layer_scale_init': 1e-4},
           'sigmoid+hybrid_norm': {**sigmoid, 'model.text.hybrid_norm': True},
           'sigmoid+both': {**sigmoid, 'model.text.layer_scale_init': 1e-4,
                            'model.text.hybrid_norm': True}},
          'Sigmoid (b = -log n) vs softmax attention in both towers; the stabilizers '
          '(LayerScale 1e-4, hybrid norm) are switches of the text tower (the MCi image '
          'tower\'s attention blocks always have LayerScale 1e-5)'),
      'loss_kind': experiment.Sweep(
          loss_kinds, 'CLIP (softmax) vs SigLIP (sigmoid) contrastive loss'
          + (' and distillation (teacher biases fitted, -33, or SigLIP\'s -10)'
             if role == 'student_dr' else '')),
  }


def _captioner_sweeps(settings, data_dir):
  """The DR student with learned vs oracle synthetic captions, and one vs two captioners: each
  variant reads the reinforced set of a `DemoSettings.captioner` choice (the same teachers,
  augmentations and seed; `launch/demo.py --captioner_ablation` builds them)."""
  hint = (f'{settings_lib.demo_command(settings, data_dir)} --captioner_ablation (it builds '
          "every captioner choice's reinforced set).")
  variants = {'oracle' if c == 'demo' else c: {'data.name': settings_lib.reinforced_name(c),
                                                'data.build_hint': hint}
              for c in settings_lib.CAPTIONERS}
  return {'captioners': experiment.Sweep(
      variants, 'Synthetic captions from the procedural oracle, a CoCa trained on the teachers\' '
      'set, or both (two keys: twice the captions per image; MobileCLIP2: captioners add up)')}

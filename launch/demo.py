r"""The whole MobileCLIP recipe on the built-in demo world, on one CPU, from nothing.

  python launch/demo.py                       # ~/.cache/mobileclip_jax/demo
  python launch/demo.py --workdir=/tmp/demo
  python launch/demo.py --quick               # toy sizes, a smoke run: <default>_quick
  python launch/demo.py --inspect             # what the models see and learned -> <workdir>/inspect
  python launch/demo.py --captioner=coca      # the students' captions from a CoCa trained here
  python launch/demo.py --regeneration_ablation   # also demo_world_reinforced_noregen

Makes the demo-world datasets, trains two CLIP teachers, reinforces the students' dataset with
them (stored augmentations, teacher embeddings, synthetic captions), trains the same small
MobileCLIP student with the CLIP loss and with the DR objective (3 seeds each), evaluates them,
exports the DR student to open_clip and checks it there, and prints the results (also in
<workdir>/results.json, loss curves in <workdir>/loss_curves.png). Rerun to complete an
interrupted run: finished stages and runs are skipped. `--config=configs/demo.py:student_dr`
(or teacher_a, teacher_b, student_clip) reruns one model with launch/train.py, and
launch/experiment.py sweeps it. See mobileclip_jax/demo/recipe.py.
"""
import dataclasses
import os

from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax.demo import hparams as settings_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where everything goes (default: '
                               f'{settings_lib.DEFAULT_WORKDIR}, or '
                               f'{settings_lib.QUICK_WORKDIR} with --quick).')
_QUICK = flags.DEFINE_bool('quick', False, 'Toy sizes: every stage, in a fraction of the time; '
                           'the numbers mean nothing.')
_REGENERATION = flags.DEFINE_bool(
    'regeneration_ablation', False, 'Also reinforce the students\' set without caption '
    'regeneration (demo_world_reinforced_noregen, for configs/demo.py\'s regeneration sweep; '
    'one more reinforcement stage); its caption measures go to results.json.')
_CAPTIONER = flags.DEFINE_enum(
    'captioner', settings_lib.DemoSettings.captioner, settings_lib.CAPTIONERS,
    "Who writes the students' synthetic captions: the procedural oracle ('demo'), a small CoCa "
    "trained on the teachers' set ('coca'), or both ('coca+demo', each its own caption key).")
_CAPTIONER_ABLATION = flags.DEFINE_bool(
    'captioner_ablation', False, "Also reinforce the students' set with the other --captioner "
    "choices (for configs/demo.py's captioners sweep); their caption measures go to "
    'results.json.')
_WORKERS = flags.DEFINE_integer(
    'workers', 0, 'Training runs side by side on a CPU (teachers, student seeds), each in its '
    'own process (0: one per core); on an accelerator they go one after another.')
_INSPECT = flags.DEFINE_bool('inspect', False, 'Instead of running the demo, write what its '
                             'models see and learned (crops, captions, confusion matrices, '
                             'linear probes) for what the workdir holds, to <workdir>/inspect.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  compilation_cache.enable()
  settings = dataclasses.replace(
      settings_lib.quick() if _QUICK.value else settings_lib.DemoSettings(),
      captioner=_CAPTIONER.value)
  workdir = os.path.expanduser(_WORKDIR.value or (
      settings_lib.QUICK_WORKDIR if _QUICK.value else settings_lib.DEFAULT_WORKDIR))
  if _INSPECT.value:
    from mobileclip_jax.demo import inspection  # pylint: disable=g-import-not-at-top
    inspection.inspect(workdir, settings)
  else:
    from mobileclip_jax.demo import recipe  # pylint: disable=g-import-not-at-top
    recipe.run(workdir, settings, regeneration_ablation=_REGENERATION.value,
               captioner_ablation=_CAPTIONER_ABLATION.value, workers=_WORKERS.value)


if __name__ == '__main__':
  cli.run(main)

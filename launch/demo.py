r"""The whole MobileCLIP recipe on the built-in demo world, on one CPU, from nothing.

  python launch/demo.py                       # ~/.cache/mobileclip_jax/demo
  python launch/demo.py --workdir=/tmp/demo
  python launch/demo.py --quick               # toy sizes: a smoke run (~/.cache/mobileclip_jax/demo_quick)

Makes the demo-world datasets, trains two CLIP teachers, reinforces the students' dataset with
them (stored augmentations, teacher embeddings, synthetic captions), trains the same small
MobileCLIP student with the CLIP loss and with the DR objective, evaluates all four, exports the
DR student to open_clip and checks it there, and prints the results (also in
<workdir>/results.json, loss curves in <workdir>/loss_curves.png). Rerun to complete an
interrupted run: finished stages are skipped. Afterwards `python launch/train.py
--config=configs/mobileclip2.py:s4,runlocal` trains with the DR objective on the reinforced demo
data, and
`--config=configs/demo.py:student_dr` (or teacher_a, teacher_b, student_clip) reruns a stage.
See mobileclip_jax/demo.py.
"""

from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import demo

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where everything goes (default: '
                               f'{demo.DEFAULT_WORKDIR}, or {demo.QUICK_WORKDIR} with --quick).')
_QUICK = flags.DEFINE_bool('quick', False, 'Toy sizes: every stage, in a fraction of the time; '
                           'the numbers mean nothing.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  compilation_cache.enable()
  settings = demo.quick() if _QUICK.value else demo.DemoSettings()
  workdir = _WORKDIR.value or (demo.QUICK_WORKDIR if _QUICK.value else demo.DEFAULT_WORKDIR)
  demo.run(workdir, settings)


if __name__ == '__main__':
  cli.run(main)

"""The models of the demo (launch/demo.py), one role at a time, for launch/train.py.

  python launch/train.py --config=configs/demo.py:student_dr --workdir=/tmp/student_dr
  python launch/train.py --config=configs/demo.py:teacher_a,quick --workdir=/tmp/teacher_a

Roles: teacher_a, teacher_b, student_clip, student_dr; add `quick` for the --quick sizes. The
datasets are read from the demo's workdir (~/.cache/mobileclip_jax/demo/tfds, or demo_quick/tfds
with quick), where launch/demo.py makes them.
"""
import os

from mobileclip_jax import demo


def get_config(arg=None):
  parts = [p for p in (arg or '').split(',') if p]
  quick = 'quick' in parts
  roles = [p for p in parts if p != 'quick']
  if len(roles) != 1 or roles[0] not in demo.ROLES:
    raise ValueError(f'configs/demo.py needs one role ({", ".join(demo.ROLES)}) and optionally '
                     f"'quick', e.g. configs/demo.py:student_dr; got {arg!r}.")
  settings = demo.quick() if quick else demo.DemoSettings()
  workdir = demo.QUICK_WORKDIR if quick else demo.DEFAULT_WORKDIR
  return demo.train_config(roles[0], settings, os.path.join(workdir, 'tfds'))

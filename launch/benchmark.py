"""Speed and memory benchmarks, side by side with the PyTorch reference where one exists.

  python launch/benchmark.py models [--option=variants=MobileCLIP2-S0,MobileCLIP2-S4]
  python launch/benchmark.py data
  python launch/benchmark.py train
  python launch/benchmark.py compile
  python launch/benchmark.py loss
  python launch/benchmark.py export   (the exported ONNX / TFLite towers; needs the export extra)
  python launch/benchmark.py efficiency [--option=demo=/tmp/demo]
  python launch/benchmark.py caption [--option=variant=coca_ViT-L-14]

Prints one JSON line per result (and appends them to --out when given). Numbers are only
comparable within one run: the machine is shared and noisy.
"""
import json

from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax import benchmark
from mobileclip_jax.benchmark import common

_OUT = flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')
_OPTIONS = flags.DEFINE_multi_string(
    'option', [], 'key=value options for the benchmark (see its module docstring), repeatable.')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f'Usage: benchmark.py NAME [flags]; NAME in {benchmark.BENCHMARKS}.')
  options = dict(o.split('=', 1) for o in _OPTIONS.value)
  machine = common.machine()
  out = open(_OUT.value, 'a') if _OUT.value else None
  try:
    for row in benchmark.run(argv[1], options):
      line = json.dumps({'benchmark': argv[1], **row, 'machine': machine})
      print(line, flush=True)
      if out:
        out.write(line + '\n')
        out.flush()
  finally:
    if out:
      out.close()


if __name__ == '__main__':
  cli.run(main)

r"""Exports the image and text towers for phones: ONNX or TFLite, checked against JAX.

  python launch/export.py --checkpoint=WORKDIR --format=onnx --out=export/onnx
  python launch/export.py --checkpoint=WORKDIR --format=tflite --out=export/tflite_int8 \
      --precision=int8
  python launch/export.py --model=MobileCLIP2-S0 --format=tflite --out=/tmp/s0   # random weights

--checkpoint is a model checkpoint (launch/convert.py writes them) or a training run (latest
step, or --step). The towers are exported reparameterized, float32 compute, with fixed shapes:
--batch (default 1), --image_size and --context_length (default: the model's). OUT gets
image.{onnx,tflite}, text.{onnx,tflite} (or the one tower --towers names), the tokenizer's
vocabulary and export.json
(preprocessing, tokenizer, input/output names, shapes and dtypes, precision, source, and each
tower's measured distance from JAX). fp32 exports must match JAX within 1e-4 relative L2 or
nothing is written. Needs the export extra (see setup.py).

--format=coreml converts the PyTorch (open_clip / timm) form of the model with coremltools
(variants open_clip can build); on Linux the converted PyTorch module is what is checked against
JAX, since Core ML predictions need macOS.
"""
import sys

from absl import app
from absl import flags

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model checkpoint or training run directory.')
_STEP = flags.DEFINE_integer('step', None, 'Training step (default: the latest).')
_MODEL = flags.DEFINE_string('model', None, 'Without --checkpoint: a named variant (e.g. '
                             'MobileCLIP2-S0) exported with random weights.')
_FORMAT = flags.DEFINE_string('format', None, 'onnx, tflite or coreml.', required=True)
_OUT = flags.DEFINE_string('out', None, 'The new export directory.', required=True)
_PRECISION = flags.DEFINE_string('precision', 'fp32', 'fp32, fp16 or int8 (dynamic range).')
_BATCH = flags.DEFINE_integer('batch', 1, 'Fixed batch of both towers.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Resolution (default: the model\'s).')
_CONTEXT_LENGTH = flags.DEFINE_integer('context_length', None,
                                       'Tokens per text (default: the model\'s, 77).')
_SEED = flags.DEFINE_integer('seed', 0, 'With --model: the seed of the random weights.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing export directory.')
_TOWERS = flags.DEFINE_list('towers', ['image', 'text'],
                            'The towers to export (e.g. image alone, for an app that only embeds '
                            'photos).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from mobileclip_jax import export  # pylint: disable=g-import-not-at-top  (after flag parsing)
  shapes = export.Shapes(_BATCH.value, _IMAGE_SIZE.value, _CONTEXT_LENGTH.value)
  try:
    metadata = export.export_checkpoint(
        _CHECKPOINT.value, _OUT.value, _FORMAT.value, _PRECISION.value, shapes, step=_STEP.value,
        model=_MODEL.value, seed=_SEED.value, overwrite=_OVERWRITE.value, towers=_TOWERS.value)
  except (FileExistsError, FileNotFoundError, ImportError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  for tower in _TOWERS.value:
    entry = metadata[tower]
    print(f'{tower}: {entry["file"]} {entry["input"]["name"]} {entry["input"]["shape"]} '
          f'{entry["input"]["dtype"]} -> {entry["output"]["shape"]}; relative L2 vs JAX '
          f'{entry["rel_l2_vs_jax"]:.2g} in {entry["checked_in"]} ({metadata["precision"]})')
  print(f'Wrote {_OUT.value} ({metadata["format"]}, {metadata["source"]["variant"]}).')


if __name__ == '__main__':
  app.run(main)

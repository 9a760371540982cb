r"""Converts checkpoints between this project (Orbax) and PyTorch (open_clip / timm / Apple v1).

To PyTorch, from a model checkpoint or a training run (latest step, or --step):

  python launch/convert.py --checkpoint=WORKDIR --out=export/open_clip_model.safetensors
  python launch/convert.py --checkpoint=WORKDIR --out=reparam/open_clip_model.safetensors \
      --reparameterize
  python launch/convert.py --checkpoint=WORKDIR --out=timm/model.safetensors --format=timm

  --format=open_clip (default) writes the whole model in open_clip's names plus
  `open_clip_config.json` beside it, so that either of these loads it (strict):
      model = open_clip.create_model('MobileCLIP2-S0'); model.load_state_dict(state_dict)
      model, _, preprocess = open_clip.create_model_and_transforms('local-dir:export')
  With --reparameterize the MobileOne/RepMixer branches are folded (timm's names); open_clip
  builds the train-time model, so fold it first:
      model = timm.models.reparameterize_model(open_clip.create_model('MobileCLIP2-S0'))
      model.load_state_dict(state_dict)
  --format=timm writes the image tower alone in timm's names plus timm's `config.json`:
      timm.create_model('fastvit_mci0', num_classes=512).load_state_dict(state_dict)
  --format=apple_v1 writes Apple's ml-mobileclip v1 names (MobileCLIP-S0/S1/S2/B only).
  .pt/.pth/.bin need torch; .safetensors does not.

To Orbax, from an open_clip state_dict (raw, {'state_dict': ...}, 'module.'-prefixed) or an
Apple v1 checkpoint (mobileclip_s0.pt ...; the format is recognized by its keys):

  python launch/convert.py --torch_checkpoint=mobileclip_s0.pt --model=MobileCLIP-S0 --out=ckpt/s0

The result is a model checkpoint that training (as initialization) and evaluation read.
"""
import sys

from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax.convert import files

_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'To PyTorch: a model checkpoint or training run directory.')
_STEP = flags.DEFINE_integer('step', None, 'To PyTorch: the training step (default: latest).')
_FORMAT = flags.DEFINE_enum('format', 'open_clip', files.FORMATS, 'To PyTorch: the names to use.')
_REPARAMETERIZE = flags.DEFINE_bool('reparameterize', False,
                                    'To PyTorch: fold the reparameterizable branches first.')
_TORCH_CHECKPOINT = flags.DEFINE_string(
    'torch_checkpoint', None, 'To Orbax: a .pt/.pth/.bin/.safetensors/.npz state_dict file.')
_MODEL = flags.DEFINE_string(
    'model', None, 'To Orbax: the variant, e.g. MobileCLIP2-S0 (default: from the config beside '
    'the file written by an export, or, for Apple checkpoints, from its keys).')
_OUT = flags.DEFINE_string('out', None, 'To PyTorch: the weights file (its suffix picks the file '
                           'type). To Orbax: the new checkpoint directory.', required=True)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'To PyTorch: replace existing output files.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (_CHECKPOINT.value is None) == (_TORCH_CHECKPOINT.value is None):
    raise app.UsageError('Give exactly one of --checkpoint (to PyTorch) or --torch_checkpoint '
                         '(to Orbax).')
  try:
    if _CHECKPOINT.value is not None:
      _to_torch()
    else:
      _to_orbax()
  except (FileExistsError, FileNotFoundError, ImportError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}\nNothing was written.')


def _to_torch():
  if _MODEL.value is not None:
    raise app.UsageError('--model is for --torch_checkpoint; a checkpoint records its model.')
  written = files.export_checkpoint(_CHECKPOINT.value, _OUT.value, step=_STEP.value,
                                    reparameterize=_REPARAMETERIZE.value, fmt=_FORMAT.value,
                                    overwrite=_OVERWRITE.value)
  print(f'Wrote {written["weights"]} ({_FORMAT.value}'
        f'{", reparameterized" if _REPARAMETERIZE.value else ""}) and {written["config"]}.')


def _to_orbax():
  if (_STEP.value is not None or _REPARAMETERIZE.value or _OVERWRITE.value
      or flags.FLAGS['format'].present):
    raise app.UsageError('--step, --format, --reparameterize and --overwrite are for '
                         '--checkpoint.')
  config = files.import_checkpoint(_TORCH_CHECKPOINT.value, _OUT.value, model=_MODEL.value)
  print(f'Wrote the model checkpoint {_OUT.value} ({config.name}'
        f'{", reparameterized" if config.reparameterized else ""}).')


if __name__ == '__main__':
  cli.run(main)

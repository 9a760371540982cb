"""An export directory: the two towers, the tokenizer's vocabulary and `export.json`.

  OUT/image.onnx|.tflite|.mlpackage   image tower: normalized pixels -> embedding [batch, D]
  OUT/text.onnx|.tflite|.mlpackage    text tower: int32 tokens -> embedding [batch, D]
  OUT/<vocabulary>         bpe_simple_vocab_16e6.txt.gz (CLIP BPE) or tokenizer.model
  (`towers` may ask for one tower: an app that only embeds photos needs no text tower; then
  export.json describes that tower alone, and the vocabulary comes with the text tower)
  OUT/export.json          everything an app needs to feed the towers and read their outputs

`export.json`: format, precision; `source` (checkpoint path, step, variant name and the full
ModelConfig); `embed_dim`; `logit_scale` (exp of the learned log scale: probabilities are
softmax(logit_scale * cosine)) and `logit_bias` for sigmoid-loss models; per tower its `file`,
`input` / `output` (name, shape, dtype; the image's `layout`); `preprocess` (open_clip's
PreprocessCfg: resize the shorter side to `size` with `interpolation`, centre crop, pixels / 255,
then (x - mean) / std); `tokenizer` (kind, vocabulary file, context length, SOT / EOT / pad ids,
how ids are laid out, and an example text with its ids, for checking an app's tokenizer); `check`
(relative L2 of each tower's embeddings against JAX in the format's own runtime); versions.

Everything is written into a temporary directory beside OUT and renamed into place only when
every tower is written and checked, so OUT is either complete or absent.
"""
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

import mobileclip_jax
from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import utils
from mobileclip_jax.convert import files as convert_files
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.export import coreml
from mobileclip_jax.export import onnx_format
from mobileclip_jax.export import tflite_format
from mobileclip_jax.export import towers as towers_lib
from mobileclip_jax.models import clip as clip_lib

FORMATS = {'onnx': onnx_format, 'tflite': tflite_format, 'coreml': coreml}
METADATA = 'export.json'
NAMES = {'image': ('image', 'embedding'), 'text': ('tokens', 'embedding')}
FP32_TOLERANCE = 1e-4   # Relative L2 of fp32 embeddings against JAX, enforced.
EXAMPLE_TEXT = 'a photo of a red circle on a blue background'
CHECK_CAPTIONS = (EXAMPLE_TEXT, 'two dogs playing in the snow', 'a diagram on a whiteboard',
                  'an empty street at night, wet with rain')


def check_request(fmt: str, precision: str,
                  towers: Sequence[str] = towers_lib.TOWERS) -> None:
  """One-line ValueErrors for a format, precision or tower that does not exist."""
  unknown = [t for t in towers if t not in towers_lib.TOWERS]
  if unknown or not towers or len(set(towers)) < len(towers):
    raise ValueError(f'Export towers {list(towers)}: choose one or both of '
                     f'{", ".join(towers_lib.TOWERS)}.')
  if fmt not in FORMATS:
    raise ValueError(f'Unknown export format {fmt!r}; choose one of {", ".join(FORMATS)}.')
  if precision not in FORMATS[fmt].PRECISIONS:
    raise ValueError(f'{fmt} export has no precision {precision!r}; choose one of '
                     f'{", ".join(FORMATS[fmt].PRECISIONS)} (int8 = dynamic-range: int8 weights, '
                     'no calibration data).')


def _rel_l2_per_row(got: np.ndarray, want: np.ndarray) -> float:
  """The worst row: one bad example in a batch must not hide behind good ones."""
  return max(utils.rel_l2(g, w) for g, w in zip(got, want))


def _tokenizer_entry(tokenizer: tokenizer_lib.Tokenizer, context: int) -> Dict[str, Any]:
  ids = tokenizer([EXAMPLE_TEXT], context)[0]
  entry = {'context_length': context, 'vocab_size': tokenizer.vocab_size,
           'sot': tokenizer.sot_token_id, 'eot': tokenizer.eot_token_id,
           'pad': tokenizer.pad_token_id,
           'layout': 'SOT, ids..., EOT, pad...; a longer text is cut so that EOT is the last id; '
                     'the tower pools at the largest id (EOT)',
           'example': {'text': EXAMPLE_TEXT,
                       'ids': [int(i) for i in ids[:int(np.argmax(ids)) + 1]]}}
  if isinstance(tokenizer, tokenizer_lib.ClipTokenizer):
    entry.update(kind='clip_bpe', vocabulary=tokenizer_lib.CLIP_VOCAB_FILENAME,
                 about="CLIP's byte-level BPE, ids as open_clip's SimpleTokenizer: ftfy.fix_text, "
                       'HTML unescape, whitespace collapsed, lower-cased, split by CLIP\'s regex, '
                       'BPE merges in the order of the vocabulary file')
  else:
    entry.update(kind='sentencepiece', vocabulary='tokenizer.model',
                 about='SentencePiece ids remapped: the model\'s pad -> 0, its other pieces in '
                       'order -> 1, 2, ..., bos -> SOT = vocab_size - 2, eos -> EOT = '
                       'vocab_size - 1 (see mobileclip_jax/data/tokenizer.py)')
  return entry


def _vocabulary_path(tokenizer: tokenizer_lib.Tokenizer) -> str:
  if isinstance(tokenizer, tokenizer_lib.ClipTokenizer):
    return tokenizer.vocab_path
  return tokenizer.model_path


def _check_inputs(config: clip_lib.ModelConfig, shapes: towers_lib.Shapes,
                  tokenizer: tokenizer_lib.Tokenizer, seed: int = 0) -> Dict[str, np.ndarray]:
  """NHWC normalized-space images (N(0, 1) pixels) and tokenized captions, `batch` of each."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((shapes.batch, shapes.image_size, shapes.image_size, 3))
  captions = [CHECK_CAPTIONS[i % len(CHECK_CAPTIONS)] for i in range(shapes.batch)]
  return {'image': images.astype(np.float32),
          'text': tokenizer(captions, shapes.context_length).astype(np.int32)}


def _to_layout(x: np.ndarray, tower: str, module) -> np.ndarray:
  if tower == 'image' and module.IMAGE_LAYOUT == 'NCHW':
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  return x


def _write_towers(directory: str, fmt: str, precision: str, variables, config,
                  shapes: towers_lib.Shapes, inputs, reference,
                  towers: Sequence[str]) -> Dict[str, Any]:
  """Writes and checks `towers`; `reference` = (variables, config) of the model as given."""
  module = FORMATS[fmt]
  entries = {}
  for tower in towers:
    path = os.path.join(directory, tower + module.SUFFIX)
    io = module.write(config, variables, tower, towers_lib.input_spec(config, shapes, tower),
                      path, precision, NAMES[tower])
    run, checked_in = module.load(path), module.RUNTIME
    if run is None:  # A format this OS cannot run (Core ML on Linux): check what was converted.
      run, checked_in = module.source_runner(config, variables, tower), module.SOURCE_RUNTIME
    want = towers_lib.jax_embeddings(reference[1], reference[0], tower, inputs[tower])
    got = run(_to_layout(inputs[tower], tower, module))
    rel_l2 = _rel_l2_per_row(got, want)
    if precision == 'fp32' and not rel_l2 <= FP32_TOLERANCE:
      raise ValueError(f'The exported {tower} tower differs from JAX: relative L2 {rel_l2:.3g} > '
                       f'{FP32_TOLERANCE} in fp32; nothing was written. Please report this.')
    if tower == 'image':
      io['input']['layout'] = module.IMAGE_LAYOUT
    entries[tower] = {'file': os.path.basename(path), **io, 'rel_l2_vs_jax': rel_l2,
                      'checked_in': checked_in}
  return entries


def export_variables(variables: Dict[str, Any], config: clip_lib.ModelConfig, out: str, fmt: str,
                     precision: str = 'fp32', shapes: towers_lib.Shapes = towers_lib.Shapes(),
                     source: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                     towers: Sequence[str] = towers_lib.TOWERS) -> Dict[str, Any]:
  """Exports `towers` (default both) of (variables, config) into the directory `out`; returns
  export.json.

  Raises ValueError (one line, before anything is written) for an unknown format, precision or
  tower or shapes the towers cannot take, FileExistsError when `out` exists and not `overwrite`.
  """
  check_request(fmt, precision, towers)
  shapes = towers_lib.resolve_shapes(config, shapes)
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f'{out} exists; choose a new directory or pass --overwrite.')
  tokenizer = tokenizer_lib.get_tokenizer(config.tokenizer)
  # The check compares with the model as trained (train-time branches, float32 compute).
  reference = (variables, dataclasses.replace(config, dtype='float32'))
  variables, config = towers_lib.inference_form(variables, config, shapes)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.')
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT's mode.
  try:
    inputs = _check_inputs(config, shapes, tokenizer)
    entries = _write_towers(tmp, fmt, precision, variables, config, shapes, inputs, reference,
                            towers)
    if 'text' in entries:
      text = entries['text']
      text['tokenizer'] = _tokenizer_entry(tokenizer, shapes.context_length)
      shutil.copyfile(_vocabulary_path(tokenizer),
                      os.path.join(tmp, text['tokenizer']['vocabulary']))
    if 'image' in entries:
      entries['image']['preprocess'] = convert_files.preprocess_cfg(config)
    params = variables['params']
    metadata = {
        'format': fmt, 'precision': precision,
        'source': {**(source or {}), 'variant': config.name,
                   'model_config': clip_lib.config_to_dict(config)},
        'embed_dim': config.embed_dim,
        'embeddings': 'unnormalized; L2-normalize both before taking cosine similarities',
        'logit_scale': float(np.exp(params['logit_scale'])),
        **({'logit_bias': float(params['logit_bias'])} if 'logit_bias' in params else {}),
        **entries,
        'check': f'rel_l2_vs_jax: worst example\'s relative L2 distance of the embeddings from '
                 f'JAX (jax.jit on {jax.default_backend()}) on {shapes.batch} input(s); fp32 must '
                 f'be <= {FP32_TOLERANCE}',
        'versions': {'mobileclip_jax': mobileclip_jax.__version__, 'jax': jax.__version__,
                     **FORMATS[fmt].versions()},
    }
    with open(os.path.join(tmp, METADATA), 'w') as f:
      json.dump(metadata, f, indent=1)
    if os.path.exists(out):  # overwrite: the old directory goes only once the new one is whole.
      old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.old.')
      os.rename(out, os.path.join(old, 'x'))
      os.rename(tmp, out)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return metadata


def _step(checkpoint: str, step: Optional[int]) -> Optional[int]:
  """The training step `load_variables` read (None for a model checkpoint)."""
  if step is not None or os.path.exists(os.path.join(checkpoint, checkpoint_lib.MODEL_JSON)):
    return step
  runs = os.path.join(checkpoint, 'checkpoints')
  steps = checkpoint_lib.training_steps(runs if os.path.isdir(runs) else checkpoint)
  return steps[-1] if steps else None


def export_checkpoint(checkpoint: Optional[str], out: str, fmt: str, precision: str = 'fp32',
                      shapes: towers_lib.Shapes = towers_lib.Shapes(), step: Optional[int] = None,
                      model: Optional[str] = None, seed: int = 0, overwrite: bool = False,
                      towers: Sequence[str] = towers_lib.TOWERS) -> Dict[str, Any]:
  """Exports a model checkpoint or training run (`checkpoint.load_variables`), or, with
  `model` and no checkpoint, the named variant with `towers.random_variables` (for trying an
  app or timing a runtime before training). Returns export.json's content."""
  check_request(fmt, precision, towers)
  if (checkpoint is None) == (model is None):
    raise ValueError('Give a checkpoint to export, or a model name (without a checkpoint) for '
                     'random weights.')
  if checkpoint is not None:
    variables, config = checkpoint_lib.load_variables(checkpoint, step)
    source = {'checkpoint': os.path.abspath(checkpoint), 'step': _step(checkpoint, step)}
  else:
    config = clip_lib.get_config(model)  # ValueError naming the nearest variants.
    towers_lib.resolve_shapes(config, shapes)  # Fail before building the weights.
    variables = towers_lib.random_variables(config, seed)
    source = {'checkpoint': None, 'random_weights_seed': seed}
  return export_variables(variables, config, out, fmt, precision, shapes, source, overwrite,
                          towers)

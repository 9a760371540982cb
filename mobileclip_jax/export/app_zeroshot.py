"""Zero-shot accuracy of an exported tower pair, run as an app would run it.

`evaluate(directory)` reads only the export directory: export.json for the preprocessing, the
shapes and the files, the shipped vocabulary for the tokenizer, the two towers in their runtime.
It scores the demo world's zero-shot tasks (or any `evaluation.datasets` classification source)
with the evaluator's own pieces: `datasets.open_source`, `templates.prompts`, `base.load_image`,
`preprocess.normalize`, `metrics.zero_shot_classifier` and `metrics.topk_accuracy`, so its
numbers are comparable with `launch/evaluate.py`'s for the checkpoint that was exported; the
difference is what the export's precision costs.
"""
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import base
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import metrics as metrics_lib
from mobileclip_jax.evaluation import templates as templates_lib
from mobileclip_jax.export import bundle

DEMO = {'kind': 'demo', 'split': 'val', 'num_samples': 1000}
_TOKENIZER_SPECS = {'clip_bpe': 'clip', 'sentencepiece': 'sentencepiece'}


def _embed(run: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, batch: int) -> np.ndarray:
  """Unit embeddings of `rows` [N, ...] through a tower with a fixed `batch` (last one padded)."""
  out = []
  for start in range(0, len(rows), batch):
    chunk = rows[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(run(padded), np.float32)[:len(chunk)])
  emb = np.concatenate(out)
  return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def evaluate(directory: str, source: Optional[Mapping[str, Any]] = None,
             name: str = 'demo') -> Dict[str, float]:
  """Top-1 (and top-5 over 5+ classes) of the exported towers on `source`'s tasks.

  Metric names follow the zero-shot evaluator: 'zeroshot/<name>_<task>/top1'.
  Raises FileNotFoundError when `directory` holds no export.json, ValueError for a format this
  OS cannot run (Core ML outside macOS).
  """
  path = os.path.join(directory, bundle.METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} holds no {bundle.METADATA}; export a model into it with '
                            'launch/export.py.')
  with open(path, encoding='utf-8') as f:
    metadata = json.load(f)
  module = bundle.FORMATS[metadata['format']]
  runs = {tower: module.load(os.path.join(directory, metadata[tower]['file']))
          for tower in ('image', 'text')}
  if runs['image'] is None:
    raise ValueError(f'{metadata["format"]} towers cannot run on this OS; evaluate them where '
                     'they run.')
  image, text = metadata['image'], metadata['text']
  pre, tok = image['preprocess'], text['tokenizer']
  tokenizer = tokenizer_lib.get_tokenizer(
      f'{_TOKENIZER_SPECS[tok["kind"]]}:{os.path.join(directory, tok["vocabulary"])}')
  batch = image['input']['shape'][0]
  data = datasets.open_source(dict(source or DEMO), datasets.CLASSIFICATION, pre['size'])

  pixels = np.stack([base.load_image(e.image, pre['size'], pre['interpolation'], e.where)
                     for e in data.examples])
  pixels = preprocess.normalize(pixels, pre['mean'], pre['std'])
  if image['input']['layout'] == 'NCHW':
    pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
  image_emb = _embed(runs['image'], pixels, batch)
  labels = np.asarray([e.labels for e in data.examples], np.int64)

  metrics = {}
  for t, task in enumerate(data.tasks):
    prompts = templates_lib.prompts(task.classnames, task.templates)
    tokens = tokenizer(prompts, tok['context_length']).astype(np.int32)
    classifier = metrics_lib.zero_shot_classifier(
        _embed(runs['text'], tokens, text['input']['shape'][0]), len(task.classnames))
    ks = [k for k in (1, 5) if k == 1 or k < len(task.classnames)]
    accuracy = metrics_lib.topk_accuracy(image_emb, classifier, labels[:, t], ks)
    group = f'zeroshot/{name}' + (f'_{task.name}' if task.name else '')
    metrics.update({f'{group}/top{k}': value for k, value in accuracy.items()})
  return metrics

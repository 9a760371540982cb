"""Zero-shot classification: prompt-ensemble classifiers from the text tower, top-1 / top-5.

Per task, every class name is put into every template; the prompts' unit text embeddings are
averaged per class and re-normalized (the CLIP convention, as open_clip's
`build_zero_shot_classifier`). An image is classified by the largest cosine similarity; top-k
accuracy uses the tie rule of `metrics.py`; top-5 is reported for tasks with more than 5 classes
(with 5 it is 1.0 by construction).

The confidence cascade (inference option cascade_size, cascade_tau) encodes every image at
cascade_size first and again at the model's side when its top-1 minus top-2 cosine to the
classifiers is below cascade_tau for any task; 'at_<S>px' metrics give the share at each side.

The prompts of all tasks form one text stream and the images one image stream, each sharded over
the mesh (base.py); a dataset with several tasks (the demo world) embeds its images once.
Metrics: '<prefix>/<name>/top1' and '/top5' for a single-task dataset, '<prefix>/<name>_<task>/...'
per task otherwise.
"""
from typing import Dict, List, Optional

import numpy as np

from mobileclip_jax.evaluation import metrics as metrics_lib
from mobileclip_jax.evaluation import base
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import templates as templates_lib

TOP_K = (1, 5)


class ZeroShotEvaluator(base.EvaluatorBase):
  """Zero-shot classification of an `EvalData` with tasks (see `base.EvaluatorBase`)."""
  default_prefix = 'zeroshot'

  def __init__(self, name: str, data: datasets.EvalData, model_config, mesh, **kwargs):
    if not data.tasks:
      raise ValueError(f'Evaluator {name!r}: {data.description} has no classification task '
                       '(class names and templates).')
    super().__init__(name, data, model_config, mesh, **kwargs)
    self._prompt_batches: Optional[List[Dict[str, np.ndarray]]] = None

  def _prompt_stream(self) -> List[Dict[str, np.ndarray]]:
    """This process's token batches of every task's prompts (tokenized once, then kept)."""
    if self._prompt_batches is None:
      prompts = [p for task in self.data.tasks
                 for p in templates_lib.prompts(task.classnames, task.templates)]
      self._prompt_batches = [
          {'inputs': self.tokenize([prompts[i] if i >= 0 else '' for i in slots]),
           'index': slots}
          for slots in base.stream_slots(len(prompts), self.text_batch_size)]
    return self._prompt_batches

  def _labels(self, index: int, example: datasets.Example) -> Dict[str, np.ndarray]:
    tasks = self.data.tasks
    if len(example.labels) != len(tasks) or not all(
        0 <= label < len(task.classnames) for label, task in zip(example.labels, tasks)):
      raise ValueError(f'{example.where} (example {index}): labels {example.labels} do not fit '
                       f'the class counts {[len(t.classnames) for t in tasks]} of the tasks; '
                       'are the class names those of this dataset?')
    return {'labels': np.asarray(example.labels, np.int32)}

  def _classifiers(self, text: np.ndarray) -> List[np.ndarray]:
    """Each task's classifier [C, D] from the prompts' embeddings (in stream order)."""
    out, start = [], 0
    for task in self.data.tasks:
      num_prompts = len(task.classnames) * len(task.templates)
      out.append(metrics_lib.zero_shot_classifier(text[start:start + num_prompts],
                                                  len(task.classnames)))
      start += num_prompts
    return out

  def _cascade(self, model, variables, images, classifiers) -> None:
    """Re-encodes at the model's side, in place, the images whose top-1 minus top-2 cosine is
    below cascade_tau for any task (the confidence cascade's second pass)."""
    margin = np.full(len(images['index']), np.inf, np.float32)
    for classifier in classifiers:
      if len(classifier) > 1:
        top2 = np.sort(images['embeddings'] @ classifier.T, axis=-1)[:, -2:]
        margin = np.minimum(margin, top2[:, 1] - top2[:, 0])
    rerun = np.flatnonzero(margin < self.inference.cascade_tau)
    if len(rerun):
      full = self.encode_images_at(model, variables, self.model_config.image_size,
                                   lambda *_: {}, {}, images['index'][rerun])
      images['embeddings'][rerun], images['side'][rerun] = full['embeddings'], full['side']

  def _evaluate(self, model, variables) -> Dict[str, float]:
    text = self.embed_text(model, variables, self._prompt_stream(), ('index',))['embeddings']
    images = self.encode_images(model, variables, self._labels,
                                {'labels': (len(self.data.tasks),)})
    classifiers = self._classifiers(text)
    if self.inference.cascade_size:
      self._cascade(model, variables, images, classifiers)
    metrics = {}
    for t, (task, classifier) in enumerate(zip(self.data.tasks, classifiers)):
      # Top-5 of 5 classes is 1.0 by construction: top-k only for tasks with more than k classes.
      ks = [k for k in TOP_K if k == 1 or k < len(task.classnames)]
      accuracy = metrics_lib.topk_accuracy(images['embeddings'], classifier,
                                           images['labels'][:, t], ks)
      group = f'{self.prefix}/{self.name}' + (f'_{task.name}' if task.name else '')
      metrics.update({f'{group}/top{k}': value for k, value in accuracy.items()})
    metrics.update(self.side_metrics(images))
    return metrics

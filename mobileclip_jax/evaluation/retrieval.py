"""Image-text retrieval: recall@1/5/10 in both directions, several captions per image.

Conventions of CLIP, clip_benchmark and DataComp (metrics.py): text->image R@k over all captions,
image->text R@k over images (any of the image's captions counts); COCO is evaluated on the 5k
Karpathy test images (25k captions), Flickr30k on its 1k test images (5k captions), and DataComp's
main retrieval number is the mean of the two R@1.

Images are a global stream; each process embeds the captions of the images it read, as a
process-local stream padded to a common number of batches (base.py). The caption tokens are
kept after the first run.

Metrics: '<prefix>/<name>/i2t_R@k', '<prefix>/<name>/t2i_R@k' for k in 1, 5, 10, and
'<prefix>/<name>/mean_R@1'.
"""
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np

from mobileclip_jax import embedding
from mobileclip_jax.evaluation import metrics as metrics_lib
from mobileclip_jax.evaluation import base
from mobileclip_jax.evaluation import datasets

RECALL_K = (1, 5, 10)


class RetrievalEvaluator(base.EvaluatorBase):
  """Image-text retrieval over an `EvalData` with captions (see `base.EvaluatorBase`)."""
  default_prefix = 'retrieval'

  def __init__(self, name: str, data: datasets.EvalData, model_config, mesh, **kwargs):
    super().__init__(name, data, model_config, mesh, **kwargs)
    if self.inference.cascade_size:
      raise ValueError(f'Evaluator {name!r}: the confidence cascade (cascade_size) needs '
                       'zero-shot classes; retrieval takes image_size or selector_tau.')
    self._captions: List[Tuple[int, int, str]] = []  # (image index, caption number, text).
    self._caption_batches: Optional[List[Dict[str, np.ndarray]]] = None

  def _collect_captions(self, index: int, example: datasets.Example) -> Dict[str, np.ndarray]:
    if self._caption_batches is None:
      if not example.captions:
        raise ValueError(f'{example.where} (example {index}) has no caption.')
      self._captions.extend((index, n, text) for n, text in enumerate(example.captions))
    return {}

  def _caption_stream(self) -> List[Dict[str, np.ndarray]]:
    """This process's caption token batches; every process runs the same number of batches."""
    if self._caption_batches is None:
      local_batch = self.text_batch_size // jax.process_count()
      need = -(-len(self._captions) // local_batch)
      num_batches = max(1, embedding.global_max([need], self.mesh)[0])
      batches = []
      for slots in base.local_slots(len(self._captions), local_batch, num_batches):
        rows = [self._captions[i] if i >= 0 else (-1, 0, '') for i in slots]
        batches.append({'inputs': self.tokenize([text for _, _, text in rows]),
                        'image': np.asarray([r[0] for r in rows], np.int32),
                        'caption': np.asarray([r[1] for r in rows], np.int32)})
      self._caption_batches, self._captions = batches, []
    return self._caption_batches

  def _evaluate(self, model, variables) -> Dict[str, float]:
    if self._caption_batches is None:
      self._captions = []  # A failed earlier run may have left some.
    images = self.encode_images(model, variables, self._collect_captions, {})
    texts = self.embed_text(model, variables, self._caption_stream(), ('image', 'caption'))
    recall = metrics_lib.retrieval_recall(images['embeddings'], texts['embeddings'],
                                          texts['image'], RECALL_K)
    group = f'{self.prefix}/{self.name}'
    metrics = {f'{group}/i2t_R@{k}': v for k, v in recall['image_to_text'].items()}
    metrics.update({f'{group}/t2i_R@{k}': v for k, v in recall['text_to_image'].items()})
    metrics[f'{group}/mean_R@1'] = (recall['image_to_text'][1] + recall['text_to_image'][1]) / 2
    metrics.update(self.side_metrics(images))
    return metrics

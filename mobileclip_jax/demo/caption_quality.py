"""Synthetic captions against the scene labels: what a captioner names right and what it invents.

The demo world knows every image's scene (the uid gives it: `inspection.scene_of`), so a
captioner's captions can be scored against the truth, per caption:

  shape_correct      the main object's shape is named (its word, or its plural)
  color_correct      the main object's colour is named
  object_correct     the main object's colour directly before its shape ('red star')
  hallucinated       a shape or colour word that no object of the scene has (split into
                     shape_hallucinated and color_hallucinated); background colours are their
                     own vocabulary (world.BACKGROUND_COLORS shares no word with object colours)
                     and never count

Rates are fractions of captions. Beside them, per image over the captioner's captions,
`captioners.CaptionStats`: empty, exact and near duplicate rates (near: averaged teacher cosine
above the generation's threshold), mean pairwise cosine, distinct-1/2. The oracle ('demo')
captioner names every object's colour and shape and nothing else: 100% correct, 0% invented.
"""
import dataclasses
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from mobileclip_jax import utils
from mobileclip_jax.demo import world as world_lib
from mobileclip_jax.reinforce import captioners

_WORD = re.compile(r'[a-z]+')
FLAGS = ('shape_correct', 'color_correct', 'object_correct', 'hallucinated',
         'shape_hallucinated', 'color_hallucinated')


def _plural(shape: str) -> str:
  return shape + ('es' if shape.endswith(('s', 'x', 'ch', 'sh')) else 's')


# Word -> the shape it names (singular and plural forms).
_SHAPE_OF = {form: shape for shape in world_lib.SHAPES for form in (shape, _plural(shape))}
_COLORS = frozenset(world_lib.OBJECT_COLORS)


def caption_flags(text: str, labels: Mapping[str, Any]) -> Dict[str, bool]:
  """The per-caption flags (module docstring) of one caption of a scene (`Scene.labels()`)."""
  words = _WORD.findall(text.lower())
  shapes = [_SHAPE_OF.get(w) for w in words]
  main = labels['objects'][0]
  present_shapes = {o['shape'] for o in labels['objects']}
  present_colors = {o['color'] for o in labels['objects']}
  shape_invented = any(s is not None and s not in present_shapes for s in shapes)
  color_invented = any(w in _COLORS and w not in present_colors for w in words)
  return {
      'shape_correct': main['shape'] in shapes,
      'color_correct': main['color'] in words,
      'object_correct': any(words[i] == main['color'] and shapes[i + 1] == main['shape']
                            for i in range(len(words) - 1)),
      'hallucinated': shape_invented or color_invented,
      'shape_hallucinated': shape_invented,
      'color_hallucinated': color_invented,
  }


@dataclasses.dataclass
class CaptionQuality:
  """Label-checked counts and `CaptionStats` of one captioner's captions, as mergeable sums."""
  captions: int = 0
  counts: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(FLAGS, 0))
  stats: captioners.CaptionStats = dataclasses.field(default_factory=captioners.CaptionStats)

  def add(self, texts: Sequence[str], labels: Mapping[str, Any], emb: np.ndarray,
          num_teachers: int, threshold: float) -> None:
    """Adds one image's captions with their teacher embeddings [S, D] (unit-norm per teacher)."""
    for text in texts:
      for flag, value in caption_flags(text, labels).items():
        self.counts[flag] += value
    self.captions += len(texts)
    self.stats.add(texts, emb, num_teachers, threshold)

  def rates(self) -> Dict[str, float]:
    """Every measure as a fraction (module docstring), and the caption count."""
    out = {f'{flag}_rate' if 'hallucinated' in flag else flag:
           count / self.captions if self.captions else 0.0
           for flag, count in self.counts.items()}
    return {'captions': self.captions, **out, **self.stats.rates()}


def measure(captions: Sequence[Sequence[str]], labels: Sequence[Mapping[str, Any]],
            emb: Sequence[np.ndarray], num_teachers: int,
            threshold: float) -> Dict[str, float]:
  """`CaptionQuality.rates` of N images' captions (N lists of S), labels and embeddings
  (N arrays [S, D])."""
  quality = CaptionQuality()
  for texts, scene, e in zip(captions, labels, emb, strict=True):
    quality.add(texts, scene, e, num_teachers, threshold)
  return quality.rates()


def dataset_quality(name: str, data_dir: str, world: world_lib.DemoWorldConfig,
                    threshold: float, num: Optional[int] = None) -> Dict[str, Dict[str, float]]:
  """Per synthetic-caption key of a reinforced demo-world dataset, `measure` over its first
  `num` samples (default all), with the stored teacher embeddings."""
  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.data import reinforced_tfds
  from mobileclip_jax.demo import inspection
  # pylint: enable=g-import-not-at-top
  source, meta = reinforced_tfds.open_reinforced(name, data_dir)
  num_teachers = len(meta.teacher_dims)
  quality = {key: CaptionQuality() for key in meta.syn_keys}
  for i in range(len(source) if num is None else min(num, len(source))):
    record = source[i]
    labels = inspection.scene_of(record['uid'].decode(), world).labels()
    texts = [t.decode() for t in record['syn_captions']]
    emb = np.asarray(record['text_emb'][meta.num_captions:], np.float32)
    index = np.asarray(record['syn_key_index'])
    for k, key in enumerate(meta.syn_keys):
      rows = np.flatnonzero(index == k)
      quality[key].add([texts[j] for j in rows], labels, emb[rows], num_teachers, threshold)
  return {key: q.rates() for key, q in quality.items()}


def format_table(quality: Mapping[str, Mapping[str, float]]) -> str:
  """One line per caption key: the label-checked rates, duplicates and distinct-n (%)."""
  columns = (('shape', 'shape_correct'), ('colour', 'color_correct'),
             ('object', 'object_correct'), ('invented', 'hallucinated_rate'),
             ('exact dup', 'exact_duplicate_rate'), ('near dup', 'near_duplicate_rate'),
             ('dist-1', 'distinct_1'), ('dist-2', 'distinct_2'))
  width = max(len(k) for k in quality)
  lines = [f'{"captions (%)":<{width}}  ' + '  '.join(f'{c:>9}' for c, _ in columns)]
  for key, rates in quality.items():
    lines.append(f'{key:<{width}}  ' + '  '.join(f'{100 * rates[m]:9.1f}' for _, m in columns))
  return '\n'.join(lines)


def write_into_summary(out_dir: str, summary_file: str,
                       quality: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
  """Adds `quality` as 'caption_quality' to a generation's summary JSON; returns the summary."""
  path = os.path.join(out_dir, summary_file)
  with open(path, encoding='utf-8') as f:
    summary = json.load(f)
  summary['caption_quality'] = dict(quality)
  utils.write_json_atomic(path, summary)
  return summary

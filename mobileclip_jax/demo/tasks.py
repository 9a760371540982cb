"""The demo world's zero-shot tasks: per task, the label fields, class names and prompts."""
import dataclasses
import functools
from typing import Any

from mobileclip_jax.demo import captions
from mobileclip_jax.demo import world
from mobileclip_jax.demo.world import DemoWorldConfig, Labels


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
  """A zero-shot classification task over demo-world labels.

  Attributes:
    name: task name.
    fields: label keys whose values identify the class.
    values: per class, the tuple of label values (same order as `fields`).
    classnames: per class, the text put into the templates.
    templates: prompt templates with one '{}'.
  """
  name: str
  fields: tuple[str, ...]
  values: tuple[tuple[Any, ...], ...]
  classnames: tuple[str, ...]
  templates: tuple[str, ...]

  @functools.cached_property
  def _class_of(self) -> dict[tuple[Any, ...], int]:
    return {v: i for i, v in enumerate(self.values)}

  def target(self, labels: Labels) -> int:
    """The class index of a sample's labels."""
    key = tuple(labels[f] for f in self.fields)
    if key not in self._class_of:
      raise ValueError(f'Labels {key} of fields {self.fields} are not a class of zero-shot task '
                       f'{self.name!r}; classes: {self.values}.')
    return self._class_of[key]


def zero_shot_tasks(config: DemoWorldConfig) -> dict[str, ZeroShotTask]:
  """The zero-shot tasks of a world; 'object' (colour + shape) is the compositional one."""

  def task(name, fields, values, classnames, templates):
    values = tuple(v if isinstance(v, tuple) else (v,) for v in values)
    return ZeroShotTask(name, fields, values, tuple(classnames), templates)

  counts = range(1, len(config.count_probs) + 1)
  pairs = [(c, s) for c in config.colors for s in config.shapes]
  tasks = [
      task('shape', ('shape',), config.shapes, config.shapes,
           ('a photo of a {}.', 'a drawing of a {}.', 'a {} shape.', 'an image of a {}.')),
      task('color', ('color',), config.colors, config.colors,
           ('a photo of a {} shape.', 'a drawing of a {} object.', 'something {}.')),
      task('object', ('color', 'shape'), pairs, [f'{c} {s}' for c, s in pairs],
           ('a photo of a {}.', 'a drawing of a {}.', 'an image of a {}.')),
      task('count', ('count',), counts, [captions.count_phrase(n) for n in counts],
           ('a photo of {}.', 'a picture with {}.', '{} on a background.')),
      task('size', ('size',), tuple(world.SIZE_RADII),
           [captions.SIZE_WORDS[s][0] for s in world.SIZE_RADII],
           ('a {} shape.', 'a photo of a {} object.', 'a drawing of a {} thing.')),
      task('position', ('position',), tuple(world.POSITION_ANCHORS),
           [captions.POSITION_PHRASES[p][0] for p in world.POSITION_ANCHORS],
           ('a shape {}.', 'a photo of an object {}.', 'a drawing with something {}.')),
      task('style', ('style',), world.STYLES, [captions.STYLE_WORDS[s][0] for s in world.STYLES],
           ('a {} shape.', 'a drawing of a {} object.')),
      task('texture', ('texture',), config.textures,
           [captions.TEXTURE_WORDS[t][0] for t in config.textures],
           ('a shape on a {} background.', 'a photo with a {} background.', 'a {} background.')),
      task('background_color', ('background_color',), config.background_colors,
           config.background_colors,
           ('a shape on a {} background.', 'a drawing on a {} background.')),
  ]
  return {t.name: t for t in tasks}

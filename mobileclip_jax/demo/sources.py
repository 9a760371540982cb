"""The demo world in the registries: an evaluation source, standard evaluations, the captioner
and a reinforcement input (imported by mobileclip_jax/plugins.py, so configs and command lines
name them without importing the demo).

  evaluation source  kind='demo': split='val', num_samples=1000, seed=0, world=None, tasks=None,
                     image_size=None, captions='captioner', num_captions=5, temperature=0.7
      Rendered on the fly at `image_size` (default: the model's). Classification: the world's
      zero-shot tasks (`tasks` picks some, default all); on the 'heldout' split the 'object'
      task (colour + shape) is the compositional test. Retrieval: `num_captions` accurate
      captioner captions per image, or captions='gt' for the noisy ground-truth caption.
  standard evals     'demo' (the 'val' split, all tasks, 1,000 images), 'demo_heldout' (the
                     'heldout' split), 'demo_retrieval' ('val' images, 5 captioner captions each)
  captioner          'demo[:temperature=0.7]': `DemoCaptioner` on the labels in each sample's json
  reinforce input    'demo:SPLIT:N[:key=value,...]' (samples_per_shard=1000, image_size=64,
                     seed=0): samples 0..N-1 of a split made in memory, with the members
                     `samples.write_split` writes to disk
"""
import ast
import dataclasses
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError
from mobileclip_jax.demo import captions as captions_lib
from mobileclip_jax.demo import samples
from mobileclip_jax.demo import tasks as tasks_lib
from mobileclip_jax.demo import world as world_lib
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.evaluation import registry
from mobileclip_jax.reinforce import captioners
from mobileclip_jax.reinforce import inputs

_CAPTIONER_STREAM = 0xCA97  # Seeds the retrieval captions per (seed, split, index).
NO_LABELS = 'no_labels'  # CorruptSampleError reason: a sample without demo-world labels.


# ----------------------------------------------------------------------------------------------
# Evaluation.


def open_source(spec: Mapping[str, Any], eval_type: str, image_size: int) -> datasets.EvalData:
  """The 'demo' evaluation source (module docstring)."""
  config = world_lib.DemoWorldConfig.from_dict(dict(spec.get('world') or {}))
  split, seed = spec.get('split', 'val'), int(spec.get('seed', 0))
  world_lib.check_split(split)
  num_samples = int(spec.get('num_samples', 1000))
  size = int(spec.get('image_size') or image_size)
  description = f'demo:{split}'

  if eval_type == datasets.CLASSIFICATION:
    all_tasks = tasks_lib.zero_shot_tasks(config)
    names = spec.get('tasks') or tuple(all_tasks)
    names = names.split(',') if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in all_tasks]
    if unknown:
      raise ValueError(f'Unknown demo-world tasks {unknown}; tasks are {sorted(all_tasks)}.')
    chosen = [all_tasks[n] for n in names]

    def read(i: int) -> datasets.Example:
      sample = samples.make_sample(split, i, size, seed, config)
      return datasets.Example(sample['image'],
                              labels=tuple(t.target(sample['labels']) for t in chosen),
                              where=f'{description}:{i}')

    found = tuple(datasets.ClassificationTask(t.name, t.classnames, t.templates) for t in chosen)
    return datasets.EvalData(description, datasets.Examples(num_samples, read), found)

  mode = spec.get('captions', 'captioner')
  if mode not in ('captioner', 'gt'):
    raise ValueError(f"Demo retrieval captions must be 'captioner' or 'gt', got {mode!r}.")
  captioner = captions_lib.DemoCaptioner(float(spec.get('temperature', 0.7)))
  num_captions = int(spec.get('num_captions', 5))

  def read_pair(i: int) -> datasets.Example:
    sample = samples.make_sample(split, i, size, seed, config)
    if mode == 'gt':
      texts = (sample['caption'],)
    else:
      rng = np.random.default_rng([seed, world_lib.SPLITS.index(split), i, _CAPTIONER_STREAM])
      texts = tuple(captioner.caption(sample['labels'], rng) for _ in range(num_captions))
    return datasets.Example(sample['image'], captions=texts, where=f'{description}:{i}')

  return datasets.EvalData(description, datasets.Examples(num_samples, read_pair))


# ----------------------------------------------------------------------------------------------
# Reinforcement.


class DemoWorldCaptioner(captioners.Captioner):
  """The demo world's `DemoCaptioner` on the labels in each sample's json."""
  name = 'demo'

  def __init__(self, temperature: float = 0.7):
    self._captioner = captions_lib.DemoCaptioner(temperature)

  def check(self, item: captioners.CaptionInput, num_captions: int) -> None:
    if 'objects' not in item.labels:
      raise CorruptSampleError(item.shard, item.key, NO_LABELS,
                               'the json member has no demo-world labels (objects, background); '
                               '--captioners=demo only captions demo-world samples')

  def __call__(self, batch, num_captions, rng):
    return self._captioner([item.labels for item in batch], num_captions, rng)

  def describe(self):
    return {'name': self.name, 'temperature': self._captioner.temperature}


@dataclasses.dataclass(frozen=True)
class DemoShard:
  """Samples start .. start + count - 1 of a demo-world split, encoded as tar members."""
  index: int
  name: str
  split: str
  start: int
  count: int
  image_size: int
  seed: int

  def read(self, on_error: Optional[wds.ErrorHandler]) -> Iterator[wds.RawSample]:
    del on_error  # Made in memory: nothing can be corrupt.
    for sample in samples.iter_samples(self.split, self.count, self.image_size, self.seed,
                                       start=self.start):
      yield wds.RawSample(self.name, sample['uid'], samples.tar_members(sample))

  def fingerprint(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


_SRC = re.compile(r'demo:(\w+):(\d+)(?::(.*))?')
_SRC_OPTIONS = {'samples_per_shard': 1000, 'image_size': 64, 'seed': 0}


def resolve_src(src: str) -> List[DemoShard]:
  """The input shards of 'demo:SPLIT:N[:key=value,...]' (module docstring)."""
  match = _SRC.fullmatch(src)
  if not match or match.group(1) not in world_lib.SPLITS or int(match.group(2)) < 1:
    raise ValueError(f'--src={src!r}: the demo world is demo:SPLIT:N[:key=value,...] with SPLIT '
                     f'one of {world_lib.SPLITS} and N >= 1 samples, e.g. demo:train:1000 or '
                     'demo:train:1000:image_size=48.')
  options = dict(_SRC_OPTIONS)
  for item in filter(None, (match.group(3) or '').split(',')):
    key, _, value = item.partition('=')
    if key not in options:
      raise ValueError(f'--src={src!r}: unknown option {key!r}; options: {sorted(options)}.')
    options[key] = int(ast.literal_eval(value))
  if min(options.values()) < 0 or options['samples_per_shard'] < 1:
    raise ValueError(f'--src={src!r}: options must be >= 0 and samples_per_shard >= 1.')
  split, total, per_shard = match.group(1), int(match.group(2)), options['samples_per_shard']
  return [DemoShard(i, f'{i:08d}.tar', split, start, min(per_shard, total - start),
                    options['image_size'], options['seed'])
          for i, start in enumerate(range(0, total, per_shard))]


# ----------------------------------------------------------------------------------------------
# Registration.

datasets.register_source('demo', open_source, ('split', 'num_samples', 'seed', 'world', 'tasks',
                                               'image_size', 'captions', 'num_captions',
                                               'temperature'))
registry.register_standard_eval(
    'demo', registry.ZEROSHOT, (registry.generated('demo', split='val', num_samples=1000),))
registry.register_standard_eval(
    'demo_heldout', registry.ZEROSHOT,
    (registry.generated('demo', split='heldout', num_samples=1000),))
registry.register_standard_eval(
    'demo_retrieval', registry.RETRIEVAL,
    (registry.generated('demo', split='val', num_samples=1000, num_captions=5),))
captioners.register_captioner('demo', lambda syn_key, **options: DemoWorldCaptioner(**options))
inputs.register_scheme('demo', resolve_src)

"""Standard evaluations by name, and where each looks for its data under a data folder.

  name            type       looks in DATA_DIR for, first found wins
  imagenet        zeroshot   wds_imagenet1k[_test]/ (webdataset), TFDS imagenet2012 'validation'
  cifar10         zeroshot   wds_cifar10[_test]/, TFDS cifar10 'test'
  cifar100        zeroshot   wds_vtab-cifar100[_test]/, TFDS cifar100 'test'
  coco            retrieval  wds_mscoco_captions[_test]/, TFDS coco_captions 'test' (Karpathy 5k),
                             coco/test.jsonl
  flickr          retrieval  wds_flickr30k[_test]/, flickr30k/test.jsonl (the 1k test images)

Plugins add names with `register_standard_eval` (the demo world's 'demo', 'demo_heldout' and
'demo_retrieval': mobileclip_jax/demo/sources.py).

The webdataset folders are the clip_benchmark / DataComp downloads (Hugging Face
`djghosh/wds_<task>_test` or `clip-benchmark/wds_<task>`, split folder 'test'); they ship their
class names and templates, except that ImageNet always uses OpenAI's names and 80 templates (from
open_clip, templates.py). TFDS datasets must be prepared as ArrayRecord in DATA_DIR; TFDS's CIFAR
has no prompt templates, so OpenAI's ImageNet templates stand in for the CLIP benchmark's
(numbers differ slightly from the published protocol; use the webdataset folders for those).
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

from mobileclip_jax import plugins
from mobileclip_jax.evaluation import templates

ZEROSHOT, RETRIEVAL = 'zeroshot', 'retrieval'
_OPENAI = dict(classnames=templates.OPENAI_IMAGENET, templates=templates.OPENAI_IMAGENET)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """One place a dataset may be: `find(data_dir)` gives its source spec, or None if absent."""
  description: str
  find: Callable[[str], Optional[Dict[str, Any]]]


def _wds(folder: str, **fields) -> _Layout:
  def find(data_dir):
    for name in (folder, f'{folder}_test'):
      path = os.path.join(data_dir, name)
      if os.path.isdir(os.path.join(path, 'test')):
        return dict(kind='wds', path=path, split='test', **fields)
    return None
  return _Layout(f'{folder}[_test]/test/ (webdataset)', find)


def _tfds(name: str, split: str, **fields) -> _Layout:
  def find(data_dir):
    if os.path.isdir(os.path.join(data_dir, name)):
      return dict(kind='tfds', name=name, split=split, data_dir=data_dir, **fields)
    return None
  return _Layout(f'{name}/ (TFDS, ArrayRecord, split {split!r})', find)


def _jsonl(path: str) -> _Layout:
  def find(data_dir):
    full = os.path.join(data_dir, path)
    return dict(kind='jsonl', path=full) if os.path.isfile(full) else None
  return _Layout(f'{path} (JSONL image-caption pairs)', find)


def generated(kind: str, **fields) -> _Layout:
  """A source that needs no files (e.g. rendered on the fly): always found."""
  return _Layout('nothing (generated)', lambda _: dict(kind=kind, **fields))


STANDARD_EVALS: Dict[str, Tuple[str, Tuple[_Layout, ...]]] = {
    'imagenet': (ZEROSHOT, (_wds('wds_imagenet1k', **_OPENAI),
                            _tfds('imagenet2012', 'validation', **_OPENAI))),
    'cifar10': (ZEROSHOT, (_wds('wds_cifar10'),
                           _tfds('cifar10', 'test', templates=templates.OPENAI_IMAGENET))),
    'cifar100': (ZEROSHOT, (_wds('wds_vtab-cifar100'),
                            _tfds('cifar100', 'test', templates=templates.OPENAI_IMAGENET))),
    'coco': (RETRIEVAL, (_wds('wds_mscoco_captions'),
                         _tfds('coco_captions', 'test', caption_key='captions/text'),
                         _jsonl(os.path.join('coco', 'test.jsonl')))),
    'flickr': (RETRIEVAL, (_wds('wds_flickr30k'), _jsonl(os.path.join('flickr30k', 'test.jsonl')))),
}


def register_standard_eval(name: str, eval_type: str, layouts: Tuple[_Layout, ...]) -> None:
  """Adds a standard evaluation: its type and where its data may be (first found wins)."""
  if name in STANDARD_EVALS:
    raise ValueError(f'Standard evaluation {name!r} is registered already.')
  STANDARD_EVALS[name] = (eval_type, tuple(layouts))


def names() -> Tuple[str, ...]:
  """The standard evaluations, plugins' included, sorted."""
  plugins.load()
  return tuple(sorted(STANDARD_EVALS))


def standard_eval(name: str, data_dir: str) -> Tuple[str, Dict[str, Any]]:
  """(type, source spec) of a standard evaluation, from the first layout found in `data_dir`.

  Raises:
    ValueError: unknown name. FileNotFoundError: no layout found; the message lists them all.
  """
  if name not in names():
    raise ValueError(f'Unknown standard evaluation {name!r}; known: {list(names())}.')
  eval_type, layouts = STANDARD_EVALS[name]
  data_dir = os.path.expanduser(data_dir or '')
  for layout in layouts:
    spec = layout.find(data_dir)
    if spec is not None:
      return eval_type, spec
  looked = '\n'.join(f'  {os.path.join(data_dir, "")}{layout.description}' for layout in layouts)
  raise FileNotFoundError(f'No data for the {name!r} evaluation in data_dir={data_dir!r}; '
                          f'looked for:\n{looked}')

"""Class names and prompt templates for zero-shot classification.

Templates are strings with one placeholder for the class name: '{c}' (clip_benchmark / DataComp's
`zeroshot_classification_templates.txt`) or '{}' (open_clip's format strings).

The ImageNet class names and prompt templates are OpenAI's, as open_clip ships them in
`open_clip/zero_shot_metadata.py`. That file is loaded on its own, without importing open_clip
(and so torch): it is located with `importlib.util.find_spec` and executed standalone after
checking that it imports nothing. Nothing is copied into this repository.

Class-name and template specs (config entries and source specs) are one of:
  None                  whatever the dataset ships (caller's default)
  'openai_imagenet'     the OpenAI ImageNet class names / 80 templates (open_clip)
  'simple_imagenet'     open_clip's 7-template subset (templates only)
  '/path/file.txt'      one entry per line
  a list of strings
"""
import ast
import functools
import importlib.util
import os
import types
from typing import Optional, Sequence, Tuple, Union

OPENAI_IMAGENET = 'openai_imagenet'
SIMPLE_IMAGENET = 'simple_imagenet'
_OPEN_CLIP_FILE = 'zero_shot_metadata.py'
_PLACEHOLDERS = ('{c}', '{}')

Spec = Union[None, str, Sequence[str]]


@functools.lru_cache(maxsize=None)
def open_clip_metadata() -> types.ModuleType:
  """open_clip's `zero_shot_metadata.py`, executed standalone (it must have no imports)."""
  spec = importlib.util.find_spec('open_clip')  # Finds the package without importing it.
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'The ImageNet class names and templates come from open_clip\'s zero_shot_metadata.py, '
        'and open_clip is not installed: `pip install open-clip-torch` (torch is not needed to '
        'read the file), or pass classnames=FILE and templates=FILE (one per line).')
  path = os.path.join(list(spec.submodule_search_locations)[0], _OPEN_CLIP_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist in this open_clip version; pass '
                            'classnames=FILE and templates=FILE (one per line) instead.')
  with open(path, encoding='utf-8') as f:
    source = f.read()
  tree = ast.parse(source, path)
  imports = [node.lineno for node in ast.walk(tree)
             if isinstance(node, (ast.Import, ast.ImportFrom))]
  if imports:
    raise RuntimeError(f'{path} has imports (lines {imports}) and cannot be loaded standalone; '
                       'pass classnames=FILE and templates=FILE (one per line) instead.')
  module = types.ModuleType('_open_clip_zero_shot_metadata')
  module.__file__ = path
  exec(compile(tree, path, 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


def _open_clip_templates(attribute: str) -> Tuple[str, ...]:
  # open_clip's templates are lambdas; called with the placeholder they give format strings.
  return tuple(t('{c}') for t in getattr(open_clip_metadata(), attribute))


def imagenet_classnames() -> Tuple[str, ...]:
  """The 1,000 OpenAI ImageNet class names, in the standard (sorted synset) label order."""
  names = tuple(open_clip_metadata().IMAGENET_CLASSNAMES)
  if len(names) != 1000:
    raise ValueError(f'open_clip\'s IMAGENET_CLASSNAMES has {len(names)} names, expected 1000.')
  return names


def read_lines(path: str, what: str) -> Tuple[str, ...]:
  """Stripped lines of a text file; an empty file or a blank line is an error."""
  try:
    with open(os.path.expanduser(path), encoding='utf-8') as f:
      lines = [line.strip() for line in f.read().splitlines()]
  except FileNotFoundError:
    raise FileNotFoundError(f'{what} file {path} does not exist.') from None
  blank = [i + 1 for i, line in enumerate(lines) if not line]
  if not lines or blank:
    raise ValueError(f'{what} file {path} is empty or has blank lines (lines {blank[:10]}); '
                     'write one entry per line.')
  return tuple(lines)


def check_template(template: str) -> str:
  """Returns the template if it has exactly one '{c}' or '{}' placeholder."""
  counts = [template.count(p) for p in _PLACEHOLDERS]
  if sum(counts) != 1:
    raise ValueError(f'Prompt template {template!r} needs exactly one class-name placeholder, '
                     "'{c}' or '{}'.")
  return template


def fill(template: str, classname: str) -> str:
  """The prompt for one class: the template with its placeholder replaced by the class name."""
  for placeholder in _PLACEHOLDERS:
    if placeholder in template:
      return template.replace(placeholder, classname, 1)
  raise ValueError(f'Prompt template {template!r} has no placeholder.')


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list:
  """All prompts, class-major (open_clip's order): C * T strings."""
  return [fill(t, c) for c in classnames for t in templates]


def resolve_classnames(spec: Spec, default: Optional[Sequence[str]] = None,
                       where: str = '') -> Tuple[str, ...]:
  """Class names from a spec (module docstring); `default` is what the dataset ships."""
  if spec is None:
    if default is None:
      raise ValueError(f'{where or "The dataset"} ships no class names; set classnames to a '
                       f"file (one per line), a list, or '{OPENAI_IMAGENET}'.")
    names = tuple(default)
  elif spec == OPENAI_IMAGENET:
    names = imagenet_classnames()
  elif isinstance(spec, str):
    names = read_lines(spec, 'Class names')
  else:
    names = tuple(str(n) for n in spec)
  if not names or not all(n.strip() for n in names):
    raise ValueError(f'Class names of {where or "the dataset"} are empty or contain blanks.')
  return names


def resolve_templates(spec: Spec, default: Optional[Sequence[str]] = None,
                      where: str = '') -> Tuple[str, ...]:
  """Prompt templates from a spec (module docstring); `default` is what the dataset ships."""
  if spec is None:
    if default is None:
      raise ValueError(f'{where or "The dataset"} ships no prompt templates; set templates to a '
                       f"file (one per line), a list, '{OPENAI_IMAGENET}' or '{SIMPLE_IMAGENET}'.")
    templates = tuple(default)
  elif spec == OPENAI_IMAGENET:
    templates = _open_clip_templates('OPENAI_IMAGENET_TEMPLATES')
  elif spec == SIMPLE_IMAGENET:
    templates = _open_clip_templates('SIMPLE_IMAGENET_TEMPLATES')
  elif isinstance(spec, str):
    templates = read_lines(spec, 'Prompt templates')
  else:
    templates = tuple(str(t) for t in spec)
  if not templates:
    raise ValueError(f'No prompt templates for {where or "the dataset"}.')
  return tuple(check_template(t) for t in templates)

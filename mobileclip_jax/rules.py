"""Ordered regex rules over parameter paths: weight decay, learning-rate multipliers, freezing.

A rule is (regex, value); a parameter's path is its '/'-joined Flax path ('visual/stages_0/
blocks_1/mlp/fc1/kernel', 'logit_scale'). The first rule whose regex matches (`re.search`) gives
the value, as big_vision's `wd_mults`/`lr_mults` and MaxText's logical-axis rules; a parameter
no rule matches gets the default. Rules live in the config (`optim.wd_rules`, `optim.lr_rules`,
`optim.freeze`, `sharding.rules`), so an experiment states them instead of code deriving them.
Used by the optimizer (train/optimizer.py) and the partitioner (sharding.py).

The default weight-decay rules reproduce open_clip's set (decay iff the PyTorch tensor has
ndim >= 2 and its name has none of 'bn', 'ln', 'bias', 'logit_scale') on this project's Flax
names: biases, norm scales and the logit scale/bias are not decayed; the transformers' LayerScale
vectors (`ls_1`, `ls_2`, (C,) in PyTorch) are not; kernels, embeddings, position embeddings and
the FastViT towers' LayerScale (`layer_scale*`, (C, 1, 1) in PyTorch) are. open_clip's own ViTs
store their class token as a vector and do not decay it: configs of open_clip-layout towers add
`OPEN_CLIP_VIT_WD_RULE` in front.
"""
import re
from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

import jax

Rule = Tuple[str, Any]

DEFAULT_WD_RULES: Tuple[Rule, ...] = (
    (r'(^|/)(bias|scale|logit_scale|logit_bias)$', 0.0),  # Biases, norm scales, logit scale/bias.
    (r'(^|/)ls_\d+/gamma$', 0.0),                         # Transformer LayerScale (C,).
    (r'^masks/', 0.0),                                    # Learned inheritance's gates.
    (r'.', 1.0),
)
OPEN_CLIP_VIT_WD_RULE: Rule = (r'^visual/cls_token$', 0.0)  # open_clip's class_embedding (C,).


def path_str(key_path) -> str:
  """'/'-joined names of a jax tree path (dict keys, attribute names, sequence indices)."""
  parts = []
  for k in key_path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def compile_rules(rules: Iterable[Sequence[Any]], what: str) -> list:
  """[(compiled regex, value)]; a rule that is not (regex, value) or does not compile fails here."""
  compiled = []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2:
      raise ValueError(f'{what}: each rule is (regex, value), got {rule!r}.')
    pattern, value = rule
    try:
      compiled.append((re.compile(pattern), value))
    except re.error as e:
      raise ValueError(f'{what}: {pattern!r} is not a regular expression ({e}).') from None
  return compiled


def match(compiled: Sequence[Tuple[re.Pattern, Any]], path: str, default: Any) -> Any:
  """The value of the first rule matching `path`, else `default`."""
  for pattern, value in compiled:
    if pattern.search(path):
      return value
  return default


def tree_values(rules: Iterable[Sequence[Any]], tree: Any, default: Any, what: str,
                leaf_fn: Callable[[str, Any, Any], Any] = None, strict: bool = True) -> Any:
  """A tree like `tree` with each leaf's rule value (or `leaf_fn(path, leaf, value)`).

  With `strict`, every rule must match some leaf: a rule that matches nothing is a typo or a
  stale path. (General rule sets, such as the default decay rules, are not strict.)
  """
  compiled = compile_rules(rules, what)
  used = set()

  def leaf(key_path, x):
    path = path_str(key_path)
    for i, (pattern, value) in enumerate(compiled):
      if pattern.search(path):
        used.add(i)
        break
    else:
      value = default
    return leaf_fn(path, x, value) if leaf_fn else value

  out = jax.tree_util.tree_map_with_path(leaf, tree)
  unused = [compiled[i][0].pattern for i in range(len(compiled)) if i not in used]
  if strict and unused:
    example = path_str(jax.tree_util.tree_flatten_with_path(tree)[0][0][0])
    raise ValueError(f'{what}: the rule(s) {unused} match no parameter (paths look like '
                     f'{example!r}).')
  return out


def freeze_labels(patterns: Iterable[str], params: Any) -> Any:
  """'frozen' | 'trained' per parameter: frozen where one of the regexes matches its path."""
  rules = [(p, 'frozen') for p in patterns]
  return tree_values(rules, params, 'trained', 'optim.freeze')


def summary(tree: Any) -> Dict[Any, int]:
  """{value: number of parameters} of a tree of rule values (for the log)."""
  counts: Dict[Any, int] = {}
  for value in jax.tree.leaves(tree):
    counts[value] = counts.get(value, 0) + 1
  return counts

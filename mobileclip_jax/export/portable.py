"""A function's computation with `lax.platform_dependent` choices made before export.

The towers pick their depthwise convolution per platform (models/layers.py: unrolled shifted
taps behind an optimization barrier on CPU, a `lax.scan` over examples when differentiated;
XLA's grouped convolution elsewhere). Exporters need one plain graph: jax2onnx has no rule for
the `platform_index` primitive, and the taps exported would be dozens of slices per
convolution (a WHILE loop of them in TFLite for a scan) that phone runtimes run slowly.
`resolve_platform(fn)` traces `fn` and re-runs its jaxpr with every platform choice taken for
a platform that none of the branches names, i.e. the `default` branch: the grouped convolution
that ONNX `Conv(group=C)` and TFLite `DEPTHWISE_CONV_2D` express directly. The models stay
untouched, and running the result under `jax.jit` on CPU still computes the same function (the
reference the exports are checked against uses the CPU branch, so the check also covers the two
branches agreeing).
"""
from typing import Any, Callable, List, Optional, Sequence

import jax
from jax.extend import core as jex_core

def _branch(platforms: Sequence[Optional[Sequence[str]]]) -> int:
  """Index of the default branch (the entry `None`) of a `platform_index` equation."""
  for index, names in enumerate(platforms):
    if names is None:
      return index
  raise ValueError(f'lax.platform_dependent without a default branch (branches for '
                   f'{list(platforms)}) cannot be exported platform-independently.')


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> List[Any]:
  """`jax.core.eval_jaxpr`, inlining nested jits and resolving platform choices."""
  env, resolved = {}, {}

  def read(var):
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    inputs = [read(v) for v in eqn.invars]
    if name == 'platform_index':
      resolved[eqn.outvars[0]] = env[eqn.outvars[0]] = _branch(eqn.params['platforms'])
      continue
    selector = eqn.invars[0] if eqn.invars else None
    if name == 'cond' and not isinstance(selector, jex_core.Literal) and selector in resolved:
      branch = eqn.params['branches'][resolved[selector]]
      outputs = _eval(branch.jaxpr, branch.consts, inputs[1:])
    elif name in ('jit', 'pjit'):  # Inlined: a platform choice may sit inside.
      closed = eqn.params['jaxpr']
      outputs = _eval(closed.jaxpr, closed.consts, inputs)
    else:
      outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def resolve_platform(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` (pytrees in and out) with every `lax.platform_dependent` taking its default branch."""
  def resolved(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outputs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)
  return resolved

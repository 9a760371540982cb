"""Compile time of every recipe's train step, cold and from the persistent compilation cache.

  python launch/benchmark.py compile [--option=KEY=VALUE ...]

Options (all optional):
  recipes=MobileCLIP2-S0,...   model names of configs/ recipes (default: every recipe)
  batch=8                      global batch of the compiled step (default 8: the step's program
                               does not depend on the batch size beyond its shapes; `recipe`
                               compiles at each recipe's own batch)
  quick=1                      MobileCLIP2-S0 only

Each recipe compiles twice, each time in a fresh process, ahead of time on this machine's JAX
devices with abstract inputs (`train.setup.build` with a synthetic input spec: no data, no
weights): first with an empty persistent cache (a real compile, written to the cache), then
with that cache, as a resumed run would. A row: recipe, batch, cold_s, warm_s, cold_wrote_cache,
warm_hit (the first process wrote the executable and the second wrote nothing: it read it),
the compiled step's per-device memory, entry_thunks / thunks_by_op (`entry_thunks`, counted in
the first process, summed over the step's programs) and program_thunks (per program: the
gradients', then the update's where `update_program` separates it). *_lower_s is tracing +
lowering (paid on every start), cold_s / warm_s
compiling or reading the executable from the cache (`train.setup.Run`).
"""
import collections
import os
import re
import tempfile
from typing import Any, Dict, Iterator

from mobileclip_jax.benchmark import common

_OPTIONS = ('recipes', 'batch', 'quick')
TEACHER_DIMS = (768, 768)  # Both recipes' teachers are ViT-L/14s.
# Entry-computation instructions that run nothing: no thunk of their own.
_FREE_OPS = frozenset(('parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'))


def entry_thunks(hlo_text: str) -> Dict[str, int]:
  """Instructions of the compiled program's ENTRY computation that run, by opcode.

  XLA:CPU runs each as one thunk (a loop or a conditional as one, with its body a graph of its
  own) and, at every compile and every load from the persistent cache, builds their dependency
  graph in time that grows with the square of their count (README, Performance).
  """
  entry = re.search(r'^ENTRY [^\n]*\n(.*?)^}', hlo_text, re.S | re.M)
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  ops = re.findall(r'^\s*(?:ROOT )?%?[\w.\-]+ = [^=]*? ([a-z][\w\-]*)\(', entry.group(1), re.M)
  return dict(collections.Counter(op for op in ops if op not in _FREE_OPS).most_common())


def measure(spec: str, batch: int, cache_dir: str, count_thunks: bool) -> Dict[str, Any]:
  """Compiles the recipe's step in this process with `cache_dir` as the persistent cache.

  count_thunks: also count `entry_thunks` (printing the program's HLO: tens of MB at S4).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import sharding  # pylint: disable=g-import-not-at-top
  from mobileclip_jax.train import setup  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  config = config_lib.load_config_file(spec)
  if batch:
    config.batch_size = batch
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  model_config = setup.model_config(config)
  run = setup.build(config, mesh, spec=setup.InputSpec.synthetic(model_config, TEACHER_DIMS))
  files_before = len(os.listdir(cache_dir))
  run.step  # pylint: disable=pointless-statement  (compiles)
  analysis = run.step.memory_analysis()
  per_program = [entry_thunks(program.as_text()) if count_thunks else {}
                 for program in run.step.programs]
  thunks = dict(sum((collections.Counter(t) for t in per_program), collections.Counter())
                .most_common())
  return {'entry_thunks': sum(thunks.values()), 'thunks_by_op': thunks,
          'program_thunks': [sum(t.values()) for t in per_program],
          'lower_s': round(run.lower_seconds, 2), 'compile_s': round(run.compile_seconds, 2),
          'batch': config.batch_size,
          'cache_files_written': len(os.listdir(cache_dir)) - files_before,
          'temp_gib': round(analysis.temp_size_in_bytes / 2**30, 3) if analysis else None,
          'argument_gib': round(analysis.argument_size_in_bytes / 2**30, 3) if analysis else None,
          'devices': jax.device_count(), 'platform': jax.default_backend()}


def run(options: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
  """Yields one row per recipe (see the module docstring)."""
  from mobileclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  quick, _ = common.common_options(options, _OPTIONS, 'compile', '{}')
  specs = config_lib.recipe_specs()
  names = common.option_list(options, 'recipes', ['MobileCLIP2-S0'] if quick else list(specs))
  unknown = sorted(set(names) - set(specs))
  if unknown:
    raise ValueError(f'No recipe for {unknown}; recipes: {", ".join(specs)}.')
  batch = options.get('batch', '8')
  batch = 0 if batch == 'recipe' else common.option_scalar({'batch': batch}, 'batch', 8, int)
  for name in names:
    with tempfile.TemporaryDirectory(prefix='mobileclip_compile_cache_') as cache_dir:
      kwargs = dict(spec=specs[name], batch=batch, cache_dir=cache_dir)
      try:
        cold = common.isolated(__name__, 'measure', dict(kwargs, count_thunks=True),
                               timeout=4 * 3600)
        warm = common.isolated(__name__, 'measure', dict(kwargs, count_thunks=False),
                               timeout=4 * 3600)
      except RuntimeError as e:  # Out of memory, or a failed compile: report it, go on.
        yield {'recipe': name, 'error': str(e)[-2000:]}
        continue
    yield {'recipe': name, 'config': os.path.relpath(specs[name], config_lib.CONFIGS_DIR),
           'batch': cold['batch'], 'cold_lower_s': cold['lower_s'], 'cold_s': cold['compile_s'],
           'warm_lower_s': warm['lower_s'], 'warm_s': warm['compile_s'],
           'cold_wrote_cache': cold['cache_files_written'] > 0,
           'warm_hit': cold['cache_files_written'] > 0 and warm['cache_files_written'] == 0,
           'temp_gib': cold['temp_gib'], 'entry_thunks': cold['entry_thunks'],
           'program_thunks': cold['program_thunks'],
           'thunks_by_op': cold['thunks_by_op'],
           'argument_gib': cold['argument_gib'], 'devices': cold['devices'],
           'platform': cold['platform']}

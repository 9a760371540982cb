"""The one place a training run is assembled, from a config and a mesh.

  run = setup.build(config, mesh)                      # opens config.data (this process's slice)
  run = setup.build(config, mesh, spec=InputSpec...)   # no dataset: benchmarks, compile checks
  state = run.init_state()                             # or a restored checkpoint
  state, metrics = run.step(state, batch)              # compiled ahead of time, on first use

`build` decides everything a step depends on: the model (its config with the run's overrides),
the input (its per-example shapes and teacher widths), the objective (CLIP or DR), the loss,
durations and schedule, the optimizer (rule-based decay, lr multipliers, freezing), the state's
shardings (fsdp threshold, sharding rules) and the step (accumulation, donation, one XLA program
or two with the optimizer's update apart). The loop, the train benchmark, the tests and
launch/evaluate.py all come through here, so they run one step.
"""
import collections
import dataclasses
import functools
import logging
import math
import time
import types
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mobileclip_jax import checkpoint as ckpt_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import keys
from mobileclip_jax import losses
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax import utils
from mobileclip_jax.data import loader
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.models import coca as coca_lib
from mobileclip_jax.models import layers
from mobileclip_jax.train import optimizer as optimizer_lib
from mobileclip_jax.train import reporting
from mobileclip_jax.train import step as step_lib

log = logging.getLogger('mobileclip_jax')
ElementSpec = Dict[str, Tuple[Tuple[int, ...], np.dtype]]


# ----------------------------------------------------------------------------------------------
# The model.


def model_config(config: ml_collections.ConfigDict):
  """The variant `config.model.name` with the config's overrides (None = the variant's value):
  a clip.ModelConfig, or a coca.CoCaConfig for captioners ('coca_*')."""
  m = config.model
  captioner = m.name in coca_lib.COCA_CONFIGS
  overrides = dict(dtype=m.dtype)
  if captioner:
    clip_only = {'attention': (m.attention, 'softmax'), 'qk_norm': (m.qk_norm, False),
                 'bn_group_size': (m.bn_group_size, 0), 'inherit.masks': (config.inherit.masks, '')}
    changed = [k for k, (value, default) in clip_only.items() if value != default]
    if changed:
      raise ValueError(f'{m.name} is a CoCa captioner (open_clip softmax attention, no BatchNorm, '
                       f'no learned inheritance): leave {", ".join(changed)} at their defaults.')
  else:
    overrides.update(attention=m.attention, qk_norm=m.qk_norm, bn_group_size=m.bn_group_size)
  overrides.update(config_lib.overridden(ml_collections.ConfigDict(
      {'embed_dim': m.embed_dim, 'image_size': m.image_size,
       'init_logit_scale': m.init_logit_scale, 'init_logit_bias': m.init_logit_bias})))
  for tower in ('image', 'text', 'decoder'):
    tower_overrides = config_lib.overridden(m[tower])
    if tower_overrides and tower == 'decoder' and not captioner:
      raise ValueError(f'model.decoder overrides ({sorted(tower_overrides)}) are for CoCa '
                       f'captioners; {m.name} has no decoder.')
    if tower_overrides:
      overrides[tower] = tower_overrides
  return clip_lib.get_config(m.name, **overrides)


def build_model(config: ml_collections.ConfigDict, model_config_):
  """(the Flax module, the step's regularizer or None): CLIP or CoCa, or with `inherit.masks` the
  masked model of learned inheritance and its sparsity constraint (inheritance/masks.py)."""
  inherit = config.inherit
  if not inherit.masks:
    return clip_lib.model_from_config(model_config_), None
  from mobileclip_jax.inheritance import masks  # pylint: disable=g-import-not-at-top
  kinds = tuple(k.strip() for k in inherit.masks.split(',') if k.strip())
  ramp = config_lib.parse_duration(inherit.ramp, config.batch_size, None, 'inherit.ramp')
  return (masks.MaskedCLIP(model_config_, kinds, inherit.mask_init),
          masks.sparsity_regularizer(model_config_, kinds, inherit.target, ramp))


# ----------------------------------------------------------------------------------------------
# The input.


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the step needs to know of its input.

  Attributes:
    element_spec: per-example (shape, dtype) of each batch key (mobileclip_jax/keys.py).
    teacher_dims: per-teacher embedding widths (reinforced data), else ().
    num_examples: dataset size (durations in epochs need it), None if unknown.
    name: the dataset's name, for logs.
  """
  element_spec: ElementSpec
  teacher_dims: Tuple[int, ...] = ()
  num_examples: Optional[int] = None
  name: str = 'synthetic'

  @classmethod
  def synthetic(cls, model_config_: clip_lib.ModelConfig,
                teacher_dims: Tuple[int, ...] = ()) -> 'InputSpec':
    """The batch layout of a plain (no teacher_dims) or reinforced dataset, without one."""
    size, length = model_config_.image_size, model_config_.text.context_length
    spec = {keys.IMAGE: ((size, size, 3), np.dtype(np.uint8)),
            keys.TEXT: ((length,), np.dtype(np.int32))}
    if teacher_dims:
      width = sum(teacher_dims)
      spec[keys.SYN_TEXT] = ((length,), np.dtype(np.int32))
      spec.update({k: ((width,), np.dtype(np.float32)) for k in keys.TEACHERS})
    return cls(spec, tuple(teacher_dims))


@dataclasses.dataclass
class TrainInput:
  """An opened training dataset: this process's iterator and its spec."""
  name: str
  iterator: loader.TrainIterator

  @property
  def spec(self) -> InputSpec:
    return InputSpec(dict(self.iterator.element_spec), tuple(self.iterator.teacher_dims),
                     self.iterator.num_examples, self.name)

  def counters(self) -> Dict[str, float]:
    """Skipped (corrupt) examples so far, total and by reason, for the metrics."""
    counter = self.iterator.skip_counter
    out = {'data/skipped': float(counter.num_skipped())}
    out.update({f'data/skipped/{reason}': float(n) for reason, n in counter.skipped.items()})
    return out


def open_input(config: ml_collections.ConfigDict, model_config_: clip_lib.ModelConfig,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               skipped_log: Optional[str] = None) -> TrainInput:
  """This process's training iterator for `config.data` at the model's resolution.

  A dataset that is not built is an error naming the command that builds it (never built here).
  Every skipped (corrupt) record is listed in `skipped_log` (a local JSONL file) when given.
  """
  d = config.data
  input_config = loader.InputConfig(
      dataset=d.name, data_dir=d.data_dir, split=d.split, global_batch_size=config.batch_size,
      image_size=model_config_.image_size, tokenizer=d.tokenizer,
      context_length=model_config_.text.context_length, syn_key_regex=d.syn_key_regex,
      syn_key_weights=tuple(sorted(d.syn_key_weights.items())),
      seed=config.seed, worker_count=d.workers, prefetch_batches=d.prefetch,
      error_policy=d.error_policy, error_budget=d.max_corrupt,
      teachers=None if d.teachers is None else tuple(d.teachers), num_syn=d.num_syn)
  try:
    iterator = loader.make_train_iterator(input_config, process_index, process_count,
                                          skipped_log=skipped_log)
  except FileNotFoundError as e:
    hint = f'\nFor this config: {d.build_hint}' if d.build_hint else ''
    raise FileNotFoundError(f'{e}{hint}') from None
  return TrainInput(d.name, iterator)


# ----------------------------------------------------------------------------------------------
# Objective, durations, loss.


@dataclasses.dataclass(frozen=True)
class Objective:
  use_syn: bool
  use_teachers: bool
  captions: bool = False  # CoCa: caption cross-entropy + CLIP on the ground-truth captions.

  @property
  def description(self) -> str:
    if self.captions:
      return 'CoCa (caption cross-entropy + CLIP, ground-truth captions)'
    return ('DR (CLIP + distillation, gt + synthetic captions)' if self.use_teachers
            else 'CLIP (ground-truth captions)')


def select_objective(batch_keys, objective: str, captioner: bool = False) -> Objective:
  """'auto' | 'clip' | 'dr' | 'coca' given the batch's keys and whether the model is a CoCa
  captioner ('auto': 'coca' for captioners, else DR on reinforced data, CLIP on plain)."""
  reinforced = keys.SYN_TEXT in batch_keys and all(k in batch_keys for k in keys.TEACHERS)
  if objective not in ('auto', 'clip', 'dr', 'coca'):
    raise ValueError(f"loss.objective must be 'auto', 'clip', 'dr' or 'coca', got {objective!r}.")
  if captioner and objective not in ('auto', 'coca'):
    raise ValueError(f"loss.objective={objective!r} trains CLIP models; a CoCa captioner trains "
                     "with 'coca' (or 'auto').")
  if objective == 'coca' and not captioner:
    raise ValueError("loss.objective='coca' needs a CoCa captioner (model.name='coca_ViT-B-32', "
                     '...); this model has no text decoder.')
  if captioner:
    return Objective(False, False, captions=True)
  if objective == 'auto':
    return Objective(reinforced, reinforced)
  if objective == 'clip':
    return Objective(False, False)
  if not reinforced:
    raise ValueError("loss.objective='dr' needs a reinforced dataset (synthetic captions and "
                     'teacher embeddings); this one is plain image-caption data.')
  return Objective(True, True)


@dataclasses.dataclass(frozen=True)
class Durations:
  """Steps of the schedule and the checkpoint cadence (config durations resolved)."""
  total: int
  warmup: int
  constant: int
  checkpoint_every: int
  keep_every: Optional[int]


def durations(config: ml_collections.ConfigDict, num_examples: Optional[int]) -> Durations:
  parse = lambda value, name: config_lib.parse_duration(value, config.batch_size, num_examples,
                                                        name)
  keep = config.checkpoint.keep_every
  return Durations(
      total=parse(config.schedule.total, 'schedule.total'),
      warmup=parse(config.schedule.warmup, 'schedule.warmup'),
      constant=parse(config.schedule.constant, 'schedule.constant'),
      checkpoint_every=parse(config.checkpoint.every, 'checkpoint.every'),
      keep_every=parse(keep, 'checkpoint.keep_every') if keep else None)


def loss_config(config: ml_collections.ConfigDict, teacher_dims,
                captions: bool = False) -> losses.LossConfig:
  """The loss settings; teacher settings only matter (and are checked) for distillation, the
  caption weight for captioners."""
  loss = config.loss
  kwargs = dict(kind=loss.kind, clip_weight=loss.clip_weight, distill_weight=loss.distill_weight,
                gt_weight=loss.gt_weight, syn_weight=loss.syn_weight, average=loss.average,
                student_scale=loss.student_scale, block_size=loss.block_size,
                caption_weight=loss.caption_weight if captions else 0.0)
  if teacher_dims:
    scales = config_lib.as_tuple(loss.teacher_scales)
    if len(scales) != len(teacher_dims):
      raise ValueError(f'loss.teacher_scales has {len(scales)} values but the input has '
                       f'{len(teacher_dims)} teachers (dims {tuple(teacher_dims)}, as '
                       'data.teachers selects them); pass one scale per teacher, e.g. '
                       '--config.loss.teacher_scales=70,60.')
    kwargs.update(teacher_scales=scales, teacher_dims=tuple(teacher_dims),
                  teacher_biases=config_lib.as_tuple(loss.teacher_biases))
  return losses.LossConfig(**kwargs)


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  shards = sharding_lib.num_batch_shards(mesh)
  if config.batch_size % (config.accum_steps * shards):
    raise ValueError(f'batch_size {config.batch_size} must split into accum_steps='
                     f'{config.accum_steps} micro-batches over the {shards} devices of the mesh '
                     f'{dict(mesh.shape)}; use a multiple of {config.accum_steps * shards}.')


# ----------------------------------------------------------------------------------------------
# The run.


def _state_from(variables: Dict[str, Any], tx: Any) -> step_lib.TrainState:
  params = variables['params']
  return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             batch_stats=variables.get('batch_stats', {}),
                             opt_state=tx.init(params))


def _initial_state(model, tx: Any, rng: jax.Array) -> step_lib.TrainState:
  return _state_from(clip_lib.init_variables(model, rng), tx)


def _for_mesh(fn, mesh):
  """`fn` traced with only the towers' forms for the platform of the mesh's devices."""
  return layers.for_platform(fn, sharding_lib.platform(mesh))


@dataclasses.dataclass
class Run:
  """Everything a step needs, built by `build`. `step` compiles on first use."""
  config: ml_collections.ConfigDict
  mesh: Any
  model_config: Any                       # clip.ModelConfig, or coca.CoCaConfig for captioners.
  model: Any                              # clip.CLIP, coca.CoCa, or inheritance's MaskedCLIP.
  data: Optional[TrainInput]
  spec: InputSpec
  objective: Objective
  loss_config: losses.LossConfig
  durations: Durations
  schedule: Any
  tx: Any
  regularizer: Optional[Any]              # (params, step) -> (loss, metrics), added to the loss.
  state_shardings: step_lib.TrainState
  abstract_state: step_lib.TrainState     # ShapeDtypeStructs carrying the state's shardings.
  batch_sharding: Any
  lower_seconds: Optional[float] = None     # Tracing and lowering of `step`.
  compile_seconds: Optional[float] = None   # Compiling it, or loading it from the cache.

  @property
  def abstract_batch(self) -> Dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((self.config.batch_size,) + shape, dtype,
                                    sharding=self.batch_sharding)
            for k, (shape, dtype) in self.spec.element_spec.items()}

  def init_state(self) -> step_lib.TrainState:
    """A fresh state placed per its shardings; weights from `model.init_from` when set (nothing
    is then drawn at random, unless fresh inheritance masks need it)."""
    if self.config.model.init_from:
      return self._init_from(self.config.model.init_from)
    return self._random_state()

  def _random_state(self) -> step_lib.TrainState:
    init = functools.partial(_initial_state, self.model, self.tx)
    return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(self.config.seed))

  def _init_from(self, path: str) -> step_lib.TrainState:
    """Starts the weights from a model checkpoint or another run (fine-tuning, inheritance).

    The optimizer state is made from the loaded weights: compiling the random init of every
    parameter only to discard it cost seconds per start on CPU (S0's: 11-15 s).
    """
    variables, source_config = ckpt_lib.load_variables(path)
    params = dict(variables['params'])
    if keys.MASKS in self.abstract_state.params and keys.MASKS not in params:
      params[keys.MASKS] = self._random_state().params[keys.MASKS]  # Learned inheritance.
    got = jax.tree.map(lambda x: x.shape, params)
    want = jax.tree.map(lambda x: x.shape, self.abstract_state.params)
    if got != want:
      from mobileclip_jax.inheritance import stages  # pylint: disable=g-import-not-at-top
      raise ValueError(f'model.init_from={path} holds {source_config.name} parameters whose '
                       f'shapes differ from {self.model_config.name} with these overrides. '
                       + stages.init_from_hint(source_config, self.model_config, variables))
    placed = {'params': jax.device_put(params, self.state_shardings.params),
              'batch_stats': jax.device_put(variables.get('batch_stats', {}),
                                            self.state_shardings.batch_stats)}
    state = jax.jit(functools.partial(_state_from, tx=self.tx), donate_argnums=0,
                    out_shardings=self.state_shardings)(placed)
    log.info('Initialized the weights from %s (%s).', path, source_config.name)
    return state

  def _step_kwargs(self) -> Dict[str, Any]:
    return dict(mesh=self.mesh, accum_steps=self.config.accum_steps,
                use_syn=self.objective.use_syn, use_teachers=self.objective.use_teachers,
                captions=self.objective.captions, seed=self.config.seed)

  @functools.cached_property
  def grad_fn(self):
    """jit(state, batch) -> (loss, metrics, grads, batch statistics): the step before the
    optimizer (step.make_grad_fn), for checks against reference losses."""
    return jax.jit(_for_mesh(
        step_lib.make_grad_fn(self.model, self.loss_config, **self._step_kwargs()), self.mesh))

  @property
  def separate_update(self) -> bool:
    """Whether the step is two XLA programs, the optimizer's update apart (`update_program`)."""
    choice = self.config.update_program
    return choice == 'separate' or (choice == 'auto'
                                    and sharding_lib.platform(self.mesh) == 'cpu')

  @functools.cached_property
  def step(self) -> 'CompiledStep':
    """The compiled step: (state, batch) -> (state, metrics); the state is donated."""
    kwargs, norms = self._step_kwargs(), tuple(self.config.norm_metrics)
    states, replicated = self.state_shardings, sharding_lib.replicated(self.mesh)
    start = time.perf_counter()
    if self.separate_update:
      grad_fn = step_lib.make_grad_fn(self.model, self.loss_config, **kwargs)
      first = jax.jit(_for_mesh(grad_fn, self.mesh), in_shardings=(states, self.batch_sharding),
                      out_shardings=(replicated, replicated, states.params, states.batch_stats)
                      ).lower(self.abstract_state, self.abstract_batch)
      loss, metrics, _, _ = first.out_info
      update = step_lib.make_update(self.tx, regularizer=self.regularizer, norms=norms)
      lowered = [first, jax.jit(_for_mesh(update, self.mesh),
                                in_shardings=(states, replicated, replicated, states.params),
                                out_shardings=(states, replicated), donate_argnums=(0,)).lower(
                                    self.abstract_state, loss, metrics, self.abstract_state.params)]
    else:
      fn = step_lib.make_train_step(self.model, self.tx, self.loss_config,
                                    regularizer=self.regularizer, norms=norms, **kwargs)
      lowered = [jax.jit(_for_mesh(fn, self.mesh), in_shardings=(states, self.batch_sharding),
                         out_shardings=(states, replicated), donate_argnums=(0,)).lower(
                             self.abstract_state, self.abstract_batch)]
    self.lower_seconds = time.perf_counter() - start
    # Or loaded from the persistent compilation cache (the options are part of its key).
    options = _compiler_options(self.config, self.mesh)
    programs = tuple(program.compile(compiler_options=options) for program in lowered)
    self.compile_seconds = time.perf_counter() - start - self.lower_seconds
    utils.release_freed_host_memory()  # What compiling freed, before the step's buffers come.
    per_device = lambda x: math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return CompiledStep(programs, sum(map(per_device, jax.tree.leaves(
        (self.abstract_state, self.abstract_batch)))))

  def memory(self) -> Optional[str]:
    """Per-device memory of the compiled step (arguments, outputs, temporaries)."""
    return reporting.memory_summary(self.step)

  def param_counts(self) -> Dict[str, int]:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    params = self.abstract_state.params
    towers = {'image': 'visual', 'text': 'text', 'decoder': 'text_decoder'}
    return {k: count(params[v]) for k, v in towers.items() if v in params}


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The train step as compiled XLA programs, called as one: (state, batch) -> (state, metrics).

  One program, or two (`Run.separate_update`): the loss and gradients, then the optimizer's
  update. On XLA:CPU reading a program back from the persistent cache costs more than linearly in
  its operations (each program's thunk graph is built pairwise, README, Performance), so two
  halves read in about half the time of the whole (S0 at batch 8: 5.9 vs 12.7 s), for the
  gradients and statistics handed between them (the whole program holds them as temporaries).
  """
  programs: Tuple[Any, ...]
  argument_bytes: int  # Per device: the state and the batch.

  def __call__(self, state: step_lib.TrainState, batch: Dict[str, jax.Array]):
    if len(self.programs) == 1:
      return self.programs[0](state, batch)
    gradients, update = self.programs
    loss, metrics, grads, new_stats = gradients(state, batch)
    state, metrics = update(state, loss, metrics, grads)  # Donates the state.
    return state.replace(batch_stats=new_stats), metrics

  def memory_analysis(self) -> Optional[Any]:
    """Per-device bytes: arguments (state and batch), outputs, aliased, and temporaries: of two
    programs, the larger one's own plus what the first hands to the second."""
    stats = [program.memory_analysis() for program in self.programs]
    if len(stats) == 1:
      return stats[0]
    first, last = stats
    if first is None or last is None:
      return None
    return types.SimpleNamespace(
        argument_size_in_bytes=self.argument_bytes,  # The first program reads no optimizer state.
        output_size_in_bytes=last.output_size_in_bytes,
        alias_size_in_bytes=last.alias_size_in_bytes,
        temp_size_in_bytes=max(first.temp_size_in_bytes, last.temp_size_in_bytes)
        + first.output_size_in_bytes)

  def cost_analysis(self) -> Dict[str, float]:
    """XLA's cost estimates summed over the programs ('flops', 'bytes accessed', ...)."""
    total = collections.Counter()
    for program in self.programs:
      total.update({k: v for k, v in utils.cost_analysis(program).items()
                    if isinstance(v, (int, float))})
    return dict(total)


UPDATE_PROGRAMS = ('auto', 'separate', 'fused')
_CPU_SCHEDULERS = {'memory': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
                   'concurrency': 'CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED'}


def _compiler_options(config: ml_collections.ConfigDict, mesh) -> Optional[Dict[str, str]]:
  """XLA options of the train step: on CPU, `config.cpu_scheduler`'s scheduler."""
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  return {'xla_cpu_scheduler_type': _CPU_SCHEDULERS[config.cpu_scheduler]}


def build(config: ml_collections.ConfigDict, mesh, *, spec: Optional[InputSpec] = None,
          process_index: Optional[int] = None, process_count: Optional[int] = None,
          skipped_log: Optional[str] = None) -> Run:
  """Assembles the run of `config` on `mesh` (see the module docstring).

  Args:
    config: a training config (mobileclip_jax/config.py).
    mesh: the device mesh (sharding.create_mesh).
    spec: the input's layout when no dataset should be opened; None opens `config.data` for this
      process (process_index/count default to JAX's), listing skipped records in `skipped_log`.
  """
  check_batch(config, mesh)
  unknown = sorted(set(config.norm_metrics) - set(step_lib.NORM_METRICS))
  if unknown:
    raise ValueError(f'norm_metrics={tuple(config.norm_metrics)!r}: {unknown} not among '
                     f'{step_lib.NORM_METRICS} (grad_norm is always logged).')
  if config.cpu_scheduler not in _CPU_SCHEDULERS:
    raise ValueError(f'cpu_scheduler={config.cpu_scheduler!r}: use one of '
                     f'{", ".join(map(repr, _CPU_SCHEDULERS))}.')
  if config.update_program not in UPDATE_PROGRAMS:
    raise ValueError(f'update_program={config.update_program!r}: use one of '
                     f'{", ".join(map(repr, UPDATE_PROGRAMS))}.')
  model_config_ = model_config(config)
  if config.loss.kind == 'sigmoid' and model_config_.init_logit_bias is None:
    raise ValueError("loss.kind='sigmoid' needs a learned logit bias: set model.init_logit_bias "
                     '(SigLIP: model.init_logit_bias=-10 with model.init_logit_scale=2.3026, '
                     'log 10).')
  model, regularizer = build_model(config, model_config_)
  data = None
  if spec is None:
    data = open_input(config, model_config_, process_index, process_count, skipped_log)
    spec = data.spec
  objective = select_objective(spec.element_spec, config.loss.objective,
                               isinstance(model_config_, coca_lib.CoCaConfig))
  steps = durations(config, spec.num_examples)
  schedule = optimizer_lib.lr_schedule(config.optim.lr, steps.total, steps.warmup,
                                       config.schedule.kind, steps.constant)
  # Traced once: the optimizer's rules need the parameter tree.
  abstract_variables = jax.eval_shape(functools.partial(clip_lib.init_variables, model),
                                      jax.random.PRNGKey(0))
  o = config.optim
  eps = optimizer_lib.default_eps(model_config_.name) if o.eps is None else o.eps
  tx = optimizer_lib.make_optimizer(
      abstract_variables['params'], schedule, b1=o.b1, b2=o.b2, eps=eps,
      weight_decay=o.weight_decay, grad_clip=o.grad_clip, wd_rules=o.wd_rules,
      lr_rules=o.lr_rules, freeze=o.freeze)
  abstract = jax.eval_shape(functools.partial(_state_from, tx=tx), abstract_variables)
  shardings = sharding_lib.infer_shardings(abstract, mesh, rules=config.sharding.rules,
                                           min_fsdp_size=config.sharding.min_fsdp_size)
  return Run(
      config=config, mesh=mesh, model_config=model_config_, model=model, data=data, spec=spec,
      objective=objective,
      loss_config=loss_config(config, spec.teacher_dims if objective.use_teachers else None,
                              objective.captions),
      durations=steps, schedule=schedule, tx=tx, regularizer=regularizer,
      state_shardings=shardings,
      abstract_state=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings),
      batch_sharding=sharding_lib.batch_sharding(mesh))


def build_evaluators(config: ml_collections.ConfigDict, model_config_: clip_lib.ModelConfig,
                     mesh) -> List[Any]:
  """The evaluators of `config.evals` (see mobileclip_jax.evaluation)."""
  if not config.evals:
    return []
  from mobileclip_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.build_evaluators(config.evals, model_config_, mesh)

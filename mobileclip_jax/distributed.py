"""Multi-process JAX, started one way by every launcher (train, evaluate, reinforce).

`initialize` calls `jax.distributed.initialize` when the run has several processes: given
explicitly (coordinator address, process count and id: flags or `config.distributed`), or found in
the environment of a cluster (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS), which JAX reads
itself. A single process (no coordinator, no cluster) is left alone. CPU processes exchange
collectives over gloo; GPUs and TPUs ignore that setting.
"""
import dataclasses
import os
from typing import Optional

from absl import flags
import jax

_CLUSTER_ENV = ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                'JAX_COORDINATOR_ADDRESS')


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to find the other processes (config `distributed`, or the launchers' flags)."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  heartbeat_timeout_s: int = 100
  initialization_timeout_s: int = 300

  @classmethod
  def from_config(cls, d) -> 'Settings':
    return cls(d.coordinator_address, d.num_processes, d.process_id, d.heartbeat_timeout_s,
               d.initialization_timeout_s)


def initialize(settings: Settings = Settings()) -> None:
  """Joins the other processes of this run, if there are any (see the module docstring)."""
  explicit = settings.coordinator_address is not None
  cluster = any(os.environ.get(v) for v in _CLUSTER_ENV)
  if not (explicit or cluster) or jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=settings.initialization_timeout_s,
                heartbeat_timeout_seconds=settings.heartbeat_timeout_s)
  if explicit:
    if settings.num_processes is None or settings.process_id is None:
      raise ValueError('A coordinator address needs the number of processes and this process\'s '
                       'id too (--coordinator_address, --num_processes, --process_id).')
    kwargs.update(coordinator_address=settings.coordinator_address,
                  num_processes=settings.num_processes, process_id=settings.process_id)
  jax.distributed.initialize(**kwargs)


def define_flags() -> None:
  """The flags of a launcher without a training config (evaluate, reinforce)."""
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process '
                      'run outside a cluster that JAX detects (TPU pods, SLURM, Open MPI).')
  flags.DEFINE_integer('num_processes', None, 'Processes of the run (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')


def settings_from_flags() -> Settings:
  f = flags.FLAGS
  return Settings(f.coordinator_address, f.num_processes, f.process_id)

"""Stage 1 of a build on Apache Beam: the shards processed in parallel by any Beam runner.

TFDS's route for datasets too large for one machine: `dataset_build.build_dataset(...,
runner='beam')` makes `ReinforcedDatasetBuilder._generate_examples` return `examples(jobs)`, and
TFDS's Beam writer shuffles and writes the ArrayRecord files in the same pipeline. Each shard is
one unit of work (`shard_staging.process_shard`, as in the local runner), so Dataflow, Flink or
Spark scale it over workers; a retried shard rewrites the same per-shard result files. Skips
are also reported as Beam counters ('mobileclip_jax' namespace: 'accepted' and one per reason)
so that a runner's UI shows them while the job runs.
"""
from typing import Any, Iterator, Sequence

import apache_beam as beam

from mobileclip_jax.data import shard_staging

_NAMESPACE = 'mobileclip_jax'


class _ProcessShard(beam.DoFn):
  """One shard job -> its (record key, example) pairs; writes the shard's counts and list."""

  def process(self, job: shard_staging.ShardJob) -> Iterator[tuple[str, dict[str, Any]]]:
    result = shard_staging.ShardResult()
    yield from shard_staging.process_shard(job, result)
    shard_staging.write_result(job, result, fingerprint=None)
    beam.metrics.Metrics.counter(_NAMESPACE, 'accepted').inc(result.counter.accepted)
    for reason, count in result.counter.skipped.items():
      beam.metrics.Metrics.counter(_NAMESPACE, reason).inc(count)


def examples(jobs: Sequence[shard_staging.ShardJob]) -> beam.PTransform:
  """The PTransform TFDS applies to its pipeline: shard jobs -> (record key, example)."""
  # Reshuffle: without it a runner may fuse Create with the processing onto one worker.
  return (beam.Create(list(jobs)) | 'ShardsToWorkers' >> beam.Reshuffle()
          | 'ReadValidate' >> beam.ParDo(_ProcessShard()))

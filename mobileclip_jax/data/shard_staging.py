"""Stage 1 of a build: each input shard read, validated and turned into examples, with its counts.

Both runners go through `process_shard`: the local runner (`stage_local`) writes each shard's
examples to a staging file in a process pool and resumes after a crash; the Beam runner
(beam_build.py) hands them to TFDS's Beam writer. Either way each shard leaves, in the staging
folder, written atomically once the shard is done:
  <index>.skipped.jsonl  its skipped samples, one JSON line each (shard, key, reason, count, detail)
  <index>.json           its counts (`SkipCounter`), what the tar reader found (`wds.ShardStats`)
                         and a fingerprint of the inputs and settings (written last: the marker
                         that the shard is done)
`finish` merges them into the totals, adds the estimated loss of shards cut with no manifest,
writes the full list (`reinforced_tfds.SKIPPED_FILE` in the staging folder) and checks the
budget on the totals.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
from typing import Any, Iterator, Sequence

from etils import epath
import tqdm

from mobileclip_jax import utils
from mobileclip_jax.data import errors
from mobileclip_jax.data import sample_checks
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import uid_join
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import (BudgetExceededError, CorruptSampleError, ErrorPolicy,
                                        SkipCounter)
from mobileclip_jax.data.reinforced_tfds import SKIPPED_FILE, DatasetMetadata

# Expected when joining DataCompDR-12M with downloaded images: counted, never budgeted.
JOIN_MISSES = frozenset({errors.NO_IMAGE_FOR_UID, errors.IMAGE_WITHOUT_SAMPLE})


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """Everything a worker needs to process one input shard."""
  index: int
  shard: str
  image_shard: str | None
  name: str  # The shard's path relative to the common folder of all shards: key prefix.
  meta: DatasetMetadata
  policy: ErrorPolicy
  staging_dir: str

  def _path(self, suffix: str) -> str:
    return os.path.join(self.staging_dir, f'{self.index:08d}{suffix}')

  @property
  def examples_path(self) -> str:
    return self._path('.examples')

  @property
  def stats_path(self) -> str:
    return self._path('.json')

  @property
  def skipped_path(self) -> str:
    return self._path('.skipped.jsonl')

  def fingerprint(self) -> str:
    """Hash of the inputs (path, size, mtime) and of every setting that shapes the output."""
    files = []
    for path in (self.shard, self.image_shard):
      if path and '://' in path:
        stat = epath.Path(path).stat()
        files.append((path, stat.length, stat.mtime))
      elif path:
        files.append((path, os.stat(path).st_size, os.stat(path).st_mtime_ns))
    settings = dataclasses.replace(self.meta, source_shards=(), image_shards=(), skipped={})
    payload = json.dumps([files, self.name, settings.to_json(), self.policy.mode,
                          sorted(self.policy.exempt)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class _Rows(list):
  """Skipped-sample rows of one shard, gathered as `ErrorPolicy.handle`'s log."""

  def write(self, error: CorruptSampleError, **extra: Any) -> None:
    self.append({**error.to_json(), **extra})


@dataclasses.dataclass
class ShardResult:
  """What processing one shard counted: its skips, listed, and what its tars held."""
  counter: SkipCounter = dataclasses.field(default_factory=SkipCounter)
  stats: list[wds.ShardStats] = dataclasses.field(default_factory=list)
  rows: _Rows = dataclasses.field(default_factory=_Rows)


def process_shard(job: ShardJob, result: ShardResult) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (record key, example) for every good sample of the job's shard (joined with its
  image shard); counts and lists the rest in `result` (raises under policy 'fail')."""

  def handle(error: CorruptSampleError) -> None:
    job.policy.handle(error, result.counter, result.rows, check_budget=False)

  stats = wds.ShardStats(job.shard)
  result.stats.append(stats)
  samples = wds.iter_samples(job.shard, handle, stats)
  if job.image_shard:
    image_stats = wds.ShardStats(job.image_shard)
    result.stats.append(image_stats)
    samples = uid_join.join_by_uid(samples, wds.iter_samples(job.image_shard, handle,
                                                             image_stats), handle)
  reinforced = job.meta.kind == 'reinforced'
  for raw in samples:
    try:
      sample = sample_codec.decode_sample(raw, reinforced, job.meta.syn_key_regex)
      key = f'{job.name}/{raw.key}'
      example = sample_checks.make_example(sample, key, job.meta)
    except CorruptSampleError as e:
      handle(e)
      continue
    result.counter.ok()
    yield key, example


def write_result(job: ShardJob, result: ShardResult, fingerprint: str | None) -> None:
  """Writes the shard's list, then its counts (the marker that the shard is done)."""
  with utils.atomic_write(job.skipped_path) as f:
    f.writelines(json.dumps(row) + '\n' for row in result.rows)
  utils.write_json_atomic(job.stats_path, {
      'fingerprint': fingerprint, 'shard': job.shard, 'counter': result.counter.to_json(),
      'stats': [s.to_json() for s in result.stats]})


def read_result(job: ShardJob, fingerprint: str | None = None) -> ShardResult | None:
  """The result a run left for this shard (with this fingerprint, if given), else None."""
  try:
    with epath.Path(job.stats_path).open('r') as f:
      data = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if fingerprint is not None and data.get('fingerprint') != fingerprint:
    return None
  if 'stats' not in data or not epath.Path(job.skipped_path).exists():
    return None  # Staged by an older version without the lists: staged again.
  return ShardResult(SkipCounter.from_json(data['counter']),
                     [wds.ShardStats(**s) for s in data['stats']])


# ----------------------------------------------------------------------------------------------
# The local runner.


def stage_shard(job: ShardJob) -> SkipCounter:
  """Processes one shard into its staging files (runs in a worker process); returns its counts."""
  result = ShardResult()
  tmp = epath.Path(f'{job.examples_path}.{os.getpid()}.tmp')
  try:
    with tmp.open('wb') as f:
      for _, example in process_shard(job, result):
        pickle.dump(example, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(job.examples_path)
  finally:
    tmp.unlink(missing_ok=True)
  write_result(job, result, job.fingerprint())
  return result.counter


def read_staged(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(record key, example) of a staging file, in order."""
  with epath.Path(path).open('rb') as f:
    while True:
      try:
        example = pickle.load(f)
      except EOFError:
        return
      yield example['key'], example


def stage_local(jobs: Sequence[ShardJob], workers: int, policy: ErrorPolicy,
                progress: bool) -> tuple[int, int]:
  """Stages every shard not staged before (the budget checked on the totals as they come).

  Returns:
    (shards reused from an earlier run, samples read now).
  """
  total, todo, done = SkipCounter(), [], []
  for job in jobs:
    if epath.Path(job.examples_path).exists() and (
        staged := read_result(job, job.fingerprint())) is not None:
      total.merge(staged.counter)
      done.append(job)
    else:
      todo.append(job)
  reused, read = len(done), 0

  def check() -> None:
    try:
      policy.check(total)
    except BudgetExceededError:  # Again, naming the list of what was skipped so far.
      policy.check(total, log_path=write_list(done, [], jobs[0].staging_dir))

  check()
  bar = tqdm.tqdm(desc=f'Validating {len(todo)} shards ({reused} done before)', unit=' samples',
                  disable=not progress, smoothing=0.1)

  def finished(job: ShardJob, counter: SkipCounter) -> None:
    nonlocal read
    done.append(job)
    read += counter.seen
    total.merge(counter)
    bar.update(counter.seen)
    bar.set_postfix(shards=f'{len(done)}/{len(jobs)}', skipped=sum(total.skipped.values()))
    check()

  with bar:
    if workers <= 1 or len(todo) <= 1:
      for job in todo:
        finished(job, stage_shard(job))
    else:
      # 'spawn': the parent may have started JAX's threads, which fork() does not survive.
      context = multiprocessing.get_context('spawn')
      with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)),
                                                  mp_context=context) as pool:
        futures = {pool.submit(stage_shard, job): job for job in todo}
        try:
          for future in concurrent.futures.as_completed(futures):
            finished(futures[future], future.result())
        except BaseException:
          # Shards already running finish and stay staged for the next run.
          pool.shutdown(wait=True, cancel_futures=True)
          raise
  return reused, read


# ----------------------------------------------------------------------------------------------
# Both runners: the totals.


def finish(jobs: Sequence[ShardJob], policy: ErrorPolicy, staging_dir: str
           ) -> tuple[SkipCounter, str]:
  """Merges every shard's result, adds the estimated loss of shards cut with no manifest, writes
  the full skipped-samples list and checks the budget on the totals.

  Returns:
    (the totals, the path of the list). Raises BudgetExceededError naming the list.
  """
  total, stats = SkipCounter(), {'src': [], 'images': []}
  for job in jobs:
    result = read_result(job)
    if result is None:
      raise RuntimeError(f'Shard {job.shard} has no result in {staging_dir}: was the staging '
                         'folder changed during the build?')
    total.merge(result.counter)
    stats['src'].append(result.stats[0])
    stats['images'].extend(result.stats[1:])
  extra = _Rows()
  for group in stats.values():
    for error in wds.estimate_cut_loss(group):
      policy.handle(error, total, extra, check_budget=False)
  list_path = write_list(jobs, extra, staging_dir)
  policy.check(total, final=True, log_path=list_path)
  return total, list_path


def write_list(jobs: Sequence[ShardJob], extra: Sequence[dict[str, Any]], staging_dir: str) -> str:
  """Joins the skipped-sample lists of `jobs` (in order) and `extra` into SKIPPED_FILE."""
  path = os.path.join(staging_dir, SKIPPED_FILE)

  def lines() -> Iterator[str]:
    for job in jobs:
      with epath.Path(job.skipped_path).open('r') as f:
        yield from f
    yield from (json.dumps(row) + '\n' for row in extra)

  with utils.atomic_write(path) as f:
    f.writelines(lines())
  return path

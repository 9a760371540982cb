"""Building a reinforced (or plain) TFDS dataset from tar shards, on one machine or on Apache Beam.

`build_dataset` turns DataCompDR-style webdataset shards (wds.py) into the TFDS ArrayRecord
dataset of reinforced_tfds.py:
  1. Layout: k, teacher widths and caption keys from the arguments, else the consensus of the
     first samples (dataset_layout.py).
  2. Stage 1, per shard (shard_staging.py): read (resyncing over damage), join (DataCompDR-12M
     + image shards), decode and validate every sample (sample_checks.py); corrupt samples go
     through an `ErrorPolicy` (fail, or skip within a budget), counted by reason and listed.
  3. Stage 2: a `tfds.core.GeneratorBasedBuilder` writes ArrayRecord. Record keys are
     '<shard path>/<sample key>', so a rebuild gives the same data.
Runner 'local' does stage 1 in a process pool into per-shard staging files, resumable after a
crash, and checks the budget before anything is written. Runner 'beam' does both stages in one
Apache Beam pipeline (TFDS's route for large datasets: Dataflow, Flink, Spark, or the
DirectRunner) and checks the budget when the pipeline is done, before the dataset is moved
into place. Both write the same records, the same counts, and the list of every skipped
sample (`reinforced_tfds.SKIPPED_FILE`) beside the dataset (in the staging folder if the budget
fails).
"""
import dataclasses
import os
import posixpath
import re
import time
from typing import Any, Iterator, Sequence

from etils import epath
import tensorflow_datasets as tfds

from mobileclip_jax.data import dataset_layout
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import shard_staging
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError, ErrorPolicy, SkipCounter
from mobileclip_jax.data.reinforced_tfds import (SKIPPED_FILE, VERSION, DatasetMetadata,
                                                 dataset_dir, features)

RUNNERS = ('local', 'beam')


class ReinforcedDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the examples of the shard jobs as one 'train' split of ArrayRecord files.

  With runner 'local' the examples come from the staging files of `shard_staging.stage_local`;
  with 'beam' from a Beam pipeline over the jobs, after which the totals are checked against
  the budget (a failure leaves no dataset). The dataset name is chosen per build (so it is an
  instance attribute, as in tfds' ReadOnlyBuilder); readers need only the folder it writes.
  """
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Reinforced or plain image-caption examples from tar shards.'}
  # tfds looks for a checksums file next to a packaged builder's code through the
  # importlib_resources backport, which it does not install on Python >= 3.9. Nothing here is
  # downloaded, so there is no such file.
  code_path = None

  def __init__(self, *, name: str, metadata: DatasetMetadata,
               jobs: Sequence[shard_staging.ShardJob], runner: str, staging_dir: str,
               data_dir: str):
    self.name = name
    self._metadata, self._jobs, self._runner = metadata, tuple(jobs), runner
    self._staging_dir = staging_dir
    self.counter: SkipCounter | None = None
    super().__init__(data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() looks for README files next to the module.
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self._metadata.kind} image-caption data built by '
        'mobileclip_jax launch/build_dataset.py', features=features(self._metadata),
        metadata=tfds.core.MetadataDict(self._metadata.to_json()))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self) -> Any:
    if self._runner == 'beam':
      from mobileclip_jax.data import beam_build  # pylint: disable=g-import-not-at-top
      return beam_build.examples(self._jobs)
    return self._staged_examples()

  def _staged_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    for job in self._jobs:
      yield from shard_staging.read_staged(job.examples_path)

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
  # before and "downloaded and prepared ..." after a build; nothing is downloaded here, and
  # build() reports what it wrote.
  def _log_download_bytes(self) -> None:
    print(f'Writing the {self.name} dataset (ArrayRecord files) to {self.data_dir}...',
          flush=True)

  def _log_download_done(self) -> None:
    pass

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is the folder TFDS renames into place once this returns.
    if self._runner == 'beam':
      policy = self._jobs[0].policy
      self.counter, _ = shard_staging.finish(self._jobs, policy, self._staging_dir)
      self.info.metadata['skipped'] = self.counter.to_json()
    epath.Path(self._staging_dir, SKIPPED_FILE).copy(epath.Path(self.data_dir, SKIPPED_FILE))


@dataclasses.dataclass
class BuildReport:
  """What a build did: output folder, examples written, skips by reason, shards and time."""
  path: str
  num_examples: int
  counter: SkipCounter
  num_shards: int
  shards_reused: int
  samples_read: int  # by this run (shards staged before are not read again)
  seconds: float
  metadata: DatasetMetadata

  @property
  def skipped_list(self) -> str:
    """Every skipped sample, one JSON line each (shard, key, reason, count, detail)."""
    return os.path.join(self.path, SKIPPED_FILE)

  def summary(self) -> str:
    rate = self.samples_read / self.seconds if self.seconds > 0 else 0.0
    return '\n'.join([
        f'Wrote {self.num_examples} {self.metadata.kind} examples to {self.path} in '
        f'{self.seconds:.1f} s ({rate:.0f} samples/s).',
        f'Input: {self.num_shards} shards ({self.shards_reused} staged by an earlier run).',
        self.counter.summary(self.skipped_list)])


def _absolute(path: str) -> str:
  return path if '://' in path else os.path.abspath(path)


def _common_folder(paths: Sequence[str]) -> str:
  """The deepest folder holding every path (URLs too: split on '/' only)."""
  parts = [posixpath.dirname(p).split('/') for p in paths]
  common = []
  for level in zip(*parts):
    if len(set(level)) > 1:
      break
    common.append(level[0])
  return '/'.join(common)


def build_dataset(src: str | Sequence[str], name: str, data_dir: str, *,
                  images_src: str | Sequence[str] | None = None, kind: str = 'auto',
                  runner: str = 'local', beam_options: Any = None, workers: int = 1,
                  policy: ErrorPolicy = ErrorPolicy(), emb_dtype: str = 'float16',
                  teachers: Sequence[str] | None = None,
                  teacher_dims: Sequence[int] | None = None, k: int | None = None,
                  augmentation: dict[str, Any] | None = None, tokenizer: str = 'clip',
                  syn_key_regex: str = sample_codec.DEFAULT_SYN_KEY_REGEX,
                  staging_dir: str | None = None, keep_staging: bool = False,
                  overwrite: bool = False, progress: bool = True) -> BuildReport:
  """Builds the TFDS dataset `name` in `data_dir` from tar shards; see the module docstring.

  Args:
    src: shard patterns (see `wds.expand_shards`); local paths or URLs.
    name: dataset name (lower_snake_case).
    data_dir: TFDS data folder; the dataset goes to <data_dir>/<name>/<VERSION>.
    images_src: image+caption shards to join with `src` shard by shard (DataCompDR-12M).
    kind: 'reinforced', 'plain' or 'auto' (reinforced if most first samples have paug or
      embeddings).
    runner: 'local' (a process pool, resumable) or 'beam' (an Apache Beam pipeline).
    beam_options: with runner 'beam', `apache_beam.options.pipeline_options.PipelineOptions`
      (the runner, e.g. DataflowRunner, and its settings); None: the DirectRunner.
    workers: with runner 'local', processes validating shards in parallel.
    policy: what to do with corrupt samples.
    emb_dtype: storage of the embeddings: 'float16', 'bfloat16' or 'float32'.
    teachers, teacher_dims: teacher names and widths; widths are inferred if the embeddings
      are concatenations of equal-width unit-norm slices.
    k: augmentations kept per sample (default: what most of the first samples store).
    augmentation: the augmentation config (required for reinforced data).
    tokenizer: tokenizer spec string recorded in the metadata.
    syn_key_regex: which syn.json keys are synthetic captions.
    staging_dir: where per-shard results (and, locally, staged examples) go (default
      <data_dir>/<name>.staging); kept after a failure, so that a local rerun resumes and the
      skipped-samples list can be read; deleted after success unless `keep_staging`.
    overwrite: replace an existing build of this dataset.
    progress: show progress bars (local runner).

  Returns:
    A `BuildReport`. Raises `CorruptSampleError` (policy 'fail') naming shard and sample, or
    `BudgetExceededError` (policy 'skip') with the counts by reason and where the list is.
  """
  start = time.time()
  if runner not in RUNNERS:
    raise ValueError(f'Unknown runner {runner!r}: use one of {RUNNERS}.')
  data_dir = os.path.expanduser(data_dir)
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'Dataset name {name!r} must be lower_snake_case (TFDS naming).')
  out_dir = epath.Path(dataset_dir(name, data_dir))
  built_before = (out_dir / 'dataset_info.json').exists()
  if built_before and not overwrite:
    raise FileExistsError(f'{out_dir} already holds a built dataset {name!r}; pass '
                          '--overwrite to rebuild it or choose another --name.')
  shards = [_absolute(p) for p in wds.expand_shards(src)]
  image_shards = [_absolute(p) for p in wds.expand_shards(images_src)] if images_src else None
  if image_shards is not None and len(image_shards) != len(shards):
    raise ValueError(f'--images_src has {len(image_shards)} shards but --src has {len(shards)}: '
                     'they are joined shard by shard, in pattern order.')
  if image_shards:
    policy = dataclasses.replace(policy, exempt=policy.exempt | shard_staging.JOIN_MISSES)

  meta = dataset_layout.metadata_for(
      shards, image_shards, kind, teachers=teachers, teacher_dims=teacher_dims, k=k,
      augmentation=augmentation, emb_dtype=emb_dtype, tokenizer=tokenizer,
      syn_key_regex=syn_key_regex)
  staging_dir = staging_dir or os.path.join(data_dir, f'{name}.staging')
  epath.Path(staging_dir).mkdir(parents=True, exist_ok=True)
  root = _common_folder(shards)
  job_meta = dataclasses.replace(meta, source_shards=(), image_shards=())
  jobs = [shard_staging.ShardJob(i, shard, image_shards[i] if image_shards else None,
                                 shard[len(root) + 1:], job_meta, policy, staging_dir)
          for i, shard in enumerate(shards)]
  reused, samples_read, counter = 0, 0, None
  if runner == 'local':
    reused, samples_read = shard_staging.stage_local(jobs, workers, policy, progress)
    counter, _ = shard_staging.finish(jobs, policy, staging_dir)
    meta = dataclasses.replace(meta, skipped=counter.to_json())
  if built_before:  # Removed only now that the new data is staged.
    out_dir.rmtree()
  builder = ReinforcedDatasetBuilder(name=name, metadata=meta, jobs=jobs, runner=runner,
                                     staging_dir=staging_dir, data_dir=data_dir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_options=beam_options))
  except Exception as e:  # pylint: disable=broad-except
    # Beam wraps a worker's exception (RuntimeError: ... [while running ...]): the corrupt
    # sample that stopped the build under policy 'fail' is the one to report.
    cause = e
    while cause is not None and not isinstance(cause, CorruptSampleError):
      cause = cause.__cause__ or cause.__context__
    if cause is None or cause is e:
      raise
    raise cause from None
  if runner == 'beam':
    counter = builder.counter
    samples_read = counter.seen
    meta = dataclasses.replace(meta, skipped=counter.to_json())
  if not keep_staging:
    epath.Path(staging_dir).rmtree()
  return BuildReport(path=os.fspath(builder.data_dir),
                     num_examples=builder.info.splits['train'].num_examples, counter=counter,
                     num_shards=len(shards), shards_reused=reused, samples_read=samples_read,
                     seconds=time.time() - start, metadata=meta)

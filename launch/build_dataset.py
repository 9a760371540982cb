r"""DataCompDR-style webdataset shards -> a TFDS (ArrayRecord) dataset for training.

Reinforced data (images, captions, synthetic captions, stored augmentations, teacher
embeddings), e.g. DataCompDR-12M joined with its DataComp-12M images:

  python launch/build_dataset.py --name=datacompdr12m --data_dir=~/tensorflow_datasets \
    --src='dr12m/{00000000..00001023}.tar' --images_src='dc12m/{00000000..00001023}.tar' \
    --reinforce_config=datacompdr12m.json --teacher_dims=768,768 \
    --workers=16 --policy=skip --max_corrupt=0.01

Plain image-caption data (teachers, the no-distillation baseline): --kind=plain. The local
build resumes after a crash: rerun the same command. Prints what was written and what was
skipped; every skipped sample is listed in skipped_samples.jsonl beside the dataset.

Too large for one machine (DataCompDR-1B): --runner=beam runs the same build as an Apache Beam
pipeline (pip install -e '.[beam]'), e.g. on Dataflow:

  OPTS=runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,setup_file=./setup.py
  python launch/build_dataset.py --runner=beam --name=datacompdr1b --data_dir=gs://B/tfds \
    --src='gs://B/dr1b/{00..64}/{00000000..00000999}.tar' ... --beam_pipeline_options=$OPTS
"""
import os
import sys

from absl import app
from absl import flags

from mobileclip_jax import cli
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data.errors import BudgetExceededError, CorruptSampleError, ErrorPolicy

_SRC = flags.DEFINE_string('src', None, "Input tar shards: braces, globs, a folder; '::' joins "
                           'several patterns.', required=True)
_NAME = flags.DEFINE_string('name', None, 'Dataset name (lower_snake_case).', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('TFDS_DATA_DIR',
                                                           '~/tensorflow_datasets'),
                                'TFDS data folder; the dataset goes to DATA_DIR/NAME/VERSION.')
_IMAGES_SRC = flags.DEFINE_string('images_src', None, 'Image+caption shards joined with --src '
                                  'shard by shard on the uid (DataCompDR-12M + DataComp-12M).')
_KIND = flags.DEFINE_enum('kind', 'auto', ['auto', 'reinforced', 'plain'],
                          'reinforced: with augmentations and teacher embeddings; plain: images '
                          'and captions only; auto: reinforced if the shards have them.')
_RUNNER = flags.DEFINE_enum('runner', 'local', list(dataset_build.RUNNERS),
                            'local: a process pool on this machine (resumable); beam: an Apache '
                            'Beam pipeline (Dataflow, Flink, Spark; see --beam_pipeline_options).')
_BEAM_OPTIONS = flags.DEFINE_string(
    'beam_pipeline_options', None, "With --runner=beam: comma-separated key=value Beam pipeline "
    "options, e.g. 'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,"
    "setup_file=./setup.py'; none: the DirectRunner on this machine.")
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'With --runner=local: processes '
                                'validating shards.')
_POLICY = flags.DEFINE_enum('policy', 'fail', ['fail', 'skip'],
                            'Corrupt samples: fail at the first, or skip and count them.')
_MAX_CORRUPT = flags.DEFINE_string('max_corrupt', None, "With --policy=skip: the most samples "
                                   "to skip, a count ('100') or a fraction ('0.01', '1%'), "
                                   'checked on the totals at the end (and mid-run locally).')
_EMB_DTYPE = flags.DEFINE_enum('emb_dtype', None, sorted(reinforced_tfds.EMB_DTYPES),
                               'Storage dtype of the teacher embeddings (default: the reinforce '
                               "config's, else float16).")
_TEACHERS = flags.DEFINE_list('teachers', None, 'Teacher names, in embedding-slice order.')
_TEACHER_DIMS = flags.DEFINE_list('teacher_dims', None, 'Per-teacher embedding widths, e.g. '
                                  '768,768 (inferred for equal widths if not given).')
_K = flags.DEFINE_integer('k', None, 'Augmentations kept per sample (default: what most of '
                          'the first samples store).')
_REINFORCE_CONFIG = flags.DEFINE_string(
    'reinforce_config', None, 'JSON generation config (as ml-mobileclip training/configs/'
    'datacompdr12m.json) or a bare augmentation config: required for reinforced data.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer spec recorded in the metadata '
                                 "(default: the reinforce config's, else 'clip').")
_SYN_KEY_REGEX = flags.DEFINE_string('syn_key_regex', None, 'syn.json keys that hold synthetic '
                                     "captions (default: the reinforce config's, else "
                                     f'{sample_codec.DEFAULT_SYN_KEY_REGEX!r}).')
_STAGING_DIR = flags.DEFINE_string('staging_dir', None, 'Per-shard staging files (default '
                                   'DATA_DIR/NAME.staging); kept until the build succeeds.')
_KEEP_STAGING = flags.DEFINE_bool('keep_staging', False, 'Keep the staging files.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing build of NAME.')


def _beam_options():
  """The Beam PipelineOptions of --beam_pipeline_options (None: Beam's defaults)."""
  if _RUNNER.value != 'beam':
    if _BEAM_OPTIONS.value:
      raise app.UsageError('--beam_pipeline_options needs --runner=beam.')
    return None
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise app.UsageError("--runner=beam needs Apache Beam: pip install -e '.[beam]'.") from None
  flags_list = [f'--{option.strip()}' for option in (_BEAM_OPTIONS.value or '').split(',')
                if option.strip()]
  return pipeline_options.PipelineOptions(flags_list)


def main(argv):
  del argv
  config = (reinforced_tfds.read_reinforce_config(_REINFORCE_CONFIG.value)
            if _REINFORCE_CONFIG.value else {})
  given_dims = [int(d) for d in _TEACHER_DIMS.value] if _TEACHER_DIMS.value else None
  try:
    report = dataset_build.build_dataset(
        _SRC.value, _NAME.value, _DATA_DIR.value, images_src=_IMAGES_SRC.value,
        kind=_KIND.value, runner=_RUNNER.value, beam_options=_beam_options(),
        workers=_WORKERS.value,
        policy=ErrorPolicy.parse(_POLICY.value, _MAX_CORRUPT.value),
        emb_dtype=_EMB_DTYPE.value or config.get('emb_dtype') or 'float16',
        teachers=_TEACHERS.value or config.get('teachers'),
        teacher_dims=given_dims or config.get('teacher_dims'),
        k=_K.value or config.get('k'), augmentation=config.get('augmentation'),
        tokenizer=_TOKENIZER.value or config.get('tokenizer') or 'clip',
        syn_key_regex=(_SYN_KEY_REGEX.value or config.get('syn_key_regex')
                       or sample_codec.DEFAULT_SYN_KEY_REGEX),
        staging_dir=_STAGING_DIR.value, keep_staging=_KEEP_STAGING.value,
        overwrite=_OVERWRITE.value)
  except CorruptSampleError as e:
    sys.exit(f'Corrupt input: {e}\nFix or remove it, or rerun with --policy=skip '
             '--max_corrupt=N to skip and count corrupt samples; shards already validated are '
             'not redone.')
  except (BudgetExceededError, FileExistsError, FileNotFoundError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  print(report.summary())


if __name__ == '__main__':
  cli.run(main)

r"""Makes a reinforced dataset (DataCompDR format) from image-caption shards.

Per image: k stored augmentations with teacher-ensemble image embeddings, synthetic captions
(near-duplicates regenerated) and teacher text embeddings of every caption. For example,
image-caption shards whose syn.json already holds 5 captions per image, with two CLIP teachers
converted by launch/convert.py:

  python launch/reinforce.py --src='captioned/{00000000..00001023}.tar' --out=dr12m \
    --teachers=ckpt/vit_l14_openai,ckpt/vit_l14_datacomp --k=30 --num_syn=5 \
    --captioners=existing --gen_size=224

or straight from open_clip state_dicts (open_clip:NAME=PATH), and on the demo world without any
download (captions from its labels), building the TFDS dataset at the end:

  python launch/reinforce.py --src=demo:train:2000 --out=/tmp/demo_dr \
    --teachers=/tmp/teacher_a,/tmp/teacher_b --k=5 --num_syn=5 --captioners=demo \
    --build_tfds --name=demo_dr --data_dir=/tmp/tfds

With learned captioners, each writing its own syn.json key (DFNDR's layout): CoCa training runs
(configs/coca.py) or converted open_clip CoCa checkpoints, sampled as ml-mobileclip-dr does
(top_p 0.9, seq_len 30, first sentence) unless options say otherwise:

  python launch/reinforce.py --src='images/{00000..00099}.tar' --out=dr \
    --teachers=ckpt/a,ckpt/b --num_syn=5 \
    --captioners=coca:mscoco=ckpt/coca_l14_mscoco,coca:docci=runs/coca_docci:top_p=0.95

Rerun the same command to resume: finished shards are skipped. On several hosts every host runs
the same command (JAX finds the others on TPU pods, SLURM or Open MPI; elsewhere pass
--coordinator_address/--num_processes/--process_id, or split the shards without JAX with
--process_index/--process_count) and takes every process_count-th input shard.
"""
import os
import sys

from absl import flags
import jax

from mobileclip_jax import cli
from mobileclip_jax import compilation_cache
from mobileclip_jax import distributed
from mobileclip_jax.data import augment
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data.errors import BudgetExceededError, CorruptSampleError, ErrorPolicy
from mobileclip_jax.reinforce import captioners as captioners_lib
from mobileclip_jax.reinforce import settings as settings_lib
from mobileclip_jax.reinforce import generate
from mobileclip_jax.reinforce import inputs
from mobileclip_jax.reinforce import teachers as teachers_lib

_SRC = flags.DEFINE_string('src', None, "Input tar shards (braces, globs, a folder; '::' joins "
                           "patterns), or a plugin's source, e.g. demo:SPLIT:N[:image_size=64,"
                           "seed=0,samples_per_shard=1000] for the demo world.", required=True)
_OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)
_TEACHERS = flags.DEFINE_list('teachers', None, 'Teachers in embedding order: model checkpoint '
                              'or training-run folders, or open_clip:NAME=STATE_DICT_PATH.',
                              required=True)
_TEACHER_DTYPE = flags.DEFINE_enum('teacher_dtype', None, ['float32', 'bfloat16'],
                                   'Teacher compute dtype (default: as in the checkpoint).')
_K = flags.DEFINE_integer('k', 10, 'Augmentations per image.')
_NUM_SYN = flags.DEFINE_integer('num_syn', 5, 'Synthetic captions per image.')
_CAPTIONERS = flags.DEFINE_list(
    'captioners', ['existing'], "Captioners, each writing --num_syn captions per image under "
    "syn.json key syn_text_TAG (syn_text without a TAG): KIND[:TAG][:key=value...] or, for "
    "models, KIND:TAG=PATH[:key=value...]. Kinds: existing (the source's captions under that "
    "key), coca (a CoCa run or checkpoint, e.g. coca:mscoco=/runs/coca:top_p=0.9), and plugins' "
    "(demo[:temperature=0.7]: the demo world's captioner on each sample's labels).")
_GEN_SIZE = flags.DEFINE_integer('gen_size', 224, 'Side of the augmented crops the teachers '
                                 'see (smaller teachers get them bicubic-resized).')
_AUGMENTATION = flags.DEFINE_string('augmentation', None, "JSON (or a JSON file) of Apple's "
                                    'image_augmentation section for the other augmentation '
                                    'settings; default: DataCompDR\'s.')
_DEDUP_THRESHOLD = flags.DEFINE_float('dedup_threshold', 0.95, 'Teacher-averaged cosine above '
                                      'which two synthetic captions of an image are duplicates.')
_MAX_REGENERATE = flags.DEFINE_integer('max_regenerate', 3, 'Rounds of regenerating duplicate '
                                       'captions (0: only measure them).')
_EMB_DTYPE = flags.DEFINE_enum('emb_dtype', 'float16', sorted(reinforced_tfds.EMB_DTYPES),
                               'Storage of the embeddings (bfloat16 is written as pth.gz).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the augmentations and captions.')
_TOKENIZER = flags.DEFINE_string('tokenizer', 'clip', 'Student tokenizer spec recorded in the '
                                 'dataset metadata.')
_IMAGES_PER_DEVICE = flags.DEFINE_integer('images_per_device', 32, 'Images per device per step.')
_TEXTS_PER_DEVICE = flags.DEFINE_integer('texts_per_device', 128, 'Texts per device per step.')
_CHUNK_SIZE = flags.DEFINE_integer('chunk_size', 64, 'Samples prepared and captioned together; '
                                   'chunk_size * k a multiple of images_per_device * devices '
                                   'leaves no padded image batch.')
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Host threads decoding and '
                                'augmenting images.')
_POLICY = flags.DEFINE_enum('policy', 'fail', ['fail', 'skip'],
                            'Corrupt input samples: fail at the first, or skip and count them.')
_MAX_CORRUPT = flags.DEFINE_string('max_corrupt', None, "With --policy=skip: the most samples "
                                   "to skip, a count ('100') or a fraction ('0.01', '1%').")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Regenerate every shard, even if --out holds '
                               'a dataset with other settings.')
distributed.define_flags()
_PROCESS_INDEX = flags.DEFINE_integer('process_index', None, 'This process (default: JAX\'s).')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', None, 'Processes (default: JAX\'s).')
_BUILD_TFDS = flags.DEFINE_bool('build_tfds', False, 'Build the TFDS dataset when the '
                                'generation is complete.')
_NAME = flags.DEFINE_string('name', None, 'With --build_tfds: dataset name.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.environ.get('TFDS_DATA_DIR',
                                                           '~/tensorflow_datasets'),
                                'With --build_tfds: TFDS data folder.')
_BUILD_WORKERS = flags.DEFINE_integer('build_workers', 1, 'With --build_tfds: processes '
                                      'validating shards.')


def _augmentation() -> augment.AugmentConfig:
  if _AUGMENTATION.value is None:
    return augment.AugmentConfig(image_size=_GEN_SIZE.value)
  section = reinforced_tfds.read_reinforce_config(_AUGMENTATION.value)['augmentation']
  section.setdefault('random_resized_crop', {}).setdefault('size', _GEN_SIZE.value)
  config = augment.from_generation_config(section)
  if config.image_size != _GEN_SIZE.value:
    raise ValueError(f'--augmentation crops to {config.image_size} px but --gen_size is '
                     f'{_GEN_SIZE.value}; make them agree.')
  return config


def main(argv):
  del argv
  if _BUILD_TFDS.value and not _NAME.value:
    sys.exit('--build_tfds needs --name (and --data_dir).')
  compilation_cache.enable()
  distributed.initialize(distributed.settings_from_flags())
  try:
    generation = settings_lib.GenerationConfig(
        k=_K.value, num_syn=_NUM_SYN.value, augmentation=_augmentation(),
        dedup_threshold=_DEDUP_THRESHOLD.value,
        max_regenerate=_MAX_REGENERATE.value, emb_dtype=_EMB_DTYPE.value, seed=_SEED.value,
        chunk_size=_CHUNK_SIZE.value, tokenizer=_TOKENIZER.value)
    shards = inputs.resolve(_SRC.value)
    captioners = captioners_lib.make_captioners(_CAPTIONERS.value)
    ensemble = teachers_lib.TeacherEnsemble(
        [teachers_lib.load_teacher(spec, _TEACHER_DTYPE.value) for spec in _TEACHERS.value],
        images_per_device=_IMAGES_PER_DEVICE.value, texts_per_device=_TEXTS_PER_DEVICE.value)
    report = generate.reinforce(
        shards, _OUT.value, ensemble, captioners, generation,
        policy=ErrorPolicy.parse(_POLICY.value, _MAX_CORRUPT.value),
        process_index=_PROCESS_INDEX.value, process_count=_PROCESS_COUNT.value,
        workers=_WORKERS.value, overwrite=_OVERWRITE.value)
  except CorruptSampleError as e:
    sys.exit(f'Corrupt input: {e}\nFix or remove it, or rerun with --policy=skip '
             '--max_corrupt=N; finished shards are not redone.')
  except (BudgetExceededError, FileNotFoundError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  print(report.summary())
  if not _BUILD_TFDS.value:
    return
  process_index = jax.process_index() if _PROCESS_INDEX.value is None else _PROCESS_INDEX.value
  if report.complete and process_index == 0:
    build = generate.build_tfds(_OUT.value, _NAME.value, _DATA_DIR.value,
                                workers=_BUILD_WORKERS.value, overwrite=True)
    print(build.summary())
  else:
    print('The TFDS dataset is built by process 0 once every shard is finished: rerun this '
          'command there (finished shards are skipped).')


if __name__ == '__main__':
  cli.run(main)

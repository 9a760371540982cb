"""Learned captioners in reinforcement, end to end: demo-world tars -> a tiny CoCa trained with the
trainer -> launch/reinforce.py with two CoCa captioners -> the reinforced TFDS dataset -> the
training loader, whose synthetic captions come from both keys with their teachers' embeddings;
and the captioner specs and bad inputs (wrong model, wrong tokenizer, empty generations)."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mobileclip_jax import demo as demo_world
from mobileclip_jax import keys
from mobileclip_jax.convert import files
from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import loader
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError, ErrorPolicy
from mobileclip_jax.reinforce import captioners
from mobileclip_jax.reinforce import coca_captioner
from mobileclip_jax.reinforce import generate
from mobileclip_jax.reinforce import inputs
from mobileclip_jax.reinforce import settings
from mobileclip_jax.reinforce import teachers as teachers_lib
from mobileclip_jax.train import loop
from test_coca_train import DEMO_COCA, coca_config
from test_reinforce import TINY, _save_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SAMPLES, NUM_SYN = 8, 2


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Two demo-world tars, a teacher checkpoint, and a tiny CoCa trained 4 steps on the tars: as
  its training run and as a model checkpoint converted from its open_clip export."""
  root = tmp_path_factory.mktemp('coca_reinforce')
  shards = demo_world.write_split(str(root / 'src'), 'train', NUM_SAMPLES, 32, 4, seed=0)
  dataset_build.build_dataset(shards, 'coca_plain', str(root / 'tfds'), kind='plain',
                              progress=False)
  run = str(root / 'coca_run')
  loop.train(coca_config(DEMO_COCA, **{
      'data.name': 'coca_plain', 'data.data_dir': str(root / 'tfds'), 'log_every': 1,
      'schedule.total': '4_steps', 'checkpoint.every': '4_steps', 'optim.lr': 1e-2}), run)
  export = files.export_checkpoint(run, str(root / 'export' / 'open_clip_model.safetensors'))
  files.import_checkpoint(export['weights'], str(root / 'coca_ckpt'))
  _save_teacher(root / 'teacher', 0, **TINY)
  return dict(root=root, src=os.path.join(str(root / 'src'), 'train', '*.tar'), run=run,
              ckpt=str(root / 'coca_ckpt'), export=export['weights'],
              teacher=str(root / 'teacher'))


def _reinforce(world, out, *captioner_specs, extra=()):
  cmd = [sys.executable, os.path.join(REPO, 'launch', 'reinforce.py'), f'--src={world["src"]}',
         f'--out={out}', f'--teachers={world["teacher"]}', '--k=2', f'--num_syn={NUM_SYN}',
         f'--captioners={",".join(captioner_specs)}', '--gen_size=32', '--images_per_device=2',
         '--texts_per_device=4', '--workers=2', *extra]
  return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _two_cocas(world, a_options=''):
  """The fixture's captioner specs: the run and its conversion, the second at temperature 1.5.

  Small batches: a CoCa trained 4 steps predicts a near-flat distribution, whose top-p set is
  beyond the 256 candidates, so every step searches the whole vocabulary for each padded row; and
  it rarely ends a caption early, so `seq_len=10` (of the default 30) cuts the decoding steps.
  """
  return (f'coca:a={world["run"]}:batch_size=16:seq_len=10{a_options}',
          f'coca:b={world["ckpt"]}:temperature=1.5:batch_size=8:seq_len=10')


@pytest.fixture(scope='module')
def reinforced(world):
  out, data_dir = world['root'] / 'dr', world['root'] / 'dr_tfds'
  result = _reinforce(world, out, *_two_cocas(world),
                      extra=('--build_tfds', '--name=coca_dr', f'--data_dir={data_dir}'))
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(out=out, data_dir=str(data_dir), stdout=result.stdout)


def test_two_coca_captioners_write_their_keys_into_a_dataset_the_loader_reads(world, reinforced):
  source, meta = reinforced_tfds.open_reinforced('coca_dr', reinforced['data_dir'])
  assert len(source) == NUM_SAMPLES
  assert meta.syn_keys == ('syn_text_a', 'syn_text_b') and meta.syn_counts == (NUM_SYN, NUM_SYN)
  assert meta.syn_key_regex == '^(syn_text_a|syn_text_b)$'
  # Each captioner's quality control is reported (before -> after, per key).
  for key in meta.syn_keys:
    assert f'Synthetic captions {key}: {NUM_SAMPLES * NUM_SYN} of {NUM_SAMPLES}' in (
        reinforced['stdout'])
  with open(os.path.join(reinforced['out'], 'reinforce_config.json')) as f:
    described = json.load(f)['generation']['captioners']
  assert [(c['name'], c['top_p'], c['seq_len'], c['temperature']) for c in described] == [
      ('coca', 0.9, 10, 1.0), ('coca', 0.9, 10, 1.5)]
  assert described[0]['checksum'] == described[1]['checksum']  # The run and its conversion.

  # Which key wrote each caption (the stored tars, DFNDR's per-key embeddings).
  key_of = {}
  for i in range(len(source)):
    record = source[i]
    for text, index in zip(record['syn_captions'], record['syn_key_index']):
      key_of.setdefault(text.decode(), set()).add(meta.syn_keys[index])
  tokenizer = tokenizer_lib.get_tokenizer('clip')
  text_of = {tokenizer([t], 77)[0].tobytes(): t for t in key_of}
  teacher = teachers_lib.TeacherEnsemble([teachers_lib.load_teacher(world['teacher'])],
                                         images_per_device=2, texts_per_device=4)
  config = loader.InputConfig(dataset='coca_dr', data_dir=reinforced['data_dir'],
                              global_batch_size=8, image_size=32, context_length=77)
  iterator = loader.make_train_iterator(config, 0, 1)
  seen = set()
  for _ in range(4):
    batch = next(iterator)
    texts = [text_of[row.tobytes()] for row in batch[keys.SYN_TEXT]]
    # The teacher row the loader hands over is the teacher's embedding of that caption.
    np.testing.assert_allclose(batch[keys.TEACHER_SYN_TEXT], teacher.embed_texts(texts),
                               atol=2e-3)  # Stored as float16.
    seen |= {next(iter(key_of[t])) for t in texts if len(key_of[t]) == 1}
  iterator.close()
  assert seen == {'syn_text_a', 'syn_text_b'}


def test_a_rerun_resumes_and_other_settings_are_refused(world, reinforced):
  again = _reinforce(world, reinforced['out'], *_two_cocas(world))
  assert again.returncode == 0 and 'Generated 0 shards' in again.stdout
  changed = _reinforce(world, reinforced['out'], *_two_cocas(world, ':top_p=0.5'))
  assert changed.returncode != 0
  assert 'generation.captioners' in changed.stderr and 'top_p' in changed.stderr


def test_bad_captioners_are_refused_at_start_with_one_line(world, tmp_path):
  # Through the command line: the student's tokenizer (recorded in the dataset) is not the
  # captioner's; one line, nothing written.
  result = _reinforce(world, tmp_path / 'bad', f'coca:a={world["run"]}',
                      extra=('--tokenizer=clip:/elsewhere/bpe.txt.gz',))
  assert result.returncode != 0
  assert "has tokenizer 'clip' but the student's" in result.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'bad').exists() or not os.listdir(tmp_path / 'bad')
  cases = {
      'coca:a': 'write coca:TAG=PATH',
      f'coca:a={world["teacher"]}': 'not a CoCa captioner',
      f'coca:a={world["run"]}:top_q=0.5': re.escape("unknown option(s) ['top_q']"),
      f'coca:a={world["run"]}:seq_len=40': 'at most the context length 32',
      f'coca:a={world["run"]},coca:a={world["ckpt"]}': 'the same syn.json key',
  }
  for spec, message in cases.items():
    with pytest.raises(ValueError, match=message):
      captioners.make_captioners(spec.split(','))


def test_a_state_dict_of_another_variant_names_the_mismatching_tensors(world):
  with pytest.raises(ValueError, match='Which CoCa is'):
    coca_captioner.load_coca(_copy(world['export'], 'lonely.safetensors'))
  with pytest.raises(ValueError) as error:
    coca_captioner.load_coca(world['export'], model='coca_ViT-B-32')  # Full size, not tiny.
  message = str(error.value)
  assert 'does not match coca_ViT-B-32' in message
  assert '78 shape mismatch: text.transformer.resblocks.0.attn.out_proj.bias: expected (512,), ' \
         'got (32,)' in message and 'missing: text.transformer.resblocks.1.' in message


def _copy(path, name):
  target = os.path.join(os.path.dirname(os.path.dirname(path)), name)
  with open(path, 'rb') as src, open(target, 'wb') as dst:
    dst.write(src.read())
  return target


def test_specs_parse_kinds_tags_paths_and_options():
  existing = captioners.make_captioner('existing')
  assert (existing.name, existing.syn_key) == ('existing', 'syn_text')
  demo = captioners.make_captioner('demo:dr:temperature=0.5')
  assert (demo.syn_key, demo.describe()['temperature']) == ('syn_text_dr', 0.5)
  assert captioners.make_captioner('demo:temperature=0.5').syn_key == 'syn_text'
  for spec, message in (('blip:a=/x', "Unknown captioner 'blip'"),
                        ('demo:a:temperature=warm', 'needs a Python literal'),
                        ('demo:a-b', "TAG 'a-b' must be letters"),
                        ('demo:a:fast', 'options are key=value'),
                        ('demo:a:speed=1', "unexpected keyword argument 'speed'")):
    with pytest.raises(ValueError, match=message):
      captioners.make_captioner(spec)
  with pytest.raises(ValueError, match='same syn.json key'):
    captioners.make_captioners(['demo', 'existing'])


def test_empty_generations_are_counted_and_regenerated():
  """A caption empty after the first-sentence cut is an offender: counted, asked again."""
  emb = np.eye(3, dtype=np.float32)
  stats = captioners.CaptionStats()
  stats.add(['a red cube', '', ' .. '], emb, 1, 0.95)  # Punctuation alone is empty too.
  assert stats.empty == 2 and stats.rates()['empty_rate'] == pytest.approx(2 / 3)

  class Sometimes(captioners.Captioner):
    name = 'sometimes'
    calls = 0

    def __call__(self, batch, num_captions, rng):
      Sometimes.calls += 1
      return [['a blue ball'] * num_captions for _ in batch]

  item = captioners.CaptionInput('s', 'k', 'u', None, {})
  out, _, report = captioners.deduplicate(
      [item], [['a red cube', '']], np.eye(2, dtype=np.float32)[None], captioner=Sometimes(),
      embed_texts=lambda texts: np.eye(2, dtype=np.float32)[[1] * len(texts)], num_teachers=1,
      threshold=0.95, max_regenerate=2, rng=np.random.default_rng(0))
  assert out == [['a red cube', 'a blue ball']] and Sometimes.calls == 1
  assert report.before.empty == 1 and report.after.empty == 0 and report.regenerated == 1


def test_undecodable_images_are_counted_and_skipped_under_the_policy(world, tmp_path):
  """A CoCa run over a tar with one damaged image: 'fail' names it, 'skip' counts it and
  captions the rest."""
  src = str(tmp_path / 'src' / '00000000.tar')
  os.makedirs(os.path.dirname(src))
  with wds.ShardWriter(src.replace('00000000', '{:08d}'), max_samples=100,
                       manifest=False) as writer:
    for i, raw in enumerate(wds.iter_samples(sorted(glob.glob(world['src']))[0], None)):
      members = dict(raw.members)
      if i == 1:
        members['jpg'] = members['jpg'][:40]  # Cut short: PIL cannot load it.
      writer.write(raw.key, members)
  ensemble = teachers_lib.TeacherEnsemble([teachers_lib.load_teacher(world['teacher'])],
                                          images_per_device=2, texts_per_device=4)
  captioner = captioners.make_captioner(f'coca:a={world["run"]}:batch_size=8')
  config = settings.GenerationConfig(k=1, num_syn=NUM_SYN, augmentation=augment.AugmentConfig(
      image_size=32), chunk_size=4)
  run = lambda out, policy: generate.reinforce(inputs.resolve(src), str(tmp_path / out), ensemble,
                                               [captioner], config, policy=policy, workers=1,
                                               progress=False)
  with pytest.raises(CorruptSampleError, match='bad_image'):
    run('fail', ErrorPolicy())
  report = run('skip', ErrorPolicy('skip'))
  assert report.counter.skipped == {'bad_image': 1} and report.counter.accepted == 3
  assert report.captions['syn_text_a'].after.captions == 3 * NUM_SYN

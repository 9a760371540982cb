"""Tests for the Grain training input pipeline (mobileclip_jax.data.loader).

The datasets are tiny reinforced/plain TFDS builds made from tars here. Every teacher
embedding row encodes (sample number, row) in its first two components, so a batch shows which
record and which stored row each example got; images are checked bit for bit against
`augment.replay` of the stored entry the embedding row names (uint8; the train step normalizes).
"""
import io
import json
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from mobileclip_jax import keys
from mobileclip_jax import sharding
from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import errors
from mobileclip_jax.data import jpeg_rows
from mobileclip_jax.data import loader
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import BudgetExceededError, CorruptSampleError

NUM_SAMPLES = 24
K = 3
SYN = (('syn_text_coca', 2), ('syn_text_dfn', 3))  # S = 5 synthetic captions per sample.
DIMS = (4, 4)
HEIGHT, WIDTH = 40, 48
SIZE = 24  # The student's side.
# Apple's form (ml-mobileclip training/configs/datacompdr12m.json), at a small generation size.
AUGMENTATION = {'random_resized_crop': {'interpolation': 'bicubic', 'size': 32},
                'rand_augment': {'enable': True, 'p': 1.0},
                'normalize': {'mean': [0.5] * 3, 'std': [0.5] * 3}}
AUG_CONFIG = augment.AugmentConfig(image_size=32)


def _embedding_rows(number: int, rows: int) -> np.ndarray:
  """[rows, 8] float32: row r of sample `number` is (number/100, r/100, 0, z | 1, 0, 0, 0)."""
  out = np.zeros((rows, sum(DIMS)), np.float32)
  out[:, 0], out[:, 1] = number / 100, np.arange(rows) / 100
  out[:, 3] = np.sqrt(1 - out[:, 0]**2 - out[:, 1]**2)
  out[:, 4] = 1
  return out


def _decode_row(row: np.ndarray) -> tuple[int, int]:
  return int(round(row[0] * 100)), int(round(row[1] * 100))


def _image_bytes(rng: np.random.Generator) -> bytes:
  pixels = rng.integers(0, 256, (HEIGHT // 4, WIDTH // 4, 3), dtype=np.uint8)
  image = Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, 'PNG')
  return buffer.getvalue()


def _samples(num: int = NUM_SAMPLES) -> list[sample_codec.Sample]:
  rng = np.random.default_rng(0)
  samples = []
  for i in range(num):
    index = np.concatenate([[j] * n for j, (_, n) in enumerate(SYN)]).astype(np.int32)
    samples.append(sample_codec.Sample(
        shard='', key=f'{i:06d}', uid=f'uid{i}', image=_image_bytes(rng), image_format='png',
        captions=[f'photo {i}'], syn_keys=tuple(key for key, _ in SYN),
        syn_captions=[f'synthetic {i} {SYN[c][0]} {j}' for j, c in enumerate(index)],
        syn_key_index=index,
        paug=[augment.sample_params(rng, HEIGHT, WIDTH, AUG_CONFIG) for _ in range(K)],
        image_emb=_embedding_rows(i, K), text_emb=_embedding_rows(i, 1 + len(index))))
  return samples


def _build(tmp_path, kind: str) -> str:
  with wds.ShardWriter(str(tmp_path / 'src' / '{:05d}.tar'), 10) as writer:
    for sample in _samples():
      writer.write(sample.key, sample_codec.encode_sample(sample))
  dataset_build.build_dataset(str(tmp_path / 'src' / '*.tar'), kind, str(tmp_path / 'data'),
                                kind=kind, augmentation=AUGMENTATION, teacher_dims=DIMS,
                                emb_dtype='float32', progress=False)
  return str(tmp_path / 'data')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """One data folder with the datasets 'reinforced' and 'plain' (same samples)."""
  tmp_path = tmp_path_factory.mktemp('pipeline')
  _build(tmp_path, 'reinforced')
  _build(tmp_path, 'plain')
  return str(tmp_path / 'data')


@pytest.fixture(scope='module')
def tokenizer():
  return tokenizer_lib.get_tokenizer('clip')


def _config(data_dir, dataset='reinforced', **kwargs) -> loader.InputConfig:
  kwargs = {'global_batch_size': 8, 'image_size': SIZE,
            'context_length': 16, 'seed': 3, **kwargs}
  return loader.InputConfig(dataset=dataset, data_dir=data_dir, **kwargs)


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert sorted(a) == sorted(b)
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _tokens(tokenizer, texts) -> list[bytes]:
  """Token rows as bytes, to look texts up by their tokens."""
  return [row.tobytes() for row in tokenizer(texts, 16)]


def _numbers(batch) -> list[int]:
  """The sample number of every example of a batch, from its teacher text embedding."""
  return [_decode_row(row)[0] for row in batch[keys.TEACHER_TEXT]]


# ----------------------------------------------------------------------------------------------
# What an example holds.


def test_reinforced_rows_match_replayed_crop_and_captions(data_dir, tokenizer):
  samples = _samples()
  iterator = loader.make_train_iterator(_config(data_dir), 0, 1)
  assert (iterator.kind, iterator.teacher_dims, iterator.num_examples) == (
      'reinforced', DIMS, NUM_SAMPLES)
  replay_config = augment.from_generation_config(iterator.metadata.augmentation)
  assert replay_config == augment.AugmentConfig(image_size=32, interpolation='bicubic', p=1.0)
  seen_augmentations, seen_syn = set(), set()
  for batch in _take(iterator, 3):
    assert set(batch) == set(keys.REINFORCED_BATCH)
    for key, (shape, dtype) in iterator.element_spec.items():
      assert batch[key].shape == (8,) + shape and batch[key].dtype == dtype, key
    for b in range(8):
      number, a = _decode_row(batch[keys.TEACHER_IMAGE][b])
      sample = samples[number]
      # The image is stored augmentation a, replayed at the student's size.
      image = Image.open(io.BytesIO(sample.image))
      want = augment.replay(image, sample.paug[a], SIZE, replay_config)
      np.testing.assert_array_equal(batch[keys.IMAGE][b], want)
      # The ground-truth caption and its teacher row (row 0: C = 1).
      assert batch[keys.TEXT][b].tobytes() == _tokens(tokenizer, sample.captions)[0]
      assert _decode_row(batch[keys.TEACHER_TEXT][b]) == (number, 0)
      # The synthetic caption and its row: 1 + its index among the S flattened captions.
      s = _tokens(tokenizer, sample.syn_captions).index(batch[keys.SYN_TEXT][b].tobytes())
      assert _decode_row(batch[keys.TEACHER_SYN_TEXT][b]) == (number, 1 + s)
      seen_augmentations.add(a)
      seen_syn.add(s)
  assert seen_augmentations == set(range(K)) and seen_syn == set(range(5))
  iterator.close()


def test_choices_uniform_and_syn_key_regex(data_dir):
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  choices = loader.ReinforcedChoices.for_dataset(meta, '^syn_text.*$')
  assert choices == loader.ReinforcedChoices(k=K, num_captions=1, syn_starts=(0, 2),
                                               syn_counts=(2, 3))
  draws = np.array([choices.draw(np.random.default_rng([0, i])) for i in range(6000)])
  # a ~ U{0..k-1}; a key uniform among keys, then a caption uniform within it (Apple's
  # preprocess_dr): each of coca's 2 captions 1/4, each of dfn's 3 captions 1/6.
  for column, p in ((0, np.full(K, 1 / K)), (1, np.ones(1)),
                    (2, np.array([1 / 4] * 2 + [1 / 6] * 3))):
    counts = np.bincount(draws[:, column], minlength=len(p))
    sd = np.sqrt(len(draws) * p * (1 - p))
    assert np.all(np.abs(counts - len(draws) * p) <= 5 * sd), (column, counts)

  only_dfn = loader.ChunkLoader(_config(data_dir, syn_key_regex='^syn_text_dfn$'), source,
                                  meta, 'reinforced', 0, 1)
  rows = [_decode_row(row)[1] - 1 for u in range(3)
          for row in only_dfn(u)[keys.TEACHER_SYN_TEXT]]
  assert set(rows) == {2, 3, 4}  # dfn's captions follow coca's two.
  with pytest.raises(ValueError, match=re.escape("['syn_text_coca', 'syn_text_dfn']")):
    loader.make_train_iterator(_config(data_dir, syn_key_regex='^syn_text_blip$'), 0, 1)


def test_teachers_selects_the_stored_slices_of_those_teachers(data_dir):
  """data.teachers: the same examples, the teacher rows cut to the chosen teachers' slices."""
  full = _take(loader.make_train_iterator(_config(data_dir), 0, 1), 2)
  slices = {0: slice(0, DIMS[0]), 1: slice(DIMS[0], sum(DIMS))}
  for teachers in ((0,), (1,), (1, 0)):
    iterator = loader.make_train_iterator(_config(data_dir, teachers=list(teachers)), 0, 1)
    assert iterator.teacher_dims == tuple(DIMS[t] for t in teachers)
    width = sum(iterator.teacher_dims)
    assert all(iterator.element_spec[k][0] == (width,) for k in keys.TEACHERS)
    for got, want in zip(_take(iterator, 2), full):
      for key in keys.TEACHERS:
        np.testing.assert_array_equal(
            got[key], np.concatenate([want[key][:, slices[t]] for t in teachers], 1))
      for key in (keys.IMAGE, keys.TEXT, keys.SYN_TEXT):
        np.testing.assert_array_equal(got[key], want[key])
    iterator.close()
  # Teacher 1's stored slice is (1, 0, 0, 0) in every row (`_embedding_rows`).
  batch = next(loader.make_train_iterator(_config(data_dir, teachers=(1,)), 0, 1))
  np.testing.assert_array_equal(batch[keys.TEACHER_IMAGE], np.tile([1., 0, 0, 0], (8, 1)))


@pytest.mark.parametrize('teachers, dataset, match', [
    ((2,), 'reinforced', re.escape('no teacher [2]; the dataset stores 2')),
    ((0, 0), 'reinforced', 'distinct teacher indices'),
    ((), 'reinforced', 'distinct teacher indices'),
    ((-1,), 'reinforced', 'distinct teacher indices'),
    ((0,), 'plain', 'dataset is plain'),
])
def test_teachers_rejects_unknown_empty_and_plain_data(data_dir, teachers, dataset, match):
  with pytest.raises(ValueError, match=match):
    loader.make_train_iterator(_config(data_dir, dataset, teachers=teachers), 0, 1)


def test_num_syn_draws_from_the_first_captions_of_each_key(data_dir):
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  assert loader.ReinforcedChoices.for_dataset(meta, '^syn_text.*$', num_syn=1) == (
      loader.ReinforcedChoices(k=K, num_captions=1, syn_starts=(0, 2), syn_counts=(1, 1)))
  for num_syn, want in ((1, {0, 2}), (2, {0, 1, 2, 3})):
    iterator = loader.make_train_iterator(_config(data_dir, num_syn=num_syn), 0, 1)
    rows = {_decode_row(row)[1] - 1 for batch in _take(iterator, 3)
            for row in batch[keys.TEACHER_SYN_TEXT]}
    assert rows == want, num_syn  # coca's first (0, 1), dfn's first (2, 3) of its 2, 3, 4.
  # dfn alone stores 3: 3 is fine there, not over both keys (coca stores 2).
  loader.make_train_iterator(_config(data_dir, num_syn=3, syn_key_regex='^syn_text_dfn$'), 0, 1)
  with pytest.raises(ValueError, match=re.escape("{'syn_text_coca': 2, 'syn_text_dfn': 3}")):
    loader.make_train_iterator(_config(data_dir, num_syn=3), 0, 1)
  with pytest.raises(ValueError, match='none stored'):
    loader.make_train_iterator(_config(data_dir, 'plain', num_syn=1), 0, 1)
  with pytest.raises(ValueError, match='num_syn'):
    _config(data_dir, num_syn=0)


def test_syn_key_weights_set_the_key_draw(data_dir):
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  weights = (('syn_text_coca', 3.0), ('syn_text_dfn', 1.0))
  choices = loader.ReinforcedChoices.for_dataset(meta, '^syn_text.*$', weights)
  draws = np.array([choices.draw(np.random.default_rng([0, i]))[2] for i in range(6000)])
  # coca 3/4 (each of its 2 captions 3/8), dfn 1/4 (each of 3 captions 1/12). A uniform key draw
  # (1/4 and 1/6 per caption) is 20 standard deviations away.
  p = np.array([3 / 8] * 2 + [1 / 12] * 3)
  counts = np.bincount(draws, minlength=5)
  sd = np.sqrt(len(draws) * p * (1 - p))
  assert np.all(np.abs(counts - len(draws) * p) <= 5 * sd), counts
  uniform = np.array([1 / 4] * 2 + [1 / 6] * 3)
  assert np.any(np.abs(counts - len(draws) * uniform) > 5 * sd)
  # Through the loader: a key of weight 0 is never drawn (an unlisted key weighs 1).
  no_dfn = loader.ChunkLoader(_config(data_dir, syn_key_weights=(('syn_text_dfn', 0),)), source,
                              meta, 'reinforced', 0, 1)
  rows = [_decode_row(row)[1] - 1 for u in range(3) for row in no_dfn(u)[keys.TEACHER_SYN_TEXT]]
  assert set(rows) == {0, 1}
  with pytest.raises(ValueError, match=r"names \['syn_text_blip'\].*\['syn_text_dfn'\]"):
    loader.ReinforcedChoices.for_dataset(meta, '^syn_text_dfn$', (('syn_text_blip', 1),))
  with pytest.raises(ValueError, match='>= 0 and not all 0'):
    loader.ReinforcedChoices.for_dataset(meta, '^syn_text.*$', (('syn_text_coca', -1),))


def test_plain_dataset_gives_image_and_text_with_fresh_augmentations(data_dir, tokenizer):
  samples = _samples()
  captions = [sample.captions[0] for sample in samples]
  number_of = {row: i for i, row in enumerate(_tokens(tokenizer, captions))}
  config = _config(data_dir, 'plain', global_batch_size=NUM_SAMPLES, num_epochs=2)
  batches = _take(loader.make_train_iterator(config, 0, 1), 2)
  assert all(set(batch) == {keys.IMAGE, keys.TEXT} for batch in batches)
  images = []
  for batch in batches:
    numbers = [number_of[row.tobytes()] for row in batch[keys.TEXT]]
    assert sorted(numbers) == list(range(NUM_SAMPLES))  # One epoch per batch here.
    images.append(batch[keys.IMAGE][np.argsort(numbers)])
  # Each epoch samples new parameters: the same image is cropped differently.
  assert all(np.any(a != b) for a, b in zip(*images))

  # The configured augmentation is what is sampled: the full image, resized, with no ops.
  whole = augment.AugmentConfig(scale=(1.0, 1.0), ratio=(WIDTH / HEIGHT,) * 2, p=0.0)
  batch = next(loader.make_train_iterator(
      _config(data_dir, 'plain', augmentation=whole), 0, 1))
  for b, row in enumerate(batch[keys.TEXT]):
    image = Image.open(io.BytesIO(samples[number_of[row.tobytes()]].image))
    want = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(batch[keys.IMAGE][b], want)


# ----------------------------------------------------------------------------------------------
# Order: shuffle, epochs, processes.


def test_epochs_shuffle_and_drop_remainder(data_dir):
  config = _config(data_dir, num_epochs=2)  # 24 records, batches of 8: 3 per epoch.
  iterator = loader.make_train_iterator(config, 0, 1)
  assert iterator.num_batches == 6
  order = [n for batch in iterator for n in _numbers(batch)]  # Ends after 6 batches.
  first, second = order[:NUM_SAMPLES], order[NUM_SAMPLES:]
  assert sorted(first) == sorted(second) == list(range(NUM_SAMPLES))
  assert first != second and first != sorted(first)  # Shuffled, differently per epoch.
  other_seed = loader.make_train_iterator(_config(data_dir, num_epochs=2, seed=4), 0, 1)
  assert [n for batch in _take(other_seed, 3) for n in _numbers(batch)] != first
  # 24 records in batches of 10: the last incomplete batch is dropped.
  assert loader.make_train_iterator(
      _config(data_dir, num_epochs=1, global_batch_size=10), 0, 1).num_batches == 2
  with pytest.raises(ValueError, match='no full global batch'):
    loader.make_train_iterator(_config(data_dir, num_epochs=1, global_batch_size=32), 0, 1)


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_disjoint_slices_of_each_global_batch(data_dir, process_count):
  config = _config(data_dir, global_batch_size=16)  # Batch 1 straddles epochs 0 and 1.
  whole = _take(loader.make_train_iterator(config, 0, 1), 3)
  assert len(set(_numbers(whole[0]))) == 16
  parts = [_take(loader.make_train_iterator(config, p, process_count), 3)
           for p in range(process_count)]
  for t, batch in enumerate(whole):
    local = [part[t] for part in parts]
    assert all(len(b[keys.IMAGE]) == 16 // process_count for b in local)
    # Concatenated in process order, the slices are the global batch, bit for bit.
    _assert_batches_equal([{k: np.concatenate([b[k] for b in local]) for k in batch}], [batch])
  with pytest.raises(ValueError, match='not divisible'):
    loader.make_train_iterator(config, 0, 3)


def test_chunks_are_the_largest_divisor_of_the_local_batch(data_dir):
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  for batch, limit, processes, want in ((8, 3, 1, (2, 4)), (12, 64, 1, (12, 1)),
                                        (14, 5, 2, (1, 7)), (16, 4, 2, (4, 2))):
    last = processes - 1
    chunks = loader.ChunkLoader(_config(data_dir, global_batch_size=batch,
                                        max_chunk_size=limit), source, meta, 'r', last,
                                processes)
    assert (chunks.chunk_size, chunks.chunks_per_batch) == want
    # Batches 0 and 1 of the last process: the last B / P positions of global batches 0 and 1.
    local = batch // processes
    positions = [divmod(g, NUM_SAMPLES) for t in range(2)
                 for g in range(t * batch + last * local, (t + 1) * batch)]
    assert [p for u in range(2 * want[1]) for p in chunks.stream_positions(u)] == positions


def test_global_batch_on_fake_devices(data_dir):
  mesh = sharding.create_mesh(data=4, fsdp=2)
  local = next(loader.make_train_iterator(_config(data_dir), 0, 1))
  arrays = sharding.global_batch(local, mesh)
  for key, array in arrays.items():
    assert array.shape == local[key].shape and array.sharding == sharding.batch_sharding(mesh)
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index], err_msg=key)
      assert shard.data.shape[0] == 1


# ----------------------------------------------------------------------------------------------
# Checkpointing.


def _save_and_restore(tmp_path, iterator, fresh):
  """Saves `iterator` in an Orbax Composite (item 'data_iter'), restores it into `fresh`."""
  manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',))
  manager.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  restored = manager.restore(1, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  manager.close()
  return restored['data_iter']


@pytest.mark.parametrize('worker_count', [0, 2])
def test_orbax_resume_is_exact(data_dir, tmp_path, worker_count):
  iterator = loader.make_train_iterator(_config(data_dir), 0, 1)
  _take(iterator, 3)
  # Restored into an iterator with `worker_count` processes that build each batch in 4 chunks
  # of 2 (their own chunks for 2 workers): batches depend on neither.
  fresh = loader.make_train_iterator(
      _config(data_dir, worker_count=worker_count, max_chunk_size=3), 0, 1)
  restored = _save_and_restore(tmp_path, iterator, fresh)
  assert restored is fresh
  uninterrupted = _take(iterator, 2)
  _assert_batches_equal(_take(restored, 2), uninterrupted)
  restored.close()


def test_restore_refuses_another_batch_size(data_dir):
  state = loader.make_train_iterator(_config(data_dir), 0, 1).get_state()
  other = loader.make_train_iterator(_config(data_dir, global_batch_size=4), 0, 1)
  with pytest.raises(ValueError, match='global_batch_size'):
    other.set_state(state)


# ----------------------------------------------------------------------------------------------
# Bad data.


def _corrupt_source(data_dir):
  """(records with 3 corrupt ones, metadata, {record index: reason})."""
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  records = [source[i] for i in range(len(source))]
  bad = {2: errors.BAD_IMAGE, 5: errors.BAD_PAUG, 11: errors.EMB_NONFINITE}
  records[2] = {**records[2], 'image': records[2]['image'][:60]}  # Cut PNG.
  paug = json.loads(records[5]['paug'])
  paug = [[[0, 0, HEIGHT + 1, 10], ops] for _, ops in paug]  # Boxes taller than the image.
  records[5] = {**records[5], 'paug': json.dumps(paug).encode()}
  text_emb = records[11]['text_emb'].copy()
  text_emb[0, 0] = np.nan
  records[11] = {**records[11], 'text_emb': text_emb}
  return records, meta, bad


def _iterator(records, meta, skipped_log=None, **kwargs):
  config = loader.InputConfig(dataset='reinforced', global_batch_size=8, image_size=SIZE,
                              context_length=16, seed=3, **kwargs)
  chunks = loader.ChunkLoader(config, records, meta, 'DS', 0, 1)
  return loader.TrainIterator(chunks, num_batches=3, skipped_log=skipped_log)  # One epoch.


def test_corrupt_records_fail_naming_the_record(data_dir):
  records, meta, bad = _corrupt_source(data_dir)
  with pytest.raises(CorruptSampleError) as info:
    list(_iterator(records, meta))
  error = info.value
  index = int(re.search(r'train\[(\d+)\]', error.shard).group(1))
  assert bad[index] == error.reason
  assert error.key == records[index]['key'].decode()
  assert records[index]['uid'].decode() in str(error)


def test_jpeg_records_replay_exactly_from_the_rows_their_crops_need(data_dir, monkeypatch):
  """JPEG images are decoded only down to their crop (`jpeg_rows`); every example still equals
  the replay on the whole decode, and a cut JPEG is bad even where its crop's rows are intact."""
  from mobileclip_jax.benchmark.data import photo  # pylint: disable=g-import-not-at-top
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  rng = np.random.default_rng(1)
  records = {}
  for i in range(len(source)):
    buffer = io.BytesIO()
    Image.fromarray(photo(rng, HEIGHT, WIDTH)).save(buffer, 'JPEG', quality=90)  # 4:2:0
    record = {**source[i], 'image': buffer.getvalue()}
    records[_decode_row(record['image_emb'][0])[0]] = record
  cut = records[7]
  cut['image'] = cut['image'][:len(cut['image']) * 3 // 4]
  cut['paug'] = json.dumps([[[0, 0, 8, 8], ops] for _, ops in json.loads(cut['paug'])]).encode()
  heights = []
  decode = jpeg_rows.decode_top_rows

  def spy(image, data, rows):
    image = decode(image, data, rows)
    heights.append(image.height)
    return image

  monkeypatch.setattr(jpeg_rows, 'decode_top_rows', spy)
  iterator = _iterator([records[n] for n in range(NUM_SAMPLES)], meta, error_policy='skip',
                       worker_count=0)
  batches = list(iterator)
  assert dict(iterator.skip_counter.skipped) == {errors.BAD_IMAGE: 1}
  assert min(heights) < HEIGHT  # Some decodes did stop above the bottom.
  config = augment.from_generation_config(meta.augmentation)
  for batch in batches:
    for image, row in zip(batch[keys.IMAGE], batch[keys.TEACHER_IMAGE]):
      number, a = _decode_row(row)
      record = records[number]
      want = augment.replay(Image.open(io.BytesIO(record['image'])),
                            json.loads(record['paug'])[a], SIZE, config)
      np.testing.assert_array_equal(image, want, err_msg=f'{number}, {a}')


def test_corrupt_records_skipped_counted_and_replaced(data_dir):
  records, meta, bad = _corrupt_source(data_dir)
  iterator = _iterator(records, meta, error_policy='skip', error_budget='3', worker_count=0)
  batches = list(iterator)
  assert len(batches) == 3 and all(len(b[keys.IMAGE]) == 8 for b in batches)
  bad_numbers = {_decode_row(records[i]['image_emb'][0])[0] for i in bad}
  numbers = [n for batch in batches for n in _numbers(batch)]
  assert not bad_numbers & set(numbers)
  # Every bad record of the epoch was met once; replacements were valid records.
  assert dict(iterator.skip_counter.skipped) == {reason: 1 for reason in bad.values()}
  assert iterator.skip_counter.accepted == NUM_SAMPLES
  # Deterministic, also across worker processes, and the counts survive a restore.
  again = _iterator(records, meta, error_policy='skip', worker_count=1)
  _assert_batches_equal(list(again), batches)
  fresh = _iterator(records, meta, error_policy='skip')
  fresh.set_state(iterator.get_state())
  assert fresh.skip_counter.skipped == iterator.skip_counter.skipped
  with pytest.raises(BudgetExceededError, match='3 skipped'):
    list(_iterator(records, meta, error_policy='skip', error_budget='2'))


def test_skipped_records_are_listed_exactly_over_a_resume(data_dir, tmp_path):
  records, meta, bad = _corrupt_source(data_dir)
  kwargs = dict(error_policy='skip')
  full = _iterator(records, meta, str(tmp_path / 'full.jsonl'), **kwargs)
  list(full)
  rows = list(errors.read_skip_log(str(tmp_path / 'full.jsonl')))
  assert sorted((r['key'], r['reason']) for r in rows) == sorted(
      (records[i]['key'].decode(), reason) for i, reason in bad.items())
  assert all('DS train[' in r['shard'] and r['count'] == 1 for r in rows)
  assert max(r['batch'] for r in rows) >= 1  # Some are met after the checkpoint below.
  # A run checkpointed after batch 0 that went on to the end, then resumed from the checkpoint:
  # the batches it meets again do not list their records twice.
  log = str(tmp_path / 'resumed.jsonl')
  first = _iterator(records, meta, log, **kwargs)
  next(first)
  state = first.get_state()
  list(first)
  first.close()
  resumed = _iterator(records, meta, log, **kwargs)
  resumed.set_state(state)
  list(resumed)
  resumed.close()
  assert list(errors.read_skip_log(log)) == rows
  assert sum(resumed.skip_counter.skipped.values()) == len(rows)


def test_benchmark_photos_have_natural_image_statistics():
  """The loader benchmark's source images: amplitude spectrum ~1/f as photographs have, and
  JPEG sizes like ImageNet's (~4-5 bits per pixel at quality 90), not flat synthetic scenes."""
  from mobileclip_jax.benchmark import data as data_benchmark  # pylint: disable=g-import-not-at-top
  pixels = data_benchmark.photo(np.random.default_rng(0), 256, 384)
  gray = pixels.astype(np.float64).mean(-1)
  spectrum = np.abs(np.fft.fft2(gray - gray.mean()))
  radius = np.hypot(*np.meshgrid(np.fft.fftfreq(384), np.fft.fftfreq(256)))
  bands = np.geomspace(0.02, 0.4, 9)
  amplitude = [spectrum[(radius >= lo) & (radius < hi)].mean() for lo, hi in zip(bands, bands[1:])]
  slope = np.polyfit(np.log(np.sqrt(bands[1:] * bands[:-1])), np.log(amplitude), 1)[0]
  bits = 8 * len(data_benchmark._jpeg(pixels)) / (256 * 384)
  assert -1.3 < slope < -0.7, slope
  assert 3 < bits < 6, bits


def test_missing_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='build_dataset.py'):
    loader.make_train_iterator(loader.InputConfig(dataset='nowhere',
                                                      data_dir=str(tmp_path)), 0, 1)


def test_generation_config_from_apple_and_own_forms():
  apple = {'random_resized_crop': {'size': 224, 'interpolation': 'bilinear',
                                   'scale': [0.5, 1.0]},
           'rand_augment': {'enable': True, 'p': 0.5, 'num_ops': 3, 'interpolation': 'bilinear'},
           'to_rgb': {'enable': True}}
  assert augment.from_generation_config(apple) == augment.AugmentConfig(
      image_size=224, interpolation='bilinear', scale=(0.5, 1.0), p=0.5, num_ops=3,
      op_interpolation='bilinear')
  assert augment.from_generation_config({'random_resized_crop': {'size': [256, 256]},
                                 'rand_augment': {'enable': False}}) == augment.AugmentConfig(
                                     image_size=256, p=0.0)
  own = augment.AugmentConfig(magnitude=5)
  assert augment.from_generation_config(own.to_dict()) == own
  with pytest.raises(ValueError, match='antialias'):
    augment.from_generation_config({'random_resized_crop': {'size': 224, 'antialias': False}})
  with pytest.raises(ValueError, match='--reinforce_config'):
    augment.from_generation_config(None)

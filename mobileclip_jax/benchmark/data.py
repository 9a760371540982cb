"""Training input throughput: what building a batch costs, and what a training step asks for.

  python launch/benchmark.py data [--option=KEY=VALUE ...]

Options (all optional):
  num_samples=256     examples in the generated datasets
  short_side=512      short side of the source images (web-image size, as img2dataset stores
                      DataComp's); the long side is 1, 4/3, 3/2 or 16/9 times it
  image_size=256      the student's input side
  k=30                stored augmentations per example (DataCompDR-12M: 30)
  teacher_dims=768,768  teacher embedding widths (DataCompDR: two ViT-L/14, stored float16)
  batch_size=64       process-local batch of the measurements
  batches=8           batches timed per loader measurement (after the first one)
  workers=0,2         worker_count values of the whole-loader rows
  repeats=3           timed repetitions of the in-process measurements
  step_batch=512      examples per device per step for the demand row (MobileCLIP-S0 recipe:
                      global batch 65,536 on 128 GPUs)
  step_time_s=1.0     ASSUMED step time for the demand row (nothing here measures it)

The data: photo-like images (`photo`: noise with a natural image's 1/f amplitude spectrum and
correlated colours, plus hard edges; JPEG quality 90, ~4.5 bits per pixel, about ImageNet's)
with demo-world captions, 5 DemoCaptioner synthetic captions, k augmentations sampled with
DataCompDR's config at the image's size, random unit-norm teacher embeddings; written as
DataCompDR-style tars, built with `build_dataset` into a reinforced and a plain TFDS dataset in
a temporary folder.

Rows ('row' field):
  setup    the data: mean encoded size and bits per pixel of the source images.
  stage    CPU microseconds per example of each stage, one thread: shuffle (the record index,
           at this dataset's size and at DataCompDR-12M's: it costs more below ~1e5 records),
           read (TFDS record read and decode: zstd-compressed ArrayRecord), decode (PIL, the
           whole image), decode_rows (the loader's: only down to the stored crop's bottom,
           `jpeg_rows`), replay (crop + bicubic resize + 2 RandAugment ops at image_size;
           crop_resize alone), tokenize (a batch of captions, per caption), normalize (per
           image). draft_* is PIL's reduced-size JPEG decode, which the loader does NOT use:
           draft_applicable is the fraction of stored crops at least twice the output side
           (only there can it decode less), draft_pixels_differ the fraction of output values
           that then differ from the exact replay (the teachers saw the exact one).
  example  `ChunkLoader` building chunks in this process (no Grain around it): decode +
           replay + tokenize + everything else an example needs. samples_per_core_s = examples
           per CPU-second of this process (the loader's figure of merit: target >= 300).
  loader   the whole Grain iterator (`make_train_iterator`) with `worker_count` processes, in a
           fresh interpreter: samples_per_s (wall, after the first batch), first_batch_s, and
           cpu_s_per_sample over the whole run (parent + workers, start-up included).
  demand   the step's appetite: step_batch / step_time_s examples per device per second, and the
           cores per device the measured `example` rate needs to keep up.
"""
import io
import json
import os
import resource
import tempfile
import time
from typing import Any, Dict, Iterator

import numpy as np
from PIL import Image

from mobileclip_jax import demo as demo_world
from mobileclip_jax.benchmark import common
from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import jpeg_rows
from mobileclip_jax.data import loader
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import sample_codec
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.data import wds

_DEFAULTS = {'num_samples': 256, 'short_side': 512, 'image_size': 256, 'k': 30,
             'teacher_dims': '768,768',
             'batch_size': 64, 'batches': 8, 'workers': '0,2', 'repeats': 3, 'step_batch': 512,
             'step_time_s': 1.0}
_NUM_SYN = 5  # Synthetic captions per example, as DataCompDR.
_DATACOMPDR_12M = 12_800_000
# Apple's generation config (ml-mobileclip training/configs/datacompdr12m.json).
_AUGMENTATION = {'random_resized_crop': {'interpolation': 'bicubic', 'size': 224},
                 'rand_augment': {'enable': True, 'p': 1.0}}


def _parse(options: Dict[str, str]) -> Dict[str, Any]:
  unknown = sorted(set(options) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f'Unknown data benchmark options {unknown}; valid: {sorted(_DEFAULTS)}.')
  o = {**_DEFAULTS, **options}
  parsed = {k: type(_DEFAULTS[k])(o[k]) for k in ('num_samples', 'short_side', 'image_size', 'k',
                                                   'batch_size', 'batches', 'repeats',
                                                   'step_batch', 'step_time_s')}
  parsed['teacher_dims'] = tuple(int(d) for d in str(o['teacher_dims']).split(','))
  parsed['workers'] = [int(w) for w in str(o['workers']).split(',')]
  return parsed


def _unit_rows(rng: np.random.Generator, rows: int, dims) -> np.ndarray:
  parts = [rng.normal(size=(rows, d)) for d in dims]
  return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3] with natural-image statistics: a 1/f amplitude spectrum (power
  1/f^2, as photographs have), correlated colour channels, and a few hard edges."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(height, width))
  channels = [np.fft.irfft2(amplitude * (rng.normal(size=amplitude.shape)
                                         + 1j * rng.normal(size=amplitude.shape)),
                            s=(height, width)) for _ in range(3)]
  pixels = np.stack(channels, -1) @ np.array([[1, .8, .6], [.8, 1, .8], [.6, .8, 1]])
  pixels = (pixels - pixels.mean()) / pixels.std() * 45 + 120
  y, x = np.mgrid[:height, :width]
  for _ in range(4):  # Half-planes with their own colour shift: sharp edges at any angle.
    angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * max(height, width)
    side = np.cos(angle) * (x - width / 2) + np.sin(angle) * (y - height / 2) > offset
    pixels[side] += rng.uniform(-50, 50, size=3)
  return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def make_datasets(data_dir: str, num_samples: int, short_side: int, k: int,
                  teacher_dims) -> Dict[str, float]:
  """Builds the datasets 'reinforced' and 'plain' (the same examples) in `data_dir`; returns
  the mean encoded size (bytes) and bits per pixel of the images."""
  rng = np.random.default_rng(0)
  captioner = demo_world.DemoCaptioner()
  shards = os.path.join(data_dir, 'tars')
  sizes, pixels = [], []
  with wds.ShardWriter(os.path.join(shards, '{:05d}.tar'), 256) as writer:
    for demo in demo_world.iter_samples('train', num_samples, 16, seed=0):
      long_side = int(short_side * rng.choice([1, 4 / 3, 3 / 2, 16 / 9]))
      height, width = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
      image = _jpeg(photo(rng, height, width))
      sizes.append(len(image))
      pixels.append(height * width)
      sample = sample_codec.Sample(
          shard='', key=demo['uid'], uid=demo['uid'], image=image,
          image_format='jpg', captions=[demo['caption']], syn_keys=('syn_text',),
          syn_captions=[captioner.caption(demo['labels'], rng) for _ in range(_NUM_SYN)],
          syn_key_index=np.zeros(_NUM_SYN, np.int32),
          paug=[augment.sample_params(rng, height, width) for _ in range(k)],
          image_emb=_unit_rows(rng, k, teacher_dims),
          text_emb=_unit_rows(rng, 1 + _NUM_SYN, teacher_dims))
      writer.write(sample.key, sample_codec.encode_sample(sample))
  for kind in ('reinforced', 'plain'):
    dataset_build.build_dataset(os.path.join(shards, '*.tar'), kind, data_dir, kind=kind,
                                augmentation=_AUGMENTATION, teacher_dims=teacher_dims,
                                progress=False)
  return {'image_kb': float(np.mean(sizes)) / 1e3,
          'bits_per_pixel': 8 * float(np.sum(sizes)) / float(np.sum(pixels))}


def _input_config(data_dir: str, dataset: str, image_size: int, batch_size: int,
                  worker_count: int = 0) -> loader.InputConfig:
  return loader.InputConfig(dataset=dataset, data_dir=data_dir, global_batch_size=batch_size,
                              image_size=image_size, worker_count=worker_count)


def _per_example_us(fn, count: int, repeats: int) -> float:
  """CPU microseconds per example of `fn` (which handles `count`), best of `repeats` after a
  warm-up: CPU time, since the machine may be shared."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    start = time.process_time()
    fn()
    best = min(best, time.process_time() - start)
  return best / count * 1e6


def _draft_replay(data: bytes, params: Any, size: int, config: augment.AugmentConfig
                  ) -> np.ndarray:
  """The replay on PIL's reduced-size JPEG decode (scale 1/2, 1/4 or 1/8 chosen so that the
  crop keeps at least `size` pixels), the box scaled to match: what the loader does NOT do."""
  image = Image.open(io.BytesIO(data))
  (top, left, height, width), _ = augment.validate_params(params, image.height, image.width)
  scale = 1
  while scale < 8 and min(height, width) // (2 * scale) >= size:
    scale *= 2
  full = image.size
  image.draft('RGB', (full[0] // scale, full[1] // scale))
  image.load()
  fx, fy = image.width / full[0], image.height / full[1]
  box = [int(top * fy), int(left * fx), max(1, int(height * fy)), max(1, int(width * fx))]
  return augment.replay(image, [box, params[1]], size, config)


def _stage_row(data_dir: str, o: Dict[str, Any]) -> Dict[str, Any]:
  source, meta = reinforced_tfds.open_reinforced('reinforced', data_dir)
  count = min(o['batch_size'], len(source))
  records = [source[i] for i in range(count)]
  encoded = [r['image'] for r in records]
  images = [Image.open(io.BytesIO(data)) for data in encoded]
  for image in images:
    image.load()
  params = [json.loads(r['paug'])[0] for r in records]  # The stored augmentations.
  config = augment.from_generation_config(meta.augmentation)
  size = o['image_size']
  replayed = np.stack([augment.replay(i, a, size, config) for i, a in zip(images, params)])
  draft = np.stack([_draft_replay(d, a, size, config) for d, a in zip(encoded, params)])
  applicable = np.array([min(a[0][2:]) >= 2 * size for a in params])
  tokenizer = tokenizer_lib.get_tokenizer(meta.tokenizer)
  captions = [r['syn_captions'][0].decode() for r in records]

  def decode():
    for data in encoded:
      with Image.open(io.BytesIO(data)) as image:
        image.load()

  def decode_rows():
    for data, a in zip(encoded, params):
      top, _, height, _ = a[0]
      with Image.open(io.BytesIO(data)) as image:
        jpeg_rows.decode_top_rows(image, data, top + height)

  def crop_resize():
    for image, a in zip(images, params):
      top, left, height, width = a[0]
      image.crop((left, top, left + width, top + height)).resize((size, size),
                                                                 Image.Resampling.BICUBIC)

  def shuffle(num_examples):
    return lambda: [loader.shuffled_index(0, 0, i, num_examples) for i in range(count)]

  def us(fn):
    return _per_example_us(fn, count, o['repeats'])

  return {
      'row': 'stage', 'examples': count,
      'shuffle_us': us(shuffle(len(source))),
      'shuffle_us_12m': us(shuffle(_DATACOMPDR_12M)),
      'read_us': us(lambda: [source[i] for i in range(count)]),
      'decode_us': us(decode),
      'decode_rows_us': us(decode_rows),
      'replay_us': us(lambda: [augment.replay(i, a, size, config)
                               for i, a in zip(images, params)]),
      'crop_resize_us': us(crop_resize),
      'tokenize_us': us(lambda: tokenizer(captions)),
      'normalize_us': us(lambda: preprocess.normalize(replayed, (0.0,) * 3, (1.0,) * 3)),
      'draft_decode_replay_us': us(lambda: [_draft_replay(d, a, size, config)
                                            for d, a in zip(encoded, params)]),
      'draft_applicable': float(applicable.mean()),
      'draft_pixels_differ': float(np.mean(draft[applicable] != replayed[applicable]))
                             if applicable.any() else None,
  }


def _example_row(data_dir: str, dataset: str, o: Dict[str, Any]) -> Dict[str, Any]:
  config = _input_config(data_dir, dataset, o['image_size'], o['batch_size'])
  source, meta = reinforced_tfds.open_reinforced(dataset, data_dir)
  chunk_loader = loader.ChunkLoader(config, source, meta, dataset, 0, 1)
  chunks = iter(range(1 << 30))
  chunk_loader(next(chunks))  # Warm-up: tokenizer caches, allocator.
  count = o['repeats'] * chunk_loader.chunks_per_batch
  wall, cpu = time.perf_counter(), common.cpu_time_s()
  for _ in range(count):
    chunk_loader(next(chunks))
  wall, cpu = time.perf_counter() - wall, common.cpu_time_s() - cpu
  examples = count * chunk_loader.chunk_size
  return {'row': 'example', 'dataset': dataset, 'kind': meta.kind, 'examples': examples,
          'samples_per_s': examples / wall, 'samples_per_core_s': examples / cpu,
          'us_per_example_cpu': cpu / examples * 1e6}


def measure_loader(data_dir: str, image_size: int, batch_size: int, batches: int,
                   worker_count: int) -> Dict[str, Any]:
  """Runs in a fresh interpreter (`common.isolated`): the whole iterator, start-up included."""
  start, cpu_start = time.perf_counter(), common.cpu_time_s()
  config = _input_config(data_dir, 'reinforced', image_size, batch_size, worker_count)
  iterator = loader.make_train_iterator(config, 0, 1)
  next(iterator)
  first = time.perf_counter() - start
  steady = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  steady = time.perf_counter() - steady
  iterator.close()  # Joins the workers, so their CPU time is in RUSAGE_CHILDREN.
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = common.cpu_time_s() - cpu_start + children.ru_utime + children.ru_stime
  return {'first_batch_s': first, 'samples_per_s': batches * batch_size / steady,
          'cpu_s_per_sample': cpu / ((batches + 1) * batch_size),
          'read_threads': config.read_threads,
          'prefetch_batches': config.prefetch_batches}


def run(options: Dict[str, str]) -> Iterator[Dict[str, Any]]:
  """Yields the rows described in the module docstring."""
  o = _parse(options)
  with tempfile.TemporaryDirectory(prefix='mobileclip_data_bench_') as data_dir:
    start = time.perf_counter()
    images = make_datasets(data_dir, o['num_samples'], o['short_side'], o['k'],
                           o['teacher_dims'])
    setup = {'short_side': o['short_side'], 'image_size': o['image_size'], 'k': o['k'],
             'teacher_dims': list(o['teacher_dims']), 'batch_size': o['batch_size'],
             'cpu_count': os.cpu_count()}
    yield {'row': 'setup', 'num_samples': o['num_samples'],
           'build_s': time.perf_counter() - start, **images, **setup}
    yield {**_stage_row(data_dir, o), **setup}
    rates = {}
    for dataset in ('reinforced', 'plain'):
      row = _example_row(data_dir, dataset, o)
      rates[dataset] = row['samples_per_core_s']
      yield {**row, **setup}
    for worker_count in o['workers']:
      result = common.isolated(__name__, 'measure_loader', dict(
          data_dir=data_dir, image_size=o['image_size'], batch_size=o['batch_size'],
          batches=o['batches'], worker_count=worker_count))
      yield {'row': 'loader', 'worker_count': worker_count, **result, **setup}
    demand = o['step_batch'] / o['step_time_s']
    yield {'row': 'demand', 'step_batch_per_device': o['step_batch'],
           'assumed_step_time_s': o['step_time_s'], 'samples_per_s_per_device': demand,
           'cores_per_device_needed': demand / rates['reinforced'],
           'note': 'MobileCLIP-S0 recipe: global batch 65,536 on 128 GPUs = 512 per device per '
                   'step; the step time is an assumption (option step_time_s), not measured.'}

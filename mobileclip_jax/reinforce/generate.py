"""Generation of a reinforced dataset, shard by shard: resumable, split over processes.

Per input sample (spec sections 5-6, Apple's RayGen embedding pass):
  - k augmentations are sampled in the stored (paug.json) form, replayed at the generation size,
    bicubic-resized (PIL) to every smaller teacher resolution; each teacher normalizes with its
    own mean/std -> image_emb [k, D];
  - the ground-truth caption and S synthetic captions per captioner (each under its own syn.json
    key, near-duplicates regenerated, see captioners.py) are embedded by every teacher;
  - D = sum of the teacher widths, each teacher's slice unit-norm.
Output: one DataCompDR-format tar per input shard under the same name, members: the image
(original bytes), txt, json (as in the source, else {"uid": key}), syn.json {syn_key: [S], ...},
paug.json {"param_aug": [k]}, npz (or pth.gz for bfloat16) with image_emb [k, D] and the text
embeddings, plus any other member of the source (url.txt, ...). With one captioner writing
DataCompDR's `syn_text`, text_emb [1 + S, D] holds the ground truth then the synthetic captions
(DataCompDR's layout); otherwise text_emb [1, D] holds the ground truth and `<syn_key>_emb`
[S, D] each captioner's (DFNDR's layout). The reinforce config (settings.py) sits next to them.

Host work (decode, k replays, resizes) runs in a thread pool one chunk ahead of the devices, and
image embeddings are dispatched before the captions are made, so the three overlap.

Resume: a shard is finished when its record (.reinforce/shards/<name>.json, written after the
tar) matches the settings and the input file and the tar has the recorded size; finished shards
are skipped, anything else is generated again. Process p of P takes the input shards i with
i % P == p; no communication is needed. When every shard has a record, whoever finishes last
writes `manifest.jsonl` (DataCompDR's: one {"shard", "num_samples"} line per shard) and the
complete `reinforce_summary.json`.
"""
import concurrent.futures
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from PIL import Image
import tqdm

from mobileclip_jax import utils
from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import errors
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.data import wds
from mobileclip_jax.data.errors import CorruptSampleError, ErrorPolicy, SkipCounter
from mobileclip_jax.reinforce import captioners as captioners_lib
from mobileclip_jax.reinforce import settings as settings_lib
from mobileclip_jax.reinforce import inputs
from mobileclip_jax.reinforce import teachers as teachers_lib

STATE_DIR = '.reinforce'
SUMMARY_FILE = 'reinforce_summary.json'
MANIFEST_FILE = 'manifest.jsonl'
# Members the generation writes; the source's versions are replaced.
_GENERATED = ('syn.json', 'paug.json', 'npz', 'pth.gz')
_AUG_STREAM, _CAPTION_STREAM = 0, 1
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # Fixed member dates: the same inputs give the same bytes.


# ----------------------------------------------------------------------------------------------
# One sample on the host.


@dataclasses.dataclass
class _Prepared:
  """A decoded sample with its k augmentations at every teacher resolution."""
  raw: wds.RawSample
  item: captioners_lib.CaptionInput
  caption: str
  paug: List[Any]
  views: Dict[int, np.ndarray]  # size -> uint8 [k, size, size, 3]


def _decode_image(data: bytes, raw: wds.RawSample) -> Image.Image:
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.convert('RGB')  # Loads the pixels: a truncated file fails here.
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on damaged input.
    raise CorruptSampleError(raw.shard, raw.key, errors.BAD_IMAGE,
                             f'{type(e).__name__}: {e}') from None


def _existing_captions(raw: wds.RawSample, syn_keys: Sequence[str]) -> Dict[str, List[str]]:
  """The source's synthetic captions under `syn_keys` (those it has)."""
  if 'syn.json' not in raw.members:
    return {}
  syn = wds.decode_json(raw.members['syn.json'], raw.shard, raw.key, 'syn.json')
  out = {}
  for syn_key in syn_keys:
    texts = syn.get(syn_key) if isinstance(syn, dict) else None
    if texts is None:
      continue
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
      raise CorruptSampleError(raw.shard, raw.key, errors.BAD_JSON,
                               f'syn.json[{syn_key!r}] is not a list of strings')
    out[syn_key] = texts
  return out


@dataclasses.dataclass(frozen=True)
class _Preparer:
  """Turns a raw sample into a `_Prepared` (runs in worker threads; holds no mutable state)."""
  config: settings_lib.GenerationConfig
  captioners: Tuple[captioners_lib.Captioner, ...]
  sizes: Tuple[int, ...]
  shard_seed: int

  def __call__(self, raw: wds.RawSample, index: int) -> Union[_Prepared, CorruptSampleError]:
    try:
      return self._prepare(raw, index)
    except CorruptSampleError as e:
      return e

  def _prepare(self, raw: wds.RawSample, index: int) -> _Prepared:
    c = self.config
    _, image_bytes = raw.member(*wds.IMAGE_EXTS)
    caption = wds.decode_text(raw.member('txt')[1], raw.shard, raw.key, 'txt')
    labels = (wds.decode_json(raw.members['json'], raw.shard, raw.key, 'json')
              if 'json' in raw.members else {})
    if not isinstance(labels, dict):
      raise CorruptSampleError(raw.shard, raw.key, errors.BAD_JSON, 'json is not a JSON object')
    image = _decode_image(image_bytes, raw)
    existing = _existing_captions(raw, [captioner.syn_key for captioner in self.captioners])
    item = captioners_lib.CaptionInput(raw.shard, raw.key, str(labels.get('uid', raw.key)),
                                       image, labels, existing)
    for captioner in self.captioners:
      captioner.check(item, c.num_syn)
    # Each sample's draws depend only on (seed, shard name, position): threads cannot reorder
    # them and a redone shard gets the same augmentations.
    rng = np.random.default_rng([c.seed, self.shard_seed, index, _AUG_STREAM])
    paug = [augment.sample_params(rng, image.height, image.width, c.augmentation)
            for _ in range(c.k)]
    crops = [augment.replay(image, p, c.gen_size, c.augmentation) for p in paug]
    views = {}
    for size in self.sizes:
      views[size] = np.stack(crops if size == c.gen_size else [
          np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))
          for crop in crops])
    return _Prepared(raw, item, caption, paug, views)


def _prefetched_chunks(samples: Iterator[wds.RawSample], preparer: _Preparer, chunk_size: int,
                       pool: concurrent.futures.Executor
                       ) -> Iterator[List[Union[_Prepared, CorruptSampleError]]]:
  """Prepared chunks in order; chunk i + 1 is prepared by the pool while i is consumed."""
  def submit(start: int) -> List[concurrent.futures.Future]:
    futures = []
    for index in range(start, start + chunk_size):
      raw = next(samples, None)
      if raw is None:
        break
      futures.append(pool.submit(preparer, raw, index))
    return futures

  futures, start = submit(0), chunk_size
  while futures:
    following = submit(start)
    start += chunk_size
    yield [f.result() for f in futures]
    futures = following


# ----------------------------------------------------------------------------------------------
# Members.


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
  """An .npz file (what np.savez writes) with fixed member dates."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
    for name, array in arrays.items():
      with archive.open(zipfile.ZipInfo(f'{name}.npy', _ZIP_EPOCH), 'w',
                        force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
  return buffer.getvalue()


def _pth_gz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
  """A gzip'd torch.save of bfloat16 tensors: DataCompDR-12M-bf16's 'pth.gz' member."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError('emb_dtype=bfloat16 is stored as pth.gz (torch.save), which needs torch; '
                     'install the torch extra or use emb_dtype=float16.') from None
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
              for k, v in arrays.items()}, buffer)
  return gzip.compress(buffer.getvalue(), mtime=0)


def _embedding_member(image_emb: np.ndarray, text_emb: np.ndarray, syn_keys: Sequence[str],
                      emb_dtype: str) -> Tuple[str, bytes]:
  """text_emb [1 + len(syn_keys) * S, D]: DataCompDR's one array for the single key 'syn_text',
  else DFNDR's ground truth in text_emb and one '<key>_emb' per key (module docstring)."""
  arrays = {'image_emb': image_emb, 'text_emb': text_emb}
  if tuple(syn_keys) != (captioners_lib.SYN_KEY,):
    per_key = np.split(text_emb[1:], len(syn_keys))
    arrays = {'image_emb': image_emb, 'text_emb': text_emb[:1],
              **{f'{key}_emb': emb for key, emb in zip(syn_keys, per_key)}}
  if emb_dtype == 'bfloat16':
    return 'pth.gz', _pth_gz_bytes(arrays)
  dtype = reinforced_tfds.EMB_DTYPES[emb_dtype]
  return 'npz', _npz_bytes({k: v.astype(dtype) for k, v in arrays.items()})


def _members(p: _Prepared, syn: Dict[str, List[str]], image_emb: np.ndarray,
             text_emb: np.ndarray, config: settings_lib.GenerationConfig) -> Dict[str, bytes]:
  members = {ext: data for ext, data in p.raw.members.items() if ext not in _GENERATED}
  members.setdefault('json', json.dumps({'uid': p.raw.key}).encode('utf-8'))
  members['syn.json'] = json.dumps(syn).encode('utf-8')
  members['paug.json'] = json.dumps({'param_aug': p.paug}).encode('utf-8')
  ext, data = _embedding_member(image_emb, text_emb, list(syn), config.emb_dtype)
  members[ext] = data
  return members


# ----------------------------------------------------------------------------------------------
# Shard records (resume).


def _record_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, STATE_DIR, 'shards', f'{name}.json')


def _read_record(out_dir: str, name: str) -> Optional[Dict[str, Any]]:
  try:
    with open(_record_path(out_dir, name), encoding='utf-8') as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def finished_record(out_dir: str, shard: inputs.InputShard,
                    config_hash: str) -> Optional[Dict[str, Any]]:
  """The record of `shard` if its output is complete for these settings and inputs, else None.

  Complete = a record with the same settings hash and input fingerprint, and an output tar of
  exactly the recorded size (a cut or replaced tar is generated again).
  """
  record = _read_record(out_dir, shard.name)
  if (record is None or record.get('config_sha256') != config_hash or
      record.get('input') != json.loads(json.dumps(shard.fingerprint()))):
    return None
  if record['num_samples']:
    path = os.path.join(out_dir, shard.name)
    if not os.path.isfile(path) or os.path.getsize(path) != record['size']:
      return None
  return record


# ----------------------------------------------------------------------------------------------
# One shard.


@dataclasses.dataclass
class _Context:
  """Everything the shard loop uses, fixed for a run."""
  out_dir: str
  ensemble: teachers_lib.TeacherEnsemble
  captioners: Tuple[captioners_lib.Captioner, ...]
  config: settings_lib.GenerationConfig
  config_hash: str
  policy: ErrorPolicy
  pool: concurrent.futures.Executor
  total: SkipCounter  # Over every shard of this process, for the policy's budget.
  bar: tqdm.tqdm


def _embed_chunk(ctx: _Context, good: List[_Prepared], rngs: Sequence[np.random.Generator]
                 ) -> Tuple[np.ndarray, np.ndarray, Dict[str, List[List[str]]],
                            Dict[str, captioners_lib.QualityReport]]:
  """(image_emb [n, k, D], text_emb [n, 1 + K * S, D], {syn_key: n lists of S captions},
  {syn_key: caption report}) of a chunk, for the K captioners in order, each drawing from its
  generator in `rngs`."""
  c, ensemble = ctx.config, ctx.ensemble
  n, width = len(good), ensemble.width
  views = {s: np.concatenate([p.views[s] for p in good]) for s in ensemble.image_sizes}
  images = ensemble.embed_images_async(views)  # Runs while the captions are made.
  items = [p.item for p in good]
  syn = {}
  for captioner, rng in zip(ctx.captioners, rngs):
    made = captioner(items, c.num_syn, rng)
    if len(made) != n or any(len(s) != c.num_syn for s in made):
      raise ValueError(f'Captioner {captioner.name!r} returned {[len(s) for s in made]} '
                       f'captions for {n} images; expected {c.num_syn} each.')
    syn[captioner.syn_key] = made
  texts = ensemble.embed_texts([p.caption for p in good] +
                               [t for made in syn.values() for s in made for t in s])
  per_captioner = texts[n:].reshape(len(syn), n, c.num_syn, width)
  emb, reports = [texts[:n, None]], {}
  for i, captioner in enumerate(ctx.captioners):
    key = captioner.syn_key
    syn[key], syn_emb, reports[key] = captioners_lib.deduplicate(
        items, syn[key], per_captioner[i], captioner=captioner,
        embed_texts=ensemble.embed_texts, num_teachers=len(ensemble.teachers),
        threshold=c.dedup_threshold, max_regenerate=c.max_regenerate, rng=rngs[i])
    emb.append(syn_emb)
  return images.result().reshape(n, c.k, width), np.concatenate(emb, axis=1), syn, reports


def _generate_shard(ctx: _Context, shard: inputs.InputShard) -> Dict[str, Any]:
  """Generates one output shard and writes its record; returns the record."""
  start, c = time.time(), ctx.config
  counter = SkipCounter()
  quality = {c.syn_key: captioners_lib.QualityReport() for c in ctx.captioners}

  def handle(error: CorruptSampleError) -> None:
    ctx.policy.handle(error, counter, check_budget=False)
    ctx.total.record(error)
    ctx.policy.check(ctx.total)

  final = os.path.join(ctx.out_dir, shard.name)
  staging = os.path.join(ctx.out_dir, STATE_DIR, 'partial', shard.name)
  shard_seed = zlib.crc32(shard.name.encode('utf-8'))
  for stale in glob.glob(glob.escape(staging) + '.*'):  # Left by a run that was killed.
    os.remove(stale)
  preparer = _Preparer(c, ctx.captioners, ctx.ensemble.image_sizes, shard_seed)
  chunks = _prefetched_chunks(shard.read(handle), preparer, c.chunk_size, ctx.pool)
  with wds.ShardWriter(staging + '.{:d}', max_samples=2**62, manifest=False) as writer:
    for chunk_index, chunk in enumerate(chunks):
      good = []
      for result in chunk:
        if isinstance(result, CorruptSampleError):
          handle(result)
        else:
          good.append(result)
      if not good:
        continue
      # Captioner j > 0 draws from its own stream; the first keeps the one-captioner stream.
      rngs = [np.random.default_rng([c.seed, shard_seed, chunk_index, _CAPTION_STREAM] +
                                    ([j] if j else [])) for j in range(len(ctx.captioners))]
      image_emb, text_emb, syn, reports = _embed_chunk(ctx, good, rngs)
      for key, report in reports.items():
        quality[key].merge(report)
      for i, p in enumerate(good):
        writer.write(p.raw.key, _members(p, {key: made[i] for key, made in syn.items()},
                                         image_emb[i], text_emb[i], c))
      counter.ok(len(good))
      ctx.total.ok(len(good))
      ctx.bar.update(len(good))
  if writer.paths:
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(writer.paths[0], final)
  elif os.path.exists(final):
    os.remove(final)  # An earlier run's output of a now-empty shard.
  record = {'name': shard.name, 'input': shard.fingerprint(), 'config_sha256': ctx.config_hash,
            'num_samples': counter.accepted,
            'size': os.path.getsize(final) if writer.paths else 0,
            'counter': counter.to_json(),
            'captions': {key: report.to_json() for key, report in quality.items()},
            'seconds': time.time() - start}
  utils.write_json_atomic(_record_path(ctx.out_dir, shard.name), record)
  return record


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class ReinforceReport:
  """What a run did (this process's shards) and, if complete, where the whole dataset is.

  Attributes:
    out_dir: the output folder.
    shards: this process's input shards.
    shards_generated: shards generated by this run.
    shards_reused: shards finished by an earlier run, skipped.
    samples_generated: samples written by this run.
    seconds: wall time of this run.
    counter: accepted and skipped samples over this process's shards (reused ones included).
    captions: per syn.json key, caption measures over this process's shards (reused ones
      included).
    complete: every shard of every process is finished (manifest and summary written).
    k: augmentations per sample.
  """
  out_dir: str
  shards: int
  shards_generated: int
  shards_reused: int
  samples_generated: int
  seconds: float
  counter: SkipCounter
  captions: Dict[str, captioners_lib.QualityReport]
  complete: bool
  k: int

  @property
  def images_per_second(self) -> float:
    return self.samples_generated / self.seconds if self.seconds > 0 else 0.0

  def summary(self) -> str:
    lines = [
        f'Generated {self.shards_generated} shards ({self.samples_generated} images, '
        f'{self.samples_generated * self.k} augmentations) in {self.seconds:.1f} s: '
        f'{self.images_per_second:.1f} images/s; {self.shards_reused} of {self.shards} shards '
        'were finished before.',
        self.counter.summary(), *[q.summary(key) for key, q in self.captions.items()]]
    lines.append(f'Dataset complete in {self.out_dir} (manifest.jsonl, {SUMMARY_FILE}).'
                 if self.complete else 'Other processes still have shards to generate.')
    return '\n'.join(lines)


def _aggregate(records: Sequence[Dict[str, Any]]
               ) -> Tuple[SkipCounter, Dict[str, captioners_lib.QualityReport]]:
  counter, quality = SkipCounter(), {}
  for record in records:
    counter.merge(SkipCounter.from_json(record['counter']))
    for key, report in record['captions'].items():
      quality.setdefault(key, captioners_lib.QualityReport()).merge(
          captioners_lib.QualityReport.from_json(report))
  return counter, quality


def _write_summary(out_dir: str, shards: Sequence[inputs.InputShard], config_hash: str) -> bool:
  """Writes the summary of every finished shard; the manifest too once all are. Returns that."""
  records = [finished_record(out_dir, s, config_hash) for s in shards]
  done = [r for r in records if r is not None]
  counter, quality = _aggregate(done)
  complete = len(done) == len(shards)
  utils.write_json_atomic(os.path.join(out_dir, SUMMARY_FILE), {
      'complete': complete, 'shards': len(shards), 'shards_finished': len(done),
      'samples': sum(r['num_samples'] for r in done), 'counter': counter.to_json(),
      'captions': {key: report.to_json() for key, report in quality.items()}})
  if complete:
    lines = [json.dumps({'shard': os.path.splitext(r['name'])[0], 'num_samples': r['num_samples']})
             for r in done if r['num_samples']]
    with utils.atomic_write(os.path.join(out_dir, MANIFEST_FILE), encoding='utf-8') as f:
      f.write(''.join(line + '\n' for line in lines))
  return complete


def reinforce(shards: Sequence[inputs.InputShard], out_dir: str,
              ensemble: teachers_lib.TeacherEnsemble,
              captioners: Sequence[captioners_lib.Captioner],
              config: settings_lib.GenerationConfig, *, policy: ErrorPolicy = ErrorPolicy(),
              process_index: Optional[int] = None, process_count: Optional[int] = None,
              workers: Optional[int] = None, overwrite: bool = False,
              progress: bool = True) -> ReinforceReport:
  """Generates the reinforced shards of this process (see the module docstring).

  Args:
    shards: all input shards (`inputs.resolve`), the same list in every process.
    out_dir: output folder.
    ensemble: the teachers.
    captioners: make the synthetic captions, each under its `syn_key`
      (`captioners.make_captioners`).
    config: generation settings.
    policy: what to do with corrupt input samples (counted per reason either way).
    process_index, process_count: this process's share of the shards (default: JAX's).
    workers: host threads decoding and augmenting images (default: the CPU count).
    overwrite: generate every shard again, even when finished with other settings.
    progress: show a progress bar.

  Returns:
    A `ReinforceReport`. Raises ValueError for settings that cannot work (a teacher larger than
    the generation size, a captioning model whose tokenizer is not the student's, two
    captioners with one key, another dataset's settings in `out_dir`), CorruptSampleError or
    BudgetExceededError per `policy`.
  """
  start = time.time()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count}).')
  too_big = [f'{t.name}:{t.tag} ({t.image_size} px)' for t in ensemble.teachers
             if t.image_size > config.gen_size]
  if too_big:
    raise ValueError(f'Teachers {too_big} take larger images than the generation size '
                     f'{config.gen_size}: augmented crops are only resized down. Set gen_size to '
                     f'at least {max(ensemble.image_sizes)}.')
  keys = [captioner.syn_key for captioner in captioners]
  if not keys or len(set(keys)) != len(keys):
    raise ValueError(f'The captioners must write distinct syn.json keys, got {keys}.')
  for captioner in captioners:
    if captioner.tokenizer not in (None, config.tokenizer):
      raise ValueError(f'Captioner {captioner.name} ({captioner.syn_key}) has tokenizer '
                       f'{captioner.tokenizer!r} but the '
                       f'student\'s (the dataset metadata\'s) is {config.tokenizer!r}: use a '
                       'captioner trained with the student\'s tokenizer, or set --tokenizer.')
  settings = settings_lib.reinforce_config(ensemble.describe(), config,
                                           [captioner.describe() for captioner in captioners],
                                           keys)
  settings_lib.write_or_check(out_dir, settings, overwrite)
  config_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

  mine = [s for s in shards if s.index % process_count == process_index]
  todo, reused = [], []
  for shard in mine:
    record = None if overwrite else finished_record(out_dir, shard, config_hash)
    if record is None:
      todo.append(shard)
    else:
      reused.append(record)
  total, _ = _aggregate(reused)
  policy.check(total)
  bar = tqdm.tqdm(desc=f'Reinforcing {len(todo)} shards ({len(reused)} done before)',
                  unit=' img', disable=not progress, smoothing=0.05)
  generated = []
  with bar, concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    ctx = _Context(out_dir, ensemble, tuple(captioners), config, config_hash, policy, pool,
                   total, bar)
    for shard in todo:
      generated.append(_generate_shard(ctx, shard))
      bar.set_postfix(shards=f'{len(generated) + len(reused)}/{len(mine)}',
                      skipped=sum(total.skipped.values()))
  policy.check(total, final=True)
  counter, quality = _aggregate(reused + generated)
  complete = _write_summary(out_dir, shards, config_hash)
  return ReinforceReport(
      out_dir=out_dir, shards=len(mine), shards_generated=len(generated),
      shards_reused=len(reused), samples_generated=sum(r['num_samples'] for r in generated),
      seconds=time.time() - start, counter=counter, captions=quality, complete=complete,
      k=config.k)


def build_tfds(out_dir: str, name: str, data_dir: str, **kwargs) -> dataset_build.BuildReport:
  """Builds the TFDS dataset of a complete generation, with the metadata of its config.

  Keyword arguments go to `dataset_build.build_dataset` (workers, overwrite, progress, ...).
  """
  settings = settings_lib.read_config(out_dir)
  if settings is None:
    raise FileNotFoundError(f'{out_dir} has no {settings_lib.CONFIG_FILE}: it is not the output of '
                            'launch/reinforce.py.')
  if not os.path.exists(os.path.join(out_dir, MANIFEST_FILE)):
    raise FileNotFoundError(f'{out_dir} has no {MANIFEST_FILE}: the generation is not complete '
                            '(rerun launch/reinforce.py until every shard is finished).')
  with open(os.path.join(out_dir, MANIFEST_FILE), encoding='utf-8') as f:
    manifest = [json.loads(line) for line in f if line.strip()]
  shards = [os.path.join(out_dir, entry['shard'] + '.tar') for entry in manifest]
  config = reinforced_tfds.read_reinforce_config(os.path.join(out_dir, settings_lib.CONFIG_FILE))
  return dataset_build.build_dataset(
      shards, name, data_dir, kind='reinforced', emb_dtype=config['emb_dtype'],
      teachers=config['teachers'], teacher_dims=config['teacher_dims'], k=config['k'],
      augmentation=config['augmentation'], tokenizer=config['tokenizer'],
      syn_key_regex=config['syn_key_regex'], **kwargs)

"""The whole MobileCLIP recipe on the demo world, on one CPU in minutes (launch/demo.py).

  1. data       `demo_world`: the students' image-caption set (DataCompDR-style tars -> TFDS),
                and `demo_world_teachers`: more images with cleaner captions for the teachers
  2. teachers   two small CLIP ViTs (ViT-B-16 layout; other widths, depths, patches and seeds)
                trained with the CLIP loss by the trainer (train/loop.py)
  3. reinforce  k stored augmentations per student image embedded by both teachers, synthetic
                captions from the demo captioner (near-duplicates regenerated), teacher text
                embeddings of every caption -> `demo_world_reinforced`
  4. students   one reduced MobileCLIP2-S0 (MCi image tower, text transformer) trained twice
                with the same steps, batch and schedule: CLIP loss on `demo_world` (the baseline)
                and the DR objective on `demo_world_reinforced`
  5. evaluate   zero-shot top-1 on the 'val' tasks, the held-out colour-shape pairs ('heldout'
                split, 'object' task: compositional generalization), retrieval R@1 on 'val'
  6. export     the DR student in open_clip's names (convert/files.py), loaded by open_clip
                (torch) and compared with JAX
  7. report     a table, <workdir>/results.json and <workdir>/loss_curves.png

Why the teachers see another variant of the world: real teachers (OpenAI CLIP, DFN-2B) are
trained on far more, and filtered, data than the students' dataset; `DemoSettings.teacher_samples`
and `teacher_caption_noise` stand for that. Held-out pairs stay held out for every model.

Every stage skips when its output is complete (datasets and the reinforcement are found on disk,
training resumes from or skips on its checkpoints, evaluations are cached per run and step), so
a rerun only redoes what is missing. The settings of a workdir are recorded in
<workdir>/demo_settings.json; a run with other settings there is refused.

Layout of <workdir>: tfds/ (datasets; `configs/*.py:runlocal` read demo_world_reinforced from
~/.cache/mobileclip_jax/demo/tfds), reinforced/ (DataCompDR-format shards), runs/<role>/
(training runs), export/ (the PyTorch export), results.json, loss_curves.png.
"""
import dataclasses
import glob
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from mobileclip_jax import checkpoint as checkpoint_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import sharding
from mobileclip_jax import utils
from mobileclip_jax.data import augment
from mobileclip_jax.data import dataset_build
from mobileclip_jax.data import demo_dataset
from mobileclip_jax.data import demo_world
from mobileclip_jax.data import reinforced_tfds
from mobileclip_jax.evaluation import evaluator as evaluator_lib
from mobileclip_jax.evaluation import runner

log = logging.getLogger('mobileclip_jax')

DEFAULT_WORKDIR = os.path.dirname(config_lib.DEMO_DATA_DIR)  # ~/.cache/mobileclip_jax/demo
QUICK_WORKDIR = DEFAULT_WORKDIR + '_quick'
TEACHERS_NAME = 'demo_world_teachers'
TEACHERS, STUDENTS = ('teacher_a', 'teacher_b'), ('student_clip', 'student_dr')
ROLES = TEACHERS + STUDENTS
LABELS = {'teacher_a': 'teacher A', 'teacher_b': 'teacher B',
          'student_clip': 'student, CLIP only', 'student_dr': 'student, DR'}
SETTINGS_FILE = 'demo_settings.json'
RESULTS_FILE = 'results.json'
PLOT_FILE = 'loss_curves.png'
FORMAT = 'mobileclip_jax.demo/1'


@dataclasses.dataclass(frozen=True)
class TeacherArch:
  """A teacher: the ViT-B-16 layout (open_clip VisionTransformer, causal text) at reduced sizes."""
  width: int
  depth: int
  heads: int
  patch_size: int
  text_width: int
  text_layers: int
  seed: int


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Sizes and hyper-parameters of a demo run (`quick()` gives the smoke-test sizes).

  Attributes:
    seed: seed of the demo world (scenes, captions) and of the reinforcement.
    num_samples: images of the students' set (`demo_world`).
    render_size: side of the stored images (64: `demo_dataset.ensure_plain_dataset`'s).
    samples_per_shard: images per tar shard.
    teacher_samples: images of the teachers' set (`demo_world_teachers`).
    teacher_caption_noise: `DemoWorldConfig.caption_noise` of the teachers' set.
    image_size: the side every model sees (training crops and evaluation renders).
    embed_dim: joint embedding width of every model.
    context_length: text tokens of every model.
    teachers: the two teacher architectures.
    teacher_steps, teacher_batch, teacher_lr: teacher training.
    student_depths, student_widths, student_token_mixers, student_pos_emb, student_se: the
      students' MCi image tower (MobileCLIP2-S0's blocks: RepMixer stages, then attention with
      a conditional positional encoding).
    student_text_width, student_text_heads, student_text_layers: the students' text tower.
    student_steps, student_batch, student_lr: student training, the same for both students.
    warmup_steps: linear warmup of every run (then cosine decay).
    weight_decay: AdamW weight decay of every run.
    k: stored augmentations per image.
    num_syn: synthetic captions per image.
    captioner_temperature: diversity of the demo captioner.
    clip_weight, distill_weight: the DR student's (1 - lambda) and lambda.
    teacher_scales: logit scales of the teachers in the distillation targets.
    eval_samples: images per evaluation (val tasks, held-out pairs, retrieval).
  """
  seed: int = 0
  num_samples: int = 4096
  render_size: int = 64
  samples_per_shard: int = 1024
  teacher_samples: int = 8192
  teacher_caption_noise: float = 0.5
  image_size: int = 32
  embed_dim: int = 128
  context_length: int = 32
  teachers: Tuple[TeacherArch, TeacherArch] = (
      TeacherArch(width=128, depth=4, heads=2, patch_size=8, text_width=128, text_layers=2,
                  seed=1),
      TeacherArch(width=192, depth=3, heads=3, patch_size=8, text_width=128, text_layers=3,
                  seed=2))
  teacher_steps: int = 600
  teacher_batch: int = 128
  teacher_lr: float = 2e-3
  student_depths: Tuple[int, ...] = (1, 1)
  student_widths: Tuple[int, ...] = (32, 64)
  student_token_mixers: Tuple[str, ...] = ('repmixer', 'attention')
  student_pos_emb: Tuple[bool, ...] = (False, True)
  student_se: Tuple[bool, ...] = (False, True)
  student_text_width: int = 64
  student_text_heads: int = 1
  student_text_layers: int = 2
  student_steps: int = 200
  student_batch: int = 128
  student_lr: float = 2e-3
  warmup_steps: int = 20
  weight_decay: float = 0.1
  k: int = 4
  num_syn: int = 4
  captioner_temperature: float = 0.7
  clip_weight: float = 0.5
  distill_weight: float = 0.5
  teacher_scales: Tuple[float, float] = (50.0, 50.0)
  eval_samples: int = 500

  def to_dict(self) -> Dict[str, Any]:
    """JSON-able (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def quick() -> DemoSettings:
  """Toy sizes: every stage runs, in about a minute once compiled; numbers are noise."""
  tiny = TeacherArch(width=64, depth=1, heads=1, patch_size=8, text_width=64, text_layers=1,
                     seed=1)
  return DemoSettings(
      num_samples=128, render_size=32, samples_per_shard=64, teacher_samples=128,
      teachers=(tiny, dataclasses.replace(tiny, depth=2, seed=2)), teacher_steps=4,
      teacher_batch=16, student_widths=(32, 32), student_text_width=64, student_text_layers=1,
      student_steps=4, student_batch=16, warmup_steps=1, k=2, num_syn=2, eval_samples=32)


# ----------------------------------------------------------------------------------------------
# Training configs (also `configs/demo.py:<role>` for launch/train.py).


def _base(settings: DemoSettings, data_dir: str, steps: int, batch: int,
          lr: float) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.model.embed_dim = settings.embed_dim
  c.model.image_size = settings.image_size
  c.model.text.context_length = settings.context_length
  c.data.data_dir = data_dir
  c.batch_size = batch
  c.schedule.total = f'{steps}_steps'
  c.schedule.warmup = f'{settings.warmup_steps}_steps'
  c.optim.lr = lr
  c.optim.weight_decay = settings.weight_decay
  c.checkpoint.every = f'{max(1, steps // 2)}_steps'
  c.checkpoint.keep_last = 1
  c.log_every = max(1, min(10, steps // 4))
  c.evals = ml_collections.ConfigDict(eval_entries(settings))
  return c


def eval_entries(settings: DemoSettings) -> Dict[str, Dict[str, Any]]:
  """The demo's evaluations as `config.evals` entries (see mobileclip_jax.evaluation)."""
  n, seed = settings.eval_samples, settings.seed
  return {
      'demo': dict(type='zeroshot', source=dict(kind='demo', split='val', num_samples=n,
                                                seed=seed)),
      'demo_heldout': dict(type='zeroshot', source=dict(kind='demo', split='heldout',
                                                        num_samples=n, seed=seed,
                                                        tasks=['object'])),
      'demo_retrieval': dict(type='retrieval', source=dict(kind='demo', split='val',
                                                           num_samples=n, seed=seed,
                                                           num_captions=5)),
  }


def train_config(role: str, settings: DemoSettings, data_dir: str) -> ml_collections.ConfigDict:
  """The training config of one demo model (`ROLES`), reading datasets from `data_dir`."""
  if role in TEACHERS:
    arch = settings.teachers[TEACHERS.index(role)]
    c = _base(settings, data_dir, settings.teacher_steps, settings.teacher_batch,
              settings.teacher_lr)
    c.seed = arch.seed
    c.model.name = 'ViT-B-16'
    c.model.image.width, c.model.image.depth = arch.width, arch.depth
    c.model.image.heads, c.model.image.patch_size = arch.heads, arch.patch_size
    c.model.text.width, c.model.text.layers = arch.text_width, arch.text_layers
    c.model.text.heads = max(1, arch.text_width // 64)
    c.data.name = TEACHERS_NAME
    c.loss.objective = 'clip'
    return c
  if role not in STUDENTS:
    raise ValueError(f'Unknown demo role {role!r}; roles: {", ".join(ROLES)}.')
  c = _base(settings, data_dir, settings.student_steps, settings.student_batch,
            settings.student_lr)
  c.seed = settings.seed
  c.model.name = 'MobileCLIP2-S0'
  image = c.model.image
  image.depths, image.widths = settings.student_depths, settings.student_widths
  image.token_mixers, image.pos_emb = settings.student_token_mixers, settings.student_pos_emb
  image.se_downsample = settings.student_se
  c.model.text.width, c.model.text.heads = settings.student_text_width, settings.student_text_heads
  c.model.text.layers = settings.student_text_layers
  if role == 'student_clip':
    c.data.name = demo_dataset.PLAIN_NAME
    c.loss.objective = 'clip'
  else:
    c.data.name = demo_dataset.REINFORCED_NAME
    c.loss.objective = 'dr'
    c.loss.clip_weight, c.loss.distill_weight = settings.clip_weight, settings.distill_weight
    c.loss.teacher_scales = settings.teacher_scales
  return c


# ----------------------------------------------------------------------------------------------
# Bookkeeping.


def _write_json(path: str, value: Any) -> None:
  utils.write_json_atomic(path, value)


def _read_json(path: str) -> Optional[Any]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def check_settings(workdir: str, settings: DemoSettings) -> None:
  """Records the settings of a new workdir; refuses a workdir made with other settings."""
  path = os.path.join(workdir, SETTINGS_FILE)
  old, new = _read_json(path), settings.to_dict()
  if old is None:
    _write_json(path, new)
  elif old != new:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f'{workdir} holds a demo run with other settings ({", ".join(changed)} '
                     f'differ; see {path}). Use another --workdir, or delete this one to start '
                     'over.')


class _Clock:
  """Wall and CPU seconds (all threads of this process) since construction."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def seconds(self) -> Dict[str, float]:
    return {'wall_s': round(time.perf_counter() - self.wall, 2),
            'cpu_s': round(time.process_time() - self.cpu, 2)}


# ----------------------------------------------------------------------------------------------
# 1. Data.


def _check_size(name: str, data_dir: str, expected: int) -> None:
  source, _ = reinforced_tfds.open_reinforced(name, data_dir)
  if len(source) != expected:
    raise ValueError(f'{reinforced_tfds.dataset_dir(name, data_dir)} holds {len(source)} '
                     f'examples, but this demo run wants {expected}: it was built with other '
                     'settings. Use another --workdir, or delete that dataset.')


def build_data(settings: DemoSettings, data_dir: str) -> None:
  """The students' `demo_world` and the teachers' `demo_world_teachers` (if not built yet)."""
  demo_dataset.ensure_plain_dataset(data_dir, settings.num_samples, settings.render_size,
                                    settings.seed, settings.samples_per_shard)
  _check_size(demo_dataset.PLAIN_NAME, data_dir, settings.num_samples)
  if not demo_dataset.exists(TEACHERS_NAME, data_dir):
    log.info('Building %s (%d samples, caption noise x%.2f).', TEACHERS_NAME,
             settings.teacher_samples, settings.teacher_caption_noise)
    world = demo_world.DemoWorldConfig(caption_noise=settings.teacher_caption_noise)
    shards = demo_world.write_split(
        os.path.join(data_dir, f'{TEACHERS_NAME}.tars'), 'train', settings.teacher_samples,
        settings.render_size, settings.samples_per_shard, settings.seed, world)
    dataset_build.build_dataset(shards, TEACHERS_NAME, data_dir, kind='plain',
                                  overwrite=True, progress=False)
  _check_size(TEACHERS_NAME, data_dir, settings.teacher_samples)


# ----------------------------------------------------------------------------------------------
# 2 and 4. Training.


def run_dir(workdir: str, role: str) -> str:
  return os.path.join(workdir, 'runs', role)


def _steps(role: str, settings: DemoSettings) -> int:
  return settings.teacher_steps if role in TEACHERS else settings.student_steps


def train(role: str, settings: DemoSettings, data_dir: str, workdir: str) -> Dict[str, float]:
  """Trains one model unless its final checkpoint exists; returns its accumulated train time.

  Evaluations are left to `evaluate` (once, on the final weights). The time of every call that
  trained (an interrupted one included) is added up in <run>/demo_train_time.json.
  """
  from mobileclip_jax.train import loop  # pylint: disable=g-import-not-at-top
  directory = run_dir(workdir, role)
  time_path = os.path.join(directory, 'demo_train_time.json')
  spent = _read_json(time_path) or {'wall_s': 0.0, 'cpu_s': 0.0}
  steps = _steps(role, settings)
  if steps in checkpoint_lib.training_steps(os.path.join(directory, 'checkpoints')):
    log.info('%s: trained before (%s).', LABELS[role], directory)
    return spent
  config = train_config(role, settings, data_dir)
  config.evals = ml_collections.ConfigDict()
  log.info('Training %s for %d steps in %s.', LABELS[role], steps, directory)
  clock = _Clock()
  try:
    loop.train(config, directory)
  finally:
    now = clock.seconds()
    spent = {k: round(spent[k] + now[k], 2) for k in spent}
    os.makedirs(directory, exist_ok=True)
    _write_json(time_path, spent)
  return spent


# ----------------------------------------------------------------------------------------------
# 3. Reinforcement.


def reinforce(settings: DemoSettings, data_dir: str, workdir: str) -> Dict[str, Any]:
  """Makes `demo_world_reinforced` from the students' tars and the two teachers (if not built).

  Returns the generation's summary (caption quality, counts) as written next to the shards.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from mobileclip_jax.reinforce import captioners
  from mobileclip_jax.reinforce import settings as reinforce_config
  from mobileclip_jax.reinforce import generate
  from mobileclip_jax.reinforce import inputs
  from mobileclip_jax.reinforce import teachers as teachers_lib
  # pylint: enable=g-import-not-at-top
  out = os.path.join(workdir, 'reinforced')
  if not demo_dataset.exists(demo_dataset.REINFORCED_NAME, data_dir):
    _, meta = reinforced_tfds.open_reinforced(demo_dataset.PLAIN_NAME, data_dir)
    shards = inputs.resolve('::'.join(meta.source_shards))
    per_device = max(1, 128 // jax.local_device_count())
    ensemble = teachers_lib.TeacherEnsemble(
        [teachers_lib.load_checkpoint_teacher(run_dir(workdir, role)) for role in TEACHERS],
        images_per_device=per_device, texts_per_device=per_device)
    generation = reinforce_config.GenerationConfig(
        k=settings.k, num_syn=settings.num_syn,
        augmentation=augment.AugmentConfig(image_size=settings.image_size), seed=settings.seed,
        chunk_size=128)
    captioner = captioners.make_captioner('demo', demo_temperature=settings.captioner_temperature)
    report = generate.reinforce(shards, out, ensemble, captioner, generation, progress=False)
    log.info('%s', report.summary())
    build = generate.build_tfds(out, demo_dataset.REINFORCED_NAME, data_dir, overwrite=True,
                                progress=False)
    log.info('%s', build.summary())
  _check_size(demo_dataset.REINFORCED_NAME, data_dir, settings.num_samples)
  return _read_json(os.path.join(out, generate.SUMMARY_FILE)) or {}


# ----------------------------------------------------------------------------------------------
# 5. Evaluation.


def evaluate(role: str, settings: DemoSettings, workdir: str) -> Dict[str, float]:
  """The final weights' metrics on `eval_entries` (cached in <run>/demo_eval.json)."""
  directory = run_dir(workdir, role)
  step = _steps(role, settings)
  path = os.path.join(directory, 'demo_eval.json')
  cached = _read_json(path)
  entries = json.loads(json.dumps(eval_entries(settings)))
  if cached and cached['step'] == step and cached['evals'] == entries:
    return cached['metrics']
  model, variables = runner.load_model(checkpoint_dir=directory, step=step)
  evaluators = evaluator_lib.build_evaluators(entries, model.config, sharding.create_mesh())
  metrics = runner.run_evaluators(model, variables, evaluators)['metrics']
  _write_json(path, {'step': step, 'evals': entries, 'metrics': metrics})
  return metrics


def summarize(metrics: Mapping[str, float]) -> Dict[str, Any]:
  """The table's numbers from evaluator metrics (fractions in [0, 1])."""
  prefix, suffix = 'zeroshot/demo_', '/top1'
  tasks = {k[len(prefix):-len(suffix)]: v for k, v in metrics.items()
           if k.startswith(prefix) and k.endswith(suffix) and not k.startswith(prefix + 'heldout')}
  return {'zeroshot': tasks, 'zeroshot_mean': float(np.mean(list(tasks.values()))),
          'heldout_object': metrics['zeroshot/demo_heldout_object/top1'],
          'i2t_R@1': metrics['retrieval/demo_retrieval/i2t_R@1'],
          't2i_R@1': metrics['retrieval/demo_retrieval/t2i_R@1']}


# ----------------------------------------------------------------------------------------------
# 6. Export and the PyTorch check.


def timm_fastvit_kwargs(image: Any) -> Dict[str, Any]:
  """Keyword arguments of timm's `fastvit_mci0` that build the MCi tower `image` at its sizes.

  open_clip builds timm towers by registered name only (`fastvit_mci0..4` are the released
  sizes), so a reduced MCi is built as `timm.create_model('fastvit_mci0', **these)`: timm's own
  FastVit with the depths, widths and blocks of `image`.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  fastvit = torch_compat.import_timm().models.fastvit
  if image.attn_norm != 'batchnorm' or image.head_dim != 32:
    raise ValueError('timm_fastvit_kwargs covers MCi0-2 style towers (BatchNorm before attention, '
                     f'32-wide heads); got attn_norm={image.attn_norm!r}, head_dim={image.head_dim}.')
  n = len(image.depths)
  cpe = functools.partial(fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
  return dict(layers=tuple(image.depths), embed_dims=tuple(image.widths),
              # timm downsamples stage i if downsamples[i] or the width changes; the Flax MCi
              # only if the width changes.
              mlp_ratios=(image.mlp_ratio,) * n, downsamples=(False,) * n,
              se_downsamples=tuple(image.se_downsample), token_mixers=tuple(image.token_mixers),
              pos_embs=tuple(cpe if p else None for p in image.pos_emb), lkc_use_act=True,
              stem_use_scale_branch=image.stem_scale_branch, cls_ratio=image.final_ratio,
              layer_scale_init_value=image.layer_scale_init)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_open_clip(weights: str, checkpoint_dir: str, num_images: int = 16) -> Dict[str, Any]:
  """Loads an open_clip export of a reduced MobileCLIP2-S0 in open_clip; compares with JAX.

  JAX runs the weights of `checkpoint_dir` (what was exported), PyTorch those of `weights`.

  The PyTorch model is open_clip's `CustomTextCLIP` (as for MobileCLIP2-S0) whose timm trunk is
  `fastvit_mci0` built at the export's sizes (`timm_fastvit_kwargs`); the state_dict loads with
  strict=True. Images are demo-world 'val' renders through open_clip's own eval transform (from
  the export's `preprocess_cfg`), captions are tokenized by open_clip's tokenizer.

  Returns:
    {'library', 'image_rel_l2', 'text_rel_l2', 'tokens_equal', 'num_images'}: relative L2
    distances of the unnormalized embeddings, JAX against PyTorch.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import torch
  from mobileclip_jax import torch_compat
  from mobileclip_jax.convert import files
  from mobileclip_jax.data import preprocess
  from mobileclip_jax.data import tokenizer as tokenizer_lib
  from mobileclip_jax.models import clip as clip_lib
  # pylint: enable=g-import-not-at-top
  open_clip, timm = torch_compat.import_open_clip(), torch_compat.import_timm()
  config = files.model_config_beside(weights)
  with open(files.sidecar_path(weights, 'open_clip'), encoding='utf-8') as f:
    preprocess_cfg = json.load(f)['preprocess_cfg']
  t = config.text
  model = open_clip.CustomTextCLIP(
      config.embed_dim,
      vision_cfg=dict(timm_model_name='fastvit_mci0', timm_model_pretrained=False,
                      timm_pool='avg', timm_proj=None, image_size=config.image_size),
      text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                    heads=t.heads, layers=t.layers, no_causal_mask=not t.causal))
  model.visual.trunk = timm.create_model('fastvit_mci0', pretrained=False,
                                         num_classes=config.embed_dim, global_pool='avg',
                                         **timm_fastvit_kwargs(config.image))
  state = {k: torch.from_numpy(np.array(v)) for k, v in files.read_state_dict(weights).items()}
  model.load_state_dict(state, strict=True)
  model.eval()

  samples = [demo_world.make_sample('val', i, config.image_size, 0) for i in range(num_images)]
  images = [s['image'] for s in samples]
  captioner, rng = demo_world.DemoCaptioner(), np.random.default_rng(0)
  texts = [captioner.caption(s['labels'], rng) for s in samples]
  transform = open_clip.image_transform(
      preprocess_cfg['size'], is_train=False, mean=preprocess_cfg['mean'],
      std=preprocess_cfg['std'], resize_mode=preprocess_cfg['resize_mode'],
      interpolation=preprocess_cfg['interpolation'], fill_color=preprocess_cfg['fill_color'])
  torch_tokens = open_clip.tokenize(texts, context_length=t.context_length)
  with torch.no_grad():
    torch_image = model.encode_image(torch.stack([transform(im) for im in images])).numpy()
    torch_text = model.encode_text(torch_tokens).numpy()

  variables, _ = checkpoint_lib.load_variables(checkpoint_dir)
  jax_model = clip_lib.CLIP(config)
  pixels = preprocess.normalize(
      np.stack([preprocess.resize_center_crop(im, config.image_size, config.interpolation)
                for im in images]), config.mean, config.std)
  tokens = tokenizer_lib.get_tokenizer(config.tokenizer)(texts, t.context_length)
  jax_image = np.asarray(jax.jit(lambda v, x: jax_model.apply(
      v, x, method=jax_model.encode_image))(variables, pixels))
  jax_text = np.asarray(jax.jit(lambda v, x: jax_model.apply(
      v, x, method=jax_model.encode_text))(variables, tokens))
  return {'library': f'open_clip {open_clip.__version__} + timm {timm.__version__}',
          'image_rel_l2': _rel_l2(jax_image, torch_image),
          'text_rel_l2': _rel_l2(jax_text, torch_text),
          'tokens_equal': bool(np.array_equal(tokens, torch_tokens.numpy())),
          'num_images': num_images}


def export(workdir: str) -> Dict[str, Any]:
  """The DR student in open_clip's names, and the PyTorch check (cached in export/check.json)."""
  from mobileclip_jax.convert import files  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'export')
  check_path = os.path.join(directory, 'check.json')
  cached = _read_json(check_path)
  if cached is not None:
    return cached
  source = run_dir(workdir, 'student_dr')
  weights = os.path.join(directory, 'open_clip_model.safetensors')
  written = files.export_checkpoint(source, weights, fmt='open_clip', overwrite=True)
  result = {'format': 'open_clip', **written}
  try:
    result['check'] = check_open_clip(weights, source)
  except ImportError as e:
    result['check'] = {'skipped': f'PyTorch, open_clip or timm is not installed ({e}).'}
  _write_json(check_path, result)
  return result


# ----------------------------------------------------------------------------------------------
# 7. Report.


def _percent(x: float) -> str:
  return f'{100 * x:5.1f}'


def format_tables(models: Mapping[str, Mapping[str, Any]]) -> str:
  """The results as two text tables: summary and zero-shot top-1 per task (percent)."""
  label_width = max(len(LABELS[r]) for r in models)
  head = (f'{"":<{label_width}}  ZS mean  heldout obj  i2t R@1  t2i R@1  '
          'train wall  train CPU')
  lines = [head]
  for role, m in models.items():
    lines.append(f'{LABELS[role]:<{label_width}}  {_percent(m["zeroshot_mean"]):>7}  '
                 f'{_percent(m["heldout_object"]):>11}  {_percent(m["i2t_R@1"]):>7}  '
                 f'{_percent(m["t2i_R@1"]):>7}  {m["train_wall_s"]:>9.0f}s  '
                 f'{m["train_cpu_s"]:>8.0f}s')
  tasks = list(next(iter(models.values()))['zeroshot'])
  lines += ['', 'Zero-shot top-1 (%) per task, val split:',
            f'{"":<{label_width}}  ' + '  '.join(f'{t[:8]:>8}' for t in tasks)]
  for role, m in models.items():
    lines.append(f'{LABELS[role]:<{label_width}}  ' +
                 '  '.join(f'{_percent(m["zeroshot"][t]):>8}' for t in tasks))
  return '\n'.join(lines)


def _losses(directory: str, key: str) -> Tuple[List[int], List[float]]:
  steps, values = [], []
  with open(os.path.join(directory, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if key in row and 'lr' in row:  # Training rows (evaluation rows carry no lr).
        steps.append(row['step'])
        values.append(row[key])
  return steps, values


def plot_losses(workdir: str, path: str) -> None:
  """Training loss curves: teachers (CLIP) and students (CLIP-only vs DR), atomically to `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for role in TEACHERS:
    left.plot(*_losses(run_dir(workdir, role), 'loss'), label=LABELS[role])
  left.set(title='Teachers: CLIP loss (teacher set)', xlabel='step', ylabel='loss')
  clip_dir, dr_dir = run_dir(workdir, 'student_clip'), run_dir(workdir, 'student_dr')
  right.plot(*_losses(clip_dir, 'loss'), label='CLIP only: CLIP loss (= its objective)')
  right.plot(*_losses(dr_dir, 'gt/clip'), label='DR: CLIP loss on ground-truth captions')
  right.plot(*_losses(dr_dir, 'loss'), '--', label='DR: its objective (CLIP + KD, gt + syn)')
  right.set(title='Students (same model, steps, batch, schedule)', xlabel='step')
  for axes in (left, right):
    axes.grid(alpha=0.3)
    axes.legend()
  fig.tight_layout()
  tmp = f'{path}.{os.getpid()}.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The run.


def run(workdir: str, settings: DemoSettings = DemoSettings(),
        print_fn: Callable[[str], None] = print) -> Dict[str, Any]:
  """Runs (or completes) the demo in `workdir`; returns what results.json holds."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  check_settings(workdir, settings)
  data_dir = os.path.join(workdir, 'tfds')
  stages: Dict[str, Dict[str, float]] = {}
  total = _Clock()

  def stage(name: str, fn: Callable[[], Any]) -> Any:
    clock = _Clock()
    value = fn()
    stages[name] = clock.seconds()
    log.info('Stage %s: %.1f s wall, %.1f s CPU.', name, stages[name]['wall_s'],
             stages[name]['cpu_s'])
    return value

  stage('data', lambda: build_data(settings, data_dir))
  times = {role: stage(role, lambda role=role: train(role, settings, data_dir, workdir))
           for role in TEACHERS}
  reinforcement = stage('reinforce', lambda: reinforce(settings, data_dir, workdir))
  times.update({role: stage(role, lambda role=role: train(role, settings, data_dir, workdir))
                for role in STUDENTS})
  models = {}
  for role in ROLES:
    metrics = stage(f'evaluate_{role}', lambda role=role: evaluate(role, settings, workdir))
    models[role] = {**summarize(metrics), 'train_wall_s': times[role]['wall_s'],
                    'train_cpu_s': times[role]['cpu_s'], 'metrics': metrics}
  exported = stage('export', lambda: export(workdir))
  stage('plot', lambda: plot_losses(workdir, os.path.join(workdir, PLOT_FILE)))
  results = {'format': FORMAT, 'workdir': workdir, 'settings': settings.to_dict(),
             'models': models, 'export': exported,
             'reinforcement': {'captions': reinforcement.get('captions'),
                               'samples': reinforcement.get('samples')},
             'this_run': {'stages': stages, **total.seconds()}}
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  print_fn(format_tables(models))
  check = exported['check']
  print_fn('\nExport: ' + exported['weights'] + (
      f"\n  {check['library']}: embeddings rel. L2 image {check['image_rel_l2']:.2e}, text "
      f"{check['text_rel_l2']:.2e} (tokens equal: {check['tokens_equal']})"
      if 'library' in check else f"\n  not checked: {check['skipped']}"))
  print_fn(f'\nThis run: {results["this_run"]["wall_s"]:.0f} s wall, '
           f'{results["this_run"]["cpu_s"]:.0f} s CPU. Results: '
           f'{os.path.join(workdir, RESULTS_FILE)}, plot: {os.path.join(workdir, PLOT_FILE)}')
  return results

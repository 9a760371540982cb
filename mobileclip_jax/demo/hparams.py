"""The demo's sizes and hyper-parameters, and the training config of each of its models.

`DemoSettings` holds every number of a demo run (`quick()`: the smoke-test sizes);
`train_config(role, settings, data_dir)` is the trainer's config of one model (also
`configs/demo.py:<role>`), `captioner_config` the learned captioner's, `eval_entries` the
evaluations every model gets.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import ml_collections

from mobileclip_jax import config as config_lib
from mobileclip_jax.data import augment

DEFAULT_WORKDIR = os.path.join('~', '.cache', 'mobileclip_jax', 'demo')
QUICK_WORKDIR = DEFAULT_WORKDIR + '_quick'
# Datasets (TFDS names in <workdir>/tfds): the students' plain and reinforced sets, the teachers'.
PLAIN_NAME = 'demo_world'
REINFORCED_NAME = 'demo_world_reinforced'
# The reinforced set with its synthetic captions as first made (no near-duplicate regeneration):
# the regeneration ablation's, built on request (launch/demo.py --regeneration_ablation).
REINFORCED_NOREGEN_NAME = 'demo_world_reinforced_noregen'
TEACHERS_NAME = 'demo_world_teachers'
# Who writes the students' synthetic captions (`DemoSettings.captioner`): the procedural oracle,
# a small CoCa trained on the teachers' set, or both (each its own syn.json key).
CAPTIONERS = ('demo', 'coca', 'coca+demo')
TEACHERS, STUDENTS = ('teacher_a', 'teacher_b'), ('student_clip', 'student_dr')
ROLES = TEACHERS + STUDENTS
LABELS = {'teacher_a': 'teacher A', 'teacher_b': 'teacher B',
          'student_clip': 'student, CLIP only', 'student_dr': 'student, DR'}


@dataclasses.dataclass(frozen=True)
class Arch:
  """A demo model: MobileCLIP2-S0's layout (MCi image tower: RepMixer stages, then attention with
  a conditional positional encoding; a text transformer) at reduced sizes."""
  depths: Tuple[int, ...] = (1, 1)
  widths: Tuple[int, ...] = (32, 64)
  token_mixers: Tuple[str, ...] = ('repmixer', 'attention')
  pos_emb: Tuple[bool, ...] = (False, True)
  se_downsample: Tuple[bool, ...] = (False, True)
  text_width: int = 64
  text_heads: int = 1
  text_layers: int = 2


@dataclasses.dataclass(frozen=True)
class CocaArch:
  """The demo's learned captioner: open_clip's CoCa layout (a ViT whose attentional pooler gives
  the contrastive embedding and the decoder's memory, a causal text tower, a multimodal decoder
  with an untied head over the CLIP vocabulary) at toy sizes."""
  image_width: int = 48
  image_depth: int = 1
  image_heads: int = 3
  patch_size: int = 8
  pool_queries: int = 9  # The contrastive embedding + 8 memory tokens.
  pool_heads: int = 4
  width: int = 32        # Text tower, decoder and joint embedding (CoCa ties them).
  heads: int = 4
  layers: int = 1


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Sizes and hyper-parameters of a demo run (`quick()` gives the smoke-test sizes).

  Attributes:
    seed: seed of the demo world (scenes, captions) and of the reinforcement.
    num_samples: images of the students' set (`demo_world`).
    render_size: side of the stored images (training crops are resized to image_size).
    samples_per_shard: images per tar shard.
    teacher_samples: images of the teachers' set (`demo_world_teachers`).
    teacher_caption_noise: `DemoWorldConfig.caption_noise` of the teachers' set.
    image_size: the side every model sees (training crops and evaluation renders).
    embed_dim: joint embedding width of every model.
    context_length: text tokens of every model.
    teacher: the teachers' architecture (both teachers: like MobileCLIP2's two DFN CLIPs, one
      architecture trained twice).
    teacher_seeds: the teachers' seeds (initialization and data order).
    teacher_steps, teacher_batch, teacher_lr: teacher training.
    student: the students' architecture (both students).
    student_steps, student_batch, student_lr: student training, the same for both students.
    student_seeds: runs of each student (seeds seed, seed + 1, ...); teachers run once.
    warmup_steps: linear warmup of every run (then cosine decay).
    weight_decay: AdamW weight decay of every run.
    crop_scale, rand_augment_p: the image augmentation of every model (RandomResizedCrop's area
      range; the probability of RandAugment's 2 ops at magnitude 9): open_clip's default
      (0.9-1, none) keeps the small objects of a 32 px scene in the crop and their colours
      intact (DataCompDR's 0.08-1 and RandAugment lose them: see inspection.py). Training on
      the plain sets samples it (config data.augmentation); the reinforcement stores k draws.
    k: stored augmentations per image.
    num_syn: synthetic captions per image.
    captioner_temperature: diversity of the demo captioner.
    captioner: who writes the students' synthetic captions (CAPTIONERS): 'demo', the procedural
      oracle (`captions.DemoCaptioner`, never wrong); 'coca', a small CoCa trained with the CoCa
      objective on the teachers' set, sampling as ml-mobileclip-dr (top_p 0.9); 'coca+demo'
      both, each `num_syn` captions under its own key (MobileCLIP2: captioners add up).
    coca: the CoCa captioner's architecture.
    coca_steps, coca_batch, coca_lr: its training (on `demo_world_teachers`).
    coca_sampler: how it samples (`decoding.SAMPLERS`): 'temperature', plain sampling from its
      softmax; 'top_p' is ml-mobileclip-dr's (top_p 0.9), but a CoCa this small keeps broad
      next-token distributions (the teachers' junk captions end in random digits) whose 0.9
      nucleus decoding finds by sorting the 49,408-token vocabulary: 0.38 vs 0.043 CPU s per
      caption (300-step captioner, 1,024 captions, 2 shared cores).
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
  teacher: Arch = Arch(depths=(2, 2), widths=(48, 96))
  teacher_seeds: Tuple[int, int] = (1, 2)
  teacher_steps: int = 400
  teacher_batch: int = 128
  teacher_lr: float = 2e-3
  student: Arch = Arch()
  student_steps: int = 200
  student_batch: int = 128
  student_lr: float = 2e-3
  student_seeds: int = 3
  warmup_steps: int = 20
  weight_decay: float = 0.1
  crop_scale: Tuple[float, float] = (0.9, 1.0)
  rand_augment_p: float = 0.0
  k: int = 4
  num_syn: int = 4
  captioner_temperature: float = 0.7
  captioner: str = 'demo'
  coca: CocaArch = CocaArch()
  coca_steps: int = 150
  coca_batch: int = 32
  coca_lr: float = 2e-3
  coca_sampler: str = 'temperature'
  clip_weight: float = 0.5
  distill_weight: float = 0.5
  teacher_scales: Tuple[float, float] = (50.0, 50.0)
  eval_samples: int = 500

  def __post_init__(self):
    if self.captioner not in CAPTIONERS:
      raise ValueError(f'DemoSettings.captioner must be one of {", ".join(CAPTIONERS)}, got '
                       f'{self.captioner!r}.')

  def to_dict(self) -> Dict[str, Any]:
    """JSON-able (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def quick() -> DemoSettings:
  """Toy sizes: every stage runs, in about a minute once compiled; numbers are noise."""
  tiny = Arch(widths=(16, 32), text_width=32, text_layers=1)
  return DemoSettings(
      num_samples=128, render_size=32, samples_per_shard=64, teacher_samples=128, teacher=tiny,
      teacher_steps=4, teacher_batch=16, student=tiny, student_steps=4, student_batch=16,
      warmup_steps=1, k=2, num_syn=2, eval_samples=32, coca_steps=24,
      coca_batch=16, coca_lr=1e-2)


# ----------------------------------------------------------------------------------------------
# Training configs (also `configs/demo.py:<role>` for launch/train.py).


def _base(settings: DemoSettings, data_dir: str, steps: int, batch: int,
          lr: float) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.model.embed_dim = settings.embed_dim
  c.model.image_size = settings.image_size
  c.model.text.context_length = settings.context_length
  c.data.data_dir = data_dir
  c.data.build_hint = (f'{demo_command(settings, data_dir)} (it builds the demo datasets, and '
                       'the teachers the reinforced one needs).')
  c.batch_size = batch
  c.schedule.total = f'{steps}_steps'
  c.schedule.warmup = f'{settings.warmup_steps}_steps'
  c.optim.lr = lr
  c.optim.weight_decay = settings.weight_decay
  aug = augmentation(settings)
  c.data.augmentation = ml_collections.ConfigDict(dict(scale=aug.scale, p=aug.p))
  c.checkpoint.every = f'{max(1, steps // 2)}_steps'
  c.checkpoint.keep_last = 1
  c.log_every = max(1, min(10, steps // 4))
  c.evals = ml_collections.ConfigDict(eval_entries(settings))
  return c


def demo_command(settings: DemoSettings, data_dir: str) -> str:
  """The launch/demo.py command line that makes the datasets in `data_dir`."""
  flags = ' --quick' if dataclasses.replace(settings, captioner='demo') == quick() else ''
  flags += '' if settings.captioner == 'demo' else f' --captioner={settings.captioner}'
  return f'python launch/demo.py{flags} --workdir={os.path.dirname(data_dir)}'


def augmentation(settings: DemoSettings) -> augment.AugmentConfig:
  """The demo's image augmentation at the models' resolution (see `DemoSettings`)."""
  return augment.AugmentConfig(image_size=settings.image_size, scale=settings.crop_scale,
                               p=settings.rand_augment_p)


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


def role_seed(role: str, settings: DemoSettings) -> int:
  """The (first) seed of a role's runs: its own for a teacher, `seed` for the students."""
  if role in TEACHERS:
    return settings.teacher_seeds[TEACHERS.index(role)]
  return settings.seed


def train_config(role: str, settings: DemoSettings, data_dir: str) -> ml_collections.ConfigDict:
  """The training config of one demo model (`ROLES`), reading datasets from `data_dir`."""
  if role not in ROLES:
    raise ValueError(f'Unknown demo role {role!r}; roles: {", ".join(ROLES)}.')
  teacher = role in TEACHERS
  arch = settings.teacher if teacher else settings.student
  c = _base(settings, data_dir, *((settings.teacher_steps, settings.teacher_batch,
                                   settings.teacher_lr) if teacher else
                                  (settings.student_steps, settings.student_batch,
                                   settings.student_lr)))
  c.seed = role_seed(role, settings)
  c.model.name = 'MobileCLIP2-S0'
  image = c.model.image
  image.depths, image.widths, image.token_mixers = arch.depths, arch.widths, arch.token_mixers
  image.pos_emb, image.se_downsample = arch.pos_emb, arch.se_downsample
  text = c.model.text
  text.width, text.heads, text.layers = arch.text_width, arch.text_heads, arch.text_layers
  if teacher:
    c.data.name, c.loss.objective = TEACHERS_NAME, 'clip'
    return c
  # The students differ in their data and objective only (the CLIP objective ignores the rest).
  c.data.name, c.loss.objective = ((PLAIN_NAME, 'clip') if role == 'student_clip'
                                   else (reinforced_name(settings.captioner), 'dr'))
  c.loss.clip_weight, c.loss.distill_weight = settings.clip_weight, settings.distill_weight
  c.loss.teacher_scales = settings.teacher_scales
  return c


def reinforced_name(captioner: str) -> str:
  """The students' reinforced set whose synthetic captions come from `captioner` (CAPTIONERS):
  `demo_world_reinforced` for the oracle, `demo_world_reinforced_<coca|coca_demo>` else."""
  if captioner not in CAPTIONERS:
    raise ValueError(f'Unknown demo captioner {captioner!r}; choices: {", ".join(CAPTIONERS)}.')
  suffix = '' if captioner == 'demo' else '_' + captioner.replace('+', '_')
  return REINFORCED_NAME + suffix


def captioner_config(settings: DemoSettings, data_dir: str) -> ml_collections.ConfigDict:
  """The CoCa captioner's training config: configs/coca.py's model and CoCa objective (caption
  cross-entropy x 2 + CLIP) at `settings.coca`'s sizes, on the teachers' set, the demo's context
  and augmentation, no evaluations."""
  c = _base(settings, data_dir, settings.coca_steps, settings.coca_batch, settings.coca_lr)
  coca = config_lib.load_config_file(os.path.join(config_lib.CONFIGS_DIR, 'coca.py') + ':b32')
  c.model, c.loss, c.optim.wd_rules = coca.model, coca.loss, coca.optim.wd_rules
  a = settings.coca
  c.model.embed_dim, c.model.image_size = a.width, settings.image_size  # CoCa: embed = width.
  c.model.image.update(width=a.image_width, depth=a.image_depth, heads=a.image_heads,
                       patch_size=a.patch_size, attn_pool_queries=a.pool_queries,
                       attn_pool_heads=a.pool_heads)
  for tower in ('text', 'decoder'):
    c.model[tower].update(context_length=settings.context_length, width=a.width, heads=a.heads,
                          layers=a.layers)
  c.data.name = TEACHERS_NAME
  c.seed = settings.seed
  c.evals = ml_collections.ConfigDict()
  return c

"""The demo's sizes and hyper-parameters, and the training config of each of its models.

`DemoSettings` holds every number of a demo run (`quick()`: the smoke-test sizes);
`train_config(role, settings, data_dir)` is the trainer's config of one model (also
`configs/demo.py:<role>`), `eval_entries` the evaluations every model gets.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import ml_collections

from mobileclip_jax import config as config_lib

DEFAULT_WORKDIR = os.path.join('~', '.cache', 'mobileclip_jax', 'demo')
QUICK_WORKDIR = DEFAULT_WORKDIR + '_quick'
# Datasets (TFDS names in <workdir>/tfds): the students' plain and reinforced sets, the teachers'.
PLAIN_NAME = 'demo_world'
REINFORCED_NAME = 'demo_world_reinforced'
TEACHERS_NAME = 'demo_world_teachers'
TEACHERS, STUDENTS = ('teacher_a', 'teacher_b'), ('student_clip', 'student_dr')
ROLES = TEACHERS + STUDENTS
LABELS = {'teacher_a': 'teacher A', 'teacher_b': 'teacher B',
          'student_clip': 'student, CLIP only', 'student_dr': 'student, DR'}


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
    student_seeds: runs of each student (seeds seed, seed + 1, ...); teachers run once.
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
  student_seeds: int = 3
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
  quick_flag = ' --quick' if settings == quick() else ''
  c.data.build_hint = (f'python launch/demo.py{quick_flag} --workdir={os.path.dirname(data_dir)} '
                       '(it builds the demo datasets, and the teachers the reinforced one needs).')
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


def role_seed(role: str, settings: DemoSettings) -> int:
  """The (first) seed of a role's runs: its architecture's for a teacher, `seed` for students."""
  if role in TEACHERS:
    return settings.teachers[TEACHERS.index(role)].seed
  return settings.seed


def train_config(role: str, settings: DemoSettings, data_dir: str) -> ml_collections.ConfigDict:
  """The training config of one demo model (`ROLES`), reading datasets from `data_dir`."""
  if role in TEACHERS:
    arch = settings.teachers[TEACHERS.index(role)]
    c = _base(settings, data_dir, settings.teacher_steps, settings.teacher_batch,
              settings.teacher_lr)
    c.seed = role_seed(role, settings)
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
  c.seed = role_seed(role, settings)
  c.model.name = 'MobileCLIP2-S0'
  image = c.model.image
  image.depths, image.widths = settings.student_depths, settings.student_widths
  image.token_mixers, image.pos_emb = settings.student_token_mixers, settings.student_pos_emb
  image.se_downsample = settings.student_se
  c.model.text.width, c.model.text.heads = settings.student_text_width, settings.student_text_heads
  c.model.text.layers = settings.student_text_layers
  # The students differ in their data and objective only (the CLIP objective ignores the rest).
  c.data.name, c.loss.objective = ((PLAIN_NAME, 'clip') if role == 'student_clip'
                                   else (REINFORCED_NAME, 'dr'))
  c.loss.clip_weight, c.loss.distill_weight = settings.clip_weight, settings.distill_weight
  c.loss.teacher_scales = settings.teacher_scales
  return c

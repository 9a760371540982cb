"""The demo: MobileCLIP's whole recipe on a procedural image-caption world, on one CPU.

  world.py       vocabularies, the world config, seeded scene sampling
  render.py      drawing scenes at any resolution
  captions.py    noisy ground-truth captions and the accurate demo captioner
  tasks.py       the zero-shot tasks (label fields, class names, prompts)
  samples.py     samples (image, caption, labels) and their DataCompDR-style tar shards
  training_sets.py the plain training datasets (tars -> TFDS)
  hparams.py     the demo's sizes and hyper-parameters; each model's training config
  recipe.py      the stages of launch/demo.py (data, teachers, reinforcement, students, export)
  report.py      results.json, the tables and the loss curves
  torch_check.py the exported student in open_clip, compared with JAX
  inspection.py  what the models see and what they learned (`launch/demo.py --inspect`)

The world's API is importable from here (`from mobileclip_jax import demo; demo.make_sample(...)`);
the recipe's modules (which pull in the trainer) are imported where they are used.
"""
from mobileclip_jax.demo.captions import DemoCaptioner, gt_caption
from mobileclip_jax.demo.render import encode_image
from mobileclip_jax.demo.samples import iter_samples, make_sample, sample_uid, write_split
from mobileclip_jax.demo.tasks import ZeroShotTask, zero_shot_tasks
from mobileclip_jax.demo.world import DemoWorldConfig, SPLITS, sample_scene

"""A checkpoint trained by the trainer evaluates in JAX and, converted, gives the same numbers in open_clip.

The model is a small CLIP in open_clip's own layout (ViT-B-16 shape, reduced), which open_clip
can build at any size from the model config that the export writes beside the weights.
"""
import json
import os

import numpy as np
import pytest

from mobileclip_jax import checkpoint
from mobileclip_jax import config as config_lib
from mobileclip_jax import sharding
from mobileclip_jax.convert import files
from mobileclip_jax.demo import training_sets as demo_datasets
from mobileclip_jax.demo import world as demo_world
from mobileclip_jax.data import preprocess
from mobileclip_jax.data import tokenizer as tokenizer_lib
from mobileclip_jax.evaluation import evaluator as evaluator_lib
from mobileclip_jax.evaluation import metrics
from mobileclip_jax.evaluation import base as eval_base
from mobileclip_jax.evaluation import datasets
from mobileclip_jax.models import clip as clip_lib
from mobileclip_jax.train import loop

EVAL_SOURCE = dict(kind='demo', split='val', num_samples=48, tasks=['color', 'shape'])


def _config(data_dir):
  c = config_lib.base_config()
  c.model.name = 'ViT-B-16'
  c.model.embed_dim = 16
  c.model.image_size = 32
  c.model.image.width, c.model.image.depth, c.model.image.heads = 32, 1, 2
  c.model.image.patch_size = 8
  c.model.text.width, c.model.text.heads, c.model.text.layers = 32, 2, 1
  c.model.text.context_length = 32
  c.data.name, c.data.data_dir = 'demo_world', data_dir
  c.batch_size = 8
  c.schedule.total, c.schedule.warmup, c.checkpoint.every = '3_steps', '1_steps', '3_steps'
  c.evals.demo = dict(type='zeroshot', source=EVAL_SOURCE, batch_size=16)
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('interchange')
  data_dir = str(tmp / 'tfds')
  demo_datasets.build_plain('demo_world', data_dir, 64, 32, 0, 64,
                            demo_world.DemoWorldConfig())
  workdir = str(tmp / 'work')
  last = loop.train(_config(data_dir), workdir)
  return tmp, workdir, last


def test_trained_checkpoint_gives_the_same_numbers_in_open_clip(trained):
  torch = pytest.importorskip('torch')
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  open_clip = torch_compat.import_open_clip()
  tmp, workdir, _ = trained

  # JAX: the trainer's checkpoint, evaluated by the evaluator the trainer uses.
  variables, model_config = checkpoint.load_variables(workdir)
  mesh = sharding.create_mesh()
  [evaluator] = evaluator_lib.build_evaluators({'demo': _config('').evals.demo}, model_config, mesh)
  jax_metrics = evaluator.run(clip_lib.CLIP(model_config), variables)

  # PyTorch: the converted checkpoint in open_clip, the same images and prompts.
  export = files.export_checkpoint(workdir, str(tmp / 'export' / 'model.safetensors'))
  model = open_clip.create_model(f'local-dir:{os.path.dirname(export["weights"])}').eval()
  data = datasets.open_source(EVAL_SOURCE, datasets.CLASSIFICATION, model_config.image_size)
  images = np.stack([eval_base.load_image(e.image, model_config.image_size,
                                              model_config.interpolation) for e in data.examples])
  pixels = preprocess.normalize(images, model_config.mean, model_config.std)
  tokenizer = tokenizer_lib.get_tokenizer(model_config.tokenizer)
  jax_model = clip_lib.CLIP(model_config)
  with torch.no_grad():
    torch_images = model.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
  jax_images = np.asarray(jax_model.apply(variables, pixels, method='encode_image'))
  rel = np.linalg.norm(torch_images - jax_images) / np.linalg.norm(jax_images)
  assert rel <= 1e-5
  for task in data.tasks:
    prompts = [t.format(c) for c in task.classnames for t in task.templates]
    tokens = tokenizer(prompts, model_config.text.context_length)
    with torch.no_grad():
      torch_text = model.encode_text(torch.from_numpy(tokens).long()).numpy()
    jax_text = np.asarray(jax_model.apply(variables, tokens, method='encode_text'))
    assert np.linalg.norm(torch_text - jax_text) / np.linalg.norm(jax_text) <= 1e-5
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    classifier = metrics.zero_shot_classifier(unit(torch_text), len(task.classnames))
    targets = np.array([e.labels[[t.name for t in data.tasks].index(task.name)]
                        for e in data.examples])
    torch_top1 = metrics.topk_accuracy(unit(torch_images), classifier, targets, (1,))[1]
    assert torch_top1 == pytest.approx(jax_metrics[f'zeroshot/demo_{task.name}/top1'])


def test_training_ran_its_evaluator_and_logged_it(trained):
  _, workdir, _ = trained
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'zeroshot/demo_color/top1' in r]
  assert [r['step'] for r in evals] == [0, 3]  # At the start and at the end.

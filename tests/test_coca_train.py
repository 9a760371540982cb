"""Training CoCa captioners with the one trainer: open_clip's CoCaLoss and its gradients, the real
loop on the demo world, freezing, fine-tuning from a checkpoint, conversion back to open_clip."""
import json
import os

import jax
import numpy as np
import pytest

from mobileclip_jax import checkpoint as ckpt_lib
from mobileclip_jax import config as config_lib
from mobileclip_jax import sharding as sharding_lib
from mobileclip_jax.convert import files
from mobileclip_jax.demo import training_sets as demo_datasets
from mobileclip_jax.demo import world as demo_world
from mobileclip_jax.train import loop
from mobileclip_jax.train import setup
from mobileclip_jax.train import step as step_lib

TOL = 1e-5       # Loss, as the other parity tests.
GRAD_TOL = 2e-5  # Per-tensor relative L2 of the gradients (2.6e-6 measured: sums in another order).
# A one-layer CoCa on the CLIP vocabulary for the demo world's captions (32 px; 32 tokens, so
# that it generates ml-mobileclip-dr's 30).
DEMO_COCA = dict(embed_dim=32, image_size=32,
                 image=dict(width=48, depth=1, heads=3, patch_size=8, attn_pool_queries=5,
                            attn_pool_heads=4),
                 text=dict(context_length=32, width=32, heads=4, layers=1),
                 decoder=dict(context_length=32, width=32, heads=4, layers=1))


def coca_config(overrides, **settings):
  """A coca_ViT-B-32 training config with `create_model` overrides and `settings` (dotted)."""
  c = config_lib.load_config_file(os.path.join(config_lib.CONFIGS_DIR, 'coca.py') + ':b32')
  c.model.embed_dim, c.model.image_size = overrides['embed_dim'], overrides['image_size']
  for tower in ('image', 'text', 'decoder'):
    c.model[tower].update(overrides[tower])
  c.batch_size = 8
  c.schedule.total, c.schedule.warmup = '8_steps', '2_steps'
  for key, value in settings.items():
    parent, _, leaf = key.rpartition('.')
    (c[parent] if parent else c)[leaf] = value
  return c


# ----------------------------------------------------------------------------------------------
# The loss and its gradients against open_clip.


@pytest.fixture(scope='module')
def ref():
  return pytest.importorskip('coca_reference', reason='needs torch and open_clip')


@pytest.fixture(scope='module')
def reference(ref, tmp_path_factory):
  """A tiny random open_clip CoCa saved as a model checkpoint, a batch, and open_clip's CoCaLoss
  (weights 2 / 1, pad 0) with its gradients on them."""
  torch = ref.torch
  model, gen = ref.tiny_coca(0)
  model.logit_scale.data.fill_(2.0)
  images = torch.randint(0, 256, (8, 32, 32, 3), generator=gen).numpy().astype(np.uint8)
  tokens = ref.tiny_tokens(gen, 8)
  module_config = _tiny_module_config(ref)
  variables = files.open_clip_lib.from_open_clip(ref.tr.state_dict_numpy(model), module_config)
  path = str(tmp_path_factory.mktemp('coca') / 'ckpt')
  ckpt_lib.save_variables(path, variables, module_config)
  # The trainer normalizes uint8 images on the device; open_clip gets the same pixels.
  from mobileclip_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(preprocess.normalize(images, module_config.mean, module_config.std))
  loss_fn = ref.open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
  out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(tokens).long())
  loss = sum(loss_fn(**out))
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
  return {'path': path, 'batch': {'image': images, 'text': tokens}, 'loss': loss.item(),
          'grads': grads, 'config': module_config}


def _tiny_module_config(ref):
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  return clip_lib.get_config(ref.BASE, **ref.TINY)


def _trainer_loss_and_grads(ref, reference, mesh=None, **settings):
  config = coca_config(ref.TINY, **{'model.init_from': reference['path'], **settings})
  mesh = mesh or sharding_lib.create_mesh(devices=jax.devices()[:1])
  run = setup.build(config, mesh, spec=setup.InputSpec.synthetic(setup.model_config(config)))
  loss, metrics, grads, _ = run.grad_fn(run.init_state(), reference['batch'])
  torch_grads = files.open_clip_lib.to_open_clip({'params': grads}, reference['config'])
  return float(loss), metrics, torch_grads


def _grad_errors(ours, theirs):
  rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return {k: rel(np.asarray(ours[k]).reshape(v.shape), v) for k, v in theirs.items()}


def test_loss_and_gradients_equal_open_clip_coca_loss(ref, reference):
  # Token rows end at different places: the padding mask matters.
  assert len({int((row == 0).sum()) for row in reference['batch']['text']}) > 2
  loss, metrics, grads = _trainer_loss_and_grads(ref, reference)
  assert abs(loss - reference['loss']) <= TOL * abs(reference['loss']), (loss, reference['loss'])
  assert float(metrics['caption/loss']) > 0 and float(metrics['gt/clip']) > 0
  errors = _grad_errors(grads, reference['grads'])
  assert max(errors.values()) <= GRAD_TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_sharded_accumulated_step_equals_open_clip(ref, reference):
  """A 2 x 2 mesh and 2 micro-batches (GradCache with the caption term) give the same numbers."""
  loss, _, grads = _trainer_loss_and_grads(ref, reference, sharding_lib.create_mesh(2, 2, jax.devices()[:4]),
                                           accum_steps=2)
  assert abs(loss - reference['loss']) <= TOL * abs(reference['loss'])
  assert max(_grad_errors(grads, reference['grads']).values()) <= GRAD_TOL


@pytest.mark.parametrize('mistake', ['padding_counted', 'weights_swapped'])
def test_a_wrong_detail_fails_the_comparison(ref, reference, monkeypatch, mistake):
  settings = {}
  if mistake == 'padding_counted':
    monkeypatch.setattr(step_lib, 'PAD_ID', -1)
  else:
    settings = {'loss.caption_weight': 1.0, 'loss.clip_weight': 2.0}
  loss, _, grads = _trainer_loss_and_grads(ref, reference, **settings)
  assert abs(loss - reference['loss']) > 1e-3 * abs(reference['loss'])
  assert max(_grad_errors(grads, reference['grads']).values()) > 1e-3


def test_objective_and_model_must_agree():
  clip = config_lib.base_config()
  clip.model.name = 'MobileCLIP2-S0'
  clip.loss.objective = 'coca'
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="'coca' needs a CoCa captioner"):
    setup.build(clip, mesh, spec=setup.InputSpec.synthetic(setup.model_config(clip)))
  coca = coca_config(DEMO_COCA, **{'loss.objective': 'dr'})
  with pytest.raises(ValueError, match="a CoCa captioner trains with 'coca'"):
    setup.build(coca, mesh, spec=setup.InputSpec.synthetic(setup.model_config(coca)))
  coca = coca_config(DEMO_COCA, **{'model.attention': 'sigmoid'})
  with pytest.raises(ValueError, match='leave attention at'):
    setup.model_config(coca)


# ----------------------------------------------------------------------------------------------
# The real loop on the demo world.


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  demo_datasets.build_plain('demo_world', path, 64, 32, 0, 64, demo_world.DemoWorldConfig())
  return path


def _train(workdir, data_dir, **settings):
  config = coca_config(DEMO_COCA, **{'data.name': 'demo_world', 'data.data_dir': data_dir,
                                     'checkpoint.every': '8_steps', 'log_every': 1,
                                     'optim.lr': 1e-2, **settings})
  loop.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if '"loss"' in line]
  return config, rows


@pytest.fixture(scope='module')
def frozen_run(tmp_path_factory, demo_data):
  workdir = str(tmp_path_factory.mktemp('coca_run') / 'work')
  config, rows = _train(workdir, demo_data, **{'optim.freeze': ('^visual/',)})
  return config, rows, workdir


def test_training_reduces_the_loss_and_keeps_frozen_towers(frozen_run):
  config, rows, workdir = frozen_run
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert rows[-1]['caption/loss'] < rows[0]['caption/loss'] - 1.5, rows  # nats per token (2.2 seen)
  assert rows[-1]['loss'] < rows[0]['loss']
  trained, model_config = ckpt_lib.load_variables(workdir)
  assert model_config == setup.model_config(config)
  mesh = sharding_lib.create_mesh(devices=jax.devices()[:1])
  run = setup.build(config, mesh, spec=setup.InputSpec.synthetic(model_config))
  initial = jax.device_get(run.init_state().params)
  same = jax.tree.map(np.array_equal, trained['params'], initial)
  assert all(jax.tree.leaves(same['visual']))  # Bit-identical.
  assert not any(jax.tree.leaves(same['text_decoder']))
  assert not all(jax.tree.leaves(same['text']))


def test_trained_run_converts_to_open_clip_and_back(ref, frozen_run, tmp_path):
  _, _, workdir = frozen_run
  export = tmp_path / 'export'
  written = files.export_checkpoint(workdir, str(export / 'open_clip_model.safetensors'))
  torch = ref.torch
  model = ref.open_clip.create_model(f'local-dir:{export}').eval()  # Strict load by open_clip.
  variables, config = ckpt_lib.load_variables(workdir)
  state = files.read_state_dict(written['weights'])
  assert set(state) == set(model.state_dict()) - {'text.attn_mask', 'text_decoder.attn_mask'}
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  from mobileclip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  ours = clip_lib.model_from_config(config).apply(variables, images, method='encode_image')
  with torch.no_grad():
    theirs = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)
  # Back to a model checkpoint (the config beside the export says which model it is).
  back = str(tmp_path / 'back')
  assert files.import_checkpoint(written['weights'], back) == config
  again, _ = ckpt_lib.load_variables(back)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again['params'],
                                          variables['params'])))

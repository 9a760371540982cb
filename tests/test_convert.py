"""Checkpoint interchange: Orbax <-> open_clip / timm / Apple v1 files, checked against them."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mobileclip_jax
from mobileclip_jax import checkpoint
from mobileclip_jax import utils
from mobileclip_jax.convert import apple_v1
from mobileclip_jax.convert import files
from mobileclip_jax.convert import open_clip as open_clip_lib
from mobileclip_jax.models import clip as clip_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLE_VARIANTS = sorted(apple_v1.APPLE_V1_MODELS)  # mobileclip_b, _s0, _s1, _s2.
TOL = 1e-5
TINY = dict(embed_dim=16, image=dict(depths=(1, 1, 1, 2), widths=(8, 16, 32, 64)),
            text=dict(layers=2, width=32, heads=2))


def _apple_shapes(apple_name):
  with open(os.path.join(FIXTURES, f'apple_v1_{apple_name}_keys.json')) as f:
    return {k: tuple(v) for k, v in json.load(f)['shapes'].items()}


def _random_variables(config, seed=0):
  """Seeded random variables of `config`'s shapes (no init compile); BN variances positive."""
  shapes = clip_lib.abstract_variables(config)
  rng = np.random.default_rng(seed)
  def fill(path, s):
    if path[0].key == 'batch_stats' and path[-1].key == 'var':
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save_model(directory, variables, config):
  checkpoint.save_variables(str(directory), variables, config)
  return str(directory)


# ---- Apple's v1 names ----

@pytest.mark.parametrize('apple_name', APPLE_VARIANTS)
def test_apple_v1_table_covers_every_key_of_apples_checkpoint(apple_name):
  shapes = _apple_shapes(apple_name)
  config = mobileclip_jax.get_config(apple_v1.APPLE_V1_MODELS[apple_name])
  table = apple_v1.apple_v1_table(config)
  keys = [e.torch_key for e in table.entries]
  assert len(keys) == len(set(keys))  # Each Apple key is used once ...
  tensors = {k: s for k, s in shapes.items() if not k.endswith('num_batches_tracked')}
  assert set(keys) == set(tensors)  # ... and every one of them is used,
  assert {e.torch_key: e.torch_shape for e in table.entries} == tensors  # with Apple's shapes.
  # Every Flax leaf is filled: by an Apple tensor, or (the timm head bias) with zeros.
  flax_leaves = {(c,) + tuple(k.key for k in path)
                 for c, tree in clip_lib.abstract_variables(config).items()
                 for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  covered = [(e.collection,) + e.path for e in table.entries + (table.head_bias,)]
  assert len(covered) == len(set(covered)) and set(covered) == flax_leaves
  # The BatchNorm counters written on export are exactly Apple's.
  batchnorms = {k.rsplit('.', 1)[0] for k in keys if k.endswith('.running_mean')}
  assert {k for k in shapes if k.endswith('num_batches_tracked')} == {
      f'{m}.num_batches_tracked' for m in batchnorms}


@pytest.mark.parametrize('apple_name', APPLE_VARIANTS)
def test_apple_v1_names_are_the_inverse_of_open_clip_and_timm_remaps(apple_name):
  """Key by key, Apple -> open_clip as open_clip's convert and timm's filters map them."""
  ref = pytest.importorskip('torch_reference')  # Needs torch, open_clip, timm.
  torch = ref.torch
  from open_clip import convert as open_clip_convert  # pylint: disable=g-import-not-at-top
  shapes = _apple_shapes(apple_name)
  keys = sorted(shapes)
  # Zero-memory tensors whose value is the index of their Apple key.
  state = {k: torch.tensor(float(i)).expand(shapes[k]) for i, k in enumerate(keys)}
  config = mobileclip_jax.get_config(apple_v1.APPLE_V1_MODELS[apple_name])
  with torch.device('meta'):  # The converters consult the target model; no memory needed.
    trunk = ref.timm.create_model(files.timm_architecture(config), num_classes=config.embed_dim)
  model = types.SimpleNamespace(visual=types.SimpleNamespace(trunk=trunk))
  converted = open_clip_convert.convert_state_dict(model, state)
  theirs = {keys[int(v.flatten()[0])]: k for k, v in converted.items()
            if v.numel() and not k.endswith(('num_batches_tracked', 'head.fc.bias', 'head.bias'))}
  table = apple_v1.apple_v1_table(config)
  ours = {e.torch_key: key for e, key in zip(table.entries, table.open_clip_keys)}
  if config.text_layout == 'apple_mct':  # open_clip has no MCt; its text names are checked in
    ours = {k: v for k, v in ours.items() if not k.startswith('text_encoder.')}  # test_models.
    theirs = {k: v for k, v in theirs.items() if not k.startswith('text_encoder.')}
  assert ours == theirs
  for k, v in converted.items():  # Apple's projection is [in, out]; timm's head is (out, in).
    if k.endswith(('head.fc.weight', 'head.weight')):
      assert tuple(v.shape) == shapes[keys[int(v.flatten()[0])]][::-1]


@pytest.fixture(scope='module')
def s0_v1():
  config = mobileclip_jax.get_config('MobileCLIP-S0')
  variables = _random_variables(config, seed=3)
  variables['params']['visual']['head']['bias'][:] = 0.0
  return config, variables


def test_apple_v1_s0_round_trip_is_bit_exact(s0_v1):
  config, variables = s0_v1
  state = apple_v1.to_apple_v1(variables, 'MobileCLIP-S0')
  assert {k: v.shape for k, v in state.items()} == _apple_shapes('mobileclip_s0')
  _assert_trees_equal(apple_v1.from_apple_v1(state, 'MobileCLIP-S0'), variables)
  assert apple_v1.match_apple_v1_model({k: v.shape for k, v in state.items()}) == config.name


def test_apple_v1_file_imports_with_ddp_prefix_and_wrapper(s0_v1, tmp_path):
  torch = pytest.importorskip('torch')
  config, variables = s0_v1
  state = apple_v1.to_apple_v1(variables, config)
  wrapped = {'epoch': 3,
             'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in state.items()}}
  torch.save(wrapped, tmp_path / 'mobileclip_s0.pt')
  out = tmp_path / 'orbax'
  # No variant given: it is recognized from the keys and shapes.
  saved = files.import_checkpoint(str(tmp_path / 'mobileclip_s0.pt'), str(out))
  assert saved == config
  loaded, loaded_config = checkpoint.load_variables(str(out))
  assert loaded_config == config
  _assert_trees_equal(loaded, variables)


def test_apple_v1_refuses_what_its_format_cannot_hold():
  config = mobileclip_jax.get_config('MobileCLIP-S0', **TINY)
  variables = _random_variables(config)
  with pytest.raises(ValueError, match=r'projection bias params/visual/head/bias is non-zero'):
    apple_v1.to_apple_v1(variables, config)
  variables['params']['visual']['head']['bias'][:] = 0.0
  with pytest.raises(ValueError, match='train-time form'):
    apple_v1.to_apple_v1(_random_variables(
        mobileclip_jax.get_config('MobileCLIP-S0', reparameterized=True, **TINY)), config)
  with pytest.raises(ValueError, match="no counterpart in Apple's v1 code"):
    apple_v1.apple_v1_table(mobileclip_jax.get_config('MobileCLIP2-S4'))
  state = apple_v1.to_apple_v1(variables, config)
  del state['image_encoder.model.conv_exp.se.reduce.bias']
  state['text_encoder.projection_layer'] = np.zeros((32, 8), np.float32)
  state['text_encoder.extra.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r'(?s)1 missing: image_encoder\.model\.conv_exp\.se\.reduce'
                     r'\.bias.*text_encoder\.projection_layer: expected \(32, 16\), got \(32, 8\)'
                     r'.*1 unexpected: text_encoder\.extra\.weight'):
    apple_v1.from_apple_v1(state, config)


def _apple_reference(name):
  """Perturbed open_clip `name`, its inputs and embeddings, and Flax variables from it."""
  ref = pytest.importorskip('torch_reference')
  model, gen = ref.reference_model(name)
  images, tokens = ref.reference_inputs(name, model, gen, batch=2)
  with ref.torch.no_grad():
    image_features = model.encode_image(ref.torch.from_numpy(images)).numpy()
    text_features = model.encode_text(ref.torch.from_numpy(tokens).long()).numpy()
  variables = open_clip_lib.from_open_clip(ref.state_dict_numpy(model), name)
  return ref, model, images, tokens, image_features, text_features, variables


@pytest.mark.slow
@pytest.mark.parametrize('name', ['MobileCLIP-S1', 'MobileCLIP-S2', 'MobileCLIP-B'])
def test_apple_v1_conversion_is_numerically_right(name):
  """open_clip model -> Flax -> Apple names: open_clip's own Apple importer and ours both
  reproduce the reference embeddings."""
  ref, model, images, tokens, image_features, text_features, variables = _apple_reference(name)
  torch = ref.torch
  state = apple_v1.to_apple_v1(variables, name)
  from open_clip import convert as open_clip_convert  # pylint: disable=g-import-not-at-top
  fresh = ref.open_clip.create_model(name, pretrained=None).eval()
  converted = open_clip_convert.convert_state_dict(
      fresh, {k: torch.from_numpy(v) for k, v in state.items()})
  fresh.load_state_dict(converted, strict=True)
  with torch.no_grad():
    assert _rel(fresh.encode_image(torch.from_numpy(images)).numpy(), image_features) <= TOL
    assert _rel(fresh.encode_text(torch.from_numpy(tokens).long()).numpy(), text_features) <= TOL
  back = apple_v1.from_apple_v1(state, name)
  _assert_trees_equal(back, variables)
  jax_model = clip_lib.CLIP(mobileclip_jax.get_config(name))
  image = jax_model.apply(back, jnp.asarray(ref.nhwc(images)), method='encode_image')
  text = jax_model.apply(back, jnp.asarray(tokens), method='encode_text')
  assert _rel(image, image_features) <= TOL and _rel(text, text_features) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize('apple_name', APPLE_VARIANTS)
def test_apple_v1_matches_apples_own_code(apple_name):
  """Against Apple's ml-mobileclip itself, when installed (`pip install -e` of its repository)."""
  ref = pytest.importorskip('torch_reference')  # First: it makes torchvision importable.
  apple_clip = pytest.importorskip('mobileclip.clip')
  torch = ref.torch
  import mobileclip as apple  # pylint: disable=g-import-not-at-top
  with open(os.path.join(os.path.dirname(apple.__file__), 'configs', f'{apple_name}.json')) as f:
    apple_model = apple_clip.CLIP(json.load(f)).eval()
  gen = torch.Generator().manual_seed(1)
  ref.perturb_(apple_model, gen)
  with torch.no_grad():
    for key, p in apple_model.named_parameters():  # Layer scales and (uninitialized) projections.
      if key.rsplit('.', 1)[-1].startswith('layer_scale'):
        p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
      elif key.endswith(('projection_layer', '.proj')) and p.ndim == 2:
        p.copy_(torch.randn(p.shape, generator=gen) * p.shape[0] ** -0.5)
  name = apple_v1.APPLE_V1_MODELS[apple_name]
  # Apple's ViT-B is not timm's vit_base_mci_224: `apple_semantics` switches to its stem padding
  # and LayerNorm eps, which is what importing an Apple checkpoint records.
  config = apple_v1.apple_semantics(mobileclip_jax.get_config(name))
  variables = apple_v1.from_apple_v1(ref.state_dict_numpy(apple_model), name)
  images = torch.randn(2, 3, config.image_size, config.image_size, generator=gen)
  tokens = ref.open_clip.get_tokenizer('MobileCLIP-S1')(['a photo of a cat', 'a dog in the snow'])
  jax_model = clip_lib.CLIP(config)
  image = jax_model.apply(variables, jnp.asarray(ref.nhwc(images.numpy())), method='encode_image')
  text = jax_model.apply(variables, jnp.asarray(tokens.numpy().astype(np.int32)),
                         method='encode_text')
  with torch.no_grad():
    image_features = apple_model.encode_image(images).numpy()
    text_features = apple_model.encode_text(tokens).numpy()
  assert _rel(image, image_features) <= TOL and _rel(text, text_features) <= TOL


# ---- Files ----

@pytest.fixture(scope='module')
def tiny():
  config = mobileclip_jax.get_config('MobileCLIP2-S0', **TINY)
  return config, _random_variables(config, seed=1)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pt', '.bin', '.npz'])
def test_state_dict_file_round_trip_is_bit_exact(tiny, tmp_path, suffix):
  if suffix in files.TORCH_SUFFIXES:
    pytest.importorskip('torch')
  config, variables = tiny
  state = open_clip_lib.to_open_clip(variables, config)
  path = str(tmp_path / f'model{suffix}')
  files.write_state_dict(state, path)
  back = files.read_state_dict(path)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
  _assert_trees_equal(open_clip_lib.from_open_clip(back, config), variables)
  assert os.listdir(tmp_path) == [f'model{suffix}']  # No temporary file left.
  assert os.stat(path).st_mode & 0o777 == utils.FILE_MODE  # The umask's, not mkstemp's 0600.
  with pytest.raises(FileExistsError, match='Will not overwrite the existing .*model'):
    files.write_state_dict(state, path)


def test_open_clip_training_checkpoints_and_bfloat16_are_read(tiny, tmp_path):
  torch = pytest.importorskip('torch')
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  config, variables = tiny
  state = open_clip_lib.to_open_clip(variables, config)
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  # open_clip's training saves {'epoch', 'name', 'state_dict', 'optimizer'}; DDP adds 'module.'.
  torch.save({'epoch': 2, 'name': 'run', 'optimizer': {'state': {}},
              'state_dict': {f'module.{k}': v for k, v in tensors.items()}},
             tmp_path / 'epoch_2.pt')
  np.testing.assert_equal(files.read_state_dict(str(tmp_path / 'epoch_2.pt')), state)
  safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
                              str(tmp_path / 'bf16.safetensors'))
  back = files.read_state_dict(str(tmp_path / 'bf16.safetensors'))
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v.to(torch.bfloat16).float().numpy(), err_msg=k)


def test_safetensors_need_no_torch_and_torch_files_say_they_do(tiny, tmp_path, monkeypatch):
  config, variables = tiny
  state = open_clip_lib.to_open_clip(variables, config)
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
  files.write_state_dict(state, str(tmp_path / 'model.safetensors'))
  np.testing.assert_equal(files.read_state_dict(str(tmp_path / 'model.safetensors')), state)
  with pytest.raises(ImportError, match=r'model\.pt: reading or writing .* needs PyTorch'):
    files.write_state_dict(state, str(tmp_path / 'model.pt'))
  assert sorted(os.listdir(tmp_path)) == ['model.safetensors']


def test_damaged_and_foreign_files_are_named(tiny, tmp_path):
  pytest.importorskip('torch')
  config, variables = tiny
  state = open_clip_lib.to_open_clip(variables, config)
  for suffix in ('.pt', '.safetensors'):
    good = str(tmp_path / f'good{suffix}')
    files.write_state_dict(state, good)
    with open(good, 'rb') as f:
      data = f.read()
    for name, content in ((f'truncated{suffix}', data[:len(data) // 2]),
                          (f'notes{suffix}', b'not a checkpoint, just some text\n')):
      path = tmp_path / name
      path.write_bytes(content)
      with pytest.raises(ValueError, match=rf'{name} is not a readable'):
        files.read_state_dict(str(path))
      out = tmp_path / f'out_{name}'
      with pytest.raises(ValueError, match=rf'{name} is not a readable'):
        files.import_checkpoint(str(path), str(out), model='MobileCLIP2-S0')
      assert not out.exists()
  with pytest.raises(ValueError, match=r"notes\.txt: unknown state_dict file type '\.txt'"):
    files.read_state_dict(str(tmp_path / 'notes.txt'))
  with pytest.raises(FileNotFoundError, match='missing.pt'):
    files.read_state_dict(str(tmp_path / 'missing.pt'))


# ---- Orbax <-> PyTorch ----

@pytest.mark.parametrize('suffix', ['.safetensors', '.pt'])
def test_orbax_to_torch_to_orbax_is_bit_exact(tiny, tmp_path, suffix):
  if suffix == '.pt':
    pytest.importorskip('torch')
  config, variables = tiny
  ckpt = _save_model(tmp_path / 'ckpt', variables, config)
  written = files.export_checkpoint(ckpt, str(tmp_path / 'export' / f'open_clip_model{suffix}'))
  assert written['config'] == str(tmp_path / 'export' / 'open_clip_config.json')
  # No --model: the config beside the file restores the exact (overridden) ModelConfig.
  files.import_checkpoint(written['weights'], str(tmp_path / 'back'))
  back, back_config = checkpoint.load_variables(str(tmp_path / 'back'))
  assert back_config == config
  _assert_trees_equal(back, variables)
  assert sorted(os.listdir(tmp_path)) == ['back', 'ckpt', 'export']


def test_reparameterized_export_round_trips(tiny, tmp_path):
  config, variables = tiny
  ckpt = _save_model(tmp_path / 'ckpt', variables, config)
  out = str(tmp_path / 'export' / 'open_clip_model.safetensors')
  files.export_checkpoint(ckpt, out, reparameterize=True)
  assert any('reparam_conv' in k for k in files.read_state_dict(out))
  files.import_checkpoint(out, str(tmp_path / 'back'))
  back, back_config = checkpoint.load_variables(str(tmp_path / 'back'))
  assert back_config.reparameterized and back_config == clip_lib.get_config(
      'MobileCLIP2-S0', reparameterized=True, **TINY)
  fused = jax.jit(mobileclip_jax.reparameterize)(variables)  # As the export does.
  _assert_trees_equal(back, jax.tree.map(np.asarray, fused))


def test_training_run_checkpoint_exports_its_latest_or_chosen_step(tiny, tmp_path):
  config, _ = tiny
  per_step = {100: _random_variables(config, seed=100), 200: _random_variables(config, seed=200)}
  # The layout of training runs: items 'state' (the TrainState) and 'meta' (JSON) per step.
  with ocp.CheckpointManager(str(tmp_path / 'run' / 'checkpoints'),
                             item_names=(checkpoint.STATE_ITEM, checkpoint.META_ITEM)) as manager:
    for step, v in per_step.items():
      state = {'params': v['params'], 'batch_stats': v['batch_stats'], 'step': np.int32(step),
               'opt_state': {'mu': v['params'], 'count': np.int32(step)}}
      manager.save(step, args=ocp.args.Composite(**{
          checkpoint.STATE_ITEM: ocp.args.StandardSave(state),
          checkpoint.META_ITEM: ocp.args.JsonSave(
              {'model_config': clip_lib.config_to_dict(config), 'step': step})}))
    manager.wait_until_finished()
  for step, expected in ((None, per_step[200]), (100, per_step[100])):
    out = str(tmp_path / f'step_{step}' / 'model.npz')
    files.export_checkpoint(str(tmp_path / 'run'), out, step=step)
    _assert_trees_equal(open_clip_lib.from_open_clip(files.read_state_dict(out), config), expected)
  with pytest.raises(FileNotFoundError, match=r'Step 150 is not a complete .*\[100, 200\]'):
    files.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'x' / 'model.npz'), step=150)
  assert not (tmp_path / 'x').exists()


def test_conversion_errors_name_the_problem_and_leave_nothing(tiny, tmp_path):
  config, variables = tiny
  ckpt = _save_model(tmp_path / 'ckpt', variables, config)
  path = files.export_checkpoint(ckpt, str(tmp_path / 'model.safetensors'))['weights']
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match="Unknown model 'MobileCLIP2-S9'"):
    files.import_checkpoint(path, str(out), model='MobileCLIP2-S9')
  state = files.read_state_dict(path)
  del state['text.ln_final.weight']
  state['text.text_projection'] = np.zeros((32, 8), np.float32)
  files.write_state_dict(state, path, overwrite=True)  # The config beside it still names it.
  with pytest.raises(ValueError, match=r'(?s)does not match MobileCLIP2-S0:\n  1 missing: '
                     r'text\.ln_final\.weight\n  1 shape mismatch: text\.text_projection: '
                     r'expected \(32, 16\), got \(32, 8\)'):
    files.import_checkpoint(path, str(out))
  os.remove(tmp_path / 'open_clip_config.json')
  with pytest.raises(ValueError, match='Pass --model'):
    files.import_checkpoint(path, str(out))
  files.write_state_dict(open_clip_lib.to_open_clip(variables, config, tower='visual'),
                         str(tmp_path / 'tower.safetensors'))
  with pytest.raises(ValueError, match='an image tower alone'):
    files.import_checkpoint(str(tmp_path / 'tower.safetensors'), str(out), model='MobileCLIP2-S0')
  assert not out.exists()
  # Exports that cannot be made write nothing, not even the config.
  export = tmp_path / 'export'
  with pytest.raises(ValueError, match='projection bias .* is non-zero'):
    files.export_checkpoint(ckpt, str(export / 'mobileclip.safetensors'), fmt='apple_v1')
  with pytest.raises(ValueError, match='not a timm architecture'):
    files.export_checkpoint(ckpt, str(export / 'model.safetensors'), fmt='timm')
  with pytest.raises(ValueError, match='unknown state_dict file type'):
    files.export_checkpoint(ckpt, str(export / 'model.onnx'))
  assert not export.exists()
  vit = tmp_path / 'vit'
  vit_config = mobileclip_jax.get_config('MobileCLIP2-B', embed_dim=16, image_size=32,
                                         image=dict(width=32, depth=1, heads=2),
                                         text=dict(layers=1, width=32, heads=2))
  vit_ckpt = _save_model(vit, _random_variables(vit_config), vit_config)
  with pytest.raises(ValueError, match='has no reparameterizable tower'):
    files.export_checkpoint(vit_ckpt, str(export / 'model.safetensors'), reparameterize=True)
  assert not export.exists()
  # An existing output is not replaced without overwrite.
  written = files.export_checkpoint(ckpt, str(export / 'model.safetensors'))
  with pytest.raises(FileExistsError, match='Will not overwrite the existing .*model.safetensors'):
    files.export_checkpoint(ckpt, written['weights'])
  files.export_checkpoint(ckpt, written['weights'], overwrite=True)
  assert sorted(os.listdir(export)) == ['model.safetensors', 'open_clip_config.json']


def test_a_failed_write_leaves_no_file_and_no_new_directory(tmp_path):
  def fail(tmp):
    with open(tmp, 'w') as f:
      f.write('half')
    raise OSError('disk full')
  def ok(tmp):
    with open(tmp, 'w') as f:
      f.write('{}')
  with pytest.raises(OSError, match='disk full'):
    files.write_files({str(tmp_path / 'new' / 'dir' / 'config.json'): ok,
                       str(tmp_path / 'new' / 'dir' / 'model.safetensors'): fail})
  assert os.listdir(tmp_path) == []


def test_open_clip_model_configs_equal_open_clips_own():
  ref = pytest.importorskip('torch_reference')
  names = [n for n in ref.open_clip.list_models() if n.startswith('MobileCLIP')]
  assert len(names) == 9  # Every MobileCLIP / MobileCLIP2 variant open_clip knows.
  for name in names:
    assert files.open_clip_model_cfg(clip_lib.get_config(name)) == ref.open_clip.get_model_config(
        name), name
  assert files.open_clip_model_cfg(clip_lib.get_config('MobileCLIP-S0')) is None  # MCt text.
  sigmoid = clip_lib.get_config('MobileCLIP2-S0', attention='sigmoid')
  assert files.open_clip_model_cfg(sigmoid) is None
  # The CLIP teachers in open_clip's own layout: its configs plus defaults made explicit.
  for name in ('ViT-B-16', 'ViT-L-14', 'ViT-H-14', 'ViT-L-14-quickgelu'):
    want = ref.open_clip.get_model_config(name)
    got = files.open_clip_model_cfg(clip_lib.get_config(name))
    assert got.get('quick_gelu', False) == want.get('quick_gelu', False), name
    for tower in ('vision_cfg', 'text_cfg'):
      assert want[tower].items() <= got[tower].items(), (name, tower)


# ---- The full-size MobileCLIP2-S0 in open_clip and timm ----

@pytest.fixture(scope='module')
def s0(tmp_path_factory):
  """Perturbed open_clip MobileCLIP2-S0 -> Orbax model checkpoint, plus JAX embeddings."""
  ref = pytest.importorskip('torch_reference')
  name = 'MobileCLIP2-S0'
  model, gen = ref.reference_model(name)
  images, tokens = ref.reference_inputs(name, model, gen, batch=2)
  config = mobileclip_jax.get_config(name)
  variables = open_clip_lib.from_open_clip(ref.state_dict_numpy(model), name)
  ckpt = _save_model(tmp_path_factory.mktemp('s0') / 'ckpt', variables, config)
  jax_model = clip_lib.CLIP(config)
  image = jax.jit(lambda v, x: jax_model.apply(v, x, method='encode_image'))(
      variables, jnp.asarray(ref.nhwc(images)))
  text = jax.jit(lambda v, t: jax_model.apply(v, t, method='encode_text'))(variables, tokens)
  return types.SimpleNamespace(ref=ref, name=name, ckpt=ckpt, config=config, variables=variables,
                               reference=model,
                               images=ref.torch.from_numpy(images),
                               tokens=ref.torch.from_numpy(tokens).long(), image=np.asarray(image),
                               text=np.asarray(text))


def test_open_clip_loads_the_export_strictly_and_matches_jax(s0, tmp_path):
  export = tmp_path / 'export'
  files.export_checkpoint(s0.ckpt, str(export / 'open_clip_model.safetensors'))
  # open_clip builds the model and preprocessing from the config beside the weights and loads
  # them with strict=True.
  model, _, preprocess = s0.ref.open_clip.create_model_and_transforms(f'local-dir:{export}')
  model.eval()
  with s0.ref.torch.no_grad():
    assert _rel(model.encode_image(s0.images).numpy(), s0.image) <= TOL
    assert _rel(model.encode_text(s0.tokens).numpy(), s0.text) <= TOL
  resize, crop = preprocess.transforms[:2]
  normalize = preprocess.transforms[-1]
  assert resize.size == 256 and resize.interpolation.value == 'bilinear' and crop.size == (256, 256)
  assert tuple(normalize.mean) == s0.config.mean and tuple(normalize.std) == s0.config.std


@pytest.fixture(scope='module')
def s0_small_text(s0, tmp_path_factory):
  """MobileCLIP2-S0's image tower with s0's weights (so s0's JAX image embeddings hold) and a
  one-layer text tower: the reparameterized and timm exports only concern the image tower."""
  config = mobileclip_jax.get_config(s0.name, text=dict(layers=1, width=64, heads=2))
  variables = _random_variables(config, seed=5)
  for collection in variables:
    variables[collection]['visual'] = s0.variables[collection]['visual']
  ckpt = _save_model(tmp_path_factory.mktemp('s0_small_text') / 'ckpt', variables, config)
  jax_model = clip_lib.CLIP(config)
  text = jax_model.apply(variables, s0.tokens.numpy().astype(np.int32), method='encode_text')
  return types.SimpleNamespace(config=config, ckpt=ckpt, text=np.asarray(text))


def test_reparameterized_export_loads_into_reparameterized_open_clip(s0, s0_small_text, tmp_path):
  out = str(tmp_path / 'open_clip_model.safetensors')
  files.export_checkpoint(s0_small_text.ckpt, out, reparameterize=True)
  torch = s0.ref.torch
  text_cfg = files.open_clip_model_cfg(s0_small_text.config)['text_cfg']
  model = s0.ref.timm.models.reparameterize_model(
      s0.ref.open_clip.create_model(s0.name, text_cfg=text_cfg)).eval()
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  model.load_state_dict(safetensors.torch.load_file(out), strict=True)
  with torch.no_grad():
    assert _rel(model.encode_image(s0.images).numpy(), s0.image) <= TOL
    assert _rel(model.encode_text(s0.tokens).numpy(), s0_small_text.text) <= TOL


def test_timm_export_loads_into_timm(s0, s0_small_text, tmp_path):
  export = tmp_path / 'timm'
  files.export_checkpoint(s0_small_text.ckpt, str(export / 'model.safetensors'), fmt='timm')
  timm, torch = s0.ref.timm, s0.ref.torch
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  model = timm.create_model('fastvit_mci0', num_classes=512)
  model.load_state_dict(safetensors.torch.load_file(str(export / 'model.safetensors')), strict=True)
  # The tensors are open_clip's image trunk (whose embeddings s0's test compares with JAX's).
  state = model.state_dict()
  for key, value in s0.reference.visual.trunk.state_dict().items():
    torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
  # timm reads the architecture and preprocessing from the config beside the weights.
  from_dir = timm.create_model(f'local-dir:{export}', pretrained=True)
  data = timm.data.resolve_data_config({}, model=from_dir)
  assert tuple(data['input_size']) == (3, 256, 256) and data['interpolation'] == 'bilinear'
  assert tuple(data['mean']) == s0.config.mean and data['crop_pct'] == 1.0
  for key, value in from_dir.state_dict().items():
    torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


# ---- The command line ----

def test_command_line_converts_both_ways(tiny, tmp_path):
  config, variables = tiny
  ckpt = _save_model(tmp_path / 'ckpt', variables, config)
  script = os.path.join(REPO, 'launch', 'convert.py')
  run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True,
                                     text=True, cwd=tmp_path, check=False)
  exported = run(f'--checkpoint={ckpt}', '--out=export/open_clip_model.safetensors')
  assert exported.returncode == 0, exported.stderr
  imported = run('--torch_checkpoint=export/open_clip_model.safetensors', '--out=back')
  assert imported.returncode == 0, imported.stderr
  assert 'Wrote the model checkpoint back (MobileCLIP2-S0)' in imported.stdout
  back, back_config = checkpoint.load_variables(str(tmp_path / 'back'))
  assert back_config == config
  _assert_trees_equal(back, variables)

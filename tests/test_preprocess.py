"""Inference preprocessing equals open_clip's / torchvision's eval transform."""
import numpy as np
import pytest
from PIL import Image

from mobileclip_jax.data import preprocess


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('shape', [(300, 451), (451, 300), (256, 256), (99, 130)])
def test_resize_center_crop_equals_torchvision(interpolation, shape):
  torch = pytest.importorskip('torch')
  from mobileclip_jax import torch_compat  # pylint: disable=g-import-not-at-top
  tv = torch_compat.import_torchvision()
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8))
  mode = getattr(tv.transforms.InterpolationMode, interpolation.upper())
  reference = tv.transforms.Compose([tv.transforms.Resize(256, interpolation=mode),
                                     tv.transforms.CenterCrop(256)])(image)
  got = preprocess.resize_center_crop(image, 256, interpolation)
  np.testing.assert_array_equal(got, np.asarray(reference))
  normalized = preprocess.normalize(got, (0.48145466, 0.4578275, 0.40821073),
                                    (0.26862954, 0.26130258, 0.27577711))
  want = tv.transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                 (0.26862954, 0.26130258, 0.27577711))(
                                     tv.transforms.functional.to_tensor(reference))
  np.testing.assert_allclose(normalized, want.numpy().transpose(1, 2, 0), atol=1e-5)
  del torch


def test_unknown_interpolation_is_named():
  with pytest.raises(ValueError, match='interpolation must be one of'):
    preprocess.resize_center_crop(Image.new('RGB', (10, 10)), 8, 'lanczos5')

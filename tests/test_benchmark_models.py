"""Smoke test of `launch/benchmark.py models` on a tiny config (benchmarks are not tests).

Checks that one configuration runs end to end (reference weights from torch, a torch process and
a JAX process, each fresh) and yields a row whose two outputs agree and whose timings add up.
"""
import json

import pytest

pytest.importorskip('torch')
from mobileclip_jax.benchmark import models  # noqa: E402

# A one-layer 64-wide text tower; MCi0 at 64 px (the smallest image tower timm can build, whose
# timm build and XLA compile take most of a minute on a busy 2-core machine: slow).
_TINY_TEXT = {'towers': 'text', 'forms': 'train-time',
              'overrides': json.dumps({'embed_dim': 16, 'text': {'layers': 1, 'width': 64,
                                                                 'heads': 2}})}
_TINY_IMAGE = {'towers': 'image', 'forms': 'reparameterized',
               'overrides': json.dumps({'image_size': 64, 'embed_dim': 16})}


@pytest.mark.parametrize('tiny', [
    pytest.param(_TINY_TEXT, id='text'),
    pytest.param(_TINY_IMAGE, id='image-reparameterized', marks=pytest.mark.slow),
])
def test_tiny_config_yields_a_complete_row_whose_outputs_agree(tiny):
  options = dict(tiny, variants='MobileCLIP2-S0', batch_sizes='2', repeats='1', attempts='1')
  rows = list(models.run(options))
  assert len(rows) == 1
  row = rows[0]
  json.dumps(row)  # JSON-able.
  assert (row['variant'], row['tower'], row['form'], row['batch']) == (
      'MobileCLIP2-S0', options['towers'], options['forms'], 2)
  assert row['outputs_agree'] and row['rel_l2'] < 1e-4
  assert 0 < row['jax_min_s'] <= row['jax_median_s'] and 0 < row['torch_min_s'] <= row['torch_median_s']
  assert row['ratio_median'] == pytest.approx(row['jax_median_s'] / row['torch_median_s'], rel=1e-2)
  assert row['jax_compile_s'] > 0 and row['jax_peak_rss_mb'] > 0 and row['torch_peak_rss_mb'] > 0
  assert {'jax', 'flax', 'torch', 'open_clip', 'timm'} <= set(row['versions'])


@pytest.mark.parametrize('options,match', [
    ({'variant': 'MobileCLIP2-S0'}, r"Unknown option\(s\) \['variant'\].*valid: variants"),
    ({'overrides': '{"attention": "sigmoid"}'}, r"\['attention'\] have no counterpart"),
    ({'overrides': '{"text": {"causal": true}}'}, r"\['text.causal'\] have no counterpart"),
    ({'overrides': 'image_size=224'}, r'overrides must be a JSON object'),
    ({'towers': 'vision'}, r"towers=vision: \['vision'\] not in image, text"),
    ({'batch_sizes': '1,eight'}, r"Option batch_sizes='eight' is not a valid int"),
    ({'attempts': '0'}, r'attempts must be at least 1'),
])
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    next(models.run(options))

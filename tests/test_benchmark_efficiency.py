"""Smoke test of `launch/benchmark.py efficiency` on a tiny text tower (benchmarks are not tests).

The rows must be complete and consistent: the unreduced row has ratio 1 and cosine 1, merging
and pruning lower the XLA FLOP count, the padding cut shortens the input, and the speed-up is
the ratio of the interleaved medians.
"""
import json

import pytest

from mobileclip_jax.benchmark import efficiency

_TINY = json.dumps({'embed_dim': 16, 'text': {'layers': 4, 'width': 64, 'heads': 2}})


def test_tiny_text_tower_rows_are_complete_and_consistent():
  rows = list(efficiency.run(dict(parts='cost', variants='MobileCLIP2-B', towers='text',
                                  batch_sizes='2', repeats='1', quick='1', overrides=_TINY)))
  json.dumps(rows)
  by_method = {r['method']: r for r in rows}
  assert set(by_method) == {'none', 'tome', 'cut_padding', 'prune_random', 'prune_attention'}
  none = by_method['none']
  assert none['gflops_ratio'] == 1.0 and none['cosine_mean'] == 1.0 and none['speedup'] == 1.0
  for method in ('tome', 'prune_random', 'prune_attention', 'cut_padding'):
    row = by_method[method]
    assert 0 < row['gflops'] < none['gflops'], method
    assert row['speedup'] == pytest.approx(row['base_median_s'] / row['median_s'], rel=1e-2)
  # MobileCLIP2-B's text tower is causal: the padding cut changes nothing but the cost.
  assert by_method['cut_padding']['input_shape'][1] < 77
  assert by_method['cut_padding']['cosine_min'] > 0.9999


@pytest.mark.parametrize('options,match', [
    ({'variant': 'MobileCLIP2-S0'}, r"Unknown option\(s\) \['variant'\]"),
    ({'parts': 'speed'}, r"\['speed'\] not in cost, accuracy"),
    ({'towers': 'vision'}, r'only image and text'),
    ({'repeats': '0'}, r'must be >= 1'),
])
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    next(efficiency.run(options))

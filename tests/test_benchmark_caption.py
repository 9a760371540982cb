"""Smoke test of `launch/benchmark.py caption` on a tiny CoCa (benchmarks are not tests).

One configuration runs end to end (weights from a torch process, then a torch and a JAX process,
each fresh) and yields a complete row in which both sides wrote the same greedy tokens.
"""
import json

import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers', reason="open_clip's generate needs transformers")
from mobileclip_jax.benchmark import caption  # noqa: E402

_TINY = json.dumps({'embed_dim': 64, 'image_size': 64,
                    'image': {'width': 96, 'heads': 2, 'layers': 1},
                    'text': {'width': 64, 'heads': 2, 'layers': 1},
                    'decoder': {'width': 64, 'heads': 2, 'layers': 1}})
_FIELDS = ('variant', 'params_m', 'sampler', 'batch', 'seq_len', 'jax_median_s', 'jax_min_s',
           'jax_captions_per_s', 'jax_peak_rss_mb', 'torch_median_s', 'torch_captions_per_s',
           'torch_peak_rss_mb', 'jax_first_call_s', 'jax_compile_s', 'speedup_median',
           'tokens_equal', 'last_eot_position', 'jax_others_cpu_frac', 'torch_others_cpu_frac',
           'load_avg_1m', 'versions')


def test_tiny_captioner_yields_a_complete_row_with_equal_tokens():
  rows = list(caption.run(dict(overrides=_TINY, samplers='greedy', batch_sizes='2', seq_len='8',
                               repeats='1', attempts='1')))
  assert len(rows) == 1
  row = rows[0]
  assert set(_FIELDS) <= set(row), sorted(set(_FIELDS) - set(row))
  json.dumps(row)
  assert (row['sampler'], row['batch'], row['seq_len']) == ('greedy', 2, 8)
  assert row['tokens_equal']
  assert row['speedup_median'] == pytest.approx(row['torch_median_s'] / row['jax_median_s'],
                                                rel=1e-2)
  assert row['jax_captions_per_s'] == pytest.approx(2 / row['jax_median_s'], rel=1e-2)
  assert row['jax_first_call_s'] > row['jax_median_s'] > 0
  assert {'jax', 'torch', 'open_clip', 'transformers'} <= set(row['versions'])


@pytest.mark.parametrize('options,match', [
    ({'variant': 'MobileCLIP2-S0'}, 'variant must be a CoCa model'),
    ({'samplers': 'beam'}, r"\['beam'\] not in greedy, top_p"),
    ({'overrides': '{"text": {"vocab_size": 10}}'}, r"\['text.vocab_size'\] have no counterpart"),
    ({'overrides': '{"text": {"width": 256}}'}, r'text.width \(256\), decoder.width \(512\)'),
    ({'towers': 'image'}, r"Unknown option\(s\) \['towers'\]"),
])
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    next(caption.run(options))

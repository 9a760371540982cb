"""Smoke test of `launch/benchmark.py export` on a tiny config (benchmarks are not tests).

One tiny text tower runs end to end: the torch reference, JAX, the ONNX and TFLite exports and
their runtimes, each in a fresh process; the row is complete and every runtime's output agrees
with JAX. Bad options are refused by name.
"""
import pytest

from mobileclip_jax import benchmark

_TINY = {'variants': 'MobileCLIP2-S0', 'towers': 'text', 'repeats': '1', 'attempts': '1',
         'overrides': '{"embed_dim": 32, "text": {"layers": 1, "width": 64, "heads": 2}}'}


def test_tiny_text_tower_row_is_complete_and_the_runtimes_agree_with_jax():
  pytest.importorskip('onnxruntime')
  pytest.importorskip('ai_edge_litert')
  pytest.importorskip('jax2onnx')
  (row,) = list(benchmark.run('export', dict(_TINY)))
  assert (row['variant'], row['tower'], row['precision'], row['batch']) == (
      'MobileCLIP2-S0', 'text', 'fp32', 1)
  for name in ('jax', 'torch', 'onnxruntime', 'litert'):
    assert 0 < row[f'{name}_min_s'] <= row[f'{name}_median_s'], name
  for name in ('torch', 'onnxruntime', 'litert'):
    assert row[f'{name}_rel_l2'] < 1e-4, name
  assert row['onnxruntime_vs_torch'] > 0 and row['litert_version']


@pytest.mark.parametrize('options, message', [
    ({'formats': 'onnx,coreml'}, "formats=onnx,coreml: ['coreml'] not in onnx, tflite"),
    ({'precisions': 'int4'}, "['int4'] not in fp32, fp16, int8"),
    ({'batch_sizes': '8'}, "Unknown option(s) ['batch_sizes']"),
])
def test_bad_options_are_refused_by_name(options, message):
  with pytest.raises(ValueError) as err:
    list(benchmark.run('export', options))
  assert message in str(err.value)

"""Smoke test of `launch/benchmark.py loss` at small sizes (benchmarks are not tests).

- A compile-only case yields both forms' per-device buffers, and the streamed form's temporaries
  are a fraction of the unstreamed form's (which holds [B_local, B_global] matrices).
- A run case computes the same loss in both forms, each in its own fresh process.
- Bad options are named before any process starts.
"""
import pytest

from mobileclip_jax.benchmark import loss


def test_loss_benchmark_rows():
  rows = list(loss.run({'cases': '2048x8', 'run_cases': '64x1', 'block_sizes': '0,64',
                        'embed_dim': '16', 'teacher_dims': '24,8', 'repeats': '1'}))
  assert [(r['row'], r['form']) for r in rows] == [
      ('compile', 'reference'), ('compile', 'streamed'), ('run', 'reference'), ('run', 'streamed')]
  compiled_ref, compiled, run_ref, run = rows
  assert compiled['local_batch'] == 256 and compiled['devices'] == 8
  # One fp32 [256, 2048] matrix is 2 MiB; the streamed form holds [256, 64] tiles.
  assert compiled_ref['temp_mb'] > 8 and compiled['temp_ratio_vs_reference'] < 0.25
  assert abs(run['loss'] - run_ref['loss']) <= 1e-5 * abs(run_ref['loss'])
  assert run['step_s'] > 0 and 'time_ratio_vs_reference' in run


@pytest.mark.parametrize('options,message', [
    ({'case': '64x1'}, r"Unknown option\(s\) \['case'\]"),
    ({'cases': '64by8'}, 'BATCHxDEVICES'),
    ({'cases': '60x8'}, 'does not split over 8 devices'),
])
def test_bad_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    list(loss.run(options))

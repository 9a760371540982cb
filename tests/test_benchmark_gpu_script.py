"""launch/benchmark_gpu.sh, the accelerator comparison, run end to end on the CPU at toy size.

The same code path as on a GPU: bfloat16 on both sides (JAX's model dtype, torch.autocast),
PyTorch eager and torch.compile, XLA's FLOPs of the timed step, the JSON rows and the summary.
"""
import json
import os
import subprocess

import pytest

pytest.importorskip('torch')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, 'launch', 'benchmark_gpu.sh')
# As tests/test_benchmark_train.py: ViT-B-16 shrunk to one block, a one-layer text tower.
_TINY = json.dumps({'image_size': 32, 'embed_dim': 16,
                    'image': {'width': 32, 'depth': 1, 'heads': 2, 'patch_size': 8},
                    'text': {'layers': 1, 'width': 32, 'heads': 2}},
                   separators=(',', ':'))  # BENCHMARK_OPTIONS is split at spaces.


def _run(tmp_path, **env):
  env = {**os.environ, 'XLA_FLAGS': '', 'PYTHONPATH': _ROOT, **env}
  return subprocess.run(['bash', _SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                        timeout=1800)


@pytest.mark.slow  # torch.compile (inductor) of fwd + bwd on 2 CPU cores: minutes.
def test_script_runs_the_whole_comparison_and_writes_rows_and_a_summary(tmp_path):
  options = ' '.join(f'--option={k}={v}' for k, v in dict(
      variants='ViT-B-16', batch='2', repeats='1', warmup='0', overrides=_TINY).items())
  # bfloat16 and torch.compile are the accelerator defaults; the CPU needs them asked for.
  proc = _run(tmp_path, REQUIRE_ACCELERATOR='0', BENCHMARK_OPTIONS=options +
              ' --option=dtype=bfloat16 --option=torch_modes=eager,compile')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / 'train.jsonl')]
  assert len(rows) == 1 and 'error' not in rows[0], rows
  row = rows[0]
  assert row['dtype'] == 'bfloat16' and row['variant'] == 'ViT-B-16'
  assert 'torch_compile_error' not in row, row.get('torch_compile_error')
  for prefix in ('jax', 'torch', 'torch_compile'):
    assert row[f'{prefix}_median_s'] > 0 and row[f'{prefix}_tflops_per_s'] > 0
  assert row['torch_compile_compile_s'] > 0 and row['ratio_vs_compile_median'] > 0
  assert row['jax_flops_per_step'] > 0
  # In bfloat16 the first steps agree loosely, and torch.compile computes what eager computes.
  assert row['losses_agree'], (row['first_step'], row['tolerances'])
  first = row['first_step']
  assert first['torch_compile']['loss'] == pytest.approx(first['torch']['loss'], rel=1e-2)
  summary = (tmp_path / 'train.md').read_text()
  assert summary.startswith('| variant | batch | dtype |') and '| ViT-B-16 | 2 | bfloat16 |' in summary
  assert 'jax' in (tmp_path / 'environment.txt').read_text()


def test_script_refuses_to_run_on_a_cpu_unless_asked(tmp_path):
  proc = _run(tmp_path, REQUIRE_ACCELERATOR='1', JAX_PLATFORMS='cpu')
  assert proc.returncode != 0
  assert 'JAX sees no accelerator' in proc.stderr
  assert not (tmp_path / 'train.md').exists()

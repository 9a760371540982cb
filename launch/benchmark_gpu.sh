#!/usr/bin/env bash
# The accelerator comparison in one command: one MobileCLIP2 DR train step of S0, B and S4 in
# bfloat16 — JAX (jit, XLA's FLOPs -> MFU) beside PyTorch eager AMP and torch.compile on the same
# device and batch — then a Markdown summary. Runs from the checkout (PYTHONPATH), installs
# nothing, so it uses whatever jax / torch / open_clip the machine already has.
#
#   bash launch/benchmark_gpu.sh [OUT_DIR]
#
# OUT_DIR (default $OUT, else ./benchmark_gpu): environment.txt, train.jsonl (one JSON row per
# configuration, appended as each finishes, so a run cut short keeps what it measured), train.md.
# BENCHMARK_OPTIONS adds or overrides options, split at spaces (so JSON values without spaces),
# e.g. "--option=batch=128 --option=variants=MobileCLIP2-S0".
# REQUIRE_ACCELERATOR=0 lets it run on a CPU (how tests/test_benchmark_gpu_script.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmark_gpu}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"  # Peak = own use.

: > "$out/train.jsonl"  # benchmark.py appends.
python - "$out/environment.txt" "${REQUIRE_ACCELERATOR:-1}" <<'PY'
import platform, subprocess, sys
lines = [f'python {platform.python_version()} on {platform.node()}']
try:
  lines.append(subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                               '--format=csv,noheader'], capture_output=True, text=True,
                              timeout=60).stdout.strip())
except (OSError, subprocess.SubprocessError):
  lines.append('nvidia-smi: not available')
import jax
lines.append(f'jax {jax.__version__}: {jax.default_backend()} {jax.devices()}')
try:
  import torch
  cuda = torch.cuda.is_available()
  lines.append(f'torch {torch.__version__}, cuda {torch.version.cuda}, available: {cuda}' +
               (f' ({torch.cuda.get_device_name()})' if cuda else ''))
except ImportError as e:
  lines.append(f'torch: {e}')
text = '\n'.join(lines)
print(text)
open(sys.argv[1], 'w').write(text + '\n')
if sys.argv[2] == '1' and jax.default_backend() == 'cpu':
  sys.exit('JAX sees no accelerator (install the jax build for this machine, e.g. '
           "pip install -U 'jax[cuda12]'), or set REQUIRE_ACCELERATOR=0 to run on the CPU.")
PY

# Cheapest variants first: a run that hits its time limit still has S0 and B.
# shellcheck disable=SC2086
python launch/benchmark.py train --out="$out/train.jsonl" \
  --option=variants=MobileCLIP2-S0,MobileCLIP2-B,MobileCLIP2-S4 \
  --option=repeats=10 --option=warmup=3 --option=attempts=1 ${BENCHMARK_OPTIONS:-}

python - "$out/train.jsonl" "$out/train.md" <<'PY'
import json, sys
from mobileclip_jax.benchmark import train
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
table = train.summary_table(rows)
print(table)
open(sys.argv[2], 'w').write(table + '\n')
PY

#!/usr/bin/env bash
# The accelerator check (issue 8): the GPU-marked tests, then the train-step benchmark at
# d=2048, h=65536, k=64, batch 8192 in float32 and bfloat16 (bench/gpu_bench.py). Sized for
# under 8 minutes on one GPU. Uses the machine's own Python (jax with CUDA, flax, optax,
# orbax, tensorstore, pytest) with this checkout on PYTHONPATH: nothing is installed.
# Results: bench/results/gpu_bench.json, also copied to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts="--strict-markers" -m gpu tests || echo "GPU TESTS FAILED"
timeout 360 "$PY" -m bench.gpu_bench "$@"
if [ -n "${OUT:-}" ]; then cp bench/results/gpu_bench.json "$OUT/"; fi

#!/usr/bin/env bash
# The accelerator check, one command, under 8 minutes on one GPU: GPU tests, the train step at
# d=2048, h=65536 (f32/bf16), capture overhead of extraction on CUDA in float16 with a
# musicgen-small-sized random model, and the whole pipeline with JAX on the GPU, with where each
# stage ran (bench/gpu_check.py). Uses the machine's own Python (jax with CUDA, torch,
# transformers, flax, optax, orbax, tensorstore, pytest) with this checkout on PYTHONPATH:
# nothing is installed. Results: bench/results/gpu_check.json, also copied to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
"${PYTHON:-python3}" -m bench.gpu_check "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -f bench/results/gpu_check.json ]; then cp bench/results/gpu_check.json "$OUT/"; fi
exit "$status"

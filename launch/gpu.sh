#!/usr/bin/env bash
# Run a stage or the whole pipeline on all local GPUs. Training and discovery use every GPU in
# one process (the mesh's data axis; add --mesh_model M to split latents too); extraction runs
# one process per GPU, each filling its --shard i/N of the same store. A stage whose framework
# sees no GPU stops with one line naming the fix (exit status 2).
#   launch/gpu.sh extract --model facebook/musicgen-small --layers 12 --prompt_file data/...txt
#   launch/gpu.sh train --store data/activations --layer_idx 12 --hidden_dim 65536
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec "${PYTHON:-.venv/bin/python}" -m launch --platform gpu "$@"

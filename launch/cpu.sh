#!/usr/bin/env bash
# Run a stage or the whole pipeline on this machine's CPU cores.
#   launch/cpu.sh pipeline [flags]       launch/cpu.sh train --store data/activations --layer_idx 12 ...
# CPU_DEVICES=N splits the cores into N JAX devices (the mesh's data axis) to test sharding.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES:-1}"
exec "${PYTHON:-.venv/bin/python}" -m launch --platform cpu "$@"

#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per GPU, jax.distributed detects the job; a task
# whose framework sees no GPU stops with one line naming the fix (exit status 2).
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh train --store /shared/acts ...
#SBATCH --job-name=sae-music-jax
#SBATCH --gpus-per-task=1
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec srun "${PYTHON:-.venv/bin/python}" -m launch --platform gpu "$@"

#!/usr/bin/env bash
# Run a JAX stage on a TPU VM pod slice: the same command on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command "cd sae-music-jax && launch/tpu.sh train --store gs-fuse/activations --layer_idx 12 ..."
# jax.distributed detects the pod; every worker reads its share of each batch and process 0
# writes the files. The store must be on a filesystem all workers see. A JAX stage that sees no
# TPU (libtpu missing) stops with one line naming the fix (exit status 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export TPU_STDERR_LOG_LEVEL="${TPU_STDERR_LOG_LEVEL:-2}"
exec "${PYTHON:-.venv/bin/python}" -m launch --platform tpu "$@"

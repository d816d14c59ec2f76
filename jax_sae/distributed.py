"""Multi-host start-up and the few helpers that differ between one process and many.

``initialize`` calls ``jax.distributed.initialize`` from explicit flags, or lets JAX detect the
cluster (SLURM, TPU VM pod slices, Open MPI) when its environment says there is one. After that
the same SPMD program runs everywhere; only process 0 writes logs and plain files.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from sae_core.errors import UsageError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start a JAX stage: the persistent compilation cache (``runtime.use_compilation_cache``), then
    join a multi-process run when one is configured."""
    from .runtime import use_compilation_cache

    use_compilation_cache()
    if coordinator_address or (num_processes or 1) > 1 or process_id:
        if not coordinator_address or num_processes is None or process_id is None:
            raise UsageError("multi-process runs need --coordinator_address, --num_processes and --process_id "
                             "(or a SLURM / TPU environment that JAX detects)")
        if not 0 <= process_id < num_processes:
            raise UsageError(f"--process_id {process_id} must be in 0..{num_processes - 1} (--num_processes "
                             f"{num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_size() > 1:
        jax.distributed.initialize()


def _cluster_size() -> int:
    if os.environ.get("SLURM_JOB_ID"):
        return int(os.environ.get("SLURM_NTASKS", "1"))
    if os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    if os.environ.get("TPU_WORKER_HOSTNAMES"):
        return len(os.environ["TPU_WORKER_HOSTNAMES"].split(","))
    return 1


def is_primary() -> bool:
    return jax.process_index() == 0


def global_batch(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a batch every process holds; each device takes only its rows."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
    """Full numpy copies of (possibly sharded, multi-host) arrays on every process."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_host(value: np.ndarray) -> np.ndarray:
    """[processes, ...]: every process's ``value`` (same shape and dtype on each), bit for bit: 64-bit
    values travel as pairs of 32-bit words, since JAX without x64 would round them. A collective."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    flat = np.ascontiguousarray(value).reshape(-1)
    words = flat.view(np.uint32) if flat.dtype.itemsize == 8 else flat
    out = np.asarray(multihost_utils.process_allgather(words))
    return out.reshape(-1).view(flat.dtype).reshape((jax.process_count(),) + value.shape)

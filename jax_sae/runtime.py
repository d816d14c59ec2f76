"""Where the JAX work runs: one line for the log and one record for the run's files, both from
``describe``; and the refusal to run anywhere but the platform a launcher asked for.

``python -m launch --platform gpu|tpu`` calls ``require_platform`` in the stage's own process;
the stage checks after ``jax.distributed.initialize`` (which must come before anything that
touches a device), so a wrong platform stops before any data is read. Importing this module
is light (the launcher does it before a stage): jax loads on the first check.
"""

from __future__ import annotations

from typing import NamedTuple

from extractor.errors import UsageError

FIXES = {
    "gpu": "the JAX CUDA build is missing or no GPU is visible: run `SAE_MUSIC_ACCEL=cuda12 scripts/install.sh` "
           "(or `pip install -U \"jax[cuda12]\"`) and check `nvidia-smi`",
    "tpu": "libtpu is missing: run `SAE_MUSIC_ACCEL=tpu scripts/install.sh` (or `pip install \"jax[tpu]\"`)",
    "cpu": "set JAX_PLATFORMS=cpu (launch/cpu.sh does)",
}

_required: str | None = None


class PlatformError(UsageError):
    """JAX runs on another platform than the launcher asked for."""


class Runtime(NamedTuple):
    line: str
    """``jax: gpu, 8 devices (NVIDIA H100 80GB), mesh data=4 model=2`` for the log."""
    record: dict
    """The same as JSON for training_stats.json and the discovery summary."""


def require_platform(platform: str | None) -> None:
    """Make ``check_platform`` in this process refuse every JAX platform but ``platform``."""
    global _required
    _required = platform


def check_platform(stage: str = "this stage") -> None:
    """Raise PlatformError when a platform was required and JAX's devices are on another one."""
    if _required is None:
        return
    import jax

    platform = jax.devices()[0].platform
    if platform != _required:
        raise PlatformError(f"{stage} was launched for {_required} but JAX sees only {platform} devices; "
                            f"{FIXES.get(_required, '')}")


def describe(mesh) -> Runtime:
    """The platform, devices, processes and mesh this process computes on."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    record = {"platform": devices[0].platform, "device_count": len(devices),
              "local_device_count": jax.local_device_count(), "device_kinds": kinds,
              "process_count": jax.process_count(), "mesh": {name: int(n) for name, n in mesh.shape.items()}}
    processes = f" in {record['process_count']} processes" if record["process_count"] > 1 else ""
    axes = " ".join(f"{name}={n}" for name, n in record["mesh"].items())
    line = (f"jax: {record['platform']}, {len(devices)} device{'s' * (len(devices) != 1)} ({', '.join(kinds)})"
            f"{processes}, mesh {axes}")
    return Runtime(line, record)


def announce(mesh, stage: str = "this stage") -> dict:
    """Refuse a wrong platform, print the runtime line (process 0 only), return the record."""
    import jax

    check_platform(stage)
    runtime = describe(mesh)
    if jax.process_index() == 0:
        print(runtime.line, flush=True)
    return runtime.record

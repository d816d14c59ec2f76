"""Where the JAX work runs: one line for the log and one record for the run's files, both from
``describe``; and the refusal to run anywhere but the platform a launcher asked for.

``python -m launch --platform gpu|tpu`` calls ``require_platform`` in the stage's own process;
the stage checks after ``jax.distributed.initialize`` (which must come before anything that
touches a device), so a wrong platform stops before any data is read. Importing this module
is light (the launcher does it before a stage): jax loads on the first check.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from pathlib import Path
from typing import NamedTuple

from sae_core.errors import UsageError

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


def announce(mesh, stage: str = "this stage", quiet: bool = False) -> dict:
    """Refuse a wrong platform, print the runtime line (process 0 only, unless ``quiet``), return the record."""
    import jax

    check_platform(stage)
    runtime = describe(mesh)
    if jax.process_index() == 0 and not quiet:
        print(runtime.line, flush=True)
    return runtime.record


COMPILATION_CACHE_BYTES = 2 << 30
"""Cap of the persistent compilation cache; the least recently used programs go first."""


def use_compilation_cache() -> Path | None:
    """Keep compiled XLA programs on disk so the next process with the same shapes skips compiling:
    a rerun, a resumed run, discovery after training, the next SAE of a sweep (a demo training run
    spends about 3 of its 9 s compiling on 2 CPU cores). The cache is $SAE_MUSIC_JAX_CACHE, else
    jax-compilation/ under $SAE_MUSIC_CACHE or ~/.cache/sae-music-jax, in a folder per jax version
    and CPU (XLA's CPU programs use the host's vector instructions, which JAX's cache key leaves
    out, so a home directory shared by other machines must not mix them). SAE_MUSIC_JAX_CACHE=off
    turns it off, and a JAX_COMPILATION_CACHE_DIR of the user's own wins. Returns the folder used.

    Off where the host CPU is split into several devices (--xla_force_host_platform_device_count,
    the multi-device tests): with the cache on, the 4-device sweep of tests/test_sweep.py stopped in
    XLA:CPU's collective rendezvous (one device in another collective than the rest, killed after
    40 s) in every one of 5 runs with jax 0.10.2 here, and passed in every one of 6 with it off."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir or os.environ["JAX_COMPILATION_CACHE_DIR"])
    chosen = os.environ.get("SAE_MUSIC_JAX_CACHE", "")
    if chosen.lower() in ("off", "0", "none", "false") or _fake_host_devices() > 1:
        return None
    root = Path(chosen) if chosen else (Path(os.environ.get("SAE_MUSIC_CACHE") or Path.home() / ".cache" / "sae-music-jax")
                                        / "jax-compilation")
    folder = root / f"jax-{jax.__version__}-{_host_fingerprint()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time, as JAX does by default
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    return folder


def _fake_host_devices() -> int:
    """The host-platform device count XLA_FLAGS forces (1 when it forces none); read from the
    environment, so that nothing initialises a backend before a multi-process run's set-up."""
    found = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 1


def _host_fingerprint() -> str:
    """A short hash of this host's CPU architecture and instruction-set flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    text = f"{platform.machine()} {platform.processor()} {flags}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]

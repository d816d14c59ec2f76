"""What ``python -m launch --platform gpu|tpu`` checks before a stage starts, and extraction on
every GPU.

JAX stages check their own process's devices (``jax_sae.runtime``), after joining a
multi-process run, which must happen before anything touches a device. Checked here: torch's
CUDA for the torch stages; the pipeline's JAX platform, probed in a child process because the
pipeline's stages run in children of their own and a TPU opens in one process at a time; and
the GPUs that ``extract`` fans out over.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from jax_sae.runtime import FIXES

TORCH_CUDA_FIX = ("torch is a CPU-only build or no GPU is visible: run `SAE_MUSIC_ACCEL=cuda12 scripts/install.sh` "
                  "(or install torch's CUDA build) and check `nvidia-smi`")


class Refusal(RuntimeError):
    """This machine cannot run the stage on the platform asked for; the message names the fix."""


def check_torch_cuda(stage: str) -> None:
    try:
        import torch
    except ModuleNotFoundError:
        return  # a JAX-only install: the stage itself says which extra to install
    if not torch.cuda.is_available():
        raise Refusal(f"{stage} was launched for gpu but torch sees no CUDA GPU; {TORCH_CUDA_FIX}")


def check_jax_in_child(stage: str, platform: str) -> None:
    """The platform a fresh JAX process computes on, without holding a device in this one."""
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                           capture_output=True, text=True)
    lines = probe.stdout.split()
    seen = lines[-1] if probe.returncode == 0 and lines else "no"
    if seen != platform:
        raise Refusal(f"{stage} was launched for {platform} but JAX sees only {seen} devices; {FIXES[platform]}")


def visible_gpus() -> list[str]:
    """The GPUs to run on: CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists."""
    fix = "run on a machine with an NVIDIA GPU and its driver (`nvidia-smi` lists the GPUs)"
    if shutil.which("nvidia-smi") is None:
        raise Refusal(f"extract was launched for gpu but no GPU is visible (nvidia-smi not found); {fix}")
    listing = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
    count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines())
    if listing.returncode != 0 or count == 0:
        said = " ".join((listing.stderr or listing.stdout).split())[:200] or f"exit status {listing.returncode}"
        raise Refusal(f"extract was launched for gpu but nvidia-smi lists no GPU ({said}); {fix}")
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return [str(i) for i in range(count)]
    gpus = [g.strip() for g in chosen.split(",") if g.strip()]
    if not gpus:
        raise Refusal("extract was launched for gpu but CUDA_VISIBLE_DEVICES is empty; unset it to use every GPU")
    return gpus


def _status(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def extract_per_gpu(flags: list[str]) -> None:
    """Run ``extract`` as one process per GPU, each filling its ``--shard i/N`` of one store;
    wait for all of them and name every shard that failed."""
    gpus = visible_gpus()
    python = os.environ.get("PYTHON") or sys.executable  # the interpreter the launcher ran this one with
    n = len(gpus)
    shards = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the shards are stopped too
    try:
        for i, gpu in enumerate(gpus):
            command = [python, "-m", "launch", "--platform", "gpu", "extract", *flags, "--device", "cuda",
                       "--shard", f"{i}/{n}"]
            shards.append(subprocess.Popen(command, env=os.environ | {"CUDA_VISIBLE_DEVICES": gpu}))
        codes = [shard.wait() for shard in shards]
    finally:
        for shard in shards:
            if shard.poll() is None:
                shard.terminate()
    failed = [f"shard {i}/{n} (GPU {gpu}) failed with {_status(code)}"
              for i, (gpu, code) in enumerate(zip(gpus, codes)) if code != 0]
    if failed:
        sys.exit(f"error: extract on {n} GPU{'s' * (n > 1)}: {'; '.join(failed)}; "
                 f"rerun the same command to resume {'them' if len(failed) > 1 else 'it'}")
    print(f"extract on {n} GPU{'s' * (n > 1)}: every shard finished")

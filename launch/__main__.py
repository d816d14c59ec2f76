"""``python -m launch [--platform cpu|gpu|tpu] STAGE [flags]``: one entry point the
per-accelerator scripts share.

STAGE is ``pipeline`` (extract -> train -> discover -> report) or one of its stages; the flags
are that stage's own (``python -m launch train --help``). With ``--platform`` a stage whose
framework does not see that platform stops with one line naming the fix (exit status 2), and on
gpu ``extract`` without ``--shard`` runs one process per GPU.
"""

from __future__ import annotations

import runpy
import sys
from dataclasses import dataclass
from typing import Literal

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclass(frozen=True)
class Stage:
    module: str
    summary: str
    needs: Literal["jax", "torch", "both", "nothing"]
    """What must see the launcher's platform: JAX, torch, both, or nothing (the stage runs anywhere)."""


STAGES = {
    "pipeline": Stage("launch.pipeline", "extract -> train -> discover -> report in one command", "both"),
    "prompts": Stage("extractor.prompts", "prompt files from MusicCaps", "nothing"),
    "extract": Stage("extractor.extract", "MusicGen activations into an activation store (torch)", "torch"),
    "train": Stage("jax_sae.train", "an SAE on one layer of a store (JAX)", "jax"),
    "sweep": Stage("jax_sae.sweep", "a grid of SAEs in one pass over the store, on one comparison page (JAX)", "jax"),
    "discover": Stage("discovery.discover", "find, label and align an SAE's features (JAX)", "jax"),
    "report": Stage("discovery.report", "a browsable HTML report of discovered features", "nothing"),
    "export": Stage("jax_sae.export", "a trained SAE in the torch or SAELens format", "nothing"),
    "evaluate": Stage("extractor.evaluate", "how much of MusicGen's behaviour an SAE keeps (torch)", "torch"),
    "steer": Stage("extractor.steer", "generate with an SAE feature pushed into MusicGen (torch)", "torch"),
    "study": Stage("launch.study", "the published study: SAE grid, clip filter, CLAP label scores, steering", "both"),
    "steer_study": Stage("extractor.steer_study", "how many features steer toward their label, against controls (torch)",
                         "torch"),
    "label_scores": Stage("extractor.label_scores", "each label's CLAP score on its top clips against random ones "
                          "(torch)", "torch"),
}
MODULES = {name: stage.module for name, stage in STAGES.items()}
USAGE = f"usage: python -m launch [--platform {{{','.join(PLATFORMS)}}}] STAGE [flags]  (STAGE --help shows its flags)"


def _help() -> str:
    width = max(map(len, STAGES))
    stages = "\n".join(f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items())
    return (f"{USAGE}\n\nstages:\n{stages}\n\n"
            "--platform gpu|tpu: stop with one line naming the fix (exit status 2) when the stage's framework\n"
            "does not see that platform (JAX stages check after joining a multi-process run; torch stages\n"
            "check CUDA on gpu and run on the host CPU on tpu); on gpu, extract without --shard runs one\n"
            "process per GPU (CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists).\n")


def _usage_error(message: str) -> None:
    print(f"{USAGE}\nerror: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> tuple[str | None, str, list[str]]:
    platform = None
    if argv and argv[0].split("=")[0] == "--platform":
        platform, argv = (argv[0].partition("=")[2], argv[1:]) if "=" in argv[0] else ("".join(argv[1:2]), argv[2:])
        if platform not in PLATFORMS:
            _usage_error(f"--platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    if argv[:1] in (["-h"], ["--help"]):
        print(_help(), end="")
        sys.exit(0)
    if not argv:
        _usage_error("name a stage")
    if argv[0] not in STAGES:
        _usage_error(f"unknown stage {argv[0]!r}; choose from {', '.join(STAGES)}")
    return platform, argv[0], argv[1:]


def _prepare(platform: str, name: str) -> None:
    """The checks that must come before the stage runs; JAX stages check their own devices."""
    from jax_sae.runtime import require_platform

    from .accelerators import check_jax_in_child, check_torch_cuda

    needs = STAGES[name].needs
    if platform == "gpu" and needs in ("torch", "both"):
        check_torch_cuda(name)
    if needs == "both" and platform != "cpu":
        check_jax_in_child(name, platform)
    if needs == "jax":
        require_platform(platform)


def main(argv: list[str] | None = None) -> None:
    from jax_sae.runtime import PlatformError

    from .accelerators import Refusal, extract_per_gpu

    platform, name, flags = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        if platform is not None and not {"-h", "--help"} & set(flags):
            if platform == "gpu" and name == "extract" and not any(f.split("=")[0] == "--shard" for f in flags):
                return extract_per_gpu(flags)
            _prepare(platform, name)
        module = STAGES[name].module
        sys.argv = [f"python -m {module}", *flags]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except (Refusal, PlatformError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

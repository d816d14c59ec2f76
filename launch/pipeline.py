"""``python -m launch.pipeline``: extract -> train -> discover -> report in one command.

Each stage runs in its own process through its own CLI (torch and JAX never share one) and
is skipped when its outputs already exist and are complete; ``--force`` redoes every stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sae_core.errors import UsageError
from sae_core.files import write_json

STAGES = ("extract", "train", "discover", "report")
PIPELINE_FILE = "pipeline.json"


class PipelineError(UsageError):
    """A stage that failed or arguments that cannot work."""


@dataclass(frozen=True)
class PipelineConfig:
    """Options of ``python -m launch.pipeline`` (defaults: the offline tiny-random demo)."""

    model: str = "tiny-random"
    """MusicGen: tiny-random, a hub name (facebook/musicgen-small) or a local directory."""
    prompt_file: str = "bundled"
    """Prompts: bundled, or a file from python -m extractor.prompts."""
    layer: int = 2
    """Decoder layer to study."""
    out: str = "data/demo"
    """Root of every output (activations/, models/, results/)."""
    duration: float = 4.0
    """Seconds of audio per prompt."""
    extract_batch_size: int = 8
    """Prompts per generation batch."""
    sae_type: str = "batch_topk"
    """vanilla | topk | batch_topk | matryoshka."""
    hidden_dim: int = 512
    """SAE latents."""
    top_k: int = 16
    """Active latents per token."""
    epochs: int = 10
    """Training epochs."""
    train_batch_size: int = 256
    """Rows per optimizer step."""
    lr: float | Literal["auto"] = 1e-3
    """Peak learning rate (auto: jax_sae.train's width-scaled rule, for real models)."""
    max_features: int = 20
    """Features to report."""
    device: str = "auto"
    """Torch device for extraction and audio."""
    stages: tuple[Literal["extract", "train", "discover", "report"], ...] = STAGES
    """Stages to run (space- or comma-separated); they always run in pipeline order."""
    force: bool = False
    """Redo stages whose outputs exist."""

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise PipelineError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")


def _paths(cfg: PipelineConfig) -> dict[str, Path]:
    from jax_sae.run_dir import RunDir, run_path

    root = Path(cfg.out)
    run = RunDir(run_path(root / "models", cfg.sae_type, cfg.layer, cfg.hidden_dim))
    return {"store": root / "activations", "run": run.path, "sae": run.best,
            "features": root / "results" / f"features_layer{cfg.layer}.json",
            "report": root / "results" / f"report_layer{cfg.layer}"}


def _done(stage: str, paths: dict[str, Path]) -> bool:
    """Whether a stage's outputs exist and are complete."""
    if stage == "extract":
        from sae_core.store import Store, StoreError

        try:
            return Store(paths["store"]).complete
        except StoreError:
            return False
    if stage == "train":
        from jax_sae.run_dir import RunDir

        return RunDir(paths["run"]).finished()
    if stage == "discover":
        from discovery.discover import FeatureFiles

        return FeatureFiles(paths["features"]).finished()
    return (paths["report"] / "index.html").exists()


def _command(stage: str, cfg: PipelineConfig, paths: dict[str, Path]) -> list[str]:
    if stage == "extract":
        return ["extractor.extract", "--model", cfg.model, "--layers", str(cfg.layer), "--prompt_file",
                cfg.prompt_file, "--duration", str(cfg.duration), "--batch_size", str(cfg.extract_batch_size),
                "--out", str(paths["store"]), "--device", cfg.device] + (["--overwrite"] if cfg.force else [])
    if stage == "train":
        return ["jax_sae.train", "--store", str(paths["store"]), "--layer_idx", str(cfg.layer), "--sae_type",
                cfg.sae_type, "--hidden_dim", str(cfg.hidden_dim), "--top_k", str(cfg.top_k), "--epochs",
                str(cfg.epochs), "--batch_size", str(cfg.train_batch_size), "--lr", str(cfg.lr), "--out",
                str(Path(cfg.out) / "models")] + (["--overwrite"] if cfg.force else [])
    if stage == "discover":
        return ["discovery.discover", "--sae_path", str(paths["sae"]), "--store", str(paths["store"]),
                "--output", str(paths["features"]), "--no_filter", "--max_features", str(cfg.max_features), "--all"]
    return ["discovery.report", "--features", str(paths["features"]), "--out", str(paths["report"]),
            "--device", cfg.device]


def read_paths(out: str | Path) -> dict[str, Path] | None:
    """Where a finished pipeline under ``out`` put each stage's output (store, run, sae, features,
    report), from its ``pipeline.json``; None if no pipeline finished there."""
    path = Path(out) / PIPELINE_FILE
    return {k: Path(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else None


def run_pipeline(cfg: PipelineConfig) -> Path:
    paths = _paths(cfg)
    started = time.time()
    for stage in (s for s in STAGES if s in cfg.stages):
        if not cfg.force and _done(stage, paths):
            print(f"[{stage}] done already, skipping (--force redoes it)")
            continue
        if stage == "train" and cfg.force:
            import shutil

            shutil.rmtree(paths["run"], ignore_errors=True)
        print(f"[{stage}] python -m {' '.join(_command(stage, cfg, paths))}", flush=True)
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", *_command(stage, cfg, paths)])
        if result.returncode != 0:
            raise PipelineError(f"stage {stage} failed (exit {result.returncode}); fix the error above and rerun: "
                                "finished stages are skipped")
        print(f"[{stage}] finished in {time.time() - t0:.1f} s", flush=True)
    write_json(Path(cfg.out) / PIPELINE_FILE, {k: str(v) for k, v in paths.items()})
    print(f"pipeline finished in {time.time() - started:.1f} s; open the report: {paths['report'] / 'index.html'}")
    return paths["report"] / "index.html"


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(PipelineConfig, argv, prog="python -m launch.pipeline",
                    description="Run extract -> train -> discover -> report.", run=run_pipeline)


if __name__ == "__main__":
    main()

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
    sweep: str | None = None
    """Train a sweep instead of one SAE: a sweep file of python -m jax_sae.sweep (the flags above are its base;
    its layers are all extracted), then discover and report one member of it (--member, or the rule of --max_l0)."""
    member: str | None = None
    """With --sweep: the member to discover and report (default: the lowest validation FVU on --layer within --max_l0)."""
    max_l0: float | None = None
    """With --sweep: the largest inference L0 the picked member may have (default: any)."""

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise PipelineError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
        if (self.member or self.max_l0 is not None) and not self.sweep:
            raise PipelineError("--member and --max_l0 pick a member of a sweep; give --sweep too")
        if self.sweep and not Path(self.sweep).is_file():
            raise PipelineError(f"--sweep {self.sweep} does not exist; give a sweep file (JSON or TOML)")


def _paths(cfg: PipelineConfig, run_path_: Path | None = None) -> dict[str, Path]:
    """Where each stage writes; with --sweep, the run is the picked member's (``run_path_``, known
    once the sweep has finished) and the sweep's directory is ``sweep``."""
    from jax_sae.run_dir import RunDir, run_path

    root = Path(cfg.out)
    run = RunDir(run_path_ or run_path(root / "models", cfg.sae_type, cfg.layer, cfg.hidden_dim))
    name = f"layer{cfg.layer}" + (f"_{run.path.parents[2].name}" if cfg.sweep and run_path_ else "")
    paths = {"store": root / "activations", "run": run.path, "sae": run.best,
             "features": root / "results" / f"features_{name}.json", "report": root / "results" / f"report_{name}"}
    return paths | ({"sweep": root / "models" / "sweep"} if cfg.sweep else {})


def _sweep_layers(cfg: PipelineConfig) -> list[int]:
    """Every layer the sweep file trains on (and --layer), from the sweep's own reading of its file."""
    from jax_sae.sweep import SweepConfig
    from jax_sae.sweep.config import grid
    from sae_core.cli import from_flags

    rows = grid(from_flags(SweepConfig, {"sweep_file": cfg.sweep, "layer_idx": cfg.layer}))
    return sorted({int(row.get("layer_idx", cfg.layer)) for row in rows} | {cfg.layer})


def pick_member(cfg: PipelineConfig, sweep_dir: Path) -> Path:
    """The run directory of the member to discover: --member, or of the members on --layer that
    finished, the lowest validation FVU among those with inference L0 within --max_l0."""
    from jax_sae.sweep.page import read_summary

    records = [r for r in read_summary(sweep_dir)["members"] if r.get("stats")]
    if cfg.member:
        named = [r for r in records if r["name"] == cfg.member]
        if not named:
            raise PipelineError(f"the sweep has no finished member {cfg.member}; it has "
                                f"{', '.join(r['name'] for r in records)}")
        return Path(named[0]["run_dir"])
    fits = [r for r in records if r["stats"]["config"]["layer_idx"] == cfg.layer and r["stats"].get("final_val")
            and (cfg.max_l0 is None or r["stats"]["final_val"]["l0"] <= cfg.max_l0)]
    if not fits:
        raise PipelineError(f"no finished member of the sweep on layer {cfg.layer} has inference L0 within "
                            f"{cfg.max_l0}; raise --max_l0 or name one with --member")
    best = min(fits, key=lambda r: (r["stats"]["final_val"]["fvu"], r["stats"]["final_val"]["l0"]))
    print(f"[sweep] picked member {best['name']}: validation FVU {best['stats']['final_val']['fvu']:.4f} at "
          f"inference L0 {best['stats']['final_val']['l0']:.1f}", flush=True)
    return Path(best["run_dir"])


def _done(stage: str, paths: dict[str, Path]) -> bool:
    """Whether a stage's outputs exist and are complete."""
    if stage == "extract":
        from sae_core.store import Store, StoreError

        try:
            return Store(paths["store"]).complete
        except StoreError:
            return False
    if stage == "train" and "sweep" in paths:
        from jax_sae.sweep.page import finished

        return finished(paths["sweep"])
    if stage == "train":
        from jax_sae.run_dir import RunDir

        return RunDir(paths["run"]).finished()
    if stage == "discover":
        from discovery.discover import FeatureFiles

        return FeatureFiles(paths["features"]).finished()
    return (paths["report"] / "index.html").exists()


def _command(stage: str, cfg: PipelineConfig, paths: dict[str, Path]) -> list[str]:
    if stage == "extract":
        layers = ",".join(map(str, _sweep_layers(cfg))) if cfg.sweep else str(cfg.layer)
        return ["extractor.extract", "--model", cfg.model, "--layers", layers, "--prompt_file",
                cfg.prompt_file, "--duration", str(cfg.duration), "--batch_size", str(cfg.extract_batch_size),
                "--out", str(paths["store"]), "--device", cfg.device] + (["--overwrite"] if cfg.force else [])
    if stage == "train":
        where = ["--out", str(paths["sweep"]), "--sweep_file", cfg.sweep] if cfg.sweep else \
            ["--out", str(Path(cfg.out) / "models")]
        return ["jax_sae.sweep" if cfg.sweep else "jax_sae.train", "--store", str(paths["store"]), "--layer_idx",
                str(cfg.layer), "--sae_type", cfg.sae_type, "--hidden_dim", str(cfg.hidden_dim), "--top_k",
                str(cfg.top_k), "--epochs", str(cfg.epochs), "--batch_size", str(cfg.train_batch_size), "--lr",
                str(cfg.lr), *where] + (["--overwrite"] if cfg.force else [])
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
    if cfg.sweep:
        _sweep_layers(cfg)  # a bad sweep file stops here, before extraction
    started, picked = time.time(), not cfg.sweep
    for stage in (s for s in STAGES if s in cfg.stages):
        if stage in ("discover", "report") and not picked:
            paths, picked = _paths(cfg, pick_member(cfg, paths["sweep"])), True
        if not cfg.force and _done(stage, paths):
            print(f"[{stage}] done already, skipping (--force redoes it)")
            continue
        if stage == "train" and cfg.force:
            import shutil

            shutil.rmtree(paths.get("sweep", paths["run"]), ignore_errors=True)
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

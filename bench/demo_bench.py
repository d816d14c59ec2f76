"""``python -m bench.demo_bench``: the demo pipeline (what ``./run.sh --force`` runs) stage by stage,
and where the report stage's time goes.

After one untimed run (it builds the store and fills the JAX compilation cache, as a user's first
``./run.sh`` does), each stage runs ``--repeats`` times as ``python -m launch.pipeline --force
--stages STAGE`` in a fresh process, timed from outside; the table gives medians. ``--compare``
names a second checkout (e.g. ``git worktree add /tmp/before <commit>``) run with this same
interpreter: the two alternate repeat by repeat, so the ratio is measured in one run on one
machine. With ``--profile`` the report stage of each checkout runs once more under cProfile in one
process (``--plot_workers 1`` where the checkout has it), and the cumulative seconds of its parts
are listed (cProfile's overhead inflates Python-heavy parts such as plotting; the parts nest).
"""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .common import report, run_bench, summarize

STAGES = ("extract", "train", "discover", "report")
# Functions whose cumulative time makes up the report stage, in either version of the code.
REPORT_PARTS = (
    ("load the model", ("load_model",)),
    ("activation curves (JAX)", ("_examples",)),
    ("decode audio (EnCodec)", ("decode_codes", "decode_codes_batch")),
    ("write clips (Opus)", ("write_audio",)),
    ("read clips back", ("read_audio",)),
    ("spectrograms", ("log_mel", "log_mels")),
    ("draw plots (examples, histograms)", ("plot_example", "plot_histogram", "draw")),
    ("of which PNG files", ("savefig", "save_rgb")),
    ("output effects", ("output_effects",)),
    ("pages", ("_write_page",)),
)


@dataclass(frozen=True)
class DemoBenchConfig:
    """Options of ``python -m bench.demo_bench``."""

    repeats: int = 3
    """Timed runs of each stage (medians)."""
    compare: str | None = None
    """Another checkout to time beside this one (e.g. a git worktree of an older commit)."""
    profile: bool = False
    """Also profile each checkout's report stage once with cProfile."""
    cold_cache: bool = False
    """Give every timed run an empty JAX compilation cache (a first run on a new machine)."""


def _env(repo: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), SAE_MUSIC_JAX_CACHE=str(cache))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _stage_seconds(repo: Path, out: Path, stage: str, cache: Path) -> float:
    command = [sys.executable, "-m", "launch.pipeline", "--out", str(out), "--force", "--stages", stage]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=_env(repo, cache), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{repo}: stage {stage} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def _report_profile(repo: Path, out: Path, cache: Path) -> dict[str, float]:
    """Cumulative seconds of the report's parts under cProfile, in one process."""
    features = out / "results" / "features_layer2.json"
    help_text = subprocess.run([sys.executable, "-m", "discovery.report", "--help"], cwd=repo, env=_env(repo, cache),
                               capture_output=True, text=True).stdout
    one_process = ["--plot_workers", "1"] if "--plot_workers" in help_text else []
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "report.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "discovery.report", "--features",
                   str(features), "--out", str(Path(tmp) / "report"), "--no-progress", *one_process]
        start = time.perf_counter()
        subprocess.run(command, cwd=repo, env=_env(repo, cache), check=True, capture_output=True)
        total = time.perf_counter() - start
        stats = pstats.Stats(str(profile)).stats
    parts = {"whole stage (under cProfile)": total}
    for label, names in REPORT_PARTS:
        seconds = [cumulative for (path, _, name), (_, _, _, cumulative, _) in stats.items()
                   if name in names and (_ours(path, repo) or (name == "savefig" and path.endswith("figure.py")))]
        if seconds:
            parts[label] = sum(seconds)
    return parts


def _ours(path: str, repo: Path) -> bool:
    return path.startswith(str(repo)) and "site-packages" not in path


def run(cfg: DemoBenchConfig) -> dict:
    repos = {"this": Path(__file__).resolve().parents[1]}
    if cfg.compare:
        repos["compare"] = Path(cfg.compare).resolve()
    seconds = {name: {stage: [] for stage in STAGES} for name in repos}
    with tempfile.TemporaryDirectory(prefix="demo-bench-") as tmp:
        outs = {name: Path(tmp) / name / "demo" for name in repos}
        caches = {name: Path(tmp) / name / "jax-cache" for name in repos}
        for name, repo in repos.items():  # untimed: the store, and a warm compilation cache
            subprocess.run([sys.executable, "-m", "launch.pipeline", "--out", str(outs[name])], cwd=repo,
                           env=_env(repo, caches[name]), check=True, capture_output=True)
        for repeat in range(cfg.repeats):
            for name, repo in repos.items():
                for stage in STAGES:
                    cache = Path(tmp) / name / f"cold-{repeat}-{stage}" if cfg.cold_cache else caches[name]
                    seconds[name][stage].append(_stage_seconds(repo, outs[name], stage, cache))
                print(f"repeat {repeat + 1}/{cfg.repeats} {name}: "
                      + ", ".join(f"{s} {seconds[name][s][-1]:.1f} s" for s in STAGES), flush=True)
        profiles = {name: _report_profile(repo, outs[name], caches[name]) for name, repo in repos.items()} \
            if cfg.profile else {}
    figures = {}
    for name in repos:
        totals = [sum(seconds[name][s][i] for s in STAGES) for i in range(cfg.repeats)]
        figures |= {f"{name}: {stage}": summarize(seconds[name][stage]) for stage in STAGES}
        figures[f"{name}: pipeline"] = summarize(totals)
    for name, parts in profiles.items():
        figures |= {f"{name} report under cProfile: {part}": summarize([value]) for part, value in parts.items()}
    derived = {}
    if cfg.compare:
        for stage in (*STAGES, "pipeline"):
            derived[f"{stage}: compare / this"] = (figures[f"compare: {stage}"]["median"]
                                                   / figures[f"this: {stage}"]["median"])
    return report("demo_bench", figures, params={"repeats": cfg.repeats, "compare": cfg.compare,
                                                 "cold_cache": cfg.cold_cache}, derived=derived)


def main(argv: list[str] | None = None):
    return run_bench(DemoBenchConfig, run, argv, "demo_bench",
                     "Time the demo pipeline stage by stage (and the report's parts).")


if __name__ == "__main__":
    main()

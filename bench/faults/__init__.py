"""``python -m bench.faults``: what the stages survive - killed processes, full disks, damaged
files, two extractions of one shard at once.

Each stage runs as a user runs it (``python -m ...`` in a fresh process, tiny-random, a toy store)
in a directory of its own, with the same relative paths as its uninterrupted reference run, so
that every output can be compared with the reference's:

- kill: SIGKILL at seeded random moments (uniform between 0 and the reference run's duration,
  measured first), spread round-robin over extraction, training, discovery, export, the
  steering study (resumed seed by seed) and the sweep; then the same command again.
- disk_full: a full disk during extraction and during a checkpoint save, two ways: a small tmpfs
  (where this process may mount one) filled up mid-run, after the first committed batch or
  checkpoint (ENOSPC); and ``RLIMIT_FSIZE`` set in the child, with SIGXFSZ ignored so writes fail
  with EFBIG. The run must stop with exit status 2 and one ``error:`` line; with room again the
  same command must resume from what it had kept and finish with the reference's result.
- damage: a truncated and a garbled activation chunk, a torn progress line and a truncated
  ``samples.jsonl`` must be named by ``python -m sae_core.store check`` and, after
  ``python -m sae_core.store repair``, refilled by the same extract command; a truncated latest
  checkpoint must be named by the resumed training run, which falls back to the previous one.
- concurrent: the same extract command twice at once on one store (the second started at once,
  then at seeded random delays): both finish, or one refuses with one line.
- bucket: the store in a bucket behind a fault-injecting proxy (``bucket``, ``proxy``): an
  extraction through 5% failing requests equals the reference; an extraction and a training run
  that meet an outage longer than the retries stop with one line naming the bucket, and the same
  command after it ends equal to the reference.

Equal to the reference is defined in ``compare``. Hidden temporary files a killed run leaves
behind are reported, not counted as failures. Every case prints one line; the results JSON counts
cases tried and survived per category. The package: ``harness`` (running stages, reading where
they got to through their files' owners), ``cases`` (the faults), ``compare`` (equal to the
reference), and here the bench's options, its run and its report.
"""


from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError
from sae_core.files import write_json

from .. import common
from ..common import report, run_bench, summarize, target
from .bucket import bucket_cases
from .cases import concurrent_case, damage_cases, disk_full_case, kill_case
from .harness import STAGES, Case, Workspace, can_mount_tmpfs

NAME = "faults"
CATEGORIES = ("kill", "disk_full", "damage", "concurrent", "bucket")

__all__ = ["CATEGORIES", "STAGES", "FaultsConfig", "main", "run"]


@dataclass(frozen=True)
class FaultsConfig:
    """Options of ``python -m bench.faults``."""

    kills: int = 20
    """SIGKILLs, spread round-robin over the stages (extraction, training, discovery, export, steering, sweep)."""
    concurrent: int = 2
    """Pairs of simultaneous extractions (the first starts both at once, the others at a random offset)."""
    categories: tuple[Literal["kill", "disk_full", "damage", "concurrent", "bucket"], ...] = CATEGORIES
    """Which kinds of fault to inject."""
    disk_full: Literal["auto", "tmpfs", "rlimit", "both"] = "both"
    """How the disk fills: tmpfs (mounted here, filled mid-run), rlimit (RLIMIT_FSIZE in the child),
    both, or auto (tmpfs where it can be mounted, else rlimit); tmpfs falls back to rlimit without mount rights."""
    seed: int = 0
    """Seed of the kill moments, the concurrent offsets and the garbled bytes."""
    prompts: int = 6
    """Bundled prompts extracted (batches of 2)."""
    duration: float = 1.0
    """Seconds of audio per prompt."""
    tmp_dir: str = "/tmp"
    """Where the work directory goes (removed afterwards unless --keep)."""
    keep: bool = False
    """Keep the work directory (every command's output is in its logs/)."""
    quick: bool = False
    """6 kills (one per stage), one concurrent pair, one disk-full mechanism, 4 prompts of 0.5 s: a few minutes."""

    def __post_init__(self) -> None:
        if self.kills < 0 or self.concurrent < 0:
            raise UsageError("--kills and --concurrent must be >= 0")
        if self.prompts < 4 or not self.duration > 0:
            raise UsageError("--prompts must be >= 4 (two batches to train and validate on) and --duration > 0")


def _mechanisms(cfg: FaultsConfig, root: Path) -> list[str]:
    mountable = cfg.disk_full in ("auto", "tmpfs", "both") and can_mount_tmpfs(root)
    if cfg.disk_full == "rlimit" or not mountable:
        return ["rlimit"]
    return ["tmpfs", "rlimit"] if cfg.disk_full == "both" else ["tmpfs"]


def _cases(cfg: FaultsConfig, ws: Workspace) -> Iterator[Case]:
    rng = np.random.default_rng(cfg.seed)
    if "kill" in cfg.categories:
        for i in range(cfg.kills):
            stage = STAGES[i % len(STAGES)]
            yield kill_case(ws, i, stage, float(rng.uniform(0, ws.seconds[stage])))
    if "disk_full" in cfg.categories:
        for mechanism in _mechanisms(cfg, ws.root):
            for stage in ("extract", "train"):
                yield disk_full_case(ws, stage, mechanism)
    if "damage" in cfg.categories:
        yield from damage_cases(ws, rng)
    if "concurrent" in cfg.categories:
        for i in range(cfg.concurrent):
            yield concurrent_case(ws, i, 0.0 if i == 0 else float(rng.uniform(0, ws.seconds["extract"])))
    if "bucket" in cfg.categories:
        yield from bucket_cases(ws)


def run(cfg: FaultsConfig) -> dict:
    if cfg.quick:
        cfg = replace(cfg, kills=len(STAGES), concurrent=1, disk_full="auto", prompts=4, duration=0.5, quick=False)
    root = Path(tempfile.mkdtemp(prefix="sae-faults-", dir=cfg.tmp_dir))
    print(f"fault injection in {root}", flush=True)
    cases: list[Case] = []
    started = time.perf_counter()
    ws = Workspace(root, cfg.prompts, cfg.duration)
    try:
        ws.references()
        begun = time.perf_counter()
        for case in _cases(cfg, ws):
            case.seconds, begun = time.perf_counter() - begun, time.perf_counter()
            cases.append(case)
            print(case.line(), flush=True)
    finally:
        ws.close()
        if not cfg.keep:
            shutil.rmtree(root, ignore_errors=True)
    return _report(cfg, ws, cases, time.perf_counter() - started)


def _report(cfg: FaultsConfig, ws: Workspace, cases: list[Case], seconds: float) -> dict:
    figures = {f"reference {stage}": summarize([ws.seconds[stage]]) for stage in STAGES}
    derived: dict = {}
    for category in cfg.categories:
        mine = [c for c in cases if c.category == category]
        if mine:
            figures[f"{category}: seconds per case"] = summarize([c.seconds for c in mine])
            derived[f"{category}: survived / tried"] = f"{sum(c.survived for c in mine)} / {len(mine)}"
            if not all(c.injected for c in mine):
                derived[f"{category}: injected while running"] = sum(c.injected for c in mine)
    survived = sum(c.survived for c in cases)
    derived.update(tried=len(cases), survived=survived, total_seconds=round(seconds, 1))
    goal = target("cases survived", survived, f"{len(cases)} of {len(cases)}", survived == len(cases))
    results = report(NAME, figures, params={**asdict(cfg), "work_dir": str(ws.root)}, derived=derived,
                     targets=[goal])
    results["cases"] = [asdict(c) | {"line": c.line()} for c in cases]
    write_json(common.RESULTS_DIR / f"{NAME}.json", results)
    return results


def main(argv: list[str] | None = None):
    return run_bench(FaultsConfig, run, argv, NAME,
                     "Fault injection: SIGKILL, full disks, damaged files and concurrent extractions, each "
                     "compared with an uninterrupted run.")


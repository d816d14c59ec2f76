"""The evaluations a sweep can give each finished member, beside its run directory, for the
comparison page:

- spliced in (``--evaluate_model``): the member's ``best/`` exported in the SAELens format to
  ``{run}/saelens/`` (no torch needed), then ``python -m extractor.evaluate`` in a process of its
  own (torch and JAX never share one) writing ``{run}/eval.json``: loss recovered per codebook;
- on real activations (``--probe``): ``discovery.real_eval`` (tag probing and absorption) writing
  ``{run}/best.real_eval.json``; the store needs tagged samples (MusicCaps prompts).

A member whose file is newer than its ``best/`` is not evaluated again, so rerunning the sweep
command evaluates only what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sae_core.errors import UsageError

from .config import SweepError


def _fresh(result: Path, best: Path) -> bool:
    config = best / "config.json"
    return result.exists() and config.exists() and result.stat().st_mtime >= config.stat().st_mtime


def spliced(run_dirs: list[Path], model: str, store: str, samples: int, device: str, progress: bool) -> None:
    """``eval.json`` for every member in ``run_dirs`` that lacks a fresh one."""
    from tqdm import tqdm

    from ..export import main as export_main

    todo = [run for run in run_dirs if not _fresh(run / "eval.json", run / "best")]
    for run in tqdm(todo, desc="spliced-in evaluation", unit="member", disable=not progress):
        export_main(["--checkpoint", str(run / "best"), "--format", "saelens", "--out", str(run / "saelens")])
        command = [sys.executable, "-m", "extractor.evaluate", "--model", model, "--sae", str(run / "saelens"),
                   "--store", store, "--out", str(run / "eval.json"), "--max_samples", str(samples), "--device",
                   device, "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            line = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SweepError(f"the spliced-in evaluation of {run} failed (exit {done.returncode}): {line}; the trained "
                             "members are kept, rerun the same sweep command to evaluate again")


def probing(run_dirs: list[Path], store: str, progress: bool) -> None:
    """``best.real_eval.json`` for every member in ``run_dirs`` that lacks a fresh one."""
    from discovery.real_eval import RealEvalConfig, output_path, run

    for path in run_dirs:
        best = path / "best"
        if _fresh(output_path(best), best):
            continue
        try:
            run(RealEvalConfig(sae_path=str(best), store=store, progress=progress))
        except UsageError as err:
            raise SweepError(f"the real-activation evaluation of {path} failed: {err}") from None

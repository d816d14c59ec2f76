"""Comparing a trial's outputs with the uninterrupted reference's, each through its owner: the
store (files and commit log), the run directory (``RunDir``: checkpoints, stats, metrics), the
features files and the export.

Equal means: the store byte for byte (the progress files as sets of committed batches: repairs and
racing writers reorder or repeat their lines); parameters of ``best/`` and ``final/`` within
``PARAM_TOL`` with every other run file equal except ``training_stats.json``'s ``VOLATILE_STATS``
and the orbax files, which carry timestamps and random file names; the features JSON and its
summary equal; the export byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from .harness import Case, Ran, Workspace, commits, escaped

PARAM_TOL = 1e-6
VOLATILE_STATS = ("seconds", "bytes_read_per_process", "resumed_from")
"""training_stats.json fields that differ between a run and its resumption: wall-clock time, the
bytes this process read and the step it started from (a resumed run starts at its checkpoint)."""

LEFTOVER = re.compile(r"(^|/)\.|\.orbax-checkpoint-tmp|__lock$")


def files_of(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(ref: Path, trial: Path) -> list[str]:
    """Hidden temporary files or directories in ``trial`` that the reference does not have."""
    seen = {str(p.relative_to(ref)) for p in ref.rglob("*")}
    found = [str(p.relative_to(trial)) for p in trial.rglob("*") if LEFTOVER.search(str(p.relative_to(trial)))]
    top = [p for p in found if p not in seen and not any(p.startswith(q + "/") for q in found)]
    return [f"left behind: {p}" for p in top[:3]] + ([f"... and {len(top) - 3} more"] if len(top) > 3 else [])


def compare_store(ref: Path, got: Path) -> list[str]:
    """Differences between two stores: every file byte for byte, progress files as the sets of
    batches they commit."""
    if not (got / "store.json").exists():
        return [f"no store at {got.name}/"]
    a, b = files_of(ref), files_of(got)
    diffs = [f"{name} missing" for name in a if name not in b]
    diffs += [f"extra file {name}" for name in b if name not in a and not LEFTOVER.search(name)]
    for name in a.keys() & b.keys():
        if name.startswith("progress/"):
            continue
        if a[name].read_bytes() != b[name].read_bytes():
            diffs.append(f"{name} differs")
    if set(commits(ref)) != set(commits(got)):
        diffs.append(f"committed batches {sorted(set(commits(got)))}, reference {sorted(set(commits(ref)))}")
    return sorted(diffs)


def progress_lines(ref: Path, got: Path) -> list[str]:
    """A note when the progress files commit the same batches in other lines than the reference's."""
    a, b = (files_of(s / "progress") for s in (ref, got))
    if a.keys() == b.keys() and all(a[n].read_bytes() == b[n].read_bytes() for n in a):
        return []
    lines = sum(len(p.read_text().splitlines()) for p in b.values())
    return [f"progress: {lines} lines for {len(set(commits(got)))} batches, in another order or repeated"]


def _json_diff(a, b, tol: float, where: str = "") -> str | None:
    """The first place two JSON values differ (numbers by more than ``tol``), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'top level'}: keys {sorted(a.keys() ^ b.keys())} differ"
        return next((d for k in a if (d := _json_diff(a[k], b[k], tol, f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _json_diff(x, y, tol, f"{where}[{i}]"))), None)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return None if abs(a - b) <= tol or a == b else f"{where}: {b} vs reference {a}"
    return None if a == b else f"{where}: {b!r} vs reference {a!r}"


def compare_run(ws: Workspace, trial: Path) -> list[str]:
    return compare_run_dirs(ws, ws.runs(ws.ref), ws.runs(trial))


def compare_sweep(ws: Workspace, trial: Path) -> list[str]:
    """Every member of the sweep as ``compare_run_dirs`` compares runs, and the comparison page written."""
    ref, got = ws.sweep_members(ws.ref), ws.sweep_members(trial)
    diffs = [f"member {name} missing" for name in ref if name not in got]
    diffs += [f"{name}: {d}" for name in ref.keys() & got.keys() for d in compare_run_dirs(ws, ref[name], got[name])]
    page = trial / ws.sweep_out / "sweep.html"
    return sorted(diffs) + ([] if page.exists() else [f"no {page.name}"])


def compare_run_dirs(ws: Workspace, ref, got) -> list[str]:
    """Differences between two training runs, read through ``RunDir``: best/ and final/ parameters
    within PARAM_TOL, the kept checkpoint steps, the stats (but VOLATILE_STATS) and metrics, and
    every other file of the run byte for byte."""
    got_stats = got.read_stats()
    if got_stats is None:
        return [f"the run did not finish (no {got.stats.name})"]
    diffs = []
    for ref_model, got_model in ((ref.best, got.best), (ref.final, got.final)):
        if not (got_model / "config.json").exists():
            diffs.append(f"no {got_model.name}/")
            continue
        gap = ws.param_gap(ref_model, got_model)
        if gap > PARAM_TOL:
            diffs.append(f"{got_model.name}/ parameters differ by up to {gap:.3g}")
        diffs += filter(None, [_json_diff(json.loads((ref_model / "config.json").read_text()),
                                          json.loads((got_model / "config.json").read_text()), PARAM_TOL,
                                          f"{got_model.name}/config.json")])
    if ref.checkpoint_steps() != got.checkpoint_steps():
        diffs.append(f"{got.ckpt.name}/ keeps steps {got.checkpoint_steps()}, reference {ref.checkpoint_steps()}")
    stats = [{k: v for k, v in s.items() if k not in VOLATILE_STATS} for s in (ref.read_stats(), got_stats)]
    diffs += filter(None, [_json_diff(*stats, PARAM_TOL, got.stats.name),
                           _json_diff(ref.read_metrics(), got.read_metrics(), PARAM_TOL, got.metrics.name)])
    compared_apart = {ref.best.name, ref.final.name, ref.ckpt.name, ref.stats.name, ref.metrics.name}
    for name, path in files_of(ref.path).items():
        if name.split("/")[0] not in compared_apart and (
                not (got.path / name).exists() or (got.path / name).read_bytes() != path.read_bytes()):
            diffs.append(f"{name} differs")
    return diffs


def compare_features(ws: Workspace, trial: Path) -> list[str]:
    """The features JSON and its summary, read through ``FeatureFiles``, equal, and no per-sample
    score file left beside them."""
    from discovery.feature_files import DiscoverError, FeatureFiles

    ref, got = FeatureFiles(ws.ref / ws.features), FeatureFiles(trial / ws.features)
    left = sorted(p.name for p in (trial / ws.features).parent.glob(".sample-*.f16"))
    if left:
        return [f"score files left behind: {', '.join(left)}"]
    if not got.finished():
        return [f"no {got.features.name} and {got.summary.name}"]
    try:
        pairs = ((ref.read_features(), got.read_features(), got.features.name),
                 (ref.read_summary(), got.read_summary(), got.summary.name))
    except DiscoverError as err:
        return [str(err)]
    return [d for a, b, name in pairs if (d := _json_diff(a, b, 0.0, name))]


def compare_export(ws: Workspace, trial: Path) -> list[str]:
    ref, got = ws.ref / ws.export, trial / ws.export
    if not got.exists():
        return [f"no {got.name}"]
    return [] if ref.read_bytes() == got.read_bytes() else [f"{got.name} differs"]


def compare_steering(ws: Workspace, trial: Path) -> list[str]:
    """steering.json equal to the reference's but for how many seeds the rerun found scored."""
    ref, got = ws.ref / ws.steering / "steering.json", trial / ws.steering / "steering.json"
    if not got.exists():
        return [f"no {got.name}"]
    a, b = (json.loads(p.read_text()) for p in (ref, got))
    for report in (a, b):
        report.pop("resumed_seeds", None)
    d = _json_diff(a, b, 0.0, got.name)
    return [d] if d else []


COMPARE: dict[str, Callable[[Workspace, Path], list[str]]] = {
    "extract": lambda ws, trial: compare_store(ws.ref / ws.store, trial / ws.store),
    "train": compare_run,
    "discover": compare_features,
    "export": compare_export,
    "steer": compare_steering,
    "sweep": compare_sweep,
}


def verdict(ws: Workspace, stage: str, trial: Path, rerun: Ran, case: Case) -> Case:
    """``case`` with its verdict: the rerun finished and its result equals the reference."""
    if rerun.rc:
        case.survived, case.why = False, f"the rerun exited {rerun.rc}: {escaped(rerun.err)}"
        return case
    diffs = COMPARE[stage](ws, trial)
    case.notes += _leftovers(ws.ref, trial)
    if stage == "extract" and not diffs:
        case.notes += progress_lines(ws.ref / ws.store, trial / ws.store)
    case.survived = not diffs
    case.why = "equals the reference" if not diffs else "differs from the reference: " + "; ".join(diffs[:4])
    return case



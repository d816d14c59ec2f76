"""The faults: each case injects one into a stage run as a user runs it, then runs the same command
again and compares the result with the uninterrupted reference (``compare``). Where a run got to
and where its rerun resumed are read from the stage's files through their owners (the commit log,
``RunDir``), never from what it printed; what it printed is checked only where the user is owed a
line (the one-line errors, the name of a damaged checkpoint)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .compare import files_of, verdict
from .harness import (
    Case,
    Ran,
    Workspace,
    error_line,
    escaped,
    fill,
    last_line,
    line_with,
    pause_between_saves,
    tmpfs,
    wait_until,
)

TRAIN_LIMIT = 64 << 10
TRAIN_SLACK = 64 << 10  # tmpfs: room left for metrics.jsonl, not for another checkpoint
DISK_FULL = "out of disk space"


def kill_case(ws: Workspace, index: int, stage: str, delay: float) -> Case:
    """SIGKILL ``stage`` ``delay`` seconds into its run, then run the same command again."""
    trial = ws.trial(f"kill{index:02d}-{stage}")
    proc = ws.start(ws.commands[stage], trial)
    try:
        ended = ws.finish(proc, timeout=delay)
        landed = f"the run ended (exit {ended.rc}) before the kill at {delay:.1f} s"
    except subprocess.TimeoutExpired:
        ws.finish(proc, kill=True)
        landed = f"SIGKILL at {delay:.1f} s of {ws.seconds[stage]:.1f} s"
    case = Case("kill", f"{stage} #{index}", f"{landed} ({ws.progress(stage, trial)}), rerun", False, "",
                injected=proc.returncode == -signal.SIGKILL)
    return verdict(ws, stage, trial, ws.run(ws.commands[stage], trial), case)


# -- full disks -----------------------------------------------------------------------------------
def _kept(ws: Workspace, stage: str, trial: Path) -> int:
    """What a stopped run kept: committed batches (extract) or the latest checkpoint's step (train)."""
    if stage == "extract":
        return len(set(ws.commits(trial)))
    return max(ws.runs(trial).checkpoint_steps(), default=0)


def _resumed(ws: Workspace, stage: str, trial: Path, before: list[int]) -> int:
    """Where a rerun resumed, from its files: the kept batches it did not commit again (extract,
    ``before`` the commits before it), or the checkpoint step its stats say it started from (train)."""
    if stage == "extract":
        again = Counter(ws.commits(trial)) - Counter(before)
        return len({u for u in before if again[u] == 0})
    return (ws.runs(trial).read_stats() or {}).get("resumed_from") or 0


def _extract_limit(ws: Workspace) -> int:
    """RLIMIT_FSIZE for extraction: between the largest file the plan writes at creation and the
    smallest activation chunk, so the store is created and its first batch write fails."""
    from sae_core.store import Store, acts_name

    store = ws.ref / ws.store
    meta = Store(store).meta
    acts_dirs = {acts_name(layer, stream) for layer in meta.layers for stream in meta.streams}
    sizes = {name: path.stat().st_size for name, path in files_of(store).items()}
    acts = [size for name, size in sizes.items() if any(name.startswith(d + "/c/") for d in acts_dirs)]
    plan = [size for name, size in sizes.items() if not any(name.startswith(d + "/") for d in acts_dirs)]
    if max(plan) >= min(acts):
        raise RuntimeError(f"no file-size limit separates the plan ({max(plan)} bytes) from the activations")
    return (max(plan) + min(acts)) // 2


def _fill_mid_run(ws: Workspace, stage: str, trial: Path) -> tuple[Ran, str] | None:
    """Start ``stage`` on a tmpfs, fill it once the run has kept something (a committed batch, a
    checkpoint), and let it run on; None when it ended first."""
    proc = ws.start(ws.commands[stage], trial)
    run = ws.runs(trial)
    if stage == "extract":
        ready, slack = (lambda: len(ws.commits(trial)) >= 1), 0
    else:
        ready, slack = (lambda: len(run.checkpoint_steps()) >= 1), TRAIN_SLACK
    if not wait_until(ready, proc, timeout=5 * ws.seconds[stage]):
        ws.finish(proc, kill=True)
        return None
    # Paused between two saves while the disk fills, as a disk that filled up meanwhile: the next
    # save then finds no room before it writes. (A disk that fills during a save ends the same
    # way, after orbax's own reports of the failed writes.)
    pause_between_saves(proc, run.saving if stage == "train" else (lambda: False))
    at = ws.progress(stage, trial)
    filler = fill(trial, slack)
    proc.send_signal(signal.SIGCONT)
    failed = ws.finish(proc, timeout=600)
    filler.unlink()
    return failed, f"filled the tmpfs ({slack >> 10} KiB left) at {at}"


def disk_full_case(ws: Workspace, stage: str, mechanism: str) -> Case:
    """Fill the disk during ``stage`` (extract: its batch writes; train: a checkpoint save), check it
    stops with one line, then rerun with room and compare."""
    name = f"{stage} ({mechanism})"
    with ExitStack() as stack:
        if mechanism == "tmpfs":
            trial = stack.enter_context(tmpfs(ws.root / f"full-{stage}-tmpfs"))
            filled = _fill_mid_run(ws, stage, trial)
            if filled is None:
                return Case("disk_full", name, "the run ended before the disk could be filled", False,
                            "no fault injected", injected=False)
            failed, done = filled
        else:
            trial = ws.trial(f"full-{stage}-rlimit")
            limit = _extract_limit(ws) if stage == "extract" else TRAIN_LIMIT
            failed = ws.run(ws.commands[stage], trial, fsize=limit)
            done = f"RLIMIT_FSIZE {limit} bytes"
        kept, problem, before = _kept(ws, stage, trial), error_line(failed, DISK_FULL), ws.commits(trial)
        done += f"; stopped with exit {failed.rc} ({ws.progress(stage, trial)}), then rerun with room"
        rerun = ws.run(ws.commands[stage], trial)
        case = verdict(ws, stage, trial, rerun, Case("disk_full", name, done, False, ""))
        resumed = _resumed(ws, stage, trial, before)
        unit = "batches committed" if stage == "extract" else "as the latest checkpoint step"
        case.done += f" (kept {kept} {unit}, resumed at {resumed})"
        if case.survived and resumed < kept:
            case.survived, case.why = False, f"work was lost: kept {kept} {unit}, resumed at {resumed}"
        if problem:
            case.survived, case.why = False, f"{problem}; rerun: {case.why}"
        else:
            case.why = f"{last_line(failed.err)!r}; rerun {case.why}"
        return case


# -- damaged files --------------------------------------------------------------------------------
def _damage_store(ws: Workspace, name: str, damage: Callable[[Path], str], expect: str) -> Case:
    """Damage a copy of the reference store. ``python -m sae_core.store check`` must name it
    (``expect``, a pattern) and say what to do: its remedy (``repair``, or removing the store) is
    applied, then the same extract command must refill the store to equal the reference."""
    trial = ws.trial(f"damage-{name.replace(' ', '-')}")
    store = trial / ws.store
    shutil.copytree(ws.ref / ws.store, store)
    case = Case("damage", name, damage(store), False, "")
    check = ws.run(("sae_core.store", "check", str(ws.store)), trial)
    said = " ".join((check.out + check.err).split())
    named = re.search(expect, said)
    if "sae_core.store repair" in said:
        remedy, repair = "repair", ws.run(("sae_core.store", "repair", str(ws.store)), trial)
        if repair.rc:
            case.why = f"repair exited {repair.rc}: {escaped(repair.err)}"
            return case
    elif re.search(r"remove \S*store and rerun", said):
        remedy = "remove the store"
        shutil.rmtree(store)
    elif "rerun the same extract command" in said:
        remedy = "rerun"
    else:
        remedy = "none given"
    case.done += f"; check (exit {check.rc}) {'named it' if named else 'did not name it'}, remedy: {remedy}; rerun"
    case = verdict(ws, "extract", trial, ws.run(ws.commands["extract"], trial), case)
    if not named or remedy == "none given":
        case.survived = False
        case.why = f"check did not name {expect!r} with a remedy: {said[-300:]!r}; the rerun alone: {case.why}"
    elif case.survived:
        case.why = f"{line_with(check.out + check.err, expect)!r}; {case.why}"
    return case


def _truncate(path: Path, keep: float) -> str:
    size = path.stat().st_size
    os.truncate(path, int(size * keep))
    return f"cut from {size} to {int(size * keep)} bytes"


def _garble(path: Path, rng: np.random.Generator) -> str:
    data = bytearray(path.read_bytes())
    at = int(rng.integers(0, len(data) - 64))
    data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    path.write_bytes(bytes(data))
    return f"64 bytes inverted at offset {at} of {len(data)}"


def _tear(path: Path) -> str:
    text = path.read_text().rstrip("\n")
    last = text.rsplit("\n", 1)[-1]
    path.write_text(text[: len(text) - len(last) // 2])
    return f"last line cut to {last[: len(last) - len(last) // 2]!r}"


def damage_cases(ws: Workspace, rng: np.random.Generator) -> Iterator[Case]:
    """A truncated and a garbled activation chunk, a torn last progress line (the last batch's
    commit) and a truncated samples.jsonl, each on a copy of the reference store; a truncated latest
    checkpoint. The files are named by the store's layout and commit log."""
    from sae_core.location import Location
    from sae_core.store import acts_name, chunk_key, commit_log

    chunk, garbled = chunk_key(acts_name(1), 0, rank=2), chunk_key(acts_name(3), 0, rank=2)
    log = commit_log(Location.parse(ws.ref / ws.store))
    progress = str(log.files()[0].relative_to(ws.ref / ws.store))
    last = max(ws.commits(ws.ref))
    damages = [
        ("truncated chunk", chunk, lambda f: _truncate(f, 0.5), re.escape(chunk)),
        ("garbled chunk", garbled, lambda f: _garble(f, rng), re.escape(garbled)),
        ("torn progress line", progress, _tear, rf"{re.escape(Path(progress).name)}|\bbatch {last}\b"),
        ("truncated samples.jsonl", "samples.jsonl", lambda f: _truncate(f, 0.6), r"samples\.jsonl"),
    ]
    for name, file, damage, expect in damages:
        yield _damage_store(ws, name, lambda store, file=file, damage=damage: f"{file}: {damage(store / file)}", expect)
    yield damaged_checkpoint_case(ws)


def damaged_checkpoint_case(ws: Workspace) -> Case:
    """Kill training once two checkpoints exist, truncate the latest's largest file, resume: the run
    must name the damaged checkpoint, fall back to the previous one (its stats say where it
    started) and end equal to the reference."""
    trial = ws.trial("damage-checkpoint")
    run = ws.runs(trial)
    proc = ws.start(ws.commands["train"], trial)
    if not wait_until(lambda: len(run.checkpoint_steps()) >= 2, proc, timeout=5 * ws.seconds["train"]):
        ws.finish(proc, kill=True)
        return Case("damage", "truncated latest checkpoint", "the run ended before two checkpoints", False,
                    "no fault injected", injected=False)
    ws.finish(proc, kill=True)
    steps = run.checkpoint_steps()
    latest = run.ckpt / str(steps[-1])
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    done = (f"killed at checkpoints {','.join(map(str, steps))}; {biggest.relative_to(run.path)} "
            f"(its largest file) {_truncate(biggest, 0.5)}; rerun")
    case = Case("damage", "truncated latest checkpoint", done, False, "")
    rerun = ws.run(ws.commands["train"], trial)
    said = " ".join((rerun.out + rerun.err).split())
    named_as = rf"({run.ckpt.name}/{steps[-1]}\b|step {steps[-1]}\b)"
    named = re.search(named_as, said)
    started = (run.read_stats() or {}).get("resumed_from")
    case = verdict(ws, "train", trial, rerun, case)
    if case.survived and not (named and started == steps[-2]):
        case.survived = False
        case.why = (f"the result is right but the run did not name checkpoint {steps[-1]} (it said {said[:300]!r}) "
                    f"or did not start from {steps[-2]} (its stats say {started})")
    elif case.survived:
        case.why = f"{line_with(rerun.out + rerun.err, named_as)!r}, started from step {started}; {case.why}"
    return case


# -- two extractions of one store -----------------------------------------------------------------
def concurrent_case(ws: Workspace, index: int, offset: float) -> Case:
    """The same extract command twice on one store, the second ``offset`` seconds after the first."""
    trial = ws.trial(f"concurrent{index}")
    first = ws.start(ws.commands["extract"], trial)
    time.sleep(offset)
    second = ws.start(ws.commands["extract"], trial)
    runs = [ws.finish(first, timeout=600), ws.finish(second, timeout=600)]
    outcomes = []
    for ran in runs:
        if ran.rc == 0:
            outcomes.append("finished")
        elif error_line(ran, "") is None:
            outcomes.append(f"refused: {last_line(ran.err)!r}")
        else:
            outcomes.append(f"failed: {error_line(ran, '')}")
    done = f"second run started {offset:.1f} s after the first; {' / '.join(outcomes)}"
    case = Case("concurrent", f"extract x2 #{index}", done, False, "")
    if any(o.startswith("failed") for o in outcomes) or all(o.startswith("refused") for o in outcomes):
        case.why = "a run failed, or both refused"
        return case
    return verdict(ws, "extract", trial, Ran(0, "", "", 0.0), case)

"""``python -m bench.faults``: what the stages survive - killed processes, full disks, damaged
files, two extractions of one shard at once.

Each stage runs as a user runs it (``python -m ...`` in a fresh process, tiny-random, a toy store)
in a directory of its own, with the same relative paths as its uninterrupted reference run, so
that every output can be compared with the reference's:

- kill: SIGKILL at seeded random moments (uniform between 0 and the reference run's duration,
  measured first), spread round-robin over extraction, training, discovery and export; then the
  same command again.
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

Equal to the reference means: the store byte for byte (the progress files as sets of committed
batches: repairs and racing writers reorder or repeat their lines); parameters of ``best/`` and
``final/`` within 1e-6 with every other run file equal except ``training_stats.json``'s
``seconds`` and ``bytes_read_per_process`` (a resumed run reads only from its checkpoint on) and
the orbax files, which carry timestamps and random file names; the features JSON and its
summary equal; the exported ``.pt`` byte for byte. Hidden temporary files a killed run
leaves behind are reported, not counted as failures. Every case prints one line; the results
JSON counts cases tried and survived per category.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError
from sae_core.files import write_json

from . import common
from .common import report, run_bench, summarize, target

NAME = "faults"
REPO = Path(__file__).resolve().parents[1]
STAGES = ("extract", "train", "discover", "export")
CATEGORIES = ("kill", "disk_full", "damage", "concurrent")
RUN = Path("models/batch_topk/layer1/dim128")  # the training run directory, relative to a trial
PARAM_TOL = 1e-6
# Files of a training run that legitimately differ between two identical runs.
# training_stats.json: wall-clock time, and the bytes this process read (a resumed run reads from its checkpoint on)
VOLATILE_STATS = ("seconds", "bytes_read_per_process")
# Orbax checkpoint files hold a timestamp (_CHECKPOINT_METADATA, commit_success.txt) and random
# data-file names (and so manifests): checkpoints are compared by their restored parameters.
CHECKPOINT_DIRS = ("best", "final", "ckpt")
# RLIMIT_FSIZE for training: above metrics.jsonl when the first run checkpoint is saved, below that
# checkpoint's data file (parameters and two Adam moments, ~190 KB at d=64, h=128).
TRAIN_LIMIT = 64 << 10
TRAIN_SLACK = 64 << 10  # tmpfs: room left for metrics.jsonl, not for another checkpoint


@dataclass(frozen=True)
class FaultsConfig:
    """Options of ``python -m bench.faults``."""

    kills: int = 20
    """SIGKILLs, spread round-robin over extraction, training, discovery and export."""
    concurrent: int = 2
    """Pairs of simultaneous extractions (the first starts both at once, the others at a random offset)."""
    categories: tuple[Literal["kill", "disk_full", "damage", "concurrent"], ...] = CATEGORIES
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
    """4 kills (one per stage), one concurrent pair, one disk-full mechanism, 4 prompts of 0.5 s: a few minutes."""

    def __post_init__(self) -> None:
        if self.kills < 0 or self.concurrent < 0:
            raise UsageError("--kills and --concurrent must be >= 0")
        if self.prompts < 4 or not self.duration > 0:
            raise UsageError("--prompts must be >= 4 (two batches to train and validate on) and --duration > 0")


@dataclass
class Case:
    """One injected fault: what was done, and whether the stage came through it."""

    category: str
    name: str
    done: str
    survived: bool
    why: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    injected: bool = True
    """False where the fault came too late (a kill after the run had ended)."""

    def line(self) -> str:
        verdict = "survived" if self.survived else "NOT survived"
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return f"{self.category:<10} {self.name}: {self.done} -> {verdict}: {self.why}{notes}"


@dataclass
class Ran:
    """A finished command."""

    rc: int
    out: str
    err: str
    seconds: float


# -- running the stages ------------------------------------------------------------------------
class Workspace:
    """The work directory: the reference outputs in ``ref/``, one directory per case, every
    command's output in ``logs/``."""

    def __init__(self, root: Path, cfg: FaultsConfig):
        self.root, self.ref, self.logs = root, root / "ref", root / "logs"
        self.ref.mkdir()
        self.logs.mkdir()
        ckpt = self.ref / RUN / "final"
        self.commands = {
            "extract": ("extractor.extract", "--model", "tiny-random", "--layers", "1,3", "--prompt_file",
                        "bundled", "--max_prompts", str(cfg.prompts), "--duration", str(cfg.duration),
                        "--batch_size", "2", "--device", "cpu", "--out", "store"),
            "train": ("jax_sae.train", "--store", str(self.ref / "store"), "--layer_idx", "1", "--hidden_dim",
                      "128", "--top_k", "8", "--batch_size", "16", "--epochs", "10", "--lr", "1e-3",
                      "--checkpoint_every", "8", "--mesh_data", "1", "--out", "models", "--no-progress"),
            "discover": ("discovery.discover", "--sae_path", str(ckpt), "--store", str(self.ref / "store"),
                         "--output", "results/features.json", "--min_activation_count", "1", "--max_features",
                         "5", "--no-progress"),
            "export": ("jax_sae.export", "--checkpoint", str(ckpt), "--format", "torch", "--out", "sae.pt"),
        }
        self.seconds: dict[str, float] = {}
        self._runs = 0
        self._jax: ProcessPoolExecutor | None = None

    def param_gap(self, ref: Path, got: Path) -> float:
        """Largest difference between two checkpoints' parameters, loaded with ``jax_sae.load`` in a
        spawned worker: JAX's threads stay out of this process, which forks the children."""
        if self._jax is None:
            self._jax = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._jax.submit(_param_gap, str(ref), str(got)).result()

    def close(self) -> None:
        if self._jax is not None:
            self._jax.shutdown()

    def trial(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def start(self, argv: tuple[str, ...], cwd: Path, fsize: int | None = None) -> subprocess.Popen:
        """``python -m argv...`` in ``cwd`` running this checkout's code; ``fsize`` caps the size of
        any file it writes (RLIMIT_FSIZE, with SIGXFSZ ignored so the write fails with EFBIG)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        # preexec_fn is safe here: this process runs no threads (JAX loads in a spawned worker).
        limit = _file_size_limit(fsize)
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=limit)  # noqa: PLW1509
        proc.started = time.perf_counter()  # type: ignore[attr-defined]
        proc.label = f"{cwd.name}: python -m {' '.join(argv)}" + (f" (RLIMIT_FSIZE {fsize})" if fsize else "")
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float | None = None, kill: bool = False) -> Ran:
        """Wait for ``proc`` (SIGKILL it first with ``kill``) and log what it printed."""
        if kill:
            proc.kill()
        out, err = proc.communicate(timeout=timeout)
        ran = Ran(proc.returncode, out, err, time.perf_counter() - proc.started)  # type: ignore[attr-defined]
        self._runs += 1
        (self.logs / f"{self._runs:03d}.log").write_text(
            f"$ {proc.label}\nexit {ran.rc} after {ran.seconds:.1f} s\n--- stdout\n{out}\n--- stderr\n{err}")
        return ran

    def run(self, argv: tuple[str, ...], cwd: Path, fsize: int | None = None) -> Ran:
        return self.finish(self.start(argv, cwd, fsize), timeout=max(600.0, 10 * max(self.seconds.values(), default=0)))

    def references(self) -> None:
        """Each stage once, uninterrupted, timed: the results every case is compared with."""
        for stage in STAGES:
            ran = self.run(self.commands[stage], self.ref)
            if ran.rc:
                raise RuntimeError(f"the reference {stage} run failed (exit {ran.rc}): {_last_line(ran.err)}")
            self.seconds[stage] = ran.seconds
            print(f"reference {stage}: {ran.seconds:.1f} s", flush=True)


def _file_size_limit(fsize: int | None) -> Callable[[], None] | None:
    """What a child runs before exec to cap its files at ``fsize`` bytes: writes past it then fail
    with EFBIG instead of the default SIGXFSZ killing the process."""
    if fsize is None:
        return None

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return limit


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# Lines a dying process prints after the error that killed it (orbax's threads at interpreter exit).
SHUTDOWN_NOISE = ("Event loop is closed", "Python is likely shutting down")


def _escaped(err: str) -> str:
    """The uncaught exception in a child's stderr: its type and message (the last exception line
    that is not shutdown noise, without tensorstore's spec dump), and the last frame of this
    project's code it passed through (where it escaped)."""
    raised = [line for line in err.splitlines() if re.match(r"[\w.]+(Error|Exception|Interrupt)\w*: ", line)
              and not any(noise in line for noise in SHUTDOWN_NOISE)]
    message = raised[-1].split(" [tensorstore_spec=")[0] if raised else _last_line(err)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', err)
    ours = [(f, n, fn) for f, n, fn in frames if f.startswith(str(REPO) + "/") and "/.venv/" not in f]
    where = f" (escapes at {Path(ours[-1][0]).relative_to(REPO)}:{ours[-1][1]} in {ours[-1][2]})" if ours else ""
    return message[:600] + where


def _error_line(ran: Ran, expect: str) -> str | None:
    """None when ``ran`` stopped with exit 2 and its stderr holds exactly one ``error:`` line,
    containing ``expect``, and no traceback; else what it did instead."""
    errors = [line for line in ran.err.splitlines() if line.startswith("error:")]
    tracebacks = ran.err.count("Traceback (most recent call last)")
    if ran.rc == 2 and len(errors) == 1 and expect in errors[0]:
        if not tracebacks:
            return None
        logged = [line for line in ran.err.splitlines() if re.match(r"(ERROR|WARNING):", line)]
        first = f" (first: {logged[0][:160]!r})" if logged else ""
        return (f"exit 2 with {errors[0]!r}, but stderr holds {len(ran.err.splitlines()) - 1} lines besides "
                f"it, with {tracebacks} tracebacks{first}")
    if tracebacks:
        return f"exit {ran.rc}, uncaught {_escaped(ran.err)}"
    return f"exit {ran.rc}, " + (f"{len(errors)} error lines: {' | '.join(errors)}" if errors else
                                 f"no error line; last: {_last_line(ran.err)}")


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``ready`` until it holds (True) or ``proc`` ends or ``timeout`` passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.02)
    return False


# -- where a run got to --------------------------------------------------------------------------
def _committed(store: Path) -> list[int]:
    """Committed batches of a store, one entry per commit written (a batch committed twice counts twice)."""
    from sae_core.location import Location
    from sae_core.store import commit_log

    return [entry.unit for entry in commit_log(Location.parse(store)).entries()]


def _checkpoint_steps(run: Path) -> list[int]:
    ckpt = run / "ckpt"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _progress(stage: str, trial: Path) -> str:
    """How far a (killed) run of ``stage`` got, from its files."""
    if stage == "extract":
        meta = trial / "store" / "store.json"
        if not meta.exists():
            return "no store yet"
        return f"{len(set(_committed(trial / 'store')))}/{json.loads(meta.read_text())['n_units']} batches committed"
    if stage == "train":
        if (trial / RUN / "training_stats.json").exists():
            return "run finished"
        steps = _checkpoint_steps(trial / RUN)
        return f"checkpoints at steps {','.join(map(str, steps))}" if steps else "no checkpoint yet"
    output = trial / ("results/features.json" if stage == "discover" else "sae.pt")
    return f"{output.name} written" if output.exists() else f"no {output.name} yet"


# -- comparing with the reference --------------------------------------------------------------
LEFTOVER = re.compile(r"(^|/)\.|\.orbax-checkpoint-tmp|__lock$")


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(ref: Path, trial: Path) -> list[str]:
    """Hidden temporary files or directories in ``trial`` that the reference does not have."""
    seen = {str(p.relative_to(ref)) for p in ref.rglob("*")}
    found = [str(p.relative_to(trial)) for p in trial.rglob("*") if LEFTOVER.search(str(p.relative_to(trial)))]
    top = [p for p in found if p not in seen and not any(p.startswith(q + "/") for q in found)]
    return [f"left behind: {p}" for p in top[:3]] + ([f"... and {len(top) - 3} more"] if len(top) > 3 else [])


def _compare_store(ref: Path, got: Path) -> list[str]:
    """Differences between two stores: every file byte for byte, progress files as the sets of
    batches they commit."""
    if not (got / "store.json").exists():
        return [f"no store at {got.name}/"]
    a, b = _files(ref), _files(got)
    diffs = [f"{name} missing" for name in a if name not in b]
    diffs += [f"extra file {name}" for name in b if name not in a and not LEFTOVER.search(name)]
    for name in a.keys() & b.keys():
        if name.startswith("progress/"):
            continue
        if a[name].read_bytes() != b[name].read_bytes():
            diffs.append(f"{name} differs")
    if set(_committed(ref)) != set(_committed(got)):
        diffs.append(f"committed batches {sorted(set(_committed(got)))}, reference {sorted(set(_committed(ref)))}")
    return sorted(diffs)


def _progress_lines(ref: Path, got: Path) -> list[str]:
    """A note when the progress files commit the same batches in other lines than the reference's."""
    a, b = (_files(s / "progress") for s in (ref, got))
    if a.keys() == b.keys() and all(a[n].read_bytes() == b[n].read_bytes() for n in a):
        return []
    lines = sum(len(p.read_text().splitlines()) for p in b.values())
    return [f"progress: {lines} lines for {len(set(_committed(got)))} batches, in another order or repeated"]


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


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _param_gap(ref: str, got: str) -> float:
    import jax_sae

    a, b = jax_sae.load(ref), jax_sae.load(got)
    pairs = [(getattr(a.params, n), getattr(b.params, n)) for n in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D")]
    pairs += [(a.threshold, b.threshold), (a.input_scale, b.input_scale)]
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _compare_run(ws: Workspace, trial: Path) -> list[str]:
    """Differences between two training runs: best/ and final/ parameters within PARAM_TOL, the
    kept checkpoint steps, the other files equal (training_stats.json but its seconds)."""
    ref, got = ws.ref / RUN, trial / RUN
    if not (got / "training_stats.json").exists():
        return ["the run did not finish (no training_stats.json)"]
    diffs = []
    for name in ("best", "final"):
        if not (got / name / "config.json").exists():
            diffs.append(f"no {name}/")
            continue
        gap = ws.param_gap(ref / name, got / name)
        if gap > PARAM_TOL:
            diffs.append(f"{name}/ parameters differ by up to {gap:.3g}")
        diffs += filter(None, [_json_diff(json.loads((ref / name / "config.json").read_text()),
                                          json.loads((got / name / "config.json").read_text()), PARAM_TOL,
                                          f"{name}/config.json")])
    if _checkpoint_steps(ref) != _checkpoint_steps(got):
        diffs.append(f"ckpt/ keeps steps {_checkpoint_steps(got)}, reference {_checkpoint_steps(ref)}")
    stats = [{k: v for k, v in json.loads((d / "training_stats.json").read_text()).items() if k not in VOLATILE_STATS}
             for d in (ref, got)]
    diffs += filter(None, [_json_diff(*stats, PARAM_TOL, "training_stats.json"),
                           _json_diff(_read_jsonl(ref / "metrics.jsonl"), _read_jsonl(got / "metrics.jsonl"),
                                      PARAM_TOL, "metrics.jsonl")])
    others = {n: p for n, p in _files(ref).items() if n.split("/")[0] not in CHECKPOINT_DIRS
              and n not in ("training_stats.json", "metrics.jsonl")}
    for name, path in others.items():
        if not (got / name).exists() or (got / name).read_bytes() != path.read_bytes():
            diffs.append(f"{name} differs")
    return diffs


def _compare_features(ref: Path, got: Path) -> list[str]:
    diffs = []
    for name in ("results/features.json", "results/features.summary.json"):
        if not (got / name).exists():
            diffs.append(f"no {name}")
        elif (d := _json_diff(json.loads((ref / name).read_text()), json.loads((got / name).read_text()), 0.0, name)):
            diffs.append(d)
    return diffs


def _compare_export(ref: Path, got: Path) -> list[str]:
    if not (got / "sae.pt").exists():
        return ["no sae.pt"]
    return [] if (ref / "sae.pt").read_bytes() == (got / "sae.pt").read_bytes() else ["sae.pt differs"]


COMPARE: dict[str, Callable[[Workspace, Path], list[str]]] = {
    "extract": lambda ws, trial: _compare_store(ws.ref / "store", trial / "store"),
    "train": _compare_run,
    "discover": lambda ws, trial: _compare_features(ws.ref, trial),
    "export": lambda ws, trial: _compare_export(ws.ref, trial),
}


def _verdict(ws: Workspace, stage: str, trial: Path, rerun: Ran, case: Case) -> Case:
    """``case`` with its verdict: the rerun finished and its result equals the reference."""
    if rerun.rc:
        case.survived, case.why = False, f"the rerun exited {rerun.rc}: {_escaped(rerun.err)}"
        return case
    diffs = COMPARE[stage](ws, trial)
    case.notes += _leftovers(ws.ref, trial)
    if stage == "extract" and not diffs:
        case.notes += _progress_lines(ws.ref / "store", trial / "store")
    case.survived = not diffs
    case.why = "equals the reference" if not diffs else "differs from the reference: " + "; ".join(diffs[:4])
    return case


# -- the cases -----------------------------------------------------------------------------------
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
    case = Case("kill", f"{stage} #{index}", f"{landed} ({_progress(stage, trial)}), rerun", False, "",
                injected=proc.returncode == -signal.SIGKILL)
    return _verdict(ws, stage, trial, ws.run(ws.commands[stage], trial), case)


def _pause_between_saves(proc: subprocess.Popen, run: Path | None, tries: int = 500) -> None:
    """SIGSTOP ``proc`` at a moment when no checkpoint of ``run`` is being written (no orbax
    temporary directory, no ``.best.saving``/``.final.saving``); ``run`` None: at once."""
    for _ in range(tries):
        proc.send_signal(signal.SIGSTOP)
        saving = run is not None and (any(run.glob("ckpt/*.orbax-checkpoint-tmp*")) or any(run.glob(".*.saving")))
        if not saving:
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)


def _fill(mount: Path, slack: int) -> Path:
    """Fill the filesystem at ``mount`` with a file, then free ``slack`` bytes of it."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (b"\0" * (1 << 20), b"\0" * 4096):
            try:
                while True:
                    f.write(block)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    os.truncate(filler, max(0, filler.stat().st_size - slack))
    return filler


@contextmanager
def _tmpfs(path: Path, size: str = "256m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _can_mount_tmpfs(root: Path) -> bool:
    """Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN)."""
    try:
        with _tmpfs(root / ".probe", "1m"):
            pass
        return True
    except (subprocess.CalledProcessError, OSError):
        return False
    finally:
        shutil.rmtree(root / ".probe", ignore_errors=True)


DISK_FULL = "out of disk space"


def _kept(stage: str, trial: Path) -> int:
    """What a stopped run kept: committed batches (extract) or the latest checkpoint's step (train)."""
    if stage == "extract":
        return len(set(_committed(trial / "store")))
    return max(_checkpoint_steps(trial / RUN), default=0)


def _resumed(stage: str, out: str) -> int:
    """Where a rerun says it resumed: batches already committed (extract) or the step (train)."""
    pattern = r"resuming .*?: (\d+) of \d+ batches" if stage == "extract" else r"resuming .* from step (\d+)"
    found = re.search(pattern, out)
    return int(found.group(1)) if found else 0


def _extract_limit(store: Path) -> int:
    """RLIMIT_FSIZE for extraction: between the largest file the plan writes at creation and the
    smallest activation chunk, so the store is created and its first batch write fails."""
    sizes = {name: path.stat().st_size for name, path in _files(store).items()}
    acts = [size for name, size in sizes.items() if re.match(r"(\w+/)?layer\d+/acts/c/", name)]
    plan = [size for name, size in sizes.items() if not re.match(r"(\w+/)?layer\d+/acts/", name)]
    if max(plan) >= min(acts):
        raise RuntimeError(f"no file-size limit separates the plan ({max(plan)} bytes) from the activations")
    return (max(plan) + min(acts)) // 2


def disk_full_case(ws: Workspace, stage: str, mechanism: str) -> Case:
    """Fill the disk during ``stage`` (extract: its batch writes; train: a checkpoint save), check it
    stops with one line, then rerun with room and compare."""
    name = f"{stage} ({mechanism})"
    with ExitStack() as stack:
        if mechanism == "tmpfs":
            trial = stack.enter_context(_tmpfs(ws.root / f"full-{stage}-tmpfs"))
            proc = ws.start(ws.commands[stage], trial)
            if stage == "extract":
                ready, slack = (lambda: len(_committed(trial / "store")) >= 1), 0
            else:
                ready, slack = (lambda: len(_checkpoint_steps(trial / RUN)) >= 1), TRAIN_SLACK
            if not _wait_until(ready, proc, timeout=5 * ws.seconds[stage]):
                ws.finish(proc, kill=True)
                return Case("disk_full", name, "the run ended before the disk could be filled", False,
                            "no fault injected", injected=False)
            # Paused between two saves while the disk fills, as a disk that filled up meanwhile:
            # the next save then finds no room before it writes. (A disk that fills during a save
            # ends the same way, after orbax's own reports of the failed writes.)
            _pause_between_saves(proc, trial / RUN if stage == "train" else None)
            at = _progress(stage, trial)
            filler = _fill(trial, slack)
            proc.send_signal(signal.SIGCONT)
            failed = ws.finish(proc, timeout=600)
            done = f"filled the tmpfs ({slack >> 10} KiB left) at {at}"
            filler.unlink()
        else:
            trial = ws.trial(f"full-{stage}-rlimit")
            limit = _extract_limit(ws.ref / "store") if stage == "extract" else TRAIN_LIMIT
            failed = ws.run(ws.commands[stage], trial, fsize=limit)
            done = f"RLIMIT_FSIZE {limit} bytes"
        kept, problem = _kept(stage, trial), _error_line(failed, DISK_FULL)
        done += f"; stopped with exit {failed.rc} ({_progress(stage, trial)}), then rerun with room"
        rerun = ws.run(ws.commands[stage], trial)
        case = _verdict(ws, stage, trial, rerun, Case("disk_full", name, done, False, ""))
        resumed = _resumed(stage, rerun.out)
        unit = "batches committed" if stage == "extract" else "as the latest checkpoint step"
        case.done += f" (kept {kept} {unit}, resumed at {resumed})"
        if case.survived and resumed < kept:
            case.survived, case.why = False, f"work was lost: kept {kept} {unit}, resumed at {resumed}"
        if problem:
            case.survived, case.why = False, f"{problem}; rerun: {case.why}"
        else:
            case.why = f"{_last_line(failed.err)!r}; rerun {case.why}"
        return case


def _damage_store(ws: Workspace, name: str, damage: Callable[[Path], str], expect: str) -> Case:
    """Damage a copy of the reference store. ``python -m sae_core.store check`` must name it
    (``expect``, a pattern) and say what to do: its remedy (``repair``, or removing the store) is
    applied, then the same extract command must refill the store to equal the reference."""
    trial = ws.trial(f"damage-{name.replace(' ', '-')}")
    shutil.copytree(ws.ref / "store", trial / "store")
    case = Case("damage", name, damage(trial / "store"), False, "")
    check = ws.run(("sae_core.store", "check", "store"), trial)
    said = " ".join((check.out + check.err).split())
    named = re.search(expect, said)
    if "sae_core.store repair" in said:
        remedy, repair = "repair", ws.run(("sae_core.store", "repair", "store"), trial)
        if repair.rc:
            case.why = f"repair exited {repair.rc}: {_escaped(repair.err)}"
            return case
    elif re.search(r"remove \S*store and rerun", said):
        remedy = "remove the store"
        shutil.rmtree(trial / "store")
    elif "rerun the same extract command" in said:
        remedy = "rerun"
    else:
        remedy = "none given"
    case.done += f"; check (exit {check.rc}) {'named it' if named else 'did not name it'}, remedy: {remedy}; rerun"
    case = _verdict(ws, "extract", trial, ws.run(ws.commands["extract"], trial), case)
    if not named or remedy == "none given":
        case.survived = False
        case.why = f"check did not name {expect!r} with a remedy: {said[-300:]!r}; the rerun alone: {case.why}"
    elif case.survived:
        case.why = f"{_line_with(check.out + check.err, expect)!r}; {case.why}"
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
    checkpoint."""
    chunk, garbled, progress = "layer1/acts/c/0/0", "layer3/acts/c/0/0", "progress/shard-0-of-1.jsonl"
    last = max(_committed(ws.ref / "store"))
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
    must name the damaged checkpoint, fall back to the previous one and end equal to the reference."""
    trial = ws.trial("damage-checkpoint")
    proc = ws.start(ws.commands["train"], trial)
    if not _wait_until(lambda: len(_checkpoint_steps(trial / RUN)) >= 2, proc, timeout=5 * ws.seconds["train"]):
        ws.finish(proc, kill=True)
        return Case("damage", "truncated latest checkpoint", "the run ended before two checkpoints", False,
                    "no fault injected", injected=False)
    ws.finish(proc, kill=True)
    steps = _checkpoint_steps(trial / RUN)
    latest = trial / RUN / "ckpt" / str(steps[-1])
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    done = (f"killed at checkpoints {','.join(map(str, steps))}; ckpt/{biggest.relative_to(latest.parent)} "
            f"(its largest file) {_truncate(biggest, 0.5)}; rerun")
    case = Case("damage", "truncated latest checkpoint", done, False, "")
    rerun = ws.run(ws.commands["train"], trial)
    said = " ".join((rerun.out + rerun.err).split())
    named_as = rf"(ckpt/{steps[-1]}\b|step {steps[-1]}\b)"
    named = re.search(named_as, said)
    fell_back = re.search(rf"from step {steps[-2]}\b", said)
    case = _verdict(ws, "train", trial, rerun, case)
    if case.survived and not (named and fell_back):
        case.survived = False
        case.why = f"the result is right but the run did not name checkpoint {steps[-1]} and the fallback to " \
                   f"{steps[-2]}: {said[:300]!r}"
    elif case.survived:
        case.why = f"{_line_with(rerun.out + rerun.err, named_as)!r}; {case.why}"
    return case


def _line_with(text: str, pattern: str) -> str:
    """The first line of ``text`` matching ``pattern``, shortened."""
    line = next((line for line in text.splitlines() if re.search(pattern, line)), "")
    return line.strip()[:240]


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
        elif _error_line(ran, "") is None:
            outcomes.append(f"refused: {_last_line(ran.err)!r}")
        else:
            outcomes.append(f"failed: {_error_line(ran, '')}")
    done = f"second run started {offset:.1f} s after the first; {' / '.join(outcomes)}"
    case = Case("concurrent", f"extract x2 #{index}", done, False, "")
    if any(o.startswith("failed") for o in outcomes) or all(o.startswith("refused") for o in outcomes):
        case.why = "a run failed, or both refused"
        return case
    return _verdict(ws, "extract", trial, Ran(0, "", "", 0.0), case)


# -- the bench -----------------------------------------------------------------------------------
def _mechanisms(cfg: FaultsConfig, root: Path) -> list[str]:
    mountable = cfg.disk_full in ("auto", "tmpfs", "both") and _can_mount_tmpfs(root)
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


def run(cfg: FaultsConfig) -> dict:
    if cfg.quick:
        cfg = replace(cfg, kills=4, concurrent=1, disk_full="auto", prompts=4, duration=0.5, quick=False)
    root = Path(tempfile.mkdtemp(prefix="sae-faults-", dir=cfg.tmp_dir))
    print(f"fault injection in {root}", flush=True)
    cases: list[Case] = []
    started = time.perf_counter()
    ws = Workspace(root, cfg)
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


if __name__ == "__main__":
    main()

"""Running the stages as a user runs them, and reading where they got to through the owners of
their files: the store's commit log, the run directory (``RunDir``), the stages' own configs for
their paths. No log text is parsed for state; only the one-line errors the user sees are read.

This process stays free of JAX (it forks children with a file-size limit set before exec); what
needs JAX (loading two checkpoints' parameters) runs in one spawned worker.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STAGES = ("extract", "train", "discover", "export", "steer", "sweep")


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


def _parsed(config_cls, argv: tuple[str, ...]):
    """The config a stage builds from ``argv`` (its flags after the module), by its own parser."""
    from sae_core.cli import build_parser, from_flags

    return from_flags(config_cls, vars(build_parser(config_cls, "bench", "").parse_args(list(argv[1:]))))


class Workspace:
    """The work directory: the reference outputs in ``ref/``, one directory per case, every
    command's output in ``logs/``. Each stage's outputs are where its own config puts them,
    relative to the directory it runs in."""

    def __init__(self, root: Path, prompts: int, duration: float):
        from discovery.discover import DiscoverConfig
        from jax_sae.config import TrainConfig
        from jax_sae.export import ExportConfig

        self.root, self.ref, self.logs = root, root / "ref", root / "logs"
        self.ref.mkdir()
        self.logs.mkdir()
        train = ("jax_sae.train", "--store", str(self.ref / "store"), "--layer_idx", "1", "--hidden_dim", "128",
                 "--top_k", "8", "--batch_size", "16", "--epochs", "10", "--lr", "1e-3", "--checkpoint_every", "8",
                 "--mesh_data", "1", "--out", "models", "--no-progress")
        self.run_dir = _parsed(TrainConfig, train).run_dir()  # relative: under each trial
        final = self.ref / self.run_dir / "final"
        discover = ("discovery.discover", "--sae_path", str(final), "--store", str(self.ref / "store"), "--output",
                    "results/features.json", "--min_activation_count", "1", "--max_features", "5", "--no-progress")
        export = ("jax_sae.export", "--checkpoint", str(final), "--format", "torch", "--out", "sae.pt")
        sweep = ("jax_sae.sweep", "--store", str(self.ref / "store"), "--layers", "1,3", "--top_ks", "4,8",
                 "--hidden_dim", "64", "--batch_size", "16", "--epochs", "6", "--lr", "1e-3", "--checkpoint_every", "6",
                 "--mesh_data", "1", "--out", "sweep", "--no-progress")
        self.sweep_out = Path(sweep[sweep.index("--out") + 1])
        steer = ("extractor.steer_study", "--model", "tiny-random", "--sae", str(self.ref / "sae.pt"), "--features",
                 str(self.ref / "results" / "features.json"), "--clap", "tiny-random-clap", "--strengths", "1,2",
                 "--seeds", "4", "--controls", "3", "--duration", "0.3", "--batch_size", "4", "--audio_format",
                 "none", "--out", "steering", "--device", "cpu", "--no-progress")
        self.steering = Path(steer[steer.index("--out") + 1])
        self.commands = {
            "extract": ("extractor.extract", "--model", "tiny-random", "--layers", "1,3", "--prompt_file",
                        "bundled", "--max_prompts", str(prompts), "--duration", str(duration),
                        "--batch_size", "2", "--device", "cpu", "--out", "store"),
            "train": train, "discover": discover, "export": export, "steer": steer, "sweep": sweep,
        }
        self.store = Path(self.commands["extract"][-1])
        self.features = Path(_parsed(DiscoverConfig, discover).output)
        self.export = Path(_parsed(ExportConfig, export).out)
        self.seconds: dict[str, float] = {}
        self._runs = 0
        self._jax: ProcessPoolExecutor | None = None

    def runs(self, trial: Path):
        """The training run directory of a trial (``RunDir``)."""
        from jax_sae.run_dir import RunDir

        return RunDir(trial / self.run_dir)

    def sweep_members(self, trial: Path) -> dict[str, object]:
        """The run directories (``RunDir``) of a trial's sweep members, by their path under the sweep."""
        from jax_sae.run_dir import RunDir

        root = trial / self.sweep_out
        return {str(p.relative_to(root)): RunDir(p) for p in sorted(root.glob("*/*/layer*/dim*")) if p.is_dir()}

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
                raise RuntimeError(f"the reference {stage} run failed (exit {ran.rc}): {last_line(ran.err)}")
            self.seconds[stage] = ran.seconds
            print(f"reference {stage}: {ran.seconds:.1f} s", flush=True)

    # -- where a run got to, from its files' owners ---------------------------------------------
    def commits(self, trial: Path) -> list[int]:
        """The commits of a trial's store, one entry per commit written (a batch redone counts twice)."""
        return commits(trial / self.store)

    def progress(self, stage: str, trial: Path) -> str:
        """How far a (killed) run of ``stage`` got."""
        if stage == "extract":
            from sae_core.store import Store, StoreError

            try:
                n_units = Store(trial / self.store).meta.n_units
            except StoreError:
                return "no store yet"
            return f"{len(set(self.commits(trial)))}/{n_units} batches committed"
        if stage == "train":
            run = self.runs(trial)
            if run.read_stats() is not None:
                return "run finished"
            steps = run.checkpoint_steps()
            return f"checkpoints at steps {','.join(map(str, steps))}" if steps else "no checkpoint yet"
        if stage == "sweep":
            members = self.sweep_members(trial)
            done = sum(run.read_stats() is not None for run in members.values())
            steps = sorted({max(run.checkpoint_steps(), default=0) for run in members.values()})
            return f"{done}/{len(members)} members finished, newest checkpoints at steps {steps}" if members \
                else "no member yet"
        if stage == "steer":
            seeds = len(list((trial / self.steering / "seeds").glob("seed*-*[0-9a-f].npy")))
            return "steering.json written" if (trial / self.steering / "steering.json").exists() else \
                f"{seeds} of 4 seeds scored"
        output = trial / (self.features if stage == "discover" else self.export)
        return f"{output.name} written" if output.exists() else f"no {output.name} yet"


def commits(store: Path) -> list[int]:
    """A store's commits, one entry per commit written, through its commit log."""
    from sae_core.location import Location
    from sae_core.store import commit_log

    return [entry.unit for entry in commit_log(Location.parse(store)).entries()]


def _param_gap(ref: str, got: str) -> float:
    import jax_sae
    from jax_sae.model import named_params

    a, b = jax_sae.load(ref), jax_sae.load(got)
    pairs = list(zip(named_params(a.params).values(), named_params(b.params).values()))
    pairs += [(a.threshold, b.threshold), (a.input_scale, b.input_scale)]
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


# -- processes ---------------------------------------------------------------------------------
def _file_size_limit(fsize: int | None) -> Callable[[], None] | None:
    """What a child runs before exec to cap its files at ``fsize`` bytes: writes past it then fail
    with EFBIG instead of the default SIGXFSZ killing the process."""
    if fsize is None:
        return None

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return limit


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``ready`` until it holds (True) or ``proc`` ends or ``timeout`` passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.02)
    return False


def pause_between_saves(proc: subprocess.Popen, saving: Callable[[], bool], tries: int = 500) -> None:
    """SIGSTOP ``proc`` at a moment when ``saving()`` says no checkpoint is being written."""
    for _ in range(tries):
        proc.send_signal(signal.SIGSTOP)
        if not saving():
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)


def fill(mount: Path, slack: int) -> Path:
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
def tmpfs(path: Path, size: str = "256m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount_tmpfs(root: Path) -> bool:
    """Whether this process may mount a tmpfs (root, or CAP_SYS_ADMIN)."""
    try:
        with tmpfs(root / ".probe", "1m"):
            return True
    except (subprocess.CalledProcessError, OSError):
        return False


# -- what a stage said ---------------------------------------------------------------------------
def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# Lines a dying process prints after the error that killed it (orbax's threads at interpreter exit).
SHUTDOWN_NOISE = ("Event loop is closed", "Python is likely shutting down")


def escaped(err: str) -> str:
    """The uncaught exception in a child's stderr: its type and message (the last exception line
    that is not shutdown noise, without tensorstore's spec dump), and the last frame of this
    project's code it passed through (where it escaped)."""
    raised = [line for line in err.splitlines() if re.match(r"[\w.]+(Error|Exception|Interrupt)\w*: ", line)
              and not any(noise in line for noise in SHUTDOWN_NOISE)]
    message = raised[-1].split(" [tensorstore_spec=")[0] if raised else last_line(err)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', err)
    ours = [(f, n, fn) for f, n, fn in frames if f.startswith(str(REPO) + "/") and "/.venv/" not in f]
    where = f" (escapes at {Path(ours[-1][0]).relative_to(REPO)}:{ours[-1][1]} in {ours[-1][2]})" if ours else ""
    return message[:600] + where


def error_line(ran: Ran, expect: str) -> str | None:
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
        return f"exit {ran.rc}, uncaught {escaped(ran.err)}"
    return f"exit {ran.rc}, " + (f"{len(errors)} error lines: {' | '.join(errors)}" if errors else
                                 f"no error line; last: {last_line(ran.err)}")


def line_with(text: str, pattern: str) -> str:
    """The first line of ``text`` matching ``pattern``, shortened."""
    line = next((line for line in text.splitlines() if re.search(pattern, line)), "")
    return line.strip()[:240]

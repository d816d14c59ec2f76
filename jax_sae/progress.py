"""A run's visible progress: the progress bar, the metrics log, and the one-step-late fetch of
each step's metrics (step n's are read after step n+1 is dispatched, so the loop never waits
on the device)."""

from __future__ import annotations

import time

import jax
import numpy as np

from sae_core.errors import UsageError

from .distributed import is_primary
from .run_dir import RunDir


class TrainError(UsageError):
    """Training that had to stop (divergence); the message says what was kept."""


class Progress:
    """Owns the bar and ``metrics.jsonl`` for one run; ``lr_at(step)`` gives the logged lr."""

    def __init__(self, files: RunDir, lr_at, total_steps: int, start_step: int, batch_size: int, desc: str,
                 show: bool):
        from tqdm import tqdm

        self.files, self.lr_at, self.batch_size = files, lr_at, batch_size
        self.primary = is_primary()
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                        disable=not (show and self.primary))
        self.shown: dict[str, str] = {}
        self.pending: tuple[int, dict] | None = None
        self.tick_time, self.tick_step = time.time(), start_step

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def step(self, step: int, metrics: dict) -> None:
        """Step ``step`` was dispatched with these (device) metrics: record the previous step's."""
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._record(*previous)
        if time.time() - self.tick_time > 1.0:
            self._refresh(step)

    def flush(self) -> None:
        """Record the pending step now (before a validation, and at the end)."""
        if self.pending is not None:
            self._record(*self.pending)
            self.pending = None

    def validation(self, step: int, result: dict) -> None:
        self._log({"step": step, "val": result})

    def resampled(self, step: int, count: int) -> None:
        """``count`` rarely firing latents were resampled after step ``step``."""
        self._log({"step": step, "resampled": count})
        self.shown["resampled"] = str(count)

    def finish(self, step: int) -> None:
        self.flush()
        self.bar.update(step - self.bar.n)

    def _record(self, step: int, metrics: dict) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(host["loss"]):
            raise self.diverged(step, f"loss {host['loss']}")
        host["lr"] = float(self.lr_at(step - 1))
        self._log({"step": step, **host})
        self.shown.update(loss=f"{host['loss']:.4g}", fvu=f"{host['fvu']:.3f}", l0=f"{host['l0']:.1f}",
                          dead=f"{host['dead_fraction']:.2f}")

    def diverged(self, step: int, why: str) -> TrainError:
        """The one line for a run whose loss or parameters stopped being finite at ``step``."""
        kept = [d.name + "/" for d in (self.files.best, self.files.ckpt) if d.exists() and any(d.iterdir())]
        return TrainError(
            f"training diverged at step {step} ({why}); "
            + (f"the last good checkpoints are kept in {self.files.path} ({', '.join(kept)}); " if kept else "")
            + "lower --lr and rerun with --overwrite")

    def _refresh(self, step: int) -> None:
        now = time.time()
        self.shown["tokens/s"] = f"{(step - self.tick_step) * self.batch_size / (now - self.tick_time):.0f}"
        self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(step - self.bar.n)
        self.tick_time, self.tick_step = now, step

    def _log(self, record: dict) -> None:
        if self.primary:
            self.files.log(record)

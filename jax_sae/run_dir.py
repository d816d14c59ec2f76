"""The files of one training run, and the one module that knows their layout. The trainer writes
them through ``RunDir``; the pipeline, the report and the benchmarks read them through it.

    {out}/{sae_type}/layer{N}/dim{h}/
        best/ final/        model checkpoints (``checkpoint.save_model``)
        ckpt/               resumable whole-state checkpoints (``checkpoint.RunCheckpoints``)
        metrics.jsonl       one record per step (loss, fvu, l0, dead_fraction, lr) or validation
        training_stats.json the run's summary, written last
        training_curves.png density.png (density only when there are validation rows)

Imports neither JAX nor torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sae_core.errors import UsageError
from sae_core.files import write_json, write_text


class RunDirError(UsageError):
    """A run's file that is damaged."""


def run_path(out: str | os.PathLike, sae_type: str, layer: int, hidden_dim: int) -> Path:
    return Path(out) / sae_type / f"layer{layer}" / f"dim{hidden_dim}"


class RunDir:
    """One run directory: where each file lives, and how it is written and read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.best, self.final, self.ckpt = self.path / "best", self.path / "final", self.path / "ckpt"
        self.metrics = self.path / "metrics.jsonl"
        self.stats = self.path / "training_stats.json"
        self.curves = self.path / "training_curves.png"
        self.density = self.path / "density.png"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run a ``best/`` or ``final/`` checkpoint belongs to."""
        return cls(Path(checkpoint).absolute().parent)

    def finished(self) -> bool:
        return (self.final / "config.json").exists() and self.stats.exists()

    def checkpoint_steps(self) -> list[int]:
        """The steps of the finished resumable checkpoints in ``ckpt/`` (one directory each, named by
        its step; one being written has a temporary name), without loading orbax."""
        if not self.ckpt.is_dir():
            return []
        return sorted(int(p.name) for p in self.ckpt.iterdir() if p.name.isdigit() and p.is_dir())

    def saving(self) -> bool:
        """Whether a checkpoint of this run is being written now (a temporary directory exists)."""
        return any(self.ckpt.glob("*.orbax-checkpoint-tmp*")) or any(self.path.glob(".*.saving"))

    # metrics.jsonl
    def restart_metrics(self, step: int | None) -> None:
        """Keep the records up to ``step`` (a resumed run), or start an empty log (``None``)."""
        keep = [r for r in self.read_metrics() if r["step"] <= step] if step is not None else []
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every record; a torn last line (a kill mid-write) is dropped."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # training_stats.json
    def write_stats(self, stats: dict) -> None:
        write_json(self.stats, stats)

    def read_stats(self) -> dict | None:
        """The run's summary, None before the run finished; a damaged file is named with the fix."""
        if not self.stats.exists():
            return None
        try:
            stats = json.loads(self.stats.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"{self.stats} is damaged ({err}); rerun the same train command to rewrite it") from None
        if not isinstance(stats, dict):
            raise RunDirError(f"{self.stats} is not a training summary; rerun the same train command to rewrite it")
        return stats

    def final_val(self) -> dict:
        """The final validation metrics (fvu, l0, dead_fraction, ...), or {} when there are none."""
        return (self.read_stats() or {}).get("final_val") or {}

    def density_image(self) -> Path | None:
        return self.density if self.density.exists() else None

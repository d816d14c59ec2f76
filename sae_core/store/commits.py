"""The commit log: which work units (extraction batches) of a store are fully written.

One interface, two implementations, chosen by where the store lives:

- a directory appends one JSON line ``{"unit": u}`` per commit to ``progress/{shard}.jsonl``,
  fsynced after the unit's data; a line cut by a kill is no commit (and is reported as torn);
- a bucket (whose objects cannot be appended to) writes one object ``progress/units/{u}`` per
  commit, in a single PUT, so a kill leaves it whole or absent and two writers of one unit write
  the same bytes.

Nothing else reads or writes these files: the store, its repair and the fault benchmark all ask
``commit_log(location)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from ..files import write_text
from ..location import Location

UNITS = "progress/units/"
"""A bucket store's commit log: one object per committed unit."""


@dataclass(frozen=True)
class Entry:
    """One commit as written: the unit and the log (shard) holding it."""

    unit: int
    log: str


class CommitLog(Protocol):
    def entries(self) -> list[Entry]:
        """Every commit as written, duplicates included (a unit redone after a repair, or by two shards)."""

    def committed(self) -> set[int]:
        """The committed units."""

    def commit(self, unit: int, shard: str) -> None:
        """Record, durably, that ``unit`` is fully written."""

    def uncommit(self, units: Iterable[int]) -> None:
        """Forget these units' commits, so that the same extract command recomputes them."""

    def torn(self) -> list[tuple[str, int]]:
        """(log, 1-based line) of each commit cut by a kill."""


def commit_log(where: Location) -> CommitLog:
    """The commit log of the store at ``where``."""
    return DirectoryLog(where.local / "progress") if where.local is not None else BucketLog(where)


@dataclass(frozen=True)
class DirectoryLog:
    """Appended JSON lines, one file per shard, under ``progress/``."""

    folder: Path

    def files(self) -> list[Path]:
        """The log files, one per shard that committed anything."""
        return sorted(self.folder.glob("*.jsonl"))

    @staticmethod
    def _parse(log: Path) -> tuple[list[int], list[int]]:
        """(the units a file commits, the 1-based numbers of its lines that are no commit)."""
        units, torn = [], []
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
            try:
                units.append(int(json.loads(line)["unit"]))
            except (ValueError, KeyError, TypeError):
                torn.append(number)
        return units, torn

    def entries(self) -> list[Entry]:
        return [Entry(unit, log.name) for log in self.files() for unit in self._parse(log)[0]]

    def committed(self) -> set[int]:
        return {entry.unit for entry in self.entries()}

    def commit(self, unit: int, shard: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{shard}.jsonl"
        # After a line cut by a kill, a newline first: glued to the fragment, this commit would be lost.
        start = "" if _ends_cleanly(log) else "\n"
        with open(log, "a") as f:
            f.write(start + json.dumps({"unit": unit}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def uncommit(self, units: Iterable[int]) -> None:
        units = set(units)
        if not units:
            return
        for log in self.files():
            kept = [u for u in self._parse(log)[0] if u not in units]
            write_text(log, "".join(json.dumps({"unit": u}) + "\n" for u in kept))

    def torn(self) -> list[tuple[str, int]]:
        return [(f"progress/{log.name}", number) for log in self.files() for number in self._parse(log)[1]]


@dataclass(frozen=True)
class BucketLog:
    """One object per committed unit under ``progress/units/``."""

    where: Location

    def entries(self) -> list[Entry]:
        return [Entry(int(key.rsplit("/", 1)[1]), "units") for key in self.where.list(UNITS)]

    def committed(self) -> set[int]:
        return {entry.unit for entry in self.entries()}

    def commit(self, unit: int, shard: str) -> None:
        self.where.write(f"{UNITS}{unit}", json.dumps({"unit": unit, "shard": shard}).encode())

    def uncommit(self, units: Iterable[int]) -> None:
        for unit in sorted(set(units)):
            self.where.delete(f"{UNITS}{unit}")

    def torn(self) -> list[tuple[str, int]]:
        return []  # a PUT is whole or absent


def _ends_cleanly(log: Path) -> bool:
    """Whether a progress file is absent, empty or ends with a newline (no line cut by a kill)."""
    try:
        with open(log, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True

"""Finding and repairing damage: ``find_damage`` reads every chunk back once, ``repair`` removes the
damaged chunks and un-commits the batches that wrote them (so rerunning the same extract
command recomputes exactly those), and ``python -m sae_core.store check|repair|remove STORE``
is their command line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..cli import run_main
from .layout import PLAN_ARRAYS, StoreError, batches_text, describe_array, planned_offsets, problem_of, remove_store
from .reader import Store

@dataclass(frozen=True)
class Damage:
    """One chunk that cannot be read back: its array, file and rows, what is wrong, and the batches
    (work units) that wrote it."""

    array: str
    file: Path | str  # as chunk_file gives it: a file, or an object's URL
    rows: tuple[int, int]
    problem: str
    units: tuple[int, ...]
    key: str = ""  # its key in the store

    def line(self) -> str:
        batches = f", {batches_text(self.units)}" if self.units else ""
        return f"{describe_array(self.array)} rows {self.rows[0]}:{self.rows[1]}{batches}: {self.file} {self.problem}"


def find_damage(store: Store, group_chunks: int = 8) -> list[Damage]:
    """Read every chunk of every array once (``group_chunks`` at a time); the chunks that fail, and
    the missing activation chunks of committed rows."""
    committed, damage, offsets = store.committed_units(), [], None
    for name in store.array_names():
        arr, chunk = store.array(name), store.chunk_rows_of(name)
        starts = list(range(0, arr.shape[0], chunk))
        present = set(store.where.list(f"{name}/c/")) if name.endswith("/acts") else set()
        for first in range(0, len(starts), group_chunks):
            reads = [(lo, min(arr.shape[0], lo + chunk)) for lo in starts[first : first + group_chunks]]
            for (lo, hi), read in zip(reads, [arr[lo:hi].read() for lo, hi in reads]):
                units = () if name in PLAN_ARRAYS else tuple(store.units_of_rows(lo, hi, offsets))
                key, file = store.chunk_key(name, lo // chunk), store.chunk_file(name, lo // chunk)
                try:
                    read.result()
                except ValueError as err:
                    damage.append(Damage(name, file, (lo, hi), problem_of(err), units, key))
                    if name == "offsets":  # the rest is mapped to batches with offsets rebuilt from the plan
                        offsets = planned_offsets(store.samples)
                    continue
                # A missing chunk reads as zeros; committed activations are never all zero (codes may be).
                if name.endswith("/acts") and key not in present and committed.intersection(units):
                    damage.append(Damage(name, file, (lo, hi), "is missing", units, key))
    return damage


def repair(store: Store) -> list[Damage]:
    """Remove every damaged chunk and un-commit the batches that wrote it, so rerunning the same
    extract command recomputes exactly those; offsets and frames are rewritten from samples.jsonl.
    Run it while no extraction writes to the store."""
    store.check_samples_file(full=True)  # a damaged samples.jsonl cannot be repaired: say so before anything
    damage = find_damage(store)
    lost = [d for d in damage if d.array == "codes" and store.meta.mode != "generate"]
    if lost:
        raise StoreError(f"store {store.path}: {lost[0].line()}; the codes of a {store.meta.mode} store are its "
                         f"input, not recomputed: remove {store.path} and rerun the extract command")
    for d in damage:
        store.where.delete(d.key)
    if any(d.array in PLAN_ARRAYS for d in damage):
        offsets = planned_offsets(store.samples)
        store.write_rows("offsets", 0, offsets)
        store.write_rows("frames", 0, np.concatenate([np.arange(n, dtype=np.int32) for n in np.diff(offsets)]))
    store.log.uncommit({u for d in damage for u in d.units})
    return damage


@dataclass(frozen=True)
class StoreCommand:
    """Options of ``python -m sae_core.store`` (also ``python -m sae_core.store check|repair STORE``)."""

    action: Literal["check", "repair", "remove"] = "check"
    """check: read every chunk back and list the damaged ones (exit status 2 if any); repair: remove them
    and un-commit the batches that wrote them, so that rerunning the same extract command recomputes
    exactly those (run it while no extraction writes to the store); remove: delete the store (also one
    half-created in a bucket), refusing anything that is not one."""
    store: str = "data/activations"
    """The activation store: a directory, gs://bucket/prefix or s3://bucket/prefix[?endpoint=URL]."""


def run_command(cfg: StoreCommand) -> list[Damage]:
    if cfg.action == "remove":
        print(f"removed {cfg.store}" if remove_store(cfg.store) else f"nothing to remove at {cfg.store}")
        return []
    store = Store(cfg.store)
    where = f"store {store.path}"
    store.check_samples_file(full=True)  # named first: neither command can rebuild it
    if cfg.action == "check":
        damage = find_damage(store)
        for d in damage:
            print(f"damaged: {d.line()}")
        if damage:
            units = {u for d in damage for u in d.units}
            raise StoreError(f"{where}: {len(damage)} damaged chunk{'s' * (len(damage) > 1)}"
                             f"{f' ({batches_text(units)})' if units else ''}; run python -m sae_core.store repair "
                             f"{store.path} and then rerun the same extract command")
        for log, number in store.log.torn():
            print(f"torn: {log} line {number} is a commit cut by a kill; its batch counts as unfinished: rerun "
                  "the same extract command to redo it")
        done = len(store.committed_units())
        print(f"{where}: every chunk of {len(store.array_names())} arrays reads back, samples.jsonl is intact; "
              f"{done} of {store.meta.n_units} batches committed"
              + ("" if done >= store.meta.n_units else " (rerun the same extract command to finish)"))
        return damage
    damage = repair(store)
    for d in damage:
        print(f"removed: {d.line()}")
    units = {u for d in damage for u in d.units}
    if not damage:
        print(f"{where}: no damage found, nothing to repair")
    elif units:
        print(f"{where}: un-committed {batches_text(units)} of {store.meta.n_units}; rerun the same extract command "
              "(each --shard of it) to recompute them")
    else:
        print(f"{where}: offsets and frames rewritten from samples.jsonl; nothing to recompute")
    return damage


def main(argv: list[str] | None = None):
    argv, head = list(sys.argv[1:] if argv is None else argv), []
    while argv and not argv[0].startswith("-") and len(head) < 2:  # `check STORE`: --action check --store STORE
        head.append(argv.pop(0))
    argv = [arg for pair in zip(("--action", "--store"), head) for arg in pair] + argv
    return run_main(
        StoreCommand, argv, prog="python -m sae_core.store",
        description="Check an activation store for damaged chunks (check STORE), repair it (repair STORE): "
                    "damaged chunks are removed and their batches un-committed, so rerunning the same extract "
                    "command recomputes exactly those; or delete it (remove STORE).",
        run=run_command,
    )


if __name__ == "__main__":
    main()

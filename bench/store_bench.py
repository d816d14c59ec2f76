"""``python -m bench.store_bench``: activation-store write and read throughput.

Writes a musicgen-small-wide store (d_model 1024, float16) the way extraction does, in
``write_rows`` calls of batch_samples x frames rows, then reads it back sequentially and
shuffled as the trainer reads (``jax_sae.order``, float32 out). Each read runs in a
fresh process so its peak RSS is its own. Reads are timed twice: warm (the file was just
written and sits in the page cache) and cold (its pages dropped with posix_fadvise first).

Two diagnostic writes show what bounds the extraction-shaped write: the same bytes in
chunk-aligned batches, and the same batches with tensorstore's per-write fsync turned off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError

from .common import (
    in_fresh_process,
    peak_rss_mib,
    report,
    run_bench,
    summarize,
    synthetic_store,
    target,
)

NAME = "store_bench"
LAYER = 0
N_CODEBOOKS = 4
WRITE_TARGET_MB_S = 150.0


@dataclass(frozen=True)
class StoreBenchConfig:
    """Options of ``python -m bench.store_bench``."""

    n_samples: int = 1024
    """Samples in the store (rows = n_samples x frames)."""
    frames: int = 500
    """Frames (rows) per sample: 10 s at 50 frames/s."""
    batch_samples: int = 8
    """Samples per write_rows call, as extraction's --batch_size."""
    d_model: int = 1024
    """Activation width (musicgen-small)."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype."""
    read_batch: int = 4096
    """Rows per iter_rows batch."""
    repeats: int = 5
    """Repeats of every figure (disk speed on the bench VM varies run to run)."""
    diagnostics: bool = True
    """Also time the chunk-aligned and no-fsync diagnostic writes."""
    tmp_dir: str = "/tmp"
    """Where the temporary stores go (removed afterwards)."""
    quick: bool = False
    """A 128-sample store and 2 repeats, to check the script runs."""

    def __post_init__(self) -> None:
        if min(self.n_samples, self.frames, self.batch_samples, self.d_model, self.read_batch, self.repeats) <= 0:
            raise UsageError("sizes and repeats must be positive")


def _create(root: Path, cfg: StoreBenchConfig):
    # As extraction does: chunks aligned to its equal-sized write units.
    return synthetic_store(root / "store", n_samples=cfg.n_samples, frames=cfg.frames, d_model=cfg.d_model,
                           dtype=cfg.dtype, unit_samples=cfg.batch_samples, layer=LAYER, n_codebooks=N_CODEBOOKS)


def _batches(cfg: StoreBenchConfig, rows_per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch of activations and codes, reused for every write (bytes are bytes to the codec)."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((rows_per_batch, cfg.d_model), dtype=np.float32).astype(cfg.dtype)
    codes = rng.integers(0, 2048, (rows_per_batch, N_CODEBOOKS), dtype=np.int32)
    return acts, codes


def _store_bytes(store) -> int:
    return sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _drop_cache(path: Path) -> None:
    """Evict a store's (clean) pages from the page cache; needs no privileges."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _io_counters() -> dict[str, int]:
    """This process's bytes passed to read()/write() calls (all threads, tensorstore's included)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def _write(store, cfg: StoreBenchConfig, rows_per_batch: int, array=None) -> dict:
    """Write every row in batches, as extraction does (activations, then codes, per batch).

    Returns the seconds of the activation writes, of the code writes and of a final fsync; the
    data bytes; and per array the bytes the process wrote and read meanwhile (a write that
    covers a chunk partly reads it back and rewrites it whole). ``array`` (the activations
    opened another way) replaces ``store.write_rows`` for the activations.
    """
    from sae_core.store import acts_name

    acts, codes = _batches(cfg, rows_per_batch)
    name = acts_name(LAYER)
    spent = {"acts_s": 0.0, "codes_s": 0.0, "acts_wchar": 0, "acts_rchar": 0, "codes_wchar": 0, "codes_rchar": 0}

    def measured(kind: str, fn) -> None:
        io_before, start = _io_counters(), time.perf_counter()
        fn()
        spent[f"{kind}_s"] += time.perf_counter() - start
        io_after = _io_counters()
        for key in ("wchar", "rchar"):
            spent[f"{kind}_{key}"] += io_after.get(key, 0) - io_before.get(key, 0)

    for row0 in range(0, store.n_rows, rows_per_batch):
        n = min(rows_per_batch, store.n_rows - row0)
        if array is None:
            measured("acts", lambda: store.write_rows(name, row0, acts[:n]))  # noqa: B023 (called at once)
        else:
            measured("acts", lambda: array[row0 : row0 + n].write(acts[:n]).result())  # noqa: B023
        measured("codes", lambda: store.write_rows("codes", row0, codes[:n]))  # noqa: B023
    start = time.perf_counter()
    _fsync_tree(store.path)
    return {**spent, "write_s": spent["acts_s"] + spent["codes_s"], "sync_s": time.perf_counter() - start,
            "acts_bytes": store.n_rows * acts.itemsize * cfg.d_model,
            "codes_bytes": store.n_rows * codes.itemsize * N_CODEBOOKS}


def _read_pass(path: str, batch: int, shuffle: bool, cold: bool) -> dict:
    """One full pass of iter_rows in this (fresh) process: seconds, rows, dtype, RSS."""
    from jax_sae.order import lane_rows_shuffled
    from sae_core.store import Store, acts_name

    store = Store(path)
    if cold:
        _drop_cache(store.path / acts_name(LAYER))
    store.acts(LAYER)  # open before measuring the baseline
    rss_before = peak_rss_mib()
    rows, dtype = 0, None
    start = time.perf_counter()
    batches = lane_rows_shuffled(store, LAYER, batch, seed=0) if shuffle else store.iter_rows_indexed(LAYER, batch)
    for x, _ in batches:
        rows += len(x)
        dtype = x.dtype
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "dtype": str(dtype), "rss_before_mib": rss_before,
            "rss_peak_mib": peak_rss_mib()}


def _aligned_rows(cfg: StoreBenchConfig) -> int:
    from sae_core.store import chunk_rows_for

    return chunk_rows_for(cfg.d_model * np.dtype(cfg.dtype).itemsize, cfg.batch_samples * cfg.frames)


def _nosync_array(store):
    import tensorstore as ts

    from sae_core.store import acts_name

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store.path / acts_name(LAYER))}}
    return ts.open(spec, open=True, context=ts.Context({"file_io_sync": False})).result()


def _record_write(samples: dict[str, list], label: str, w: dict, detail: bool = True) -> None:
    """Throughput of one write pass; with ``detail`` also the share of time spent on codes and the
    bytes the process wrote and read per data byte, for the activations and the codes apart."""
    samples.setdefault(label, []).append((w["acts_bytes"] + w["codes_bytes"]) / w["write_s"] / 1e6)
    if not detail:
        return
    samples.setdefault(f"{label}: share of time on codes", []).append(w["codes_s"] / w["write_s"])
    for kind in ("acts", "codes"):
        for key, what in (("wchar", "written"), ("rchar", "read")):
            samples.setdefault(f"{label}: {kind} bytes {what} / data bytes", []).append(
                w[f"{kind}_{key}"] / w[f"{kind}_bytes"])


def _record_reads(samples: dict[str, list], store, cfg: StoreBenchConfig) -> None:
    """Sequential and shuffled passes, warm and cold, each in a fresh process."""
    acts_bytes = store.n_rows * cfg.d_model * np.dtype(cfg.dtype).itemsize
    for shuffle in (False, True):
        for cold in (False, True):
            r = in_fresh_process(_read_pass, str(store.path), cfg.read_batch, shuffle, cold)
            if r["rows"] != store.n_rows or r["dtype"] != "float32":
                raise RuntimeError(f"read pass returned {r['rows']} {r['dtype']} rows of {store.n_rows}")
            samples[f"{'shuffled' if shuffle else 'sequential'} read ({'cold' if cold else 'warm'})"].append(
                acts_bytes / r["seconds"] / 1e6)
            if shuffle and not cold:
                samples["shuffled read peak RSS"].append(r["rss_peak_mib"])
                samples["shuffled read RSS increase"].append(r["rss_peak_mib"] - r["rss_before_mib"])


def _one_repeat(cfg: StoreBenchConfig, root: Path, repeat: int, samples: dict[str, list]) -> None:
    batch_rows = cfg.batch_samples * cfg.frames
    variants = ["extraction"] + (["aligned", "nosync"] if cfg.diagnostics else [])
    shift = repeat % len(variants)  # rotate the order so no variant always writes first
    for variant in variants[shift:] + variants[:shift]:
        store = _create(root, cfg)
        try:
            if variant == "extraction":
                w = _write(store, cfg, batch_rows)
                _record_write(samples, "write", w)
                samples["write+fsync"].append((w["acts_bytes"] + w["codes_bytes"]) / (w["write_s"] + w["sync_s"]) / 1e6)
                _record_reads(samples, store, cfg)
                samples["store size on disk"].append(_store_bytes(store) / 1e6)
            elif variant == "aligned":
                _record_write(samples, "write, chunk-aligned batches", _write(store, cfg, _aligned_rows(cfg)))
            else:
                w = _write(store, cfg, batch_rows, array=_nosync_array(store))
                _record_write(samples, "write, file_io_sync off", w, detail=False)
        finally:
            shutil.rmtree(store.path, ignore_errors=True)
        print(f"  repeat {repeat + 1}/{cfg.repeats}: {variant} done", flush=True)


UNITS = {"shuffled read peak RSS": "MiB", "shuffled read RSS increase": "MiB", "store size on disk": "MB"}


def _unit(label: str) -> str:
    if label.endswith("/ data bytes"):
        return "x"
    return "frac" if label.endswith("share of time on codes") else UNITS.get(label, "MB/s")


def run(cfg: StoreBenchConfig) -> dict:
    if cfg.quick:
        cfg = replace(cfg, n_samples=128, repeats=2, quick=False)
    root = Path(tempfile.mkdtemp(prefix="sae-store-bench-", dir=cfg.tmp_dir))
    samples: dict[str, list] = {
        k: [] for k in ("write", "write+fsync", "write, chunk-aligned batches", "write, file_io_sync off",
                        "sequential read (warm)", "sequential read (cold)", "shuffled read (warm)",
                        "shuffled read (cold)", "shuffled read peak RSS", "shuffled read RSS increase",
                        "store size on disk")
    }
    n_rows = cfg.n_samples * cfg.frames
    print(f"store bench: {n_rows} rows x {cfg.d_model} {cfg.dtype} "
          f"({n_rows * cfg.d_model * np.dtype(cfg.dtype).itemsize / 1e9:.2f} GB) in {root}", flush=True)
    try:
        for repeat in range(cfg.repeats):
            _one_repeat(cfg, root, repeat, samples)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {k: summarize(v, _unit(k)) for k, v in samples.items() if v}
    derived = {}
    if cfg.diagnostics:
        derived["write: extraction batches / chunk-aligned (ratio of medians)"] = (
            figures["write"]["median"] / figures["write, chunk-aligned batches"]["median"])
        derived["write: fsync on / off (ratio of medians)"] = (
            figures["write"]["median"] / figures["write, file_io_sync off"]["median"])
    params = {**cfg.__dict__, "n_rows": n_rows, "write_rows_per_batch": cfg.batch_samples * cfg.frames,
              "chunk_rows": _aligned_rows(cfg)}
    write = figures["write"]["median"]
    goal = target("store write", write, f">= {WRITE_TARGET_MB_S:.0f} MB/s", write >= WRITE_TARGET_MB_S)
    return report(NAME, figures, params=params, derived=derived, targets=[goal])


def main(argv: list[str] | None = None):
    return run_bench(StoreBenchConfig, run, argv, NAME,
                     "Activation-store write and read throughput (measured, never asserted).")


if __name__ == "__main__":
    main()

"""Reading a store (and, for extraction, writing its rows and commits): ``Store``, ``open_store``
and ``create_store``. Every file goes through ``Location``, so the same code reads and writes a
directory or a bucket; reading needs numpy and tensorstore only, never torch.

Damage is named, not returned as rows: every chunk carries a crc32c checksum (stores made
before it have none; a truncated chunk still fails), store.json records samples.jsonl's line
count and sha256, and a chunk that cannot be read stops the reader with one line naming the
file, its rows and batches, and ``python -m sae_core.store repair`` (``repair``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from ..files import staged_dir
from ..location import Location, transport_failure
from .commits import commit_log
from .layout import (
    PLAN_ARRAYS,
    StoreError,
    StoreMeta,
    acts_name,
    batches_text,
    chunk_key,
    describe_array,
    first_line,
    PAIRED_STREAMS,
    itemsize,
    paired_parts,
    problem_of,
    sample_blocks,
    samples_digest,
    write_plan,
)

class Store:
    """Reader (and, for extraction, row writer) of one activation store."""

    def __init__(self, path: str | os.PathLike):
        self.where = Location.parse(path)
        # A directory's Path, or the URL as given (it keeps its endpoint, so str() reopens the same store).
        self.path: Path | str = self.where.local if self.where.local is not None else self.where.text
        raw = self.where.read("store.json")
        if raw is None:
            self.where.check_reachable()
            raise StoreError(f"no activation store at {self.path} (missing store.json); run python -m extractor.extract first")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{self.where.describe('store.json')} is damaged (not JSON): the store cannot be read; "
                             f"remove {self.path} and rerun the extract command") from None
        self.samples_file: dict | None = data.pop("samples_file", None)  # absent in stores made before it
        self.meta = StoreMeta.from_json(data)
        self._arrays: dict[str, ts.TensorStore] = {}
        self._offsets: np.ndarray | None = None
        self._samples: list[dict] | None = None
        self.log = commit_log(self.where)
        self.bytes_read = 0  # bytes of rows this object has read (chunk-aligned reads: what storage served)

    # -- layout ---------------------------------------------------------------------------
    def array(self, name: str) -> ts.TensorStore:
        """Open (once) one of the store's arrays by its relative name."""
        if name not in self._arrays:
            if not self.where.exists(f"{name}/zarr.json"):
                raise StoreError(f"store {self.path} has no array {name}")
            try:
                self._arrays[name] = ts.open({"driver": "zarr3", "kvstore": self.where.spec(name)}, open=True).result()
            except ValueError as err:
                self._raise_if_unreachable(err)
                raise StoreError(f"array {name} of store {self.path} is damaged ({first_line(err)}): remove the "
                                 "store and rerun the extract command") from None
        return self._arrays[name]

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one array (of a paired stream's: its parts side by side); a damaged chunk
        raises a StoreError naming it and the repair."""
        parts = paired_parts(name)
        if parts is not None:
            return np.concatenate([self.read_rows(part, lo, hi) for part in parts], axis=1)
        try:
            rows = np.asarray(self.array(name)[lo:hi].read().result())
        except ValueError as err:
            self._raise_if_unreachable(err)
            raise StoreError(self._damage_line(name, lo, hi, err)) from None
        self.bytes_read += rows.nbytes
        return rows

    def _raise_if_unreachable(self, err: ValueError) -> None:
        """A bucket that did not answer through every retry is an outage, not damage: one line that
        names it and says a rerun resumes (``Location.outage_line``)."""
        if not self.where.is_local and transport_failure(err):
            raise StoreError(self.where.outage_line(err)) from None

    def _damage_line(self, name: str, lo: int, hi: int, err: ValueError) -> str:
        """One line: which store, array, rows and batches, which chunk file, and the repair command."""
        found = _CHUNK_FILE.search(str(err))
        what = f"cannot be read ({first_line(err)})"
        if found:
            index, chunk = int(found.group(2)), self.chunk_rows_of(name)
            lo, hi = index * chunk, min(self.array(name).shape[0], (index + 1) * chunk)
            what = f"are damaged: chunk file {found.group(1)} {problem_of(err)}"
        batches = "" if name in PLAN_ARRAYS else f" ({batches_text(self.units_of_rows(lo, hi))})"
        return (f"store {self.path}: {describe_array(name)} rows {lo}:{hi}{batches} {what}; run "
                f"python -m sae_core.store repair {self.path} and then rerun the same extract command")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    def width(self, stream: str = "cond") -> int:
        """Values per row of a stream: d_model, or d_model per part of a paired stream."""
        return self.meta.d_model * len(PAIRED_STREAMS.get(stream, (stream,)))

    @property
    def n_samples(self) -> int:
        return self.meta.n_samples

    @property
    def n_rows(self) -> int:
        return self.meta.n_rows

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = self.read_rows("offsets", 0, self.n_samples + 1)
        return self._offsets

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            data = self.check_samples_file(full=True)
            self._samples = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return self._samples

    def check_samples_file(self, full: bool = False) -> bytes:
        """Refuse a samples.jsonl other than the one written at creation: by its size (cheap, on open)
        or, ``full``, by its line count and sha256 too (stores made before this recorded neither).
        Returns its bytes when it read them (``full``, or in a bucket)."""
        expected, file = self.samples_file, self.where.describe("samples.jsonl")
        local = self.where.local / "samples.jsonl" if self.where.local is not None else None
        if full or local is None:
            data = self.where.read("samples.jsonl") or b""
            found = samples_digest(data) if full else {"bytes": len(data)}
        else:
            data = b""
            found = {"bytes": local.stat().st_size if local.exists() else 0}
        if expected is None:
            return data
        if any(found[key] != expected[key] for key in found):
            seen = f"{found['lines']} lines, {found['bytes']} bytes" if full else f"{found['bytes']} bytes"
            raise StoreError(
                f"{file} is damaged ({seen}; store.json records {expected['lines']} lines, {expected['bytes']} "
                "bytes and their sha256): which prompt each row came from is lost and cannot be rebuilt from the "
                f"store; remove {self.path} and rerun the extract command")
        return data

    def check_layer(self, layer: int, stream: str = "cond") -> None:
        if layer not in self.meta.layers:
            raise StoreError(f"store {self.path} has no layer {layer}; it holds layers {list(self.meta.layers)}")
        if stream in PAIRED_STREAMS:
            missing = [part for part in PAIRED_STREAMS[stream] if part not in self.meta.streams]
            if missing:
                raise StoreError(f"store {self.path} has no {' or '.join(missing)} stream (it holds "
                                 f"{list(self.meta.streams)}): a transcoder needs the MLP's input and output; "
                                 "extract the store again with --mlp")
            return
        if stream not in self.meta.streams:
            raise StoreError(f"store {self.path} has no {stream!r} stream; it holds {list(self.meta.streams)}")

    def acts(self, layer: int, stream: str = "cond") -> ts.TensorStore:
        self.check_layer(layer, stream)
        return self.array(acts_name(layer, stream))

    def array_names(self) -> list[str]:
        return ["offsets", "codes", "frames"] + [acts_name(layer, stream) for stream in self.meta.streams
                                                 for layer in self.meta.layers]

    def chunk_key(self, name: str, index: int) -> str:
        """The key of chunk ``index`` (along rows) of one array (zarr3's default chunk keys)."""
        return chunk_key(name, index, len(self.array(name).shape))

    def chunk_file(self, name: str, index: int) -> Path | str:
        """Where chunk ``index`` of one array is: its file's Path, or its object's URL."""
        where = self.where.describe(self.chunk_key(name, index))
        return Path(where) if self.where.local is not None else where

    # -- progress -------------------------------------------------------------------------
    def unit_bounds(self, offsets: np.ndarray | None = None) -> np.ndarray:
        """Row bounds of the work units: unit u wrote rows [b[u], b[u + 1]) of every row array
        (``offsets``: the sample offsets to use instead of the stored ones, e.g. rebuilt from the plan)."""
        offsets = self.offsets if offsets is None else offsets
        per_unit = self.meta.generation.get("batch_size") or -(-self.n_samples // max(1, self.meta.n_units))
        return offsets[np.minimum(np.arange(self.meta.n_units + 1) * per_unit, self.n_samples)]

    def units_of_rows(self, lo: int, hi: int, offsets: np.ndarray | None = None) -> list[int]:
        """The work units that wrote any of the rows [lo, hi)."""
        bounds = self.unit_bounds(offsets)
        return [u for u in range(self.meta.n_units) if bounds[u] < hi and bounds[u + 1] > lo]

    def committed_units(self) -> set[int]:
        return self.log.committed()

    @property
    def complete(self) -> bool:
        return len(self.committed_units()) >= self.meta.n_units

    def require_complete(self) -> None:
        done = len(self.committed_units())
        if done < self.meta.n_units:
            raise StoreError(
                f"store {self.path} is incomplete ({done}/{self.meta.n_units} batches committed); "
                "rerun the same extract command to finish it"
            )

    def commit_unit(self, unit: int, shard: str) -> None:
        """Record that work unit ``unit`` is fully written (after its data; see ``commits``)."""
        self.log.commit(unit, shard)

    def write_rows(self, name: str, start: int, values: np.ndarray) -> None:
        arr = self.array(name)
        try:
            arr[start : start + len(values)].write(np.asarray(values).astype(arr.dtype.numpy_dtype, copy=False)).result()
        except ValueError as err:
            self._raise_if_unreachable(err)
            raise

    # -- reading --------------------------------------------------------------------------
    def sample_rows(self, index: int, layer: int, stream: str = "cond") -> np.ndarray:
        """Activations of one sample, [n_frames, d_model]."""
        if not 0 <= index < self.n_samples:
            raise StoreError(f"sample {index} is out of range: the store has {self.n_samples} samples")
        self.check_layer(layer, stream)
        return self.read_rows(acts_name(layer, stream), int(self.offsets[index]), int(self.offsets[index + 1]))

    def sample_codes(self, index: int) -> np.ndarray:
        """Audio codes of one sample, [n_frames, n_codebooks]."""
        return self.read_rows("codes", int(self.offsets[index]), int(self.offsets[index + 1]))

    def row_sample_index(self, rows: np.ndarray) -> np.ndarray:
        """The sample each global row index belongs to."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def row_positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample index, frame index, time in seconds) of global rows; see extractor.capture for
        how a row's frame accounts for the codebook delay."""
        rows = np.asarray(rows, dtype=np.int64)
        samples = self.row_sample_index(rows)
        frames = rows - self.offsets[samples]
        return samples, frames, frames / self.meta.frame_rate

    def chunk_rows(self, layer: int, stream: str = "cond") -> int:
        self.check_layer(layer, stream)
        return self.chunk_rows_of(acts_name(layer, stream))

    def chunk_rows_of(self, name: str) -> int:
        """Rows (entries, for offsets) per chunk of one array (of a paired stream: of its parts, which
        the extractor writes alike)."""
        parts = paired_parts(name)
        if parts is not None:
            rows = {self.chunk_rows_of(part) for part in parts}
            if len(rows) > 1:
                raise StoreError(f"store {self.path}: {' and '.join(parts)} have different chunk sizes ({sorted(rows)}); "
                                 "extract the store again with --mlp")
            return rows.pop()
        return int(self.array(name).chunk_layout.read_chunk.shape[0])

    def iter_rows(self, layer: int, batch_size: int, **options) -> Iterator[np.ndarray]:
        """As ``iter_rows_indexed`` (same options), the batches alone."""
        for batch, _ in self.iter_rows_indexed(layer, batch_size, **options):
            yield batch

    def iter_rows_indexed(
        self,
        layer: int,
        batch_size: int,
        *,
        rows: np.ndarray | None = None,
        samples: np.ndarray | None = None,
        exclude_rows: np.ndarray | None = None,
        stream: str = "cond",
        drop_last: bool = False,
        dtype=np.float32,
        chunks: Sequence[int] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ([batch_size, d_model] batches, the global row index of every row) in store order;
        the last batch may be short unless ``drop_last``. ``rows`` / ``samples`` restrict reading to
        a subset (``samples``: the rows of those samples, memory per sample, not per row);
        ``exclude_rows`` drops a few rows (e.g. non-finite ones); ``chunks`` reads only those chunks.
        (Training reads in its own shuffled order: ``jax_sae.order``.)"""
        if batch_size <= 0:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        chunk = self.chunk_rows(layer, stream)
        visit = np.arange(-(-self.n_rows // chunk))
        if chunks is not None:
            visit = visit[np.isin(visit, np.asarray(chunks, dtype=visit.dtype))]
        groups = self.read_chunks(acts_name(layer, stream), visit, 1, self.selection(rows, samples, exclude_rows),
                                  dtype)
        yield from rebatched(groups, batch_size, drop_last)

    def iter_chunks(self, layer: int, chunks: Sequence[int], *, samples: np.ndarray | None = None,
                    exclude_rows: np.ndarray | None = None, stream: str = "cond", dtype=np.float32
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(chunk, its selected rows, their global indices) for each of ``chunks`` with any row selected."""
        keep = self.selection(None, samples, exclude_rows)
        for c in chunks:
            for x, rows in self.read_chunks(acts_name(layer, stream), [c], 1, keep, dtype):
                yield int(c), x, rows

    def kept_rows_per_chunk(self, layer: int, *, samples: np.ndarray | None = None,
                            exclude_rows: np.ndarray | None = None, stream: str = "cond") -> np.ndarray:
        """Rows of each chunk that a selection (``samples``, less ``exclude_rows``) keeps."""
        chunk = self.chunk_rows(layer, stream)
        keep = self.selection(None, samples, exclude_rows)
        return np.array([int(keep(lo, min(self.n_rows, lo + chunk)).sum()) for lo in range(0, self.n_rows, chunk)],
                        dtype=np.int64)

    def selection(self, rows=None, samples=None, exclude_rows=None) -> Callable[[int, int], np.ndarray]:
        """``keep(lo, hi)``: which of the global rows [lo, hi) a selection reads: ``rows``, the rows of
        ``samples``, less ``exclude_rows`` (each None: no restriction)."""
        wanted = selected = None
        if rows is not None:
            wanted = np.zeros(self.n_rows, dtype=bool)
            wanted[np.asarray(rows, dtype=np.int64)] = True
        if samples is not None:
            selected = np.zeros(self.n_samples, dtype=bool)
            selected[np.asarray(samples, dtype=np.int64)] = True
        excluded = np.unique(np.asarray(exclude_rows, dtype=np.int64)) if exclude_rows is not None else None

        def keep(lo: int, hi: int) -> np.ndarray:
            mask = np.ones(hi - lo, dtype=bool)
            if wanted is not None:
                mask &= wanted[lo:hi]
            if selected is not None:
                mask &= selected[self.row_sample_index(np.arange(lo, hi))]
            if excluded is not None and len(excluded):
                mask &= ~np.isin(np.arange(lo, hi), excluded)
            return mask

        return keep

    def read_chunks(self, name: str, order: Sequence[int], group_chunks: int, keep, dtype=np.float32
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, global indices) kept (``keep``, from ``selection``) from each group of ``group_chunks``
        row chunks of array ``name`` taken in ``order``; chunks with nothing kept are not read."""
        chunk = self.chunk_rows_of(name)
        for group_start in range(0, len(order), group_chunks):
            ranges, masks = [], []
            for c in order[group_start : group_start + group_chunks]:
                lo, hi = int(c) * chunk, min(self.n_rows, (int(c) + 1) * chunk)
                mask = keep(lo, hi)
                if mask.any():
                    ranges.append((lo, hi))
                    masks.append(mask)
            if not ranges:
                continue
            xs, idx = [], []
            for (lo, hi), mask, block in zip(ranges, masks, self._read_ranges(name, ranges)):
                index = np.arange(lo, hi)
                xs.append(block if mask.all() else block[mask])
                idx.append(index if mask.all() else index[mask])
            yield np.concatenate(xs).astype(dtype, copy=False), np.concatenate(idx)

    def _read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows [lo, hi) of each range, all requested at once (a group's chunks travel in parallel: in a
        bucket their round trips overlap instead of adding up), each checked as ``read_rows`` does."""
        parts = paired_parts(name)
        if parts is not None:
            columns = [self._read_ranges(part, ranges) for part in parts]
            return [np.concatenate(blocks, axis=1) for blocks in zip(*columns)]
        if len(ranges) == 1:
            return [self.read_rows(name, *ranges[0])]
        array = self.array(name)
        futures = [array[lo:hi].read() for lo, hi in ranges]
        out = []
        for (lo, hi), future in zip(ranges, futures):
            try:
                rows = np.asarray(future.result())
            except ValueError as err:
                self._raise_if_unreachable(err)
                raise StoreError(self._damage_line(name, lo, hi, err)) from None
            self.bytes_read += rows.nbytes
            out.append(rows)
        return out

    def iter_sample_blocks(
        self, layer: int, max_rows: int, *, samples: np.ndarray | None = None, stream: str = "cond",
        dtype=np.float32,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (sample indices, rows) for each block of ``sample_blocks`` (whole samples, at most
        ``max_rows`` rows unless one sample is longer). Rows of sample i follow those of sample i - 1."""
        self.check_layer(layer, stream)
        name = acts_name(layer, stream)
        offsets = self.offsets
        for block in sample_blocks(offsets, max_rows, samples):
            if np.all(np.diff(block) == 1):
                x = self.read_rows(name, int(offsets[block[0]]), int(offsets[block[-1] + 1]))
            else:
                x = np.concatenate([self.read_rows(name, int(offsets[s]), int(offsets[s + 1])) for s in block])
            yield block, x.astype(dtype, copy=False)

    def counts(self) -> dict:
        """Sizes a user wants at a glance."""
        element = itemsize(self.meta.dtype)
        return {
            "samples": self.n_samples,
            "rows": self.n_rows,
            "layers": list(self.layers),
            "d_model": self.d_model,
            "bytes_per_layer": self.n_rows * self.d_model * element,
            "seconds_of_audio": self.n_rows / self.meta.frame_rate if self.meta.frame_rate else 0.0,
            "complete": self.complete,
        }


# `Error reading local file "<array>/c/<row chunk>/0": <what>`: how tensorstore names a chunk it cannot read.
_CHUNK_FILE = re.compile(r'local file "([^"]*/c/(\d+)(?:/\d+)*)"')


def create_store(
    path: str | os.PathLike,
    meta: StoreMeta,
    samples: Sequence[dict],
    n_frames: Sequence[int],
    codes: np.ndarray | None = None,
    unit_rows: int | None = None,
) -> Store:
    """Create a store with its whole plan, atomically: it appears complete or not at all.

    ``samples`` are the per-sample records; ``n_frames`` their row counts. ``codes`` (optional,
    [n_rows, n_codebooks]) is written at creation when already known (teacher forcing).
    ``unit_rows``: rows per write unit when all units are equal, to align chunks with writes.
    Several processes may race to create the same store: one wins, the others open it. In a
    bucket (no rename) the plan is written in place, store.json last, and every writer writes the
    same bytes, so racing creators agree; a store without store.json is no store yet.
    """
    where = Location.parse(path)
    offsets = np.zeros(len(n_frames) + 1, dtype=np.int64)
    np.cumsum(np.asarray(n_frames, dtype=np.int64), out=offsets[1:])
    if meta.n_rows != int(offsets[-1]) or meta.n_samples != len(samples) or len(samples) != len(n_frames):
        raise StoreError("store plan is inconsistent: rows, samples and frame counts disagree")
    if where.local is None:
        try:
            write_plan(where, meta, samples, n_frames, offsets, codes, unit_rows)
        except ValueError as err:
            if transport_failure(err):
                raise StoreError(where.outage_line(err)) from None
            raise
    else:
        with staged_dir(where.local, tag="creating") as tmp:
            write_plan(Location.parse(tmp), meta, samples, n_frames, offsets, codes, unit_rows)
    return Store(path)



def open_store(path: str | os.PathLike, *, require_complete: bool = True) -> Store:
    """Open a store for reading; by default refuse one whose extraction has not finished."""
    store = Store(path)
    store.check_samples_file()
    if require_complete:
        store.require_complete()
    return store


def rebatched(groups, batch_size: int, drop_last: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Groups of (rows, indices) cut into batches of ``batch_size`` (the last short unless ``drop_last``)."""
    pending_x: list[np.ndarray] = []
    pending_i: list[np.ndarray] = []
    pending = 0
    for x, index in groups:
        pending_x.append(x)
        pending_i.append(index)
        pending += len(index)
        while pending >= batch_size:
            x_all, i_all = np.concatenate(pending_x), np.concatenate(pending_i)
            yield x_all[:batch_size], i_all[:batch_size]
            pending_x, pending_i = [x_all[batch_size:]], [i_all[batch_size:]]
            pending -= batch_size
    if pending and not drop_last:
        yield np.concatenate(pending_x), np.concatenate(pending_i)

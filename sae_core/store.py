"""The activation store: the one module that knows the on-disk layout.

A store is a directory, or a prefix in a bucket (``gs://``, ``s3://``; see ``sae_core.location``)::

    store.json            model, layers, widths, frame rate, dtype, mode, generation parameters
    samples.jsonl         one line per sample: prompt, source id, tags, seed, n_frames
    offsets               zarr3 int64 [n_samples + 1]; rows of sample i are offsets[i]:offsets[i+1]
    codes                 zarr3 int32 [n_rows, n_codebooks]; the audio codes of each row's frame
    frames                zarr3 int32 [n_rows]; the frame index of each row inside its sample
    layer{N}/acts         zarr3 [n_rows, d_model]; the residual stream after decoder block N
    uncond/layer{N}/acts  the unconditional (null-text) stream, only when it was asked for
    progress/*.jsonl      committed work units, one file per extraction shard (a directory)
    progress/units/{u}    committed work unit u, one object each (a bucket: objects cannot be appended to)

The whole plan (samples, offsets, array shapes) is written before any activation, so
extraction fills fixed row ranges: a killed run resumes after its last committed unit and
several processes can fill one store. Reading needs numpy and tensorstore only, never torch.
Every file goes through ``Location``: the same code reads and writes a directory or a bucket.

Damage is named, not returned as rows: every chunk carries a crc32c checksum (stores made
before it have none; a truncated chunk still fails), store.json records samples.jsonl's line
count and sha256, and ``python -m sae_core.store check|repair STORE`` finds damaged chunks and
un-commits the batches that wrote them, so rerunning the same extract command recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import tensorstore as ts

from .errors import UsageError
from .files import staged_dir, write_text
from .location import Location

FORMAT_VERSION = 1
STORE_DTYPES = ("float16", "bfloat16", "float32")
# Row chunks of about this many bytes: large enough for ~1 GB/s sequential I/O, small
# enough that a shuffled reader's buffer of a few chunks stays well under a GB.
TARGET_CHUNK_BYTES = 8 << 20


class StoreError(UsageError):
    """A store that is missing, incomplete, or does not match what was asked of it."""


@dataclass(frozen=True)
class StoreMeta:
    """The contents of ``store.json``."""

    model: str
    layers: tuple[int, ...]
    d_model: int
    n_codebooks: int
    frame_rate: float
    sampling_rate: int
    dtype: str
    mode: str
    n_samples: int
    n_rows: int
    n_units: int
    streams: tuple[str, ...] = ("cond",)
    generation: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["streams"] = list(self.streams)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "StoreMeta":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"store format version {version} is not supported (this code reads {FORMAT_VERSION}); "
                "re-extract with this version"
            )
        data = dict(data)
        data["layers"] = tuple(data["layers"])
        data["streams"] = tuple(data["streams"])
        return cls(**data)


def acts_name(layer: int, stream: str = "cond") -> str:
    """Relative path of a layer's activation array for one guidance stream."""
    return f"layer{layer}/acts" if stream == "cond" else f"{stream}/layer{layer}/acts"


def _describe_array(name: str) -> str:
    """An array's relative name in words: ``uncond/layer12/acts`` -> ``layer 12 (uncond stream)``."""
    found = re.fullmatch(r"(?:(\w+)/)?layer(\d+)/acts", name)
    if found:
        return f"layer {found.group(2)} ({found.group(1) or 'cond'} stream)"
    return {"offsets": "sample offsets", "codes": "audio codes", "frames": "frame indices"}.get(name, name)


def _spec(kvstore: dict, shape: Sequence[int], dtype: str, chunk_rows: int) -> dict:
    chunk = [min(chunk_rows, max(1, shape[0]))] + list(shape[1:])
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            # Explicit plain codec: the default sharding codec writes ~10 MB/s here. crc32c appends
            # a checksum to each chunk, so a garbled chunk fails its read instead of giving wrong rows.
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        },
    }


def chunk_rows_for(row_bytes: int, unit_rows: int | None = None) -> int:
    """Rows per chunk so that a chunk holds about TARGET_CHUNK_BYTES: a whole number of write
    units when every unit has ``unit_rows`` rows (writes then never straddle chunks), else a
    power of two."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    if unit_rows:
        return unit_rows * max(1, round(rows / unit_rows))
    return 1 << (rows.bit_length() - 1)


def _itemsize(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}[dtype]


def estimate_bytes(n_rows: int, meta_layers: int, d_model: int, dtype: str, n_codebooks: int, streams: int) -> int:
    """Bytes a store of this plan will take on disk."""
    return n_rows * (meta_layers * streams * d_model * _itemsize(dtype) + 4 * n_codebooks + 4)


def create_store(
    path: str | os.PathLike,
    meta: StoreMeta,
    samples: Sequence[dict],
    n_frames: Sequence[int],
    codes: np.ndarray | None = None,
    unit_rows: int | None = None,
) -> "Store":
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
        _write_plan(where, meta, samples, n_frames, offsets, codes, unit_rows)
    else:
        with staged_dir(where.local, tag="creating") as tmp:
            _write_plan(Location.parse(tmp), meta, samples, n_frames, offsets, codes, unit_rows)
    return Store(path)


def _write_plan(root: Location, meta: StoreMeta, samples: Sequence[dict], n_frames: Sequence[int], offsets: np.ndarray,
                codes: np.ndarray | None, unit_rows: int | None) -> None:
    """Every file of a new store under ``root``: offsets, codes, frames, empty activation arrays,
    samples.jsonl, progress/ and, last, store.json."""
    n_rows = meta.n_rows
    _open_new(root.spec("offsets"), [len(offsets)], "int64", len(offsets)).write(offsets).result()
    # Codes and frames share the activations' row chunking: a unit's write touches the same
    # few chunks in every array instead of rewriting one huge codes chunk.
    chunk = chunk_rows_for(meta.d_model * _itemsize(meta.dtype), unit_rows)
    codes_arr = _open_new(root.spec("codes"), [n_rows, meta.n_codebooks], "int32", chunk)
    if codes is not None:
        codes_arr.write(np.asarray(codes, dtype=np.int32)).result()
    frames = np.concatenate([np.arange(n, dtype=np.int32) for n in n_frames]) if n_rows else np.zeros(0, np.int32)
    _open_new(root.spec("frames"), [n_rows], "int32", chunk).write(frames).result()
    for stream in meta.streams:
        for layer in meta.layers:
            _open_new(root.spec(acts_name(layer, stream)), [n_rows, meta.d_model], meta.dtype, chunk)
    text = "".join(json.dumps(rec) + "\n" for rec in samples)
    root.write("samples.jsonl", text.encode())
    if root.local is not None:
        (root.local / "progress").mkdir()
    store_json = {**meta.to_json(), "samples_file": _samples_digest(text.encode())}
    root.write("store.json", (json.dumps(store_json, indent=2) + "\n").encode())


def _samples_digest(data: bytes) -> dict:
    """What store.json records of samples.jsonl, to tell a truncated or altered one."""
    return {"lines": data.count(b"\n"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _open_new(kvstore: dict, shape, dtype: str, chunk_rows: int):
    """A new array, or (a racing creator of the same store in a bucket) the identical one already there."""
    spec = _spec(kvstore, shape, dtype, chunk_rows)
    try:
        return ts.open(spec, create=True, open=True).result()
    except ValueError as err:
        raise StoreError(f"{kvstore['path']} holds an array of other settings ({_first_line(err)}): a store "
                         "half-created with other settings is there; remove it (python -m sae_core.store remove "
                         "STORE) or choose another --out") from None


def remove_store(path: str | os.PathLike) -> bool:
    """Delete a store (a directory or a bucket prefix), or one half-created in a bucket; refuse
    anything else. Returns whether there was anything to delete."""
    where = Location.parse(path)
    if where.local is not None and not where.local.exists():
        return False
    if not where.exists("store.json"):
        keys = where.list()
        if where.local is None and not keys:
            return False
        if where.local is not None or foreign_keys(where):
            raise StoreError(f"{where} exists and is not an activation store; refusing to delete it")
    where.delete_all()
    return True


def foreign_keys(where: Location) -> list[str]:
    """Objects under a location that no store would hold (a half-created store has none)."""
    return [key for key in where.list() if not _LAYOUT_KEY.match(key)]


_LAYOUT_KEY = re.compile(r"(store\.json|samples\.jsonl|progress/.*|(uncond/)?layer\d+/acts/.*|(offsets|codes|frames)/.*)")


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
                raise StoreError(f"array {name} of store {self.path} is damaged ({_first_line(err)}): remove the "
                                 "store and rerun the extract command") from None
        return self._arrays[name]

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one array; a damaged chunk raises a StoreError naming it and the repair."""
        try:
            rows = np.asarray(self.array(name)[lo:hi].read().result())
        except ValueError as err:
            raise StoreError(self._damage_line(name, lo, hi, err)) from None
        self.bytes_read += rows.nbytes
        return rows

    def _damage_line(self, name: str, lo: int, hi: int, err: ValueError) -> str:
        """One line: which store, array, rows and batches, which chunk file, and the repair command."""
        found = _CHUNK_FILE.search(str(err))
        what = f"cannot be read ({_first_line(err)})"
        if found:
            index, chunk = int(found.group(2)), self.chunk_rows_of(name)
            lo, hi = index * chunk, min(self.array(name).shape[0], (index + 1) * chunk)
            what = f"are damaged: chunk file {found.group(1)} {_problem(err)}"
        batches = "" if name in PLAN_ARRAYS else f" ({_batches(self.units_of_rows(lo, hi))})"
        return (f"store {self.path}: {_describe_array(name)} rows {lo}:{hi}{batches} {what}; run "
                f"python -m sae_core.store repair {self.path} and then rerun the same extract command")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.meta.layers

    @property
    def d_model(self) -> int:
        return self.meta.d_model

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
            found = _samples_digest(data) if full else {"bytes": len(data)}
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
        return "/".join([name, "c", str(index)] + ["0"] * (len(self.array(name).shape) - 1))

    def chunk_file(self, name: str, index: int) -> Path | str:
        """Where chunk ``index`` of one array is: its file's Path, or its object's URL."""
        where = self.where.describe(self.chunk_key(name, index))
        return Path(where) if self.where.local is not None else where

    # -- progress -------------------------------------------------------------------------
    def unit_bounds(self) -> np.ndarray:
        """Row bounds of the work units: unit u wrote rows [b[u], b[u + 1]) of every row array."""
        per_unit = self.meta.generation.get("batch_size") or -(-self.n_samples // max(1, self.meta.n_units))
        return self.offsets[np.minimum(np.arange(self.meta.n_units + 1) * per_unit, self.n_samples)]

    def units_of_rows(self, lo: int, hi: int) -> list[int]:
        """The work units that wrote any of the rows [lo, hi)."""
        bounds = self.unit_bounds()
        return [u for u in range(self.meta.n_units) if bounds[u] < hi and bounds[u + 1] > lo]

    def committed_units(self) -> set[int]:
        if self.where.local is None:
            return {int(key.rsplit("/", 1)[1]) for key in self.where.list(_UNITS)}
        done: set[int] = set()
        for f in (self.where.local / "progress").glob("*.jsonl"):
            done.update(_commits(f))
        return done

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
        """Record that work unit ``unit`` is fully written (durably, after its data): a line appended to
        the shard's log in a directory, an object of its own in a bucket (one PUT, so a kill leaves
        it whole or absent; two writers of one unit write the same bytes)."""
        if self.where.local is None:
            self.where.write(f"{_UNITS}{unit}", json.dumps({"unit": unit, "shard": shard}).encode())
            return
        log = self.where.local / "progress" / f"{shard}.jsonl"
        # After a line cut by a kill, a newline first: glued to the fragment, this commit would be lost.
        start = "" if _ends_cleanly(log) else "\n"
        with open(log, "a") as f:
            f.write(start + json.dumps({"unit": unit}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_rows(self, name: str, start: int, values: np.ndarray) -> None:
        arr = self.array(name)
        arr[start : start + len(values)].write(np.asarray(values).astype(arr.dtype.numpy_dtype, copy=False)).result()

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
        """Rows (entries, for offsets) per chunk of one array."""
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
        shuffle: bool = False,
        seed: int = 0,
        rows: np.ndarray | None = None,
        samples: np.ndarray | None = None,
        exclude_rows: np.ndarray | None = None,
        stream: str = "cond",
        drop_last: bool = False,
        dtype=np.float32,
        buffer_chunks: int = 4,
        lane: tuple[int, int] = (0, 1),
        chunks: Sequence[int] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ([batch_size, d_model] batches, the global row index of every row); the last batch
        may be short unless ``drop_last``.

        Sequential by default. With ``shuffle``, chunks are visited in a seeded random order
        and rows are permuted inside a buffer of ``buffer_chunks`` chunks, so memory stays bounded
        by the buffer, not by the store. ``rows`` / ``samples`` restrict reading to a subset
        (``samples``: the rows of those samples, memory per sample, not per row); ``exclude_rows``
        drops a few rows (e.g. non-finite ones). ``lane=(j, L)`` reads only lane j of L: every
        L-th chunk of the (shuffled) order from the j-th on, with its own seeded row order; the
        lanes of one seed split the store's chunks between them (``lane_rows`` counts each one's).
        ``chunks`` reads only those chunks (of the lane's).
        """
        if batch_size <= 0:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        j, lanes = lane
        chunk = self.chunk_rows(layer, stream)
        order = self._chunk_order(layer, stream, shuffle, seed)
        rng = order.rng if lanes == 1 else np.random.default_rng([seed, lanes, j])
        keep = self._row_mask(rows, samples, exclude_rows)
        visit = order.chunks[j::lanes]
        if chunks is not None:
            visit = visit[np.isin(visit, np.asarray(chunks, dtype=visit.dtype))]
        groups = self._read_chunk_groups(acts_name(layer, stream), chunk, visit,
                                         buffer_chunks if shuffle else 1, keep, dtype)
        if shuffle:
            groups = _permuted_groups(groups, rng)
        yield from _rebatched(groups, batch_size, drop_last)

    def iter_chunks(self, layer: int, chunks: Sequence[int], *, samples: np.ndarray | None = None,
                    exclude_rows: np.ndarray | None = None, stream: str = "cond", dtype=np.float32
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(chunk, its selected rows, their global indices) for each of ``chunks`` with any row selected."""
        chunk = self.chunk_rows(layer, stream)
        keep = self._row_mask(None, samples, exclude_rows)
        for c in chunks:
            for x, rows in self._read_chunk_groups(acts_name(layer, stream), chunk, [c], 1, keep, dtype):
                yield int(c), x, rows

    def _chunk_order(self, layer: int, stream: str, shuffle: bool, seed: int) -> "_ChunkOrder":
        n_chunks = -(-self.n_rows // self.chunk_rows(layer, stream))
        rng = np.random.default_rng(seed)
        return _ChunkOrder(rng.permutation(n_chunks) if shuffle else np.arange(n_chunks), rng)

    def lane_rows(self, layer: int, lanes: int, *, shuffle: bool = False, seed: int = 0,
                  samples: np.ndarray | None = None, exclude_rows: np.ndarray | None = None,
                  stream: str = "cond", kept_per_chunk: np.ndarray | None = None) -> np.ndarray:
        """Rows each of ``lanes`` lanes yields for these options (from metadata: nothing is read).
        ``kept_per_chunk`` (from ``kept_rows_per_chunk``) saves recounting the selection."""
        if kept_per_chunk is None:
            kept_per_chunk = self.kept_rows_per_chunk(layer, samples=samples, exclude_rows=exclude_rows, stream=stream)
        order = self._chunk_order(layer, stream, shuffle, seed).chunks
        return np.array([int(kept_per_chunk[order[j::lanes]].sum()) for j in range(lanes)])

    def kept_rows_per_chunk(self, layer: int, *, samples: np.ndarray | None = None,
                            exclude_rows: np.ndarray | None = None, stream: str = "cond") -> np.ndarray:
        """Rows of each chunk that a selection (``samples``, less ``exclude_rows``) keeps."""
        chunk = self.chunk_rows(layer, stream)
        keep = self._row_mask(None, samples, exclude_rows)
        return np.array([int(keep(lo, min(self.n_rows, lo + chunk)).sum()) for lo in range(0, self.n_rows, chunk)],
                        dtype=np.int64)

    def _row_mask(self, rows, samples, exclude_rows) -> Callable[[int, int], np.ndarray]:
        """``keep(lo, hi)``: which of the global rows [lo, hi) the selection reads."""
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

    def _read_chunk_groups(self, name: str, chunk: int, order: np.ndarray, group_chunks: int, keep, dtype
                           ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, global indices) kept from each group of ``group_chunks`` chunks taken in ``order``;
        chunks with nothing kept are not read."""
        for group_start in range(0, len(order), group_chunks):
            xs, idx = [], []
            for c in order[group_start : group_start + group_chunks]:
                lo, hi = int(c) * chunk, min(self.n_rows, (int(c) + 1) * chunk)
                mask = keep(lo, hi)
                if not mask.any():
                    continue
                block, index = self.read_rows(name, lo, hi), np.arange(lo, hi)
                xs.append(block if mask.all() else block[mask])
                idx.append(index if mask.all() else index[mask])
            if xs:
                yield np.concatenate(xs).astype(dtype, copy=False), np.concatenate(idx)

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
        itemsize = _itemsize(self.meta.dtype)
        return {
            "samples": self.n_samples,
            "rows": self.n_rows,
            "layers": list(self.layers),
            "d_model": self.d_model,
            "bytes_per_layer": self.n_rows * self.d_model * itemsize,
            "seconds_of_audio": self.n_rows / self.meta.frame_rate if self.meta.frame_rate else 0.0,
            "complete": self.complete,
        }


# `Error reading local file "<array>/c/<row chunk>/0": <what>`: how tensorstore names a chunk it cannot read.
_CHUNK_FILE = re.compile(r'local file "([^"]*/c/(\d+)(?:/\d+)*)"')
PLAN_ARRAYS = ("offsets", "frames")  # written at creation from samples.jsonl, never by a batch
_UNITS = "progress/units/"  # a bucket's commit log: one object per committed unit


def sample_blocks(offsets: np.ndarray, max_rows: int, samples: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Runs of whole samples (``samples`` sorted, default all) of at most ``max_rows`` rows in all (a
    longer sample comes alone): the blocks of ``Store.iter_sample_blocks``, from the offsets alone."""
    chosen = np.arange(len(offsets) - 1) if samples is None else np.sort(np.asarray(samples, dtype=np.int64))
    i = 0
    while i < len(chosen):
        j = i + 1
        rows = offsets[chosen[i] + 1] - offsets[chosen[i]]
        while j < len(chosen) and rows + offsets[chosen[j] + 1] - offsets[chosen[j]] <= max_rows:
            rows += offsets[chosen[j] + 1] - offsets[chosen[j]]
            j += 1
        yield chosen[i:j]
        i = j


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _problem(err: BaseException) -> str:
    """What is wrong with a chunk file tensorstore could not read, said of the file."""
    text = str(err)
    if "Digest mismatch" in text:
        return "fails its crc32c checksum (garbled bytes)"
    if "Not enough data" in text:
        return "is truncated"
    return f"cannot be read ({_first_line(err)})"


def _batches(units) -> str:
    """``{0, 1, 2, 5}`` -> ``batches 0-2, 5``; ``{3}`` -> ``batch 3``."""
    parts: list[list[int]] = []
    for u in sorted(units):
        if parts and u == parts[-1][1] + 1:
            parts[-1][1] = u
        else:
            parts.append([u, u])
    numbers = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts) or "none"
    return f"batch {numbers}" if len(units) == 1 else f"batches {numbers}"


def _commits(log: Path) -> list[int]:
    """The units a progress file commits; a line cut by a kill (or otherwise unreadable) is no commit."""
    units = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            units.append(int(json.loads(line)["unit"]))
        except (ValueError, KeyError, TypeError):
            continue
    return units


def _torn_lines(log: Path) -> list[int]:
    """1-based numbers of the progress lines that do not read as a commit (cut by a kill)."""
    torn = []
    for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
        try:
            int(json.loads(line)["unit"])
        except (ValueError, KeyError, TypeError):
            torn.append(number)
    return torn


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


@dataclass(frozen=True)
class _ChunkOrder:
    """The order chunks are visited in, and the generator that drew it (it goes on to permute rows)."""

    chunks: np.ndarray
    rng: np.random.Generator


def _permuted_groups(groups, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each group's rows (and their indices) in a random order."""
    for x, index in groups:
        perm = rng.permutation(len(index))
        yield x[perm], index[perm]


def _rebatched(groups, batch_size: int, drop_last: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The groups' rows and indices cut into batches of ``batch_size`` (the last short unless ``drop_last``)."""
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


def open_store(path: str | os.PathLike, *, require_complete: bool = True) -> Store:
    """Open a store for reading; by default refuse one whose extraction has not finished."""
    store = Store(path)
    store.check_samples_file()
    if require_complete:
        store.require_complete()
    return store


# -- check and repair -----------------------------------------------------------------------
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
        batches = f", {_batches(self.units)}" if self.units else ""
        return f"{_describe_array(self.array)} rows {self.rows[0]}:{self.rows[1]}{batches}: {self.file} {self.problem}"


def find_damage(store: Store, group_chunks: int = 8) -> list[Damage]:
    """Read every chunk of every array once (``group_chunks`` at a time); the chunks that fail, and
    the missing activation chunks of committed rows."""
    committed, damage = store.committed_units(), []
    for name in store.array_names():
        arr, chunk = store.array(name), store.chunk_rows_of(name)
        starts = list(range(0, arr.shape[0], chunk))
        present = set(store.where.list(f"{name}/c/")) if name.endswith("/acts") else set()
        for first in range(0, len(starts), group_chunks):
            reads = [(lo, min(arr.shape[0], lo + chunk)) for lo in starts[first : first + group_chunks]]
            for (lo, hi), read in zip(reads, [arr[lo:hi].read() for lo, hi in reads]):
                units = () if name in PLAN_ARRAYS else tuple(store.units_of_rows(lo, hi))
                key, file = store.chunk_key(name, lo // chunk), store.chunk_file(name, lo // chunk)
                try:
                    read.result()
                except ValueError as err:
                    damage.append(Damage(name, file, (lo, hi), _problem(err), units, key))
                    if name == "offsets":  # the rest is mapped to batches with offsets rebuilt from the plan
                        store._offsets = _planned_offsets(store.samples)
                    continue
                # A missing chunk reads as zeros; committed activations are never all zero (codes may be).
                if name.endswith("/acts") and key not in present and committed.intersection(units):
                    damage.append(Damage(name, file, (lo, hi), "is missing", units, key))
    return damage


def _planned_offsets(samples: Sequence[dict]) -> np.ndarray:
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([int(s["n_frames"]) for s in samples], out=offsets[1:])
    return offsets


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
        offsets = _planned_offsets(store.samples)
        store.write_rows("offsets", 0, offsets)
        store.write_rows("frames", 0, np.concatenate([np.arange(n, dtype=np.int32) for n in np.diff(offsets)]))
    units = {u for d in damage for u in d.units}
    if store.where.local is None:
        for unit in sorted(units):
            store.where.delete(f"{_UNITS}{unit}")
        return damage
    for log in (store.where.local / "progress").glob("*.jsonl") if units else ():
        write_text(log, "".join(json.dumps({"unit": u}) + "\n" for u in _commits(log) if u not in units))
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
                             f"{f' ({_batches(units)})' if units else ''}; run python -m sae_core.store repair "
                             f"{store.path} and then rerun the same extract command")
        logs = (store.where.local / "progress").glob("*.jsonl") if store.where.local is not None else ()
        for log in sorted(logs):
            for number in _torn_lines(log):
                print(f"torn: {log.relative_to(store.path)} line {number} is a commit cut by a kill; its batch "
                      "counts as unfinished: rerun the same extract command to redo it")
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
        print(f"{where}: un-committed {_batches(units)} of {store.meta.n_units}; rerun the same extract command "
              "(each --shard of it) to recompute them")
    else:
        print(f"{where}: offsets and frames rewritten from samples.jsonl; nothing to recompute")
    return damage


def main(argv: list[str] | None = None):
    import sys

    from .cli import run_main

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

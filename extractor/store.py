"""The activation store: the one module that knows the on-disk layout.

A store is a directory::

    store.json            model, layers, widths, frame rate, dtype, mode, generation parameters
    samples.jsonl         one line per sample: prompt, source id, tags, seed, n_frames
    offsets               zarr3 int64 [n_samples + 1]; rows of sample i are offsets[i]:offsets[i+1]
    codes                 zarr3 int32 [n_rows, n_codebooks]; the audio codes of each row's frame
    frames                zarr3 int32 [n_rows]; the frame index of each row inside its sample
    layer{N}/acts         zarr3 [n_rows, d_model]; the residual stream after decoder block N
    uncond/layer{N}/acts  the unconditional (null-text) stream, only when it was asked for
    progress/*.jsonl      committed work units, one file per extraction shard

The whole plan (samples, offsets, array shapes) is written before any activation, so
extraction fills fixed row ranges: a killed run resumes after its last committed unit and
several processes can fill one store. Reading needs numpy and tensorstore only, never torch.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from .errors import UsageError
from .files import staged_dir, write_json

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


def _array_path(root: Path, name: str) -> Path:
    return root / name


def acts_name(layer: int, stream: str = "cond") -> str:
    """Relative path of a layer's activation array for one guidance stream."""
    return f"layer{layer}/acts" if stream == "cond" else f"{stream}/layer{layer}/acts"


def _spec(path: Path, shape: Sequence[int], dtype: str, chunk_rows: int) -> dict:
    chunk = [min(chunk_rows, max(1, shape[0]))] + list(shape[1:])
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            # Explicit plain codec: the default sharding codec writes ~10 MB/s here.
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
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
    Several processes may race to create the same store: one wins, the others open it.
    """
    path = Path(path)
    offsets = np.zeros(len(n_frames) + 1, dtype=np.int64)
    np.cumsum(np.asarray(n_frames, dtype=np.int64), out=offsets[1:])
    if meta.n_rows != int(offsets[-1]) or meta.n_samples != len(samples) or len(samples) != len(n_frames):
        raise StoreError("store plan is inconsistent: rows, samples and frame counts disagree")
    with staged_dir(path, tag="creating") as tmp:
        _write_plan(tmp, meta, samples, n_frames, offsets, codes, unit_rows)
    return Store(path)


def _write_plan(root: Path, meta: StoreMeta, samples: Sequence[dict], n_frames: Sequence[int], offsets: np.ndarray,
                codes: np.ndarray | None, unit_rows: int | None) -> None:
    """Every file of a new store under ``root``: offsets, codes, frames, empty activation arrays,
    samples.jsonl, progress/ and, last, store.json."""
    n_rows = meta.n_rows
    _open_new(root / "offsets", [len(offsets)], "int64", len(offsets)).write(offsets).result()
    # Codes and frames share the activations' row chunking: a unit's write touches the same
    # few chunks in every array instead of rewriting one huge codes chunk.
    chunk = chunk_rows_for(meta.d_model * _itemsize(meta.dtype), unit_rows)
    codes_arr = _open_new(root / "codes", [n_rows, meta.n_codebooks], "int32", chunk)
    if codes is not None:
        codes_arr.write(np.asarray(codes, dtype=np.int32)).result()
    frames = np.concatenate([np.arange(n, dtype=np.int32) for n in n_frames]) if n_rows else np.zeros(0, np.int32)
    _open_new(root / "frames", [n_rows], "int32", chunk).write(frames).result()
    for stream in meta.streams:
        for layer in meta.layers:
            (root / acts_name(layer, stream)).parent.mkdir(parents=True, exist_ok=True)
            _open_new(root / acts_name(layer, stream), [n_rows, meta.d_model], meta.dtype, chunk)
    with open(root / "samples.jsonl", "w") as f:
        for rec in samples:
            f.write(json.dumps(rec) + "\n")
    (root / "progress").mkdir()
    write_json(root / "store.json", meta.to_json())


def _open_new(path: Path, shape, dtype: str, chunk_rows: int):
    spec = _spec(path, shape, dtype, chunk_rows)
    return ts.open(spec, create=True, delete_existing=True).result()


def remove_store(path: str | os.PathLike) -> None:
    """Delete a store directory, refusing anything that is not one."""
    path = Path(path)
    if not path.exists():
        return
    if not (path / "store.json").exists():
        raise StoreError(f"{path} exists and is not an activation store; refusing to delete it")
    shutil.rmtree(path)


class Store:
    """Reader (and, for extraction, row writer) of one activation store."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "store.json"
        if not meta_file.exists():
            raise StoreError(f"no activation store at {self.path} (missing store.json); run python -m extractor.extract first")
        self.meta = StoreMeta.from_json(json.loads(meta_file.read_text()))
        self._arrays: dict[str, ts.TensorStore] = {}
        self._offsets: np.ndarray | None = None
        self._samples: list[dict] | None = None

    # -- layout ---------------------------------------------------------------------------
    def array(self, name: str) -> ts.TensorStore:
        """Open (once) one of the store's arrays by its relative name."""
        if name not in self._arrays:
            path = _array_path(self.path, name)
            if not path.exists():
                raise StoreError(f"store {self.path} has no array {name}")
            self._arrays[name] = ts.open(
                {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, open=True
            ).result()
        return self._arrays[name]

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
            self._offsets = np.asarray(self.array("offsets").read().result())
        return self._offsets

    @property
    def samples(self) -> list[dict]:
        if self._samples is None:
            with open(self.path / "samples.jsonl") as f:
                self._samples = [json.loads(line) for line in f if line.strip()]
        return self._samples

    def check_layer(self, layer: int, stream: str = "cond") -> None:
        if layer not in self.meta.layers:
            raise StoreError(f"store {self.path} has no layer {layer}; it holds layers {list(self.meta.layers)}")
        if stream not in self.meta.streams:
            raise StoreError(f"store {self.path} has no {stream!r} stream; it holds {list(self.meta.streams)}")

    def acts(self, layer: int, stream: str = "cond") -> ts.TensorStore:
        self.check_layer(layer, stream)
        return self.array(acts_name(layer, stream))

    # -- progress -------------------------------------------------------------------------
    def committed_units(self) -> set[int]:
        done: set[int] = set()
        for f in (self.path / "progress").glob("*.jsonl"):
            for line in f.read_text().splitlines():
                if line.strip():
                    try:
                        done.add(int(json.loads(line)["unit"]))
                    except (ValueError, KeyError, json.JSONDecodeError):
                        continue  # a line cut by a kill is not a commit
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
        """Record that work unit ``unit`` is fully written (durably, after its data)."""
        with open(self.path / "progress" / f"{shard}.jsonl", "a") as f:
            f.write(json.dumps({"unit": unit}) + "\n")
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
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return np.asarray(self.acts(layer, stream)[lo:hi].read().result())

    def sample_codes(self, index: int) -> np.ndarray:
        """Audio codes of one sample, [n_frames, n_codebooks]."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return np.asarray(self.array("codes")[lo:hi].read().result())

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
        return int(self.acts(layer, stream).chunk_layout.read_chunk.shape[0])

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
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ([batch_size, d_model] batches, the global row index of every row); the last batch
        may be short unless ``drop_last``.

        Sequential by default. With ``shuffle``, chunks are visited in a seeded random order
        and rows are permuted inside a buffer of ``buffer_chunks`` chunks, so memory stays bounded
        by the buffer, not by the store. ``rows`` / ``samples`` restrict reading to a subset
        (``samples``: the rows of those samples, memory per sample, not per row); ``exclude_rows``
        drops a few rows (e.g. non-finite ones).
        """
        if batch_size <= 0:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        chunk = self.chunk_rows(layer, stream)
        n_chunks = -(-self.n_rows // chunk)
        rng = np.random.default_rng(seed)
        order = rng.permutation(n_chunks) if shuffle else np.arange(n_chunks)
        keep = self._row_mask(rows, samples, exclude_rows)
        groups = self._read_chunk_groups(self.acts(layer, stream), chunk, order, buffer_chunks if shuffle else 1,
                                         keep, dtype)
        if shuffle:
            groups = _permuted_groups(groups, rng)
        yield from _rebatched(groups, batch_size, drop_last)

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

    def _read_chunk_groups(self, arr, chunk: int, order: np.ndarray, group_chunks: int, keep, dtype
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
                block, index = np.asarray(arr[lo:hi].read().result()), np.arange(lo, hi)
                xs.append(block if mask.all() else block[mask])
                idx.append(index if mask.all() else index[mask])
            if xs:
                yield np.concatenate(xs).astype(dtype, copy=False), np.concatenate(idx)

    def iter_sample_blocks(
        self, layer: int, max_rows: int, *, samples: np.ndarray | None = None, stream: str = "cond",
        dtype=np.float32,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (sample indices, rows) for runs of whole consecutive samples of at most ``max_rows``
        rows in all (a longer sample comes alone). Rows of sample i follow those of sample i - 1."""
        arr = self.acts(layer, stream)
        chosen = np.arange(self.n_samples) if samples is None else np.sort(np.asarray(samples, dtype=np.int64))
        offsets = self.offsets
        i = 0
        while i < len(chosen):
            j = i + 1
            rows = offsets[chosen[i] + 1] - offsets[chosen[i]]
            while j < len(chosen) and rows + offsets[chosen[j] + 1] - offsets[chosen[j]] <= max_rows:
                rows += offsets[chosen[j] + 1] - offsets[chosen[j]]
                j += 1
            block = chosen[i:j]
            contiguous = np.all(np.diff(block) == 1)
            if contiguous:
                x = np.asarray(arr[offsets[block[0]] : offsets[block[-1] + 1]].read().result())
            else:
                x = np.concatenate([np.asarray(arr[offsets[s] : offsets[s + 1]].read().result()) for s in block])
            yield block, x.astype(dtype, copy=False)
            i = j

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
    if require_complete:
        store.require_complete()
    return store

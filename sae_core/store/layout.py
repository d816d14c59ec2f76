"""The store's layout: what its files and arrays are, how a new one is planned and created, and
how one is removed. ``reader.Store`` opens what this module creates.

A store is a directory, or a prefix in a bucket (``gs://``, ``s3://``; see ``sae_core.location``)::

    store.json            model, layers, widths, frame rate, dtype, mode, generation parameters
    samples.jsonl         one line per sample: prompt, source id, tags, seed, n_frames
    offsets               zarr3 int64 [n_samples + 1]; rows of sample i are offsets[i]:offsets[i+1]
    codes                 zarr3 int32 [n_rows, n_codebooks]; the audio codes of each row's frame
    frames                zarr3 int32 [n_rows]; the frame index of each row inside its sample
    layer{N}/acts         zarr3 [n_rows, d_model]; the residual stream after decoder block N
    uncond/layer{N}/acts  the unconditional (null-text) stream, only when it was asked for
    mlp_in/layer{N}/acts, mlp_out/layer{N}/acts
                          block N's MLP input (after its layer norm) and output, when asked for (--mlp)
    progress/*.jsonl      committed work units, one file per extraction shard (a directory)
    progress/units/{u}    committed work unit u, one object each (a bucket: objects cannot be appended to)

The whole plan (samples, offsets, array shapes) is written before any activation, so
extraction fills fixed row ranges: a killed run resumes after its last committed unit
(``commits``) and several processes can fill one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from ..errors import UsageError
from ..location import Location, transport_failure

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


# Streams besides the residual stream's "cond" and "uncond": each chosen layer's MLP input (after its
# layer norm) and output (before the residual add), a transcoder's data (``extractor.extract --mlp``).
MLP_STREAMS = ("mlp_in", "mlp_out")
# Read-only streams made of stored ones side by side: "mlp" is [mlp_in | mlp_out], 2 x d_model wide,
# one row per token (a transcoder's input and target in one batch).
PAIRED_STREAMS = {"mlp": MLP_STREAMS}


def paired_parts(name: str) -> tuple[str, ...] | None:
    """The stored arrays a paired stream's array name reads side by side (None for a stored array)."""
    found = re.fullmatch(r"(\w+)/(layer\d+/acts)", name)
    if found is None or found.group(1) not in PAIRED_STREAMS:
        return None
    return tuple(f"{part}/{found.group(2)}" for part in PAIRED_STREAMS[found.group(1)])


def acts_name(layer: int, stream: str = "cond") -> str:
    """Relative path of a layer's activation array for one stream (guidance stream or MLP site)."""
    return f"layer{layer}/acts" if stream == "cond" else f"{stream}/layer{layer}/acts"


def describe_array(name: str) -> str:
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


def chunk_key(name: str, index: int, rank: int) -> str:
    """The key of row chunk ``index`` of array ``name`` of ``rank`` dimensions (zarr3's default keys)."""
    return "/".join([name, "c", str(index)] + ["0"] * (rank - 1))


def chunk_rows_for(row_bytes: int, unit_rows: int | None = None) -> int:
    """Rows per chunk so that a chunk holds about TARGET_CHUNK_BYTES: a whole number of write
    units when every unit has ``unit_rows`` rows (writes then never straddle chunks), else a
    power of two."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    if unit_rows:
        return unit_rows * max(1, round(rows / unit_rows))
    return 1 << (rows.bit_length() - 1)


def itemsize(dtype: str) -> int:
    """Bytes per element of a store dtype."""
    return {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}[dtype]


def estimate_bytes(n_rows: int, meta_layers: int, d_model: int, dtype: str, n_codebooks: int, streams: int) -> int:
    """Bytes a store of this plan will take on disk."""
    return n_rows * (meta_layers * streams * d_model * itemsize(dtype) + 4 * n_codebooks + 4)


def write_plan(root: Location, meta: StoreMeta, samples: Sequence[dict], n_frames: Sequence[int], offsets: np.ndarray,
               codes: np.ndarray | None, unit_rows: int | None) -> None:
    """Every file of a new store under ``root``: offsets, codes, frames, empty activation arrays,
    samples.jsonl, progress/ and, last, store.json."""
    n_rows = meta.n_rows
    _open_new(root.spec("offsets"), [len(offsets)], "int64", len(offsets)).write(offsets).result()
    # Codes and frames share the activations' row chunking: a unit's write touches the same
    # few chunks in every array instead of rewriting one huge codes chunk.
    chunk = chunk_rows_for(meta.d_model * itemsize(meta.dtype), unit_rows)
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
    store_json = {**meta.to_json(), "samples_file": samples_digest(text.encode())}
    root.write("store.json", (json.dumps(store_json, indent=2) + "\n").encode())


def samples_digest(data: bytes) -> dict:
    """What store.json records of samples.jsonl, to tell a truncated or altered one."""
    return {"lines": data.count(b"\n"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _open_new(kvstore: dict, shape, dtype: str, chunk_rows: int):
    """A new array, or (a racing creator of the same store in a bucket) the identical one already there."""
    spec = _spec(kvstore, shape, dtype, chunk_rows)
    try:
        return ts.open(spec, create=True, open=True).result()
    except ValueError as err:
        if transport_failure(err):
            raise  # the caller names the bucket (an outage, not other settings)
        raise StoreError(f"{kvstore['path']} holds an array of other settings ({first_line(err)}): a store "
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


PLAN_ARRAYS = ("offsets", "frames")  # written at creation from samples.jsonl, never by a batch


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


def first_line(err: BaseException) -> str:
    """An error's first line (its type's name when it has no text)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def planned_offsets(samples: Sequence[dict]) -> np.ndarray:
    """Sample offsets as the samples' records plan them (what ``offsets`` holds when intact)."""
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([int(s["n_frames"]) for s in samples], out=offsets[1:])
    return offsets


def problem_of(err: BaseException) -> str:
    """What is wrong with a chunk file tensorstore could not read, said of the file."""
    text = str(err)
    if "Digest mismatch" in text:
        return "fails its crc32c checksum (garbled bytes)"
    if "Not enough data" in text:
        return "is truncated"
    return f"cannot be read ({first_line(err)})"


def batches_text(units) -> str:
    """``{0, 1, 2, 5}`` -> ``batches 0-2, 5``; ``{3}`` -> ``batch 3``."""
    parts: list[list[int]] = []
    for u in sorted(units):
        if parts and u == parts[-1][1] + 1:
            parts[-1][1] = u
        else:
            parts.append([u, u])
    numbers = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts) or "none"
    return f"batch {numbers}" if len(units) == 1 else f"batches {numbers}"

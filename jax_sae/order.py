"""The order training reads a store in: seeded, chunk-shuffled, and split into lanes.

An epoch visits the store's row chunks in a seeded random order and permutes rows inside a
buffer of a few chunks, so memory stays bounded by the buffer, not the store. With ``lanes`` L,
each batch is L equal slices and slice j comes from lane j: every L-th chunk of the epoch's
order from the j-th on, with its own seeded row order. A batch therefore never depends on which
process reads it, and a process reads only the lanes that land on its own devices (``data_lanes``).
The store supplies the chunks (``Store.read_chunks``) and the row selection; the order is here,
next to its only user.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sae_core.store import Store, acts_name, rebatched


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def lane_buffer_chunks(lanes: int) -> int:
    """Chunks each lane shuffles its rows within: 4 in all for one lane, 1 per lane from 4 lanes on."""
    return max(1, 4 // lanes)


def chunk_order(store: Store, layer: int, seed: int, stream: str = "cond") -> tuple[np.ndarray, np.random.Generator]:
    """The epoch's chunk order, and the generator that drew it (one lane goes on to permute rows with it)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(-(-store.n_rows // store.chunk_rows(layer, stream))), rng


def lane_rows_shuffled(store: Store, layer: int, batch_size: int, *, seed: int, lane: tuple[int, int] = (0, 1),
                       samples: np.ndarray | None = None, exclude_rows: np.ndarray | None = None,
                       stream: str = "cond", drop_last: bool = False, buffer_chunks: int = 4,
                       dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """([batch_size, d_model] batches, the global row index of every row) of lane ``lane=(j, L)``
    in the seeded order: its chunks in the epoch's order, rows permuted within ``buffer_chunks``
    chunks; ``samples`` / ``exclude_rows`` select rows as ``Store.selection`` does."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    j, lanes = lane
    order, rng = chunk_order(store, layer, seed, stream)
    rng = rng if lanes == 1 else np.random.default_rng([seed, lanes, j])
    groups = store.read_chunks(acts_name(layer, stream), order[j::lanes], buffer_chunks,
                               store.selection(None, samples, exclude_rows), dtype)
    yield from rebatched(_permuted(groups, rng), batch_size, drop_last)


def lane_rows(store: Store, layer: int, lanes: int, *, seed: int, kept_per_chunk: np.ndarray,
              stream: str = "cond") -> np.ndarray:
    """Rows each of ``lanes`` lanes yields in the order of ``seed`` (``kept_per_chunk`` from
    ``Store.kept_rows_per_chunk``: nothing is read)."""
    order, _ = chunk_order(store, layer, seed, stream)
    return np.array([int(kept_per_chunk[order[j::lanes]].sum()) for j in range(lanes)])


def epoch_batches(store: Store, layer: int, samples: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  skip: int = 0, exclude_rows: np.ndarray | None = None, lanes: int = 1,
                  read_lanes: Sequence[int] | None = None, batches: int | None = None,
                  stream: str = "cond") -> Iterator[np.ndarray]:
    """One epoch of full batches in the seeded order; ``skip`` resumes mid-epoch. Only the
    ``read_lanes`` (default all) are read and filled; the rest of each batch is left as zeros (a
    process fills the slices that land on its own devices). ``batches`` is the epoch's length
    (``epoch_lengths``); by default, the full batches every lane can fill."""
    per_lane = batch_size // lanes
    read = range(lanes) if read_lanes is None else sorted(read_lanes)
    seed = epoch_seed(seed, epoch)
    streams = {j: lane_rows_shuffled(store, layer, per_lane, seed=seed, lane=(j, lanes), samples=samples,
                                     exclude_rows=exclude_rows, stream=stream, drop_last=True,
                                     buffer_chunks=lane_buffer_chunks(lanes))
               for j in read}
    if batches is None:
        kept = store.kept_rows_per_chunk(layer, samples=samples, exclude_rows=exclude_rows, stream=stream)
        batches = int(lane_rows(store, layer, lanes, seed=seed, kept_per_chunk=kept, stream=stream).min()) // per_lane
    for i in range(batches):
        x = np.zeros((batch_size, store.width(stream)), np.float32) if len(read) < lanes else None
        parts = []
        for j, stream in streams.items():
            part, _ = next(stream)
            if x is None:
                parts.append(part)
            else:
                x[j * per_lane:(j + 1) * per_lane] = part
        if i >= skip:
            yield np.concatenate(parts) if x is None else x


def epoch_lengths(store: Store, layer: int, samples: np.ndarray, batch_size: int, *, seed: int, epochs: int,
                  lanes: int, exclude_rows: np.ndarray | None = None, stream: str = "cond") -> list[int]:
    """Full batches in each epoch (every lane fills its slice of each; from metadata, nothing is read)."""
    kept = store.kept_rows_per_chunk(layer, samples=samples, exclude_rows=exclude_rows, stream=stream)
    per_lane = batch_size // lanes
    return [int(lane_rows(store, layer, lanes, seed=epoch_seed(seed, e), kept_per_chunk=kept,
                          stream=stream).min()) // per_lane
            for e in range(epochs)]


def _permuted(groups, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each group's rows (and their indices) in a random order."""
    for x, index in groups:
        perm = rng.permutation(len(index))
        yield x[perm], index[perm]

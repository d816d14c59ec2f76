"""Training data from the activation store: whole-sample splits, token budgets, a scan for
non-finite rows and the input scale, and a bounded, prefetching shuffled batch stream."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from sae_core.errors import UsageError
from sae_core.store import Store


class DataError(UsageError):
    """Training data that cannot be used as asked."""


@dataclass(frozen=True)
class DataSplit:
    """Which samples train and which validate; all choices are seeded."""

    train_samples: np.ndarray
    val_samples: np.ndarray
    train_rows: int
    val_rows: int
    notes: tuple[str, ...]


def _rows_of(store: Store, samples: np.ndarray) -> int:
    offsets = store.offsets
    return int(np.sum(offsets[samples + 1] - offsets[samples]))


def _take_budget(store: Store, samples: np.ndarray, budget: int) -> np.ndarray:
    """The longest prefix of ``samples`` whose rows fit in ``budget`` (at least one sample)."""
    lengths = store.offsets[samples + 1] - store.offsets[samples]
    n = max(1, int(np.searchsorted(np.cumsum(lengths), budget, side="right")))
    return samples[:n]


def split_samples(
    store: Store,
    *,
    val_fraction: float,
    seed: int,
    num_samples: int | None = None,
    max_tokens: int | None = None,
    val_max_tokens: int | None = None,
    by_chunks_of: int | None = None,
) -> DataSplit:
    """Hold out whole samples for validation (never the last rows), then apply the budgets.

    ``by_chunks_of`` (the store's rows per chunk): the held-out samples are those lying wholly in a
    few random whole chunks, so each validation reads about its own rows' worth of chunks instead
    of nearly every chunk of the store, as randomly scattered samples do. Without it, samples are
    drawn one by one."""
    notes = []
    order = np.random.default_rng(seed).permutation(store.n_samples)
    if num_samples is not None:
        if num_samples < 2 and val_fraction > 0:
            raise DataError("--num_samples must be at least 2 to hold out a validation sample")
        order = order[:num_samples]
    n_val = int(round(len(order) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = min(max(1, n_val), len(order) - 1)
    if len(order) - n_val < 1:
        raise DataError(f"the store has {store.n_samples} samples: too few to train and validate")
    held = _chunks_first(store, order, by_chunks_of, seed) if by_chunks_of else order
    val = np.sort(held[:n_val])
    train = order[~np.isin(order, val)]  # in the random order: --max_tokens keeps a random subset
    if max_tokens is not None and _rows_of(store, train) > max_tokens:
        before = _rows_of(store, train)
        train = _take_budget(store, train, max_tokens)
        notes.append(
            f"subsampled training data to {len(train)} of {len(order) - n_val} samples "
            f"({_rows_of(store, train)} of {before} tokens) to fit --max_tokens {max_tokens}"
        )
    if val_max_tokens is not None and len(val) and _rows_of(store, val) > val_max_tokens:
        first = held[:n_val] if by_chunks_of else np.random.default_rng(seed + 1).permutation(val)
        val = np.sort(_take_budget(store, first, val_max_tokens))
    train = np.sort(train)
    return DataSplit(train, val, _rows_of(store, train), _rows_of(store, val) if len(val) else 0, tuple(notes))


def _chunks_first(store: Store, order: np.ndarray, chunk_rows: int, seed: int) -> np.ndarray:
    """``order``'s samples in the order whole chunks free them: chunks are taken in a seeded random
    order, and a sample comes once every chunk it has rows in is taken (ties in ``order``'s order).
    A prefix of this order is the samples of a few whole chunks, so reading them reads no other chunk."""
    first_S = store.offsets[order] // chunk_rows
    last_S = np.maximum(store.offsets[order + 1] - 1, store.offsets[order]) // chunk_rows
    n_chunks = int(last_S.max()) + 1 if len(order) else 0
    rank_C = np.random.default_rng([seed, 1]).permutation(n_chunks)
    freed_S = rank_C[first_S]
    for step in range(1, int((last_S - first_S).max()) + 1 if len(order) else 1):
        freed_S = np.maximum(freed_S, rank_C[np.minimum(first_S + step, last_S)])
    return order[np.lexsort((np.arange(len(order)), freed_S))]


@dataclass(frozen=True)
class ScanResult:
    """One pass over the training rows: what the trainer must know before any compute."""

    nonfinite_rows: np.ndarray
    mean_norm: float
    sample_BD: np.ndarray
    norm_C: np.ndarray  # per chunk: sum of the finite rows' norms, and their count
    count_C: np.ndarray
    keys: np.ndarray  # the sample's row keys (``row_keys``), ascending


def row_keys(seed: int, rows: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) key per global row index, fixed by (seed, row) alone (splitmix64), so a
    sample of the smallest keys is the same whoever scans which rows."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        z = (np.asarray(rows, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def scan_rows(store: Store, layer: int, samples: np.ndarray, *, seed: int, sample_size: int = 8192,
              progress: bool = True, part: tuple[int, int] = (0, 1), stream: str = "cond") -> ScanResult:
    """Count non-finite rows, measure the mean row norm and keep a uniform sample of rows.

    Chunk by chunk, ``part=(p, P)`` scanning only every P-th chunk from the p-th; ``merge_scans``
    of the P parts equals the scan of one part of one (per-chunk sums added in chunk order,
    the sample the rows with the smallest ``row_keys``)."""
    from tqdm import tqdm

    p, parts = part
    chunk = store.chunk_rows(layer, stream)
    n_chunks = -(-store.n_rows // chunk)
    bad = []
    norm_C = np.zeros(n_chunks, np.float64)
    count_C = np.zeros(n_chunks, np.int64)
    keys = np.empty(0)
    kept = np.empty((0, store.width(stream)), np.float32)
    total = _rows_of(store, samples)
    with tqdm(total=total, desc="scanning rows", unit="row", disable=not progress, leave=False) as bar:
        for c, x, rows in store.iter_chunks(layer, np.arange(p, n_chunks, parts), samples=samples, stream=stream):
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                bad.append(rows[~finite])
                x, rows = x[finite], rows[finite]
            norm_C[c] += float(np.linalg.norm(x, axis=1).astype(np.float64).sum())
            count_C[c] += len(x)
            keys, kept = _smallest(np.concatenate([keys, row_keys(seed, rows)]), np.concatenate([kept, x]),
                                   sample_size)
            bar.update(len(rows))
    mine = ScanResult(nonfinite_rows=np.concatenate(bad) if bad else np.zeros(0, np.int64),
                      mean_norm=float("nan"), sample_BD=kept, norm_C=norm_C, count_C=count_C, keys=keys)
    return merge_scans([mine], sample_size) if parts == 1 else mine


def _smallest(keys: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` rows with the smallest keys, in key order."""
    order = np.argsort(keys, kind="stable")[:n]
    return keys[order], rows[order]


def merge_scans(parts: list[ScanResult], sample_size: int = 8192) -> ScanResult:
    """One ScanResult from the scans of disjoint parts (see ``scan_rows``)."""
    norm_C = np.sum([s.norm_C for s in parts], axis=0)  # each chunk's sum comes from one part: exact
    count = int(np.sum([s.count_C for s in parts]))
    if count == 0:
        raise DataError("every training row is non-finite (NaN or Inf); re-extract the store")
    keys, kept = _smallest(np.concatenate([s.keys for s in parts]), np.concatenate([s.sample_BD for s in parts]),
                           sample_size)
    return ScanResult(nonfinite_rows=np.sort(np.concatenate([s.nonfinite_rows for s in parts])),
                      mean_norm=float(np.sum(norm_C)) / count, sample_BD=kept,
                      norm_C=norm_C, count_C=np.sum([s.count_C for s in parts], axis=0), keys=keys)


def input_scale(mean_norm: float, d_model: int) -> float:
    """The one scalar that makes E||x|| = sqrt(d_model)."""
    if not mean_norm > 0:
        raise DataError("training rows are all zero; the store holds no signal")
    return float(np.sqrt(d_model) / mean_norm)


def geometric_median(x_ND: np.ndarray, iters: int = 100, eps: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm; robust initial decoder bias."""
    x = x_ND.astype(np.float64)
    median = x.mean(axis=0)
    for _ in range(iters):
        dist = np.maximum(np.linalg.norm(x - median, axis=1), eps)
        new = (x / dist[:, None]).sum(axis=0) / (1.0 / dist).sum()
        if np.linalg.norm(new - median) < eps * max(1.0, np.linalg.norm(median)):
            median = new
            break
        median = new
    return median.astype(np.float32)


def prefetch(iterator: Iterator, size: int = 3, transform=None) -> Iterator:
    """Run ``iterator`` (and ``transform``, e.g. a device put) in a thread, ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(transform(item) if transform else item)
        except BaseException as err:  # surface reader errors in the consumer
            q.put(err)
        q.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

"""Training data from the activation store: whole-sample splits, token budgets, a scan for
non-finite rows and the input scale, and a bounded, prefetching shuffled batch stream."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from extractor.errors import UsageError
from extractor.store import Store


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
) -> DataSplit:
    """Hold out whole samples for validation (never the last rows), then apply the budgets."""
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
    val, train = np.sort(order[:n_val]), order[n_val:]
    if max_tokens is not None and _rows_of(store, train) > max_tokens:
        before = _rows_of(store, train)
        train = _take_budget(store, train, max_tokens)
        notes.append(
            f"subsampled training data to {len(train)} of {len(order) - n_val} samples "
            f"({_rows_of(store, train)} of {before} tokens) to fit --max_tokens {max_tokens}"
        )
    if val_max_tokens is not None and len(val) and _rows_of(store, val) > val_max_tokens:
        val = np.sort(_take_budget(store, np.random.default_rng(seed + 1).permutation(val), val_max_tokens))
    train = np.sort(train)
    return DataSplit(train, val, _rows_of(store, train), _rows_of(store, val) if len(val) else 0, tuple(notes))


@dataclass(frozen=True)
class ScanResult:
    """One pass over the training rows: what the trainer must know before any compute."""

    nonfinite_rows: np.ndarray
    mean_norm: float
    sample_BD: np.ndarray


def scan_rows(store: Store, layer: int, samples: np.ndarray, *, seed: int, sample_size: int = 8192,
              batch_size: int = 8192, progress: bool = True) -> ScanResult:
    """Count non-finite rows, measure the mean row norm and keep a uniform sample of rows."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    bad, norm_sum, count = [], 0.0, 0
    keys = np.empty(0)
    kept = np.empty((0, store.d_model), np.float32)
    total = _rows_of(store, samples)
    with tqdm(total=total, desc="scanning rows", unit="row", disable=not progress, leave=False) as bar:
        for x, rows in store.iter_rows_indexed(layer, batch_size, samples=samples):
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                bad.append(rows[~finite])
                x = x[finite]
            norm_sum += float(np.linalg.norm(x, axis=1).astype(np.float64).sum())
            count += len(x)
            # Reservoir by random keys: the sample_size smallest keys are a uniform sample.
            new_keys = rng.random(len(x))
            keys = np.concatenate([keys, new_keys])
            kept = np.concatenate([kept, x])
            if len(keys) > sample_size:
                top = np.argpartition(keys, sample_size)[:sample_size]
                keys, kept = keys[top], kept[top]
            bar.update(len(rows))
    if count == 0:
        raise DataError("every training row is non-finite (NaN or Inf); re-extract the store")
    return ScanResult(
        nonfinite_rows=np.concatenate(bad) if bad else np.zeros(0, np.int64),
        mean_norm=norm_sum / count,
        sample_BD=kept,
    )


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


def epoch_batches(store: Store, layer: int, samples: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  skip: int = 0, exclude_rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """One epoch of full batches in a seeded chunk-shuffled order; ``skip`` resumes mid-epoch."""
    stream = store.iter_rows_indexed(layer, batch_size, shuffle=True, seed=seed * 100_003 + epoch, samples=samples,
                                     exclude_rows=exclude_rows, drop_last=True)
    for i, (x, _) in enumerate(stream):
        if i >= skip:
            yield x


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

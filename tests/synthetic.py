"""Synthetic activation stores with a known dictionary, for tests that need ground truth."""

from __future__ import annotations

import numpy as np

from sae_core.store import MLP_STREAMS, StoreMeta, acts_name, create_store


def planted_dictionary(d: int, n_features: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_features, d))
    return (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)


def sparse_data(directions: np.ndarray, n_rows: int, active: float, noise: float, seed: int) -> np.ndarray:
    """Rows that are sparse non-negative sums of the directions, with power-law feature
    frequencies (about ``active`` features per row on average) plus Gaussian noise."""
    rng = np.random.default_rng(seed + 1)
    n_features, d = directions.shape
    freq = 1.0 / np.arange(1, n_features + 1) ** 0.5
    freq = freq / freq.sum() * active
    on = rng.random((n_rows, n_features)) < np.minimum(freq, 1.0)
    magnitude = rng.uniform(0.5, 2.0, size=(n_rows, n_features)) * on
    x = magnitude @ directions + noise * rng.normal(size=(n_rows, d))
    return (x * 3.0 + 1.0).astype(np.float32)  # an offset and a scale the SAE must undo


def write_store(path, x: np.ndarray | dict, layer: int = 0, rows_per_sample: int = 50, tags=None,
                mlp: dict | None = None):
    """Write rows into a complete store; samples are consecutive row blocks. ``x``: one layer's rows
    (layer ``layer``), or {layer: rows} for several layers of the same shape; ``mlp``: {layer: (MLP
    input rows, MLP output rows)} of the same layers, stored as the mlp_in and mlp_out streams."""
    by_layer = x if isinstance(x, dict) else {layer: x}
    n_rows, d = next(iter(by_layer.values())).shape
    n_samples = n_rows // rows_per_sample
    meta = StoreMeta(model="synthetic", layers=tuple(by_layer), d_model=d, n_codebooks=4, frame_rate=50.0,
                     sampling_rate=32000, dtype="float32", mode="generate", n_samples=n_samples,
                     n_rows=n_samples * rows_per_sample, n_units=1,
                     streams=("cond",) + (MLP_STREAMS if mlp else ()))
    samples = [{"index": i, "prompt": f"sample {i}", "source_id": f"syn-{i}",
                "tags": list(tags[i]) if tags is not None else [], "n_frames": rows_per_sample}
               for i in range(n_samples)]
    store = create_store(path, meta, samples, [rows_per_sample] * n_samples)
    for index, rows in by_layer.items():
        store.write_rows(acts_name(index), 0, rows[: n_samples * rows_per_sample])
    for index, pair in (mlp or {}).items():
        for stream, rows in zip(MLP_STREAMS, pair):
            store.write_rows(acts_name(index, stream), 0, rows[: n_samples * rows_per_sample])
    store.commit_unit(0, "shard-0-of-1")
    return store


def planted_mlp(d: int, n_features: int, n_rows: int, active: float, seed: int):
    """(MLP inputs, MLP outputs, output directions) of an MLP computed by a known sparse dictionary:
    each input is a sparse non-negative sum of input directions a_i d_i (as ``sparse_data``, plus
    noise), and the output sum_i 2 relu(a_i - 1) e_i + 0.5 over other directions e_i: a feature
    reaches the output only past a threshold, which no linear map of the input does."""
    rng = np.random.default_rng(seed + 7)
    D_in, D_out = planted_dictionary(d, n_features, seed), planted_dictionary(d, n_features, seed + 100)
    freq = 1.0 / np.arange(1, n_features + 1) ** 0.5
    on = rng.random((n_rows, n_features)) < np.minimum(freq / freq.sum() * active, 1.0)
    a = rng.uniform(0.5, 2.5, size=(n_rows, n_features)) * on
    x = a @ D_in + 0.05 * rng.normal(size=(n_rows, d))
    y = 2.0 * np.maximum(a - 1.0, 0.0) @ D_out + 0.5
    return x.astype(np.float32), y.astype(np.float32), D_out


def mean_max_cosine(true_FD: np.ndarray, learned_HD: np.ndarray) -> float:
    """For each true direction, the best cosine with any learned decoder row, averaged."""
    learned = learned_HD / np.linalg.norm(learned_HD, axis=1, keepdims=True)
    return float(np.mean(np.max(true_FD @ learned.T, axis=1)))

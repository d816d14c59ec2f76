"""Each process reads only its share: lanes of a batch come from disjoint chunks, any subset of
lanes reads the same rows as the whole, and a row scan split by chunk merges into the whole scan."""

import numpy as np
import pytest

from sae_core.store import layout as store_module
from jax_sae.data import merge_scans, scan_rows
from jax_sae.order import epoch_batches, epoch_lengths, lane_rows_shuffled

from .synthetic import write_store


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 300 * 8 * 4)  # 300-row chunks
    x = np.random.default_rng(0).normal(size=(4000, 8)).astype(np.float32)
    x[x[:, 0] > 3.2] = np.nan  # a few non-finite rows
    return write_store(tmp_path / "store", x, rows_per_sample=40), x


def test_lanes_read_disjoint_chunks_and_any_subset_equals_the_whole(chunked):
    store, x = chunked
    samples = np.arange(0, store.n_samples, 2)  # every other sample: chunks keep different row counts
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    options = dict(seed=3, epoch=1, exclude_rows=bad, lanes=4)
    (length,) = epoch_lengths(store, 0, samples, 64, seed=3, epochs=2, lanes=4, exclude_rows=bad)[1:]
    whole = list(epoch_batches(store, 0, samples, 64, **options))
    assert len(whole) == length > 0
    store.bytes_read = 0
    halves = [list(epoch_batches(store, 0, samples, 64, read_lanes=lanes, **options)) for lanes in ((0, 1), (2, 3))]
    for full, first, second in zip(whole, *halves):
        np.testing.assert_array_equal(first[:32], full[:32])
        np.testing.assert_array_equal(second[32:], full[32:])
        assert not first[32:].any() and not second[:32].any()  # lanes not read are left empty
    rows = np.concatenate(whole)
    assert np.isfinite(rows).all() and len(np.unique(rows, axis=0)) == len(rows)  # no row twice
    # each lane draws from its own chunks: a row's chunk belongs to one lane only
    chunk = store.chunk_rows(0)
    index = {tuple(r): i for i, r in enumerate(x)}
    lanes_of_chunk = {}
    for batch in whole:
        for lane in range(4):
            for r in batch[lane * 16:(lane + 1) * 16]:
                lanes_of_chunk.setdefault(index[tuple(r)] // chunk, set()).add(lane)
    assert all(len(lanes) == 1 for lanes in lanes_of_chunk.values())


def test_one_lane_is_the_single_shuffled_stream(chunked):
    store, _ = chunked
    samples = np.arange(store.n_samples)
    plain = [b for b, _ in lane_rows_shuffled(store, 0, 64, seed=100_003 * 3 + 1, samples=samples, drop_last=True)]
    laned = list(epoch_batches(store, 0, samples, 64, seed=3, epoch=1, lanes=1))
    assert len(plain) == len(laned) and all(np.array_equal(a, b, equal_nan=True) for a, b in zip(plain, laned))


def test_a_scan_split_by_chunk_merges_into_the_whole_scan(chunked):
    store, _ = chunked
    samples = np.arange(store.n_samples)
    whole = scan_rows(store, 0, samples, seed=5, sample_size=500, progress=False)
    parts = [scan_rows(store, 0, samples, seed=5, sample_size=500, progress=False, part=(p, 3)) for p in range(3)]
    merged = merge_scans(parts, sample_size=500)
    assert merged.mean_norm == whole.mean_norm  # bit for bit: per-chunk sums added in chunk order
    np.testing.assert_array_equal(merged.nonfinite_rows, whole.nonfinite_rows)
    np.testing.assert_array_equal(merged.sample_BD, whole.sample_BD)
    assert len(whole.nonfinite_rows) > 0 and whole.sample_BD.shape == (500, 8)

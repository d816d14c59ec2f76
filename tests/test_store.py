"""The activation store: layout, reading orders, completeness, and no torch on the read path."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sae_core.store import Store, StoreError, StoreMeta, acts_name, create_store, open_store


def _make_store(path, n_frames=(5, 3, 7, 4), d=6, units=2, commit=True):
    n_rows = sum(n_frames)
    meta = StoreMeta(
        model="test", layers=(2,), d_model=d, n_codebooks=4, frame_rate=50.0, sampling_rate=32000,
        dtype="float32", mode="generate", n_samples=len(n_frames), n_rows=n_rows, n_units=units,
    )
    samples = [{"index": i, "prompt": f"p{i}", "n_frames": n} for i, n in enumerate(n_frames)]
    store = create_store(path, meta, samples, list(n_frames))
    acts = np.arange(n_rows * d, dtype=np.float32).reshape(n_rows, d)
    store.write_rows(acts_name(2), 0, acts)
    if commit:
        for unit in range(units):
            store.commit_unit(unit, "shard-0-of-1")
    return store, acts


def test_layout_offsets_and_sample_rows(tmp_path):
    store, acts = _make_store(tmp_path / "s")
    reopened = open_store(tmp_path / "s")
    assert reopened.offsets.tolist() == [0, 5, 8, 15, 19]
    np.testing.assert_array_equal(reopened.sample_rows(2, 2), acts[8:15])
    frames = np.asarray(reopened.array("frames").read().result())
    assert frames[8:15].tolist() == list(range(7))
    assert reopened.row_sample_index(np.array([0, 4, 5, 18])).tolist() == [0, 0, 1, 3]
    assert reopened.counts() == {"samples": 4, "rows": 19, "layers": [2], "d_model": 6, "bytes_per_layer": 19 * 6 * 4,
                                 "seconds_of_audio": 19 / 50.0, "complete": True}
    assert json.loads((tmp_path / "s" / "store.json").read_text())["format_version"] == 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_rows_visits_every_row_once(tmp_path, shuffle):
    store, acts = _make_store(tmp_path / "s")
    seen = []
    from jax_sae.order import lane_rows_shuffled

    def batches():
        return lane_rows_shuffled(store, 2, 4, seed=3) if shuffle else store.iter_rows_indexed(2, 4)

    for x, rows in batches():
        np.testing.assert_array_equal(x, acts[rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(acts)))
    if shuffle:
        again = [r for _, rows in batches() for r in rows.tolist()]
        assert again == seen, "the same seed must give the same order"


def test_iter_rows_subset_and_drop_last(tmp_path):
    store, acts = _make_store(tmp_path / "s")
    subset = np.array([1, 2, 9, 17])
    got = np.concatenate(list(store.iter_rows(2, 3, rows=subset)))
    np.testing.assert_array_equal(got, acts[subset])
    full = [(x, rows) for x, rows in store.iter_rows_indexed(2, 4, drop_last=True)]
    assert [len(rows) for _, rows in full] == [4, 4, 4, 4], "19 rows: four full batches, the last 3 rows dropped"
    np.testing.assert_array_equal(np.concatenate([x for x, _ in full]), acts[:16])


def test_incomplete_store_is_refused_and_missing_layer_named(tmp_path):
    _make_store(tmp_path / "s", commit=False)
    with pytest.raises(StoreError, match="incomplete .0/2 batches"):
        open_store(tmp_path / "s")
    store = open_store(tmp_path / "s", require_complete=False)
    with pytest.raises(StoreError, match="has no layer 5; it holds layers \\[2\\]"):
        store.acts(5)
    with pytest.raises(StoreError, match="missing store.json"):
        Store(tmp_path / "nowhere")


def test_reading_a_store_does_not_import_torch(tmp_path):
    _make_store(tmp_path / "s")
    code = (
        "import sys; from sae_core.store import open_store; s = open_store(sys.argv[1]); "
        "sum(len(b) for b in s.iter_rows(2, 4)); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], check=True)


def test_light_packages_do_not_import_torch():
    code = (
        "import sys, importlib\n"
        "for name in ('extractor', 'sae_core.store', 'extractor.prompts', 'jax_sae', 'discovery'):\n"
        "    importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_iter_rows_by_samples_and_excluded_rows(tmp_path):
    store, acts = _make_store(tmp_path / "s")
    got = [r for _, rows in store.iter_rows_indexed(2, 3, samples=np.array([1, 3]), exclude_rows=np.array([16]))
           for r in rows.tolist()]
    assert got == [5, 6, 7, 15, 17, 18]

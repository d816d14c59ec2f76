"""Per-sample scores on disk (discovery.scores): the same numbers as the in-memory matrix, read
one column block at a time, and a discovery whose features do not depend on the block size."""

from __future__ import annotations

import numpy as np
import pytest

import discovery.scores as S
from discovery.align import align
from discovery.features import FeatureDiscovery
from discovery.scores import SampleScores, block_columns

from . import test_discovery

planted = test_discovery.planted  # the trained planted SAE, as this module's fixture


def test_scores_round_trip_through_column_blocks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n, h = 53, 45
    want = rng.normal(size=(n, h)).astype(np.float16)
    monkeypatch.setattr(S, "BUFFER_BYTES", 7 * h * 2)  # a flush every 7 samples
    scores = SampleScores.create(tmp_path, "max", n, h, cols=16)  # blocks of 16, 16, 13 features
    assert scores.blocks == 3
    order = np.arange(n)
    for lo, hi in [(0, 5), (5, 6), (6, 30), (30, 53)]:  # runs of consecutive samples, as the pass writes them
        scores.write(order[lo:hi], want[lo:hi])
    scores.write(np.array([40, 2]), want[[40, 2]])  # samples out of order: rewritten in place
    np.testing.assert_array_equal(scores.dense(), want)
    rows = np.array([3, 17, 52])
    for lo, hi, block in scores.iter_blocks(rows):
        np.testing.assert_array_equal(block, want[rows, lo:hi])
    got = dict((f, c.copy()) for f, c in scores.columns([44, 0, 17, 16, 17]))
    assert sorted(got) == [0, 16, 17, 44]
    for feature, column in got.items():
        np.testing.assert_array_equal(column, want[:, feature])
    assert scores.path.name.startswith(".max-") and not list(tmp_path.iterdir()), \
        "the open score file has no name: a killed discovery leaves nothing behind"
    scores.close()


def test_block_width_keeps_memory_flat_as_samples_grow():
    assert block_columns(20_000, 32_768) == 2 * block_columns(40_000, 32_768)
    assert 50 * 40_000 * block_columns(40_000, 32_768) <= S.WORK_BUDGET
    assert block_columns(10, 32) == 32 and block_columns(10**7, 64) == 16


def test_alignment_from_blocks_equals_alignment_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    n, h = 120, 40
    tags = [[t for t in ("piano", "drums", "voice") if rng.random() < 0.4] for _ in range(n)]
    samples = [{"tags": t} for t in tags]
    dense = np.maximum(rng.normal(size=(n, h)), 0).astype(np.float16)  # ties at zero, as real scores have
    scores = SampleScores.create(tmp_path, "max", n, h, cols=16)
    scores.write(np.arange(n), dense)
    rows = np.flatnonzero(rng.random(n) < 0.8)
    want = align(dense[rows], [samples[i] for i in rows], min_support=3)
    got = align(scores, [samples[i] for i in rows], min_support=3, rows=rows)
    assert got.tags == want.tags == ["drums", "piano", "voice"]
    np.testing.assert_array_equal(got.auroc_TH, want.auroc_TH)  # sums of half-integer ranks: exact in float64


def test_discovery_is_the_same_in_one_block_or_many(planted, monkeypatch):
    _, store, sae, _ = planted
    runs = {}
    for budget in (S.WORK_BUDGET, 1):  # all 32 features in one block; blocks of 16
        monkeypatch.setattr(S, "WORK_BUDGET", budget)
        found = FeatureDiscovery(sae, progress=False).run(store, filter_features=False, max_features=32)
        assert found.stats.sample_max.cols == (32 if budget > 1 else 16)
        runs[budget] = found.features
        assert found.stats.sample_mean is None, "mean scores are kept only for --aggregation mean"
    assert runs[1] == runs[S.WORK_BUDGET]
    firing = found.summary["clip_firing"]  # the study's 1-25% of clips filter, from the pass's sample counts
    share = found.stats.sample_count / 300
    assert firing["kept"] == int(np.sum((share >= 0.01) & (share <= 0.25))) and firing["samples"] == 300
    assert firing["kept"] + firing["never"] + firing["rare"] + firing["common"] == 32
    assert any(f["aligned_tags"] for f in runs[1].values())


def test_unknown_score_kind_is_refused(planted):
    from discovery.stats import feature_pass
    from sae_core.errors import UsageError

    _, store, sae, _ = planted
    with pytest.raises(UsageError, match="unknown sample scores"):
        feature_pass(sae, store, 0, scores=("median",), progress=False)

"""bench.quality_bench: its synthetic data has the statistics it claims, and a small end-to-end
run through the real trainer recovers an easy dictionary."""

import json

import numpy as np
import pytest

from bench import quality_bench as Q


def test_firing_probabilities_follow_one_over_rank_capped_and_sum_to_the_mean_active():
    p = Q.firing_probabilities(2000, 16.0, 0.5)
    assert p.sum() == pytest.approx(16.0, rel=1e-6) and p.max() == pytest.approx(0.5)
    assert np.all(np.diff(p) <= 0)
    free = p < 0.5
    ratio = p[free][:-1] / p[free][1:]
    ranks = np.flatnonzero(free) + 1
    np.testing.assert_allclose(ratio, (ranks[1:]) / ranks[:-1], rtol=1e-6)


def test_rows_are_sparse_exponential_sums_of_the_true_directions_plus_tags():
    cfg = Q.QualityConfig(d=64, n_true=64, active=6.0, cap=0.5, noise=0.0, concepts=2)
    truth = Q.make_truth(cfg)
    # orthonormal directions make each row's coefficients readable
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))
    truth = Q.Truth(q.T.astype(np.float32), truth.probabilities_F, truth.tag_directions_TD)
    x = Q.make_rows(truth, 4 * Q.ROWS_PER_SAMPLE, 0.0, np.random.default_rng(1), np.zeros((4, 2), np.float32))
    coef = x @ truth.directions_FD.T
    active = coef > 1e-4
    assert active.sum(axis=1).mean() == pytest.approx(6.0, rel=0.05)
    assert coef[active].mean() == pytest.approx(1.0, rel=0.05)  # Exp(1) magnitudes
    np.testing.assert_allclose(active.mean(axis=0), truth.probabilities_F, atol=0.04)
    tagged = Q.make_rows(truth, 2 * Q.ROWS_PER_SAMPLE, 0.0, np.random.default_rng(1),
                         np.array([[1, 0], [0, 0]], np.float32))
    along = tagged @ truth.tag_directions_TD[0]
    assert along[: Q.ROWS_PER_SAMPLE].mean() > along[Q.ROWS_PER_SAMPLE:].mean() + 0.5


def test_best_cosines_of_a_dictionary_with_itself_are_one():
    d = Q.make_truth(Q.QualityConfig(d=32, n_true=40, active=4.0)).directions_FD
    np.testing.assert_allclose(Q.best_cosines(d, 3.0 * d), 1.0, rtol=1e-5)


@pytest.mark.slow  # the benchmark itself runs in python -m bench; the scoring functions are tested above
def test_a_small_run_through_the_trainer_recovers_an_easy_dictionary(tmp_path):
    argv = ["--types", "topk", "--budgets", "131072", "--seeds", "0", "--d", "32", "--n_true", "32",
            "--active", "3", "--hidden_dim", "64", "--top_k", "3", "--batch_size", "1024", "--epochs", "1",
            "--held_out", "4096", "--concepts", "2", "--work_dir", str(tmp_path), "--label", "test-small",
            "--train_args", "--lr 1e-2"]
    results = Q.main(argv)
    run = results["params"]["runs"][0]
    assert run["tokens"] == 128 * 1024 and run["l0"] == pytest.approx(3.0, abs=0.01)
    assert run["fvu"] < 0.2 and run["mmcs"] > 0.9 and run["recovered"] > 0.5, run
    assert len(run["tag_cos"]) == 2
    saved = json.loads((Q.RESULTS_DIR / "quality_bench-test-small.json").read_text())
    assert saved["params"]["runs"] == results["params"]["runs"]
    assert "| topk | 0.13M | 1 |" in saved["params"]["table"]
    assert (Q.RESULTS_DIR / "quality_bench-test-small.png").exists()

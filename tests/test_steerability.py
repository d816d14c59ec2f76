"""The steerability decision on planted scores: a direction that really moves the score is
steerable, a random one is not (even when every random direction moves the score its own
repeatable way), and false calls stay at the level asked for."""

from __future__ import annotations

import numpy as np
import pytest

from discovery.steerability import control_verdicts, fraction, judge, wilson


def _directions(rng, n: int, strengths: int, seeds: int, spread: float) -> np.ndarray:
    """Scores of ``n`` random directions: each has its own repeatable offset (``spread``) plus
    the seed's level (shared by every direction: paired) and a little noise."""
    seed_level = rng.normal(0.2, 0.05, size=(1, 1, seeds))
    offset = rng.normal(0, spread, size=(n, strengths, 1))
    return seed_level + offset + rng.normal(0, 0.01, size=(n, strengths, seeds))


def test_a_planted_direction_is_steerable_and_random_ones_are_not():
    rng = np.random.default_rng(0)
    scores = _directions(rng, 9, strengths=3, seeds=6, spread=0.02)
    controls, feature = scores[1:], scores[0].copy()
    feature[2] += 0.15  # the strongest push moves the label's score far past any random direction
    verdict = judge(feature, controls)
    assert verdict.steerable and verdict.best_strength == 2 and verdict.effect == pytest.approx(0.15, abs=0.04)
    assert not judge(feature, controls, margin=0.3).steerable, "an effect below the margin does not count"
    assert not judge(scores[0], controls).steerable, "a random direction is not steerable"
    calls = control_verdicts(controls)  # each control against the other seven: a false call is a 5% event
    assert len(calls) == 8 and sum(v.steerable for v in calls) <= 2


def test_a_repeatable_random_effect_is_not_mistaken_for_steering():
    """A random direction one spread above the others raises the score on every seed: a paired
    test against the seeds' noise calls it (p < 0.001); against the other directions it is what
    random directions do."""
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(3)
    controls = _directions(rng, 8, strengths=1, seeds=8, spread=0.05)
    means = controls.mean(axis=2)  # [controls, strengths]
    feature = controls.mean(axis=0) + means.std(axis=0, ddof=1)[:, None] + rng.normal(0, 0.002, size=(1, 8))
    assert (feature - controls.mean(axis=0) > 0).all(), "it beats the controls' mean on every seed"
    assert ttest_rel(feature[0], controls.mean(axis=0)[0], alternative="greater").pvalue < 1e-3
    verdict = judge(feature, controls)
    assert not verdict.steerable and verdict.p_value > 0.1


def test_false_calls_stay_below_alpha():
    """2,000 SAEs' worth of features that are just more random directions: the share called
    steerable is at most alpha (0.05), with room for sampling noise (about +0.01 at 2,000)."""
    rng = np.random.default_rng(1)
    calls = 0
    for _ in range(2000):
        scores = _directions(rng, 9, strengths=3, seeds=4, spread=0.03)
        calls += judge(scores[0], scores[1:]).steerable
    assert calls / 2000 <= 0.06


def test_interval_and_checks():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775
    assert fraction([]) == {"steerable": 0, "of": 0, "fraction": None, "ci95": [0.0, 1.0]}
    with pytest.raises(ValueError, match="strengths, seeds"):
        judge(np.zeros((3, 6)), np.zeros((4, 3, 5)))
    with pytest.raises(ValueError, match="at least 3 control"):
        judge(np.zeros((3, 6)), np.zeros((2, 3, 6)))

"""Is a feature positively steerable? Its direction against random directions of the same norm.

For one SAE, generation runs with each feature's decoder direction added at strengths
``a_1..a_A`` over seeds ``1..S``, and with ``C`` random directions of the same norm at the same
strengths and seeds (the controls, shared by every feature of the SAE). Each output is scored
against the feature's label (CLAP cosine of the label's text and the audio).

Any push of that size changes the music, and each random direction changes it in its own,
repeatable way: a direction can raise a label's score over every seed without meaning anything.
So the question is not whether the feature's effect beats the seeds' noise but whether its
direction is an outlier among random directions. At strength ``a``, the feature's mean score over
the seeds, ``m``, is compared with the controls' means ``m_1..m_C`` (same seeds, same label): the
effect is ``m - mean(m_c)``, and the one-sided p-value is that of a new draw from the controls'
distribution reaching ``m``, from the t prediction interval
``t = (m - mean(m_c) - margin) / (sd(m_c) * sqrt(1 + 1/C))`` with ``C - 1`` degrees of freedom.
Averaging over seeds first shrinks each direction's noise; the controls' spread then holds both
what the seeds leave and how much random directions differ. The feature is **positively
steerable** when, at some strength, the effect exceeds ``margin`` and the p-value times ``A``
(Bonferroni: the best strength is picked afterwards) is below ``alpha``.

Margin: the study this follows (Singh et al. 2025) counts a feature when steering raises its CLAP
alignment at all (margin 0, against the unsteered output, without a test); here the default
margin is 0 as well, and the test against controls is what keeps a push that changes every
score from counting. A researcher who wants an effect size can raise ``margin`` (cosine units).

Each control, judged as a feature against the other controls, gives the false-positive rate the
decision has in practice. The fraction of steerable features comes with a Wilson score interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_CONTROLS = 3  # a spread needs at least two; three make the t interval usable


@dataclass(frozen=True)
class Verdict:
    """One feature's (or control's) result."""

    steerable: bool
    best_strength: int  # index of the strength with the smallest p-value
    effect: float  # feature mean minus the controls' mean at that strength (score units)
    p_value: float  # Bonferroni-adjusted over the strengths, at most 1
    effects: tuple[float, ...]  # the effect at each strength

    def to_json(self) -> dict:
        return {"steerable": self.steerable, "best_strength": self.best_strength, "effect": round(self.effect, 6),
                "p_value": self.p_value, "effects": [round(e, 6) for e in self.effects]}


def judge(steered_AS: np.ndarray, controls_CAS: np.ndarray, margin: float = 0.0, alpha: float = 0.05) -> Verdict:
    """The verdict for one feature: ``steered_AS`` its scores per strength and seed,
    ``controls_CAS`` the controls' scores (at least ``MIN_CONTROLS``) at the same strengths and seeds."""
    from scipy.stats import t as student_t

    steered = np.asarray(steered_AS, np.float64)
    controls = np.asarray(controls_CAS, np.float64)
    if steered.ndim != 2 or controls.ndim != 3 or controls.shape[1:] != steered.shape:
        raise ValueError("scores of shape [strengths, seeds] and controls [controls, strengths, seeds] are needed; "
                         f"got {steered.shape} and {controls.shape}")
    if len(controls) < MIN_CONTROLS:
        raise ValueError(f"at least {MIN_CONTROLS} control directions are needed, got {len(controls)}")
    m_A = steered.mean(axis=1)
    m_CA = controls.mean(axis=2)
    c = len(controls)
    effects = m_A - m_CA.mean(axis=0)
    spread = np.maximum(m_CA.std(axis=0, ddof=1), 1e-12) * math.sqrt(1 + 1 / c)
    p = student_t.sf((effects - margin) / spread, df=c - 1)
    best = int(np.argmin(p - 1e-12 * effects))  # ties: the larger effect
    adjusted = float(min(1.0, p[best] * len(p)))
    return Verdict(bool(adjusted < alpha and effects[best] > margin), best, float(effects[best]), adjusted,
                   tuple(float(e) for e in effects))


def control_verdicts(controls_CAS: np.ndarray, margin: float = 0.0, alpha: float = 0.05) -> list[Verdict]:
    """Each control judged as if it were a feature, against the other controls: how often the
    decision calls a random direction steerable."""
    controls = np.asarray(controls_CAS, np.float64)
    if len(controls) <= MIN_CONTROLS:
        return []
    return [judge(controls[c], np.delete(controls, c, axis=0), margin, alpha) for c in range(len(controls))]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fraction(verdicts: list[Verdict]) -> dict:
    """The share of steerable verdicts with its 95% Wilson interval."""
    k, n = sum(v.steerable for v in verdicts), len(verdicts)
    lo, hi = wilson(k, n)
    return {"steerable": k, "of": n, "fraction": k / n if n else None, "ci95": [lo, hi]}

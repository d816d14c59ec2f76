"""Tag alignment: how well each feature's sample-level activation detects each tag.

For every tag with enough support, AUROC (Mann-Whitney, ties averaged) for every feature at
once from one rank matrix, and average precision for each feature's best tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .scores import as_scores


@dataclass
class Alignment:
    """AUROC of every (tag, feature) pair and the tags used."""

    tags: list[str]
    auroc_TH: np.ndarray
    presence_NT: np.ndarray

    def best(self, feature: int, n: int = 3) -> list[tuple[str, float]]:
        if not self.tags:
            return []
        order = np.argsort(-self.auroc_TH[:, feature], kind="stable")[:n]
        return [(self.tags[t], float(self.auroc_TH[t, feature])) for t in order]


def tag_matrix(samples: Sequence[dict], min_support: int) -> tuple[list[str], np.ndarray]:
    """Tags carried by at least ``min_support`` samples and missing from as many; presence [N, T]."""
    counts: dict[str, int] = {}
    for s in samples:
        for t in set(s.get("tags", ())):
            counts[t] = counts.get(t, 0) + 1
    n = len(samples)
    tags = sorted(t for t, c in counts.items() if c >= min_support and n - c >= min_support)
    index = {t: i for i, t in enumerate(tags)}
    presence = np.zeros((n, len(tags)), bool)
    for i, s in enumerate(samples):
        for t in s.get("tags", ()):
            if t in index:
                presence[i, index[t]] = True
    return tags, presence


def align(scores_NH, samples: Sequence[dict], min_support: int = 5, rows: np.ndarray | None = None) -> Alignment:
    """AUROC of each feature's sample scores as a detector of each supported tag. ``scores_NH``: an
    array or a ``SampleScores`` (on disk, read one column block at a time, so memory does not grow
    with the features); ``rows``: the samples of ``scores_NH`` that ``samples`` lists (default all)."""
    scores = as_scores(scores_NH)
    tags, presence = tag_matrix(samples, min_support)
    if not tags:
        return Alignment([], np.zeros((0, scores.hidden)), presence)
    n_pos = presence.sum(axis=0).astype(np.float64)
    n_neg = len(samples) - n_pos
    presence_TN = presence.T.astype(np.float64)
    auroc = np.empty((len(tags), scores.hidden))
    for lo, hi, block in scores.iter_blocks(rows):
        rank_sums_TH = presence_TN @ average_ranks(np.asarray(block, np.float32))
        auroc[:, lo:hi] = (rank_sums_TH - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]
    return Alignment(tags, auroc, presence)


def average_ranks(x_NH: np.ndarray) -> np.ndarray:
    """Ranks 1..N down each column, tied values sharing their mean rank (``scipy.stats.rankdata``'s
    "average", without importing scipy.stats: half a second of every discovery's start)."""
    n = len(x_NH)
    order = np.argsort(x_NH, axis=0, kind="stable")
    ordered = np.take_along_axis(x_NH, order, axis=0)
    starts = np.ones(ordered.shape, bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(ordered.shape, bool)
    ends[:-1] = starts[1:]
    position = np.arange(n)[:, None]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, position, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(x_NH.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    return ranks


def average_precision(scores_N: np.ndarray, positive_N: np.ndarray) -> float:
    """AP of ranking samples by score for one tag (ties broken by sample order)."""
    order = np.argsort(-scores_N.astype(np.float32), kind="stable")
    hits = positive_N[order]
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(np.sum(precision * hits) / hits.sum())


def layer_summary(alignment: Alignment, alive_H: np.ndarray) -> dict:
    """One number per layer: share of live features whose best tag has AUROC >= 0.8, and the median."""
    if not alignment.tags or not alive_H.any():
        return {"features": int(alive_H.sum()), "tags": len(alignment.tags), "fraction_auroc_ge_0.8": None,
                "median_best_auroc": None}
    best = alignment.auroc_TH[:, alive_H].max(axis=0)
    return {
        "features": int(alive_H.sum()),
        "tags": len(alignment.tags),
        "fraction_auroc_ge_0.8": float(np.mean(best >= 0.8)),
        "median_best_auroc": float(np.median(best)),
    }

"""Feature selection, examples, labels and alignment assembled into the original's JSON format.

``FeatureDiscovery(sae).discover_and_label(store, ...)`` returns
``{"42": {"label": ..., "top_examples": [{"activation", "prompt", "type", ...}], ...}}``: the
original's keys, plus frequency, activation statistics, aligned tags with AUROC and AP, the
label's source, confidence and held-out detection score, and per example the sample index,
source id, tags and (token level) the row, frame and time.

NaN/Inf rows of the store are skipped, not a reason to stop (the SAE was trained already, and
training itself stopped on them unless told to skip them): the features describe the finite
rows, frequencies are over those rows, and a sample without a finite row is left out of tag
alignment and of the detection negatives instead of counting as one where nothing fires. The
summary says how many rows were skipped (``nonfinite_rows``, ``first_nonfinite_row``,
``samples_without_finite_rows``). A figure that is undefined comes out null, never NaN.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError

from .align import Alignment, align, average_precision, layer_summary
from .feature_files import CLIP_FIRING, FeatureFiles
from .labels import Corpus, detection_score, heuristic_label
from .scores import as_scores
from .stats import HIST_EDGES, PassResult, feature_pass

AGGREGATIONS = ("max", "mean", "moments")


@dataclass
class Discovery:
    """Everything one discovery run computed; ``features`` is what goes into the JSON."""

    features: dict[str, dict]
    summary: dict
    stats: PassResult
    alignment: Alignment
    corpus: Corpus = field(repr=False)


def select_features(stats: PassResult, *, filter_features: bool, min_count: int, max_count: int,
                    max_features: int, clip_share: tuple[float, float] | None = None) -> np.ndarray:
    """Features firing on between min and max tokens (unless unfiltered) and, with ``clip_share``,
    on that share of the samples with finite rows (the study's 1-25% of clips), ranked by max
    activation."""
    alive = stats.token_count > 0
    keep = alive & ((stats.token_count >= min_count) & (stats.token_count <= max_count) if filter_features else alive)
    if clip_share is not None:
        share = stats.sample_count / max(int(np.sum(stats.finite_rows_per_sample > 0)), 1)
        keep &= (share >= clip_share[0]) & (share <= clip_share[1])
    ids = np.flatnonzero(keep)
    order = np.argsort(-stats.max[ids], kind="stable")
    return ids[order][:max_features]


def _examples(stats: PassResult, store, feature: int, aggregation: str, n: int) -> list[dict]:
    values, ids = stats.top[aggregation]
    out = []
    samples = store.samples
    for value, ident in zip(values[feature], ids[feature]):
        if not value > 0 or ident < 0 or len(out) >= n:
            continue
        if aggregation == "moments":
            s, f, t = store.row_positions(np.array([ident]))
            sample = int(s[0])
            extra = {"type": "token-level", "row": int(ident), "frame": int(f[0]), "time_seconds": round(float(t[0]), 4)}
        else:
            sample, extra = int(ident), {"type": "sample-level", "aggregation": aggregation}
        meta = samples[sample]
        out.append({"activation": round(float(value), 6), "prompt": meta.get("prompt", ""), **extra,
                    "sample_index": sample, "source_id": meta.get("source_id"), "tags": meta.get("tags", [])})
    return out


def _sample_indices(examples: list[dict]) -> list[int]:
    return list(dict.fromkeys(ex["sample_index"] for ex in examples))


def _histogram(stats: PassResult, feature: int) -> dict:
    """The feature's activation histogram for the JSON: rows per half-octave bin (HIST_EDGES; the first
    bin is everything below the first edge, the last everything above the last), where it fires."""
    if stats.histogram is None:
        return {}
    return {"activation_histogram": {"edges": [float(e) for e in HIST_EDGES],
                                     "counts": [int(c) for c in stats.histogram[feature]]}}


def _number(value, digits: int | None = None) -> float | None:
    """A float for the JSON, rounded when asked; None where it is undefined (NaN or infinite)."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None else value


def clip_firing(stats: PassResult, scored_samples: int, bounds: tuple[float, float] = CLIP_FIRING) -> dict:
    """The study's filter: features that fire (any frame above zero) on a share of the samples
    (those with finite rows) within ``bounds``, the rest split by why they fail."""
    share = stats.sample_count / max(scored_samples, 1)
    lo, hi = bounds
    return {"bounds": list(bounds), "kept": int(np.sum((share >= lo) & (share <= hi))),
            "never": int(np.sum(stats.sample_count == 0)), "rare": int(np.sum((share > 0) & (share < lo))),
            "common": int(np.sum(share > hi)), "samples": int(scored_samples)}


def _best_tags(alignment: Alignment, scores, features: list[int], rows: np.ndarray | None) -> dict[int, list]:
    """Each feature's best tags with AUROC and average precision (undefined AUROCs left out),
    reading each feature's scores once from ``scores`` (on disk: one column block at a time)."""
    out: dict[int, list] = {}
    for feature, column in as_scores(scores).columns(features):
        column = column[rows] if rows is not None else column
        aligned = []
        for tag, auroc in alignment.best(feature):
            if not math.isfinite(auroc):  # undefined (scores that are not numbers): left out
                continue
            positive = alignment.presence_NT[:, alignment.tags.index(tag)]
            aligned.append({"tag": tag, "auroc": round(auroc, 4), "ap": round(average_precision(column, positive), 4)})
        out[feature] = aligned
    return out


def _scored(stats: PassResult) -> np.ndarray:
    """The samples with at least one finite row: the only ones whose scores mean anything."""
    return np.flatnonzero(stats.finite_rows_per_sample > 0)


def _held_out(chosen: list[int], scored: np.ndarray, rng: np.random.Generator):
    """Split top samples into (fit, held-out) halves and draw as many random non-top negatives
    among the ``scored`` samples."""
    fit, held = chosen[::2], chosen[1::2]
    pool = np.setdiff1d(scored, chosen)
    if not fit or not held or not len(pool):
        return None
    return fit, held, [int(i) for i in rng.choice(pool, size=min(len(held), len(pool)), replace=False)]


def _detection(corpus: Corpus, samples: list[dict], split) -> float | None:
    """Offline judge: a label made from the fit half must tell held-out top samples from random ones."""
    if split is None:
        return None
    fit, held, negatives = split
    label = heuristic_label(corpus, fit).text
    return detection_score(label, [samples[i] for i in held], [samples[i] for i in negatives])


class FeatureDiscovery:
    """Discover, label and align an SAE's features on a store (the original's API, streaming)."""

    def __init__(self, sae, progress: bool = True):
        self.sae = sae
        self.progress = progress

    def run(self, store, layer: int | None = None, *, filter_features: bool = True, min_activation_count: int = 10,
            max_activation_count: int = 10_000, max_features: int = 10, aggregation: str = "max",
            examples: int = 20, min_tag_support: int = 5, seed: int = 0, block_rows: int = 4096,
            scores_dir=None, clip_share: tuple[float, float] | None = None) -> Discovery:
        """``scores_dir``: where the per-sample scores go while the run needs them (default the
        temporary directory): 2 bytes per sample and feature, 10.5 GB for 160,000 clips x 32,768
        latents, never held in memory."""
        if aggregation not in AGGREGATIONS:
            raise UsageError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        layer = self.sae.cfg.layer if layer is None else layer
        if layer is None:
            raise UsageError("the SAE does not record its layer; pass --layer_idx")
        stats = feature_pass(self.sae, store, layer, examples=examples, block_rows=block_rows, progress=self.progress,
                             token_examples=aggregation == "moments",
                             scores=("max", "mean") if aggregation == "mean" else ("max",), scores_dir=scores_dir)
        samples = store.samples
        corpus = Corpus.from_samples(samples)
        scores = stats.sample_mean if aggregation == "mean" else stats.sample_max
        scored = _scored(stats)
        rows = scored if len(scored) < len(samples) else None
        samples_aligned = [samples[i] for i in scored] if rows is not None else samples
        # a tag on every sample (or none) has no AUROC: at least one sample with and one without
        alignment = align(scores, samples_aligned, min_support=max(min_tag_support, 1), rows=rows)
        chosen_features = [int(f) for f in select_features(
            stats, filter_features=filter_features, min_count=min_activation_count, max_count=max_activation_count,
            max_features=max_features, clip_share=clip_share)]
        best_tags = _best_tags(alignment, scores, chosen_features, rows)
        rng = np.random.default_rng(seed)
        features: dict[str, dict] = {}
        for feature in chosen_features:
            top = _examples(stats, store, feature, aggregation, examples)
            chosen = _sample_indices(top)
            label = heuristic_label(corpus, chosen)
            aligned = best_tags[feature]
            features[str(feature)] = {
                "label": label.text,
                "top_examples": top,
                "label_source": label.source,
                "label_confidence": label.confidence,
                "label_terms": [[t, round(s, 3)] for t, s in label.terms],
                "detection_score": _detection(corpus, samples, _held_out(chosen, scored, rng)),
                "frequency": float(stats.token_count[feature] / max(stats.finite_rows, 1)),
                "activation_count": int(stats.token_count[feature]),
                "sample_count": int(stats.sample_count[feature]),
                "max_activation": _number(stats.max[feature]),
                "mean_activation": _number(stats.sum[feature] / max(stats.token_count[feature], 1)),
                **_histogram(stats, feature),
                "aligned_tags": aligned,
            }
        summary = {
            "layer": layer, "aggregation": aggregation, "rows": stats.n_rows, "samples": stats.n_samples,
            "hidden_dim": self.sae.cfg.hidden_dim, "sae_type": self.sae.cfg.sae_type,
            "transcoder": self.sae.cfg.transcoder,
            "alive_features": int(np.sum(stats.token_count > 0)), "reported_features": len(features),
            "clip_firing": clip_firing(stats, len(scored)),
            "alignment": layer_summary(alignment, stats.token_count > 0),
            "nonfinite_rows": len(stats.nonfinite_rows),
            "first_nonfinite_row": int(stats.nonfinite_rows[0]) if len(stats.nonfinite_rows) else None,
            "samples_without_finite_rows": int(stats.n_samples - len(scored)),
        }
        return Discovery(features, summary, stats, alignment, corpus)

    def discover_and_label(self, store, layer: int | None = None, *, use_llm: bool = False,
                           llm_api: str = "anthropic", llm_model: str | None = None, llm_client=None,
                           llm_cache_dir: str | Path | None = None, llm_concurrency: int = 4, **kwargs) -> dict:
        """The original's entry point: returns the features dict (labels by LLM when asked)."""
        found = self.run(store, layer, **kwargs)
        if use_llm:
            apply_llm_labels(found, store, llm_client, llm_api, llm_model, llm_cache_dir, llm_concurrency,
                             self.progress)
        return found.features

    @staticmethod
    def save_features(features: dict, path: str | os.PathLike) -> None:
        """The features JSON alone (``discovery.discover`` writes its summary beside it)."""
        FeatureFiles(path).write_features(features)

    @staticmethod
    def load_features(path: str | os.PathLike) -> dict:
        return FeatureFiles(path).read_features()


def apply_llm_labels(found: Discovery, store, client, api: str, model: str | None, cache_dir, concurrency: int,
                     progress: bool) -> None:
    """Replace heuristic labels by LLM ones where the call succeeds; record errors otherwise."""
    from .llm import LLMClient, ReplyCache, feature_prompt, label_all

    client = client or LLMClient(api, model)
    samples = store.samples
    has_rows = found.stats.finite_rows_per_sample > 0
    prompts = {}
    rng = np.random.default_rng(1)
    scores = as_scores(found.stats.sample_max)

    def cold(column: np.ndarray) -> np.ndarray:  # the samples (with finite rows) where the feature is silent
        return np.flatnonzero((column <= 0) & has_rows)

    counts = {feature: len(cold(column)) for feature, column in scores.columns(int(key) for key in found.features)}
    # positions among each feature's silent samples, drawn in the features' order (one column in memory at a time)
    drawn = {int(key): rng.choice(counts[int(key)], size=min(5, counts[int(key)]), replace=False)
             for key in found.features if counts[int(key)]}
    contrast = {feature: [samples[i] for i in cold(column)[drawn[feature]]]
                for feature, column in scores.columns(drawn)}
    for key, info in found.features.items():
        prompts[int(key)] = feature_prompt(int(key), info["top_examples"][:10], contrast.get(int(key), []))
    cache = ReplyCache(cache_dir) if cache_dir else None
    for feature, reply in label_all(client, prompts, cache, concurrency, progress).items():
        info = found.features[str(feature)]
        if reply.label:
            info.update(label=reply.label, label_source="llm", description=reply.description,
                        heuristic_label=info["label"])
        else:
            info["llm_error"] = reply.error
    _llm_detection(found, samples, client, cache, concurrency, progress)


def _llm_detection(found: Discovery, samples: list[dict], client, cache, concurrency: int, progress: bool) -> None:
    """LLM judge: does the feature's label pick its held-out top captions out of random ones?"""
    from .llm import Reply, judge_prompt, label_all, parse_judgement

    rng = np.random.default_rng(2)
    scored = _scored(found.stats)
    jobs = {}
    for key, info in found.features.items():
        split = _held_out(_sample_indices(info["top_examples"]), scored, rng)
        if split is not None:
            _, held, negatives = split
            order = [(i, True) for i in held] + [(i, False) for i in negatives]
            order = [order[j] for j in rng.permutation(len(order))]
            jobs[int(key)] = (order, judge_prompt(info["label"], [samples[i].get("prompt", "") for i, _ in order]))

    def parse(text):
        answers = parse_judgement(text)
        return Reply(label=json.dumps(answers)) if answers is not None else Reply(error="malformed judgement")

    prompts = {key: prompt for key, (_, prompt) in jobs.items()}
    for key, reply in label_all(client, prompts, cache, concurrency, progress, parse=parse, desc="LLM judge").items():
        order = jobs[key][0]
        answers = json.loads(reply.label) if reply.label else None
        if answers is None or len(answers) != len(order):
            found.features[str(key)]["llm_judge_error"] = reply.error or "judgement of the wrong length"
            continue
        pos = [a for a, (_, top) in zip(answers, order) if top]
        neg = [1 - a for a, (_, top) in zip(answers, order) if not top]
        found.features[str(key)]["detection_score_llm"] = round(float(np.mean(pos) + np.mean(neg)) / 2, 4)

"""``python -m extractor.label_scores``: how well each feature's label describes its top clips, by CLAP.

The study's check of automatic labels (Singh et al. 2025 score labels by the CLAP similarity of
the label's text and the audio the feature fires on). Here each feature's label is compared with
its top clips (the samples of its top examples, decoded from the store's codes by the model's
EnCodec) and with random clips of the same store (the same ones for every feature, less that
feature's own top samples): the gain in mean CLAP cosine, and the AUROC of the cosine telling
the top clips from the random ones (0.5: the label is no better than chance). The summary gives
the mean gain with a 95% t interval over the features and the share of features whose label
prefers their own clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError
from sae_core.files import write_json

from .clap import DEFAULT_CLAP, Clap, label_score


@dataclass(frozen=True)
class LabelScoresConfig:
    """Options of ``python -m extractor.label_scores``."""

    features: str | None = None
    """Features JSON from discovery."""
    store: str | None = None
    """The activation store the features were found in (its codes give the clips' audio)."""
    model: str = "facebook/musicgen-small"
    """The MusicGen the store was extracted with (its EnCodec decodes the codes)."""
    clap: str = DEFAULT_CLAP
    """CLAP model: hub name, local directory or tiny-random-clap."""
    top: int = 10
    """Top clips per feature (its first top examples' samples)."""
    random: int = 20
    """Random clips, shared by every feature."""
    seed: int = 0
    """Seed of the random clips."""
    out: str | None = None
    """Output JSON (default: label_scores.json beside the features JSON)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if not self.features or not self.store:
            raise UsageError("--features and --store are required (discovery's features JSON and its store)")
        if self.top < 1 or self.random < 1:
            raise UsageError(f"--top and --random must be at least 1, got {self.top} and {self.random}")


def top_samples(features: dict, top: int) -> dict[str, list[int]]:
    """Each feature's first ``top`` distinct top-example samples."""
    out = {}
    for key, info in features.items():
        samples = []
        for example in info.get("top_examples", []):
            index = example.get("sample_index")
            if index is not None and int(index) not in samples:
                samples.append(int(index))
        out[key] = samples[:top]
    return out


def _summary(scores: dict[str, dict]) -> dict:
    gains = np.array([s["gain"] for s in scores.values()])
    n = len(gains)
    if not n:
        return {"features": 0, "mean_gain": None, "gain_ci95": None, "fraction_preferring_top": None,
                "mean_auroc": None}
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1) * gains.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    mean = float(gains.mean())
    return {"features": n, "mean_gain": mean, "gain_ci95": [mean - half, mean + half] if n > 1 else None,
            "fraction_preferring_top": float(np.mean(gains > 0)),
            "mean_auroc": float(np.mean([s["auroc"] for s in scores.values()]))}


def label_scores(cfg: LabelScoresConfig) -> dict:
    from discovery.feature_files import FeatureFiles
    from sae_core.store import open_store

    from .render import AudioRequest, decode_windows

    features = FeatureFiles(cfg.features).read_features()
    store = open_store(cfg.store)
    tops = top_samples(features, cfg.top)
    missing = [k for k, samples in tops.items() if not samples]
    if missing:
        raise UsageError(f"features {missing[:5]} of {cfg.features} have no top examples with a sample_index: "
                         "rerun discovery (the label needs clips to be scored against)")
    rng = np.random.default_rng(cfg.seed)
    pool = rng.permutation(store.n_samples)[: cfg.random + cfg.top]  # spare ones for features that hold some
    wanted = sorted({s for samples in tops.values() for s in samples} | {int(s) for s in pool})
    clap = Clap.load(cfg.clap, cfg.device)
    requests = [AudioRequest(s, 0, int(store.offsets[s + 1] - store.offsets[s]), "") for s in wanted]
    clips, rate = {}, None
    for req, audio, rate in decode_windows(cfg.model, store, requests, cfg.device, cfg.progress):
        clips[req.sample] = audio.mean(axis=0)
    embedded = dict(zip(wanted, clap.clips([clips[s] for s in wanted], rate)))
    keys = list(features)
    labels = clap.texts([str(features[k].get("label") or "") for k in keys])
    scores, skipped = {}, {}
    for key, label in zip(keys, labels):
        own = set(tops[key])
        random = [int(s) for s in pool if int(s) not in own][: cfg.random]
        if not random:  # its top clips are the whole store (or the whole drawn pool): nothing to compare with
            skipped[key] = "no random clip outside its top clips"
            continue
        score = label_score(label, np.stack([embedded[s] for s in tops[key]]), np.stack([embedded[s] for s in random]))
        scores[key] = {"label": features[key].get("label"), **score, "top_samples": tops[key]}
    out = Path(cfg.out) if cfg.out else Path(cfg.features).with_name("label_scores.json")
    report = {"features_json": str(cfg.features), "store": str(store.path), "model": cfg.model, "clap": cfg.clap,
              "random_samples": [int(s) for s in pool[: cfg.random]], "summary": _summary(scores), "features": scores, "skipped": skipped}
    write_json(out, report)
    summary = report["summary"]
    if not scores:
        print(f"wrote {out}: no label could be scored ({len(skipped)} features' top clips cover the random ones)")
        return report
    print(f"wrote {out}: {summary['features']} labels, mean CLAP gain of top over random clips "
          f"{summary['mean_gain']:+.4f}, {summary['fraction_preferring_top']:.0%} prefer their own clips, "
          f"mean AUROC {summary['mean_auroc']:.3f}" + (f"; {len(skipped)} skipped (no random clip outside their "
                                                      "top clips)" if skipped else ""))
    return report


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(LabelScoresConfig, argv, prog="python -m extractor.label_scores",
                    description="Score each feature's label against its top clips and random clips with CLAP.",
                    run=label_scores)


if __name__ == "__main__":
    main()

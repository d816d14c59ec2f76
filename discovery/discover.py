"""``python -m discovery.discover``: find, label and align an SAE's features on a store layer.

Writes ``results/features_layer{N}.json`` (the original's format, enriched), a summary beside
it (``...summary.json``: layer-level alignment numbers and settings) and, with ``--all``,
compact per-feature statistics for every feature (``...all.npz``), through ``FeatureFiles``,
the one reader and writer of those files. Both JSON files are strict: never NaN or Infinity.

NaN/Inf rows in the store are skipped and reported, not a reason to stop: the SAE is trained
already (and training stopped on such rows unless ``--skip_nonfinite`` said to train without
them), a researcher wants the features of the good rows, and a handful of broken frames should
not hide them. The run prints one line with the count and the first such row, and the summary
records them (``nonfinite_rows``, ``first_nonfinite_row``, ``samples_without_finite_rows``); a
layer with no finite row at all stops with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .feature_files import DiscoverError, FeatureFiles


@dataclass(frozen=True)
class DiscoverConfig:
    """Options of ``python -m discovery.discover``."""

    sae_path: str | None = None
    """SAE checkpoint directory (models/<type>/layer<N>/dim<h>/best)."""
    store: str = "data/activations"
    """Activation store."""
    activation_file: str | None = None
    """The original's name for --store."""
    layer_idx: int | None = None
    """Store layer (default: the layer the SAE was trained on)."""
    output: str | None = None
    """Features JSON (default results/features_layer{N}.json)."""
    min_activation_count: int = 10
    """Keep features firing on at least this many tokens."""
    max_activation_count: int = 10_000
    """... and at most this many (drops overly generic features)."""
    no_filter: bool = False
    """Keep every live feature regardless of its activation count."""
    max_features: int = 10
    """Features to report, ranked by max activation."""
    clip_firing: tuple[float, ...] = ()
    """Report only features firing on this share of the samples, LO,HI (the study's 0.01,0.25)."""
    examples: int = 20
    """Top examples per feature (fewer when fewer samples fire)."""
    aggregation: Literal["max", "mean", "moments"] = "max"
    """max/mean: one score per (feature, sample); moments: top tokens with their time."""
    token_level: bool = False
    """The original's flag: same as --aggregation moments."""
    use_llm: bool = False
    """Label with an LLM (keys from ANTHROPIC_API_KEY / OPENAI_API_KEY)."""
    llm_api: Literal["anthropic", "openai"] = "anthropic"
    """LLM provider."""
    llm_model: str | None = None
    """LLM model name (default: a current model of the provider)."""
    llm_concurrency: int = 4
    """Concurrent LLM calls."""
    llm_cache: str = "results/.llm_cache"
    """Directory caching LLM replies by (model, prompt hash)."""
    min_tag_support: int = 5
    """Tags need at least this many samples with and without them for alignment."""
    all: bool = False
    """Also write statistics of every feature (npz)."""
    seed: int = 0
    """Seed of the detection-score negatives."""
    progress: bool = True
    """Show progress bars."""
    coordinator_address: str | None = None
    """host:port of process 0 for a multi-process run (SLURM and TPU pods are detected without it)."""
    num_processes: int | None = None
    """Processes in a multi-process run: each reads only its devices' rows; process 0 writes the files."""
    process_id: int | None = None
    """This process's index in a multi-process run."""

    def __post_init__(self) -> None:
        if not self.sae_path:
            raise DiscoverError("--sae_path is required (a best/ or final/ checkpoint directory)")
        if self.max_features <= 0 or self.examples <= 0:
            raise DiscoverError("--max_features and --examples must be positive")
        if self.clip_firing and not (len(self.clip_firing) == 2 and 0 <= self.clip_firing[0] <= self.clip_firing[1] <= 1):
            raise DiscoverError(f"--clip_firing takes LO,HI with 0 <= LO <= HI <= 1 (shares of the samples), got "
                                f"{','.join(map(str, self.clip_firing))}")
        if self.min_activation_count > self.max_activation_count:
            raise DiscoverError("--min_activation_count exceeds --max_activation_count")


def discover(cfg: DiscoverConfig) -> dict:
    """Run discovery and write its files; returns the features dict."""
    import jax

    import jax_sae
    from sae_core.store import open_store
    from jax_sae.distributed import initialize, is_primary
    from jax_sae.runtime import announce
    from jax_sae.sharding import make_mesh

    from .features import FeatureDiscovery

    initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    runtime = announce(make_mesh(jax.device_count(), 1), "discover")  # the mesh feature_pass builds
    sae = jax_sae.load(cfg.sae_path)
    store = open_store(cfg.activation_file or cfg.store)
    layer = cfg.layer_idx if cfg.layer_idx is not None else sae.cfg.layer
    aggregation = "moments" if cfg.token_level else cfg.aggregation
    output = Path(cfg.output or f"results/features_layer{layer}.json")
    finder = FeatureDiscovery(sae, progress=cfg.progress)
    found = finder.run(store, layer, filter_features=not cfg.no_filter, min_activation_count=cfg.min_activation_count,
                       max_activation_count=cfg.max_activation_count, max_features=cfg.max_features,
                       aggregation=aggregation, examples=cfg.examples, min_tag_support=cfg.min_tag_support,
                       seed=cfg.seed, scores_dir=output.parent,
                       clip_share=tuple(cfg.clip_firing) if cfg.clip_firing else None)  # beside the output: on its disk, not in /tmp
    if not is_primary():  # every process holds the same statistics; process 0 labels and writes
        found.stats.close()
        return found.features
    if cfg.use_llm:
        from .features import apply_llm_labels

        apply_llm_labels(found, store, None, cfg.llm_api, cfg.llm_model, cfg.llm_cache, cfg.llm_concurrency,
                         cfg.progress)
    summary = found.summary | {"sae_path": str(cfg.sae_path), "store": str(store.path), "output": str(output),
                               "runtime": runtime, "rows_read_per_process": list(found.stats.rows_read_per_process)}
    FeatureFiles(output).write(found.features, summary, _all_stats(found) if cfg.all else None)
    found.stats.close()
    if summary["nonfinite_rows"]:
        print(f"skipped {summary['nonfinite_rows']} non-finite (NaN/Inf) rows of layer {layer} of {store.path} "
              f"(first: row {summary['first_nonfinite_row']}); the features describe the other "
              f"{found.stats.finite_rows} rows; re-extract the store to include them")
    align = summary["alignment"]
    alignment = "no tags with enough support to align" if align["median_best_auroc"] is None else (
        f"tag alignment over {align['tags']} tags: median best AUROC {align['median_best_auroc']:.3f}, "
        f"{align['fraction_auroc_ge_0.8']:.1%} of live features at AUROC >= 0.8")
    print(f"wrote {output}: {len(found.features)} features of {summary['alive_features']} alive; {alignment}")
    return found.features


def _all_stats(found) -> dict[str, np.ndarray]:
    """Compact statistics of every feature (``--all``)."""
    s, alignment = found.stats, found.alignment
    return dict(token_count=s.token_count, sample_count=s.sample_count, max=s.max,
                mean_when_active=s.sum / np.maximum(s.token_count, 1), frequency=s.token_count / max(s.finite_rows, 1),
                top_sample_max=s.top["max"][1], top_sample_max_value=s.top["max"][0],
                best_tag_auroc=alignment.auroc_TH.max(axis=0) if alignment.tags else np.zeros(0),
                tags=np.array(alignment.tags))


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(DiscoverConfig, argv, prog="python -m discovery.discover",
                    description="Discover, label and align SAE features.", run=discover)


if __name__ == "__main__":
    main()

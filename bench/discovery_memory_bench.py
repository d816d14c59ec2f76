"""``python -m bench.discovery_memory_bench``: discovery's peak memory as the samples double.

Discovery keeps every sample's score for every feature (max over the sample's frames; tag
alignment, the LLM's contrast examples and the study's clip-firing filter read it). Until
2026-12-05 it held them as dense ``[samples, features]`` float16 matrices in RAM, and tag
alignment ranked them as float64: at h = 32,768 that is 64 KiB per sample for the scores and
about 0.8 MiB per sample while aligning. Now the scores go to a file of column blocks
(``discovery.scores``) sized so that one block and its ranks fit a fixed budget.

Each size runs ``python -m discovery.discover`` (in a fresh process, so the peak RSS is its own)
on a store of ``samples`` samples of ``frames`` random rows, with tags, and an untrained BatchTopK
SAE (discovery's memory does not depend on training; BatchTopK's threshold avoids a top-k over
32,768-wide rows, the pass's slowest part on a CPU). Reported: wall-clock, peak RSS, the score
file's size, and the dense matrices the earlier method held, for comparison.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError

from .common import in_fresh_process, peak_rss_mib, report, run_bench, summarize, target

NAME = "discovery_memory_bench"
RSS_GOAL_MIB = 1536
FLAT_GOAL = 1.10  # the larger store's peak RSS over the smaller's
TAGS = [f"tag{i:02d}" for i in range(24)]


@dataclass(frozen=True)
class DiscoveryMemoryConfig:
    """Options of ``python -m bench.discovery_memory_bench``."""

    samples: tuple[int, ...] = (20_000, 40_000)
    """Store sizes in samples (each a separate discovery)."""
    frames: int = 10
    """Rows per sample."""
    d_model: int = 64
    """Activation width (the score matrix does not depend on it)."""
    hidden_dim: int = 32_768
    """SAE latents (the study's expansion 32 on musicgen-small)."""
    top_k: int = 32
    """Latents active per row (the untrained SAE's threshold is set for it)."""
    tmp_dir: str = tempfile.gettempdir()
    """Where stores, SAE and outputs go (removed afterwards)."""

    def __post_init__(self) -> None:
        if not self.samples or min(self.samples) < 10:
            raise UsageError(f"--samples takes store sizes of at least 10 samples, got {self.samples}")


def _write_store(path: Path, n_samples: int, cfg: DiscoveryMemoryConfig) -> None:
    from sae_core.store import StoreMeta, acts_name, create_store

    rng = np.random.default_rng(0)
    samples = [{"index": i, "prompt": f"sample {i}", "source_id": f"bench-{i}", "n_frames": cfg.frames,
                "tags": sorted(rng.choice(TAGS, size=rng.integers(1, 4), replace=False).tolist())}
               for i in range(n_samples)]
    meta = StoreMeta(model="bench", layers=(0,), d_model=cfg.d_model, n_codebooks=4, frame_rate=50.0,
                     sampling_rate=32000, dtype="float32", mode="generate", n_samples=n_samples,
                     n_rows=n_samples * cfg.frames, n_units=1)
    store = create_store(path, meta, samples, [cfg.frames] * n_samples, unit_rows=n_samples * cfg.frames)
    store.write_rows(acts_name(0), 0, rng.standard_normal((n_samples * cfg.frames, cfg.d_model), dtype=np.float32))
    store.commit_unit(0, "shard-0-of-1")


def _write_sae(path: Path, cfg: DiscoveryMemoryConfig) -> None:
    import jax

    from jax_sae import model as M
    from jax_sae.checkpoint import model_tree, save_model
    from jax_sae.config import SAEConfig

    sae = SAEConfig(sae_type="batch_topk", d_model=cfg.d_model, hidden_dim=cfg.hidden_dim, top_k=cfg.top_k, layer=0,
                    model="bench")
    params = M.init_params(jax.random.PRNGKey(0), sae, np.zeros(cfg.d_model, np.float32))
    x = np.random.default_rng(1).standard_normal((512, cfg.d_model), dtype=np.float32)
    pre = np.asarray(M.pre_activations(params, x))
    save_model(path, sae, model_tree(params, float(np.quantile(pre, 1 - cfg.top_k / cfg.hidden_dim)), 1.0),
               {"step": 0})


def _discover(sae: str, store: str, output: str) -> dict:
    """One discovery, the CLI's way, in this (fresh) process."""
    from discovery.discover import main
    from discovery.feature_files import FeatureFiles

    started = time.perf_counter()
    main(["--sae_path", sae, "--store", store, "--output", output, "--no-progress", "--max_features", "20"])
    seconds = time.perf_counter() - started
    summary = FeatureFiles(output).read_summary()
    left = [p.name for p in Path(output).parent.iterdir() if p.name.startswith(".")]
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "tags": summary["alignment"]["tags"],
            "median_best_auroc": summary["alignment"]["median_best_auroc"], "files_left": left}


def run(cfg: DiscoveryMemoryConfig) -> dict:
    from discovery.scores import block_columns

    figures, derived, rss = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="discovery-memory-", dir=cfg.tmp_dir) as tmp:
        root = Path(tmp)
        _write_sae(root / "sae", cfg)
        for n in cfg.samples:
            _write_store(root / f"store{n}", n, cfg)
            got = in_fresh_process(_discover, str(root / "sae"), str(root / f"store{n}"),
                                   str(root / f"out{n}" / "features.json"))
            if not got["tags"] or got["files_left"]:
                raise RuntimeError(f"discovery of {n} samples aligned {got['tags']} tags and left {got['files_left']}")
            rss[n] = got["peak_rss_mib"]
            cols = block_columns(n, cfg.hidden_dim)
            figures[f"{n} samples: wall-clock"] = summarize([got["seconds"]])
            figures[f"{n} samples: peak RSS"] = summarize([got["peak_rss_mib"]], "MiB")
            derived[f"{n} samples: score file (MiB)"] = round(n * cols * -(-cfg.hidden_dim // cols) * 2 / 2**20)
            derived[f"{n} samples: features per column block"] = cols
            derived[f"{n} samples: the dense score matrix the earlier method held (MiB)"] = round(
                n * cfg.hidden_dim * 2 / 2**20)
            derived[f"{n} samples: its alignment's float64 ranks and int64 order (MiB)"] = round(
                n * cfg.hidden_dim * 16 / 2**20)
            print(f"{n} samples: {got['seconds']:.1f} s, peak RSS {got['peak_rss_mib']:.0f} MiB, "
                  f"{got['tags']} tags aligned", flush=True)
    small, large = min(rss), max(rss)
    targets = [target(f"peak RSS at {n} samples", round(v), f"under {RSS_GOAL_MIB} MiB", v < RSS_GOAL_MIB)
               for n, v in rss.items()]
    if large != small:
        ratio = rss[large] / rss[small]
        derived[f"peak RSS, {large} / {small} samples"] = round(ratio, 3)
        targets.append(target("flat as the samples grow", round(ratio, 3), f"at most {FLAT_GOAL}x", ratio <= FLAT_GOAL))
    return report(NAME, figures, params={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                  derived=derived, targets=targets)


def main(argv: list[str] | None = None):
    return run_bench(DiscoveryMemoryConfig, run, argv, NAME, "Discovery's peak memory as the samples double.")


if __name__ == "__main__":
    main()

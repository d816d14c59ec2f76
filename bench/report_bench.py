"""``python -m bench.report_bench``: the report's size per clip (Ogg/Opus against WAV) and how it
builds and loads with hundreds of features.

Audio: tiny-random extracts ``--prompts`` prompts of ``--seconds`` s, a small TopK SAE is trained
and discovered, and the report is built twice from the same features, ``--wav`` and the default
Ogg/Opus, with ``--window``-second clips; the figure is the audio bytes per clip of each.

Scale: a synthetic store, an SAE of ``--hidden`` latents, discovery of ``--features`` features
(``--no_filter``) and a report without audio; the build's seconds, and in headless Chromium (when
chromium, chromedriver and selenium are present) the index's load time and the time one sort and
one filter take, median of ``--repeats``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import report, run_bench, summarize, synthetic_store, target


@dataclass(frozen=True)
class ReportBenchConfig:
    """Options of ``python -m bench.report_bench``."""

    prompts: int = 4
    """tiny-random prompts extracted for the audio comparison."""
    seconds: float = 8.0
    """Seconds generated per prompt."""
    window: float = 4.0
    """Seconds per report clip (the report's default)."""
    features: int = 300
    """Features reported in the scale test."""
    hidden: int = 512
    """Latents of the scale test's SAE."""
    repeats: int = 5
    """Page loads (and sorts, filters) timed in Chromium."""


def _audio_sizes(cfg: ReportBenchConfig, root: Path) -> dict[str, float]:
    from discovery.discover import main as discover
    from discovery.report import main as build
    from extractor.extract import ExtractConfig, extract
    from jax_sae.train import TrainConfig, train

    words = ["slow piano", "fast drums", "calm guitar", "bright synth", "deep bass", "soft strings"]
    (root / "prompts.txt").write_text("\n".join(f"a {words[i % len(words)]} piece number {i}"
                                                 for i in range(cfg.prompts)) + "\n")
    extract(ExtractConfig(model="tiny-random", layers="2", prompt_file=str(root / "prompts.txt"), batch_size=2,
                          duration=cfg.seconds, out=str(root / "store"), device="cpu", dtype="float32", top_k=50))
    train(TrainConfig.of(sae_type="topk", layer_idx=2, hidden_dim=64, top_k=4, batch_size=64, epochs=2,
                      store=str(root / "store"), out=str(root / "models"), progress=False, patience=0))
    features = root / "features_layer2.json"
    discover(["--sae_path", str(root / "models/topk/layer2/dim64/best"), "--store", str(root / "store"),
              "--output", str(features), "--no_filter", "--max_features", "3", "--examples", "2", "--no-progress"])
    sizes = {}
    for kind, extra in (("wav", ["--wav"]), ("ogg", [])):
        out = root / f"report-{kind}"
        build(["--features", str(features), "--out", str(out), "--examples", "2", "--window", str(cfg.window),
               "--device", "cpu", "--no-progress", "--no-effects", *extra])
        clips = sorted((out / "audio").glob(f"*.{kind}"))
        sizes[kind] = sum(c.stat().st_size for c in clips) / max(1, len(clips))
    return sizes


def _scale(cfg: ReportBenchConfig, root: Path) -> tuple[float, dict[str, list[float]] | None]:
    from discovery.discover import main as discover
    from discovery.report import main as build
    from jax_sae.train import TrainConfig, train
    from sae_core.store import acts_name

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(cfg.hidden, 32)).astype(np.float32)
    codes = (rng.random((20_000, cfg.hidden)) < 6 / cfg.hidden) * rng.exponential(size=(20_000, cfg.hidden))
    store = synthetic_store(root / "store", n_samples=400, frames=50, d_model=32, dtype="float32", unit_samples=400)
    store.write_rows(acts_name(0), 0, (codes @ directions).astype(np.float32))
    store.commit_unit(0, "shard-0-of-1")
    train(TrainConfig.of(sae_type="topk", layer_idx=0, hidden_dim=cfg.hidden, top_k=8, batch_size=512, epochs=1,
                      store=str(root / "store"), out=str(root / "models"), progress=False, patience=0))
    features = root / "features_layer0.json"
    discover(["--sae_path", str(root / f"models/topk/layer0/dim{cfg.hidden}/best"), "--store", str(root / "store"),
              "--output", str(features), "--no_filter", "--max_features", str(cfg.features), "--examples", "2",
              "--no-progress"])
    started = time.perf_counter()
    build(["--features", str(features), "--out", str(root / "report"), "--examples", "2", "--window", "0.5",
           "--no-audio", "--no-progress"])
    seconds = time.perf_counter() - started
    return seconds, _browser_times(root / "report" / "index.html", cfg.repeats)


def _browser_times(index: Path, repeats: int) -> dict[str, list[float]] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError:
        return None
    if not chromium or not driver_path:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    times: dict[str, list[float]] = {"load": [], "sort": [], "filter": []}
    try:
        for _ in range(repeats):
            driver.get(index.resolve().as_uri())
            times["load"].append(driver.execute_script(
                "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;") / 1e3)
            times["sort"].append(driver.execute_script(
                "const t0 = performance.now(); document.querySelectorAll('th')[2].click(); "
                "return performance.now() - t0;") / 1e3)
            times["filter"].append(driver.execute_script(
                "const f = document.getElementById('filter'); const t0 = performance.now(); f.value = 'a';"
                "f.dispatchEvent(new Event('input')); return performance.now() - t0;") / 1e3)
    finally:
        driver.quit()
    return times


def run(cfg: ReportBenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        (Path(tmp) / "audio").mkdir()
        (Path(tmp) / "scale").mkdir()
        sizes = _audio_sizes(cfg, Path(tmp) / "audio")
        build_seconds, browser = _scale(cfg, Path(tmp) / "scale")
    figures = {"WAV bytes per clip": summarize([sizes["wav"]], "B"),
               "Ogg/Opus bytes per clip": summarize([sizes["ogg"]], "B"),
               f"report of {cfg.features} features (no audio): build": summarize([build_seconds], "s")}
    for name, values in (browser or {}).items():
        figures[f"{cfg.features}-feature index: {name}"] = summarize(values, "s")
    ratio = sizes["ogg"] / sizes["wav"]
    return report("report_bench", figures, params=vars(cfg), derived={"Opus / WAV bytes per clip": ratio},
                  targets=[target("bytes per clip against WAV", ratio, "< 0.25", ratio < 0.25)])


def main(argv: list[str] | None = None):
    return run_bench(ReportBenchConfig, run, argv, "report_bench", __doc__.split("\n")[0])


if __name__ == "__main__":
    main()

"""``python -m discovery.report``: a static, browsable report of discovered features.

``index.html`` lists every reported feature (sortable) with the layer's summary and density
histogram; ``f{N}.html`` shows each feature's top examples with an audio player and, under it,
the feature's activation over the clip's seconds. Audio is decoded from the stored codes by
the torch side (``extractor.render``, imported only here, lazily; a JAX-only install gets one line
saying so, or ``--no-audio``). All paths are relative.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractor.store import StoreError, open_store
from jax_sae.plots import plot_density

from .plotting import plot_activation

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4}th:hover{background:#e8e8e8}.ex{margin:1.2em 0;padding:.6em;
border:1px solid #e3e3e3;border-radius:6px}.tags{color:#666;font-size:.9em}audio{width:100%}.ex img{width:100%}
.metrics span{display:inline-block;margin-right:1.5em}"""
SORT_JS = """document.querySelectorAll('th').forEach((th,i)=>th.addEventListener('click',()=>{
const tb=th.closest('table').tBodies[0];const rows=[...tb.rows];const asc=th.dataset.asc!=='1';
th.dataset.asc=asc?'1':'0';rows.sort((a,b)=>{const x=a.cells[i].dataset.v??a.cells[i].textContent,
y=b.cells[i].dataset.v??b.cells[i].textContent;const nx=parseFloat(x),ny=parseFloat(y);
const c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?c:-c;});rows.forEach(r=>tb.appendChild(r));}));"""


class ReportError(ValueError):
    """A report that cannot be built from what was given."""


@dataclass(frozen=True)
class ReportConfig:
    """Options of ``python -m discovery.report``."""

    features: str | None = None
    """Features JSON written by discovery.discover."""
    store: str | None = None
    """Activation store (default: the one recorded beside the features)."""
    sae: str | None = None
    """SAE checkpoint (default: the one recorded beside the features)."""
    out: str | None = None
    """Report directory (default: beside the features, report_layer{N}/)."""
    model: str | None = None
    """Model whose EnCodec decodes the audio (default: the store's model)."""
    window: float = 4.0
    """Seconds of audio around each example's peak."""
    full_clips: bool = False
    """Decode whole samples instead of windows."""
    examples: int = 8
    """Examples shown per feature."""
    eval: str | None = None
    """eval.json from extractor.evaluate, to show loss recovered."""
    audio: bool = True
    """Decode audio (off: plots and text only)."""
    device: str = "auto"
    """Device for audio decoding."""
    progress: bool = True
    """Show progress."""

    def __post_init__(self) -> None:
        if not self.features:
            raise ReportError("--features is required (results/features_layer{N}.json)")
        if not self.window > 0 or self.examples <= 0:
            raise ReportError("--window and --examples must be positive")


def _esc(value) -> str:
    return html.escape(str(value))


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}"
            "</body></html>\n")


def _summary_metrics(sae_path: Path, eval_path: str | None) -> dict:
    metrics = {}
    stats_file = sae_path.parent / "training_stats.json"
    if stats_file.exists():
        final = json.loads(stats_file.read_text()).get("final_val") or {}
        metrics.update({k: final[k] for k in ("fvu", "l0", "dead_fraction") if k in final})
    if eval_path:
        overall = json.loads(Path(eval_path).read_text())["overall"]
        metrics.update({"loss recovered (zero abl.)": overall["loss_recovered_zero"],
                        "loss recovered (mean abl.)": overall["loss_recovered_mean"]})
    return metrics


def _audio_renderer():
    """``extractor.render`` (torch and transformers); a MissingExtraError on a JAX-only install."""
    from jax_sae.export import missing_extract

    try:
        import transformers  # noqa: F401 - rendering loads the model with it; checked before any work
        from extractor import render
    except ModuleNotFoundError as err:
        if err.name not in ("torch", "transformers"):
            raise
        raise missing_extract("the report's audio needs PyTorch and transformers (EnCodec decodes the stored codes)",
                              "--no-audio builds the report without sound") from None
    return render


def build_report(cfg: ReportConfig) -> Path:
    import jax_sae

    render = _audio_renderer() if cfg.audio else None
    features_path = Path(cfg.features)
    if not features_path.exists():
        raise ReportError(f"no features file at {features_path}; run python -m discovery.discover first")
    features = json.loads(features_path.read_text())
    summary_path = features_path.with_suffix(".summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    store_path, sae_path = cfg.store or summary.get("store"), cfg.sae or summary.get("sae_path")
    if not store_path or not sae_path:
        raise ReportError("pass --store and --sae (no summary file beside the features records them)")
    store, sae = open_store(store_path), jax_sae.load(sae_path)
    layer = summary.get("layer", sae.cfg.layer)
    out = Path(cfg.out or features_path.parent / f"report_layer{layer}")
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    requests, pages = [], {}
    rate = store.meta.frame_rate
    for key, info in features.items():
        feature, blocks = int(key), []
        for i, ex in enumerate(info["top_examples"][: cfg.examples]):
            curve = np.asarray(sae.encode(store.sample_rows(ex["sample_index"], layer)))[:, feature]
            peak = ex["frame"] if "frame" in ex else int(np.argmax(curve))
            half = int(round(cfg.window * rate / 2))
            first, last = (0, len(curve)) if cfg.full_clips else (max(0, peak - half), min(len(curve), peak + half))
            stem = f"f{feature}_e{i}"
            plot_activation(curve[first:last], rate, out / "plots" / f"{stem}.png", first / rate)
            if render is not None:
                wav = str(out / "audio" / f"{stem}.wav")
                requests.append(render.AudioRequest(ex["sample_index"], first, last, wav))
            player = f"<audio controls preload='metadata' src='audio/{stem}.wav'></audio>" if cfg.audio else ""
            blocks.append(
                f"<div class='ex'><b>#{i + 1}</b> activation {ex['activation']:.3f} "
                f"({_esc(ex['type'])}; sample {ex['sample_index']}, {first / rate:.2f}-{last / rate:.2f} s)"
                f"<p>{_esc(ex['prompt'])}</p><p class='tags'>tags: {_esc(', '.join(ex.get('tags', [])) or '-')}</p>"
                f"{player}<img src='plots/{stem}.png' alt='activation of feature {feature} over time'></div>")
        pages[feature] = blocks
    if requests:
        render.render_windows(cfg.model or store.meta.model, store, requests, cfg.device, cfg.progress)
    _write_pages(out, features, pages, layer)
    _write_index(out, features, summary, _summary_metrics(Path(sae_path), cfg.eval), Path(sae_path), features_path,
                 layer)
    print(f"report: {out / 'index.html'}")
    return out / "index.html"


def _write_pages(out: Path, features: dict, pages: dict, layer) -> None:
    for key, info in features.items():
        aligned = ", ".join(f"{_esc(a['tag'])} (AUROC {a['auroc']:.2f})" for a in info.get("aligned_tags", []))
        body = (f"<p><a href='index.html'>&larr; all features</a></p><h1>Feature {key}: {_esc(info['label'])}</h1>"
                f"<p class='metrics'><span>layer {_esc(layer)}</span><span>frequency {info.get('frequency', 0):.4g}"
                f"</span><span>max {info.get('max_activation', 0):.3f}</span><span>label: "
                f"{_esc(info.get('label_source', ''))}</span></p>"
                + (f"<p>{_esc(info['description'])}</p>" if info.get("description") else "")
                + f"<p>aligned tags: {aligned or '-'}</p>" + "".join(pages[int(key)]))
        (out / f"f{key}.html").write_text(_page(f"Feature {key}", body))


def _write_index(out: Path, features: dict, summary: dict, metrics: dict, sae_path: Path, features_path: Path,
                 layer) -> None:
    density = ""
    if (sae_path.parent / "density.png").exists():
        shutil.copy(sae_path.parent / "density.png", out / "density.png")
        density = "<h2>Feature density</h2><img src='density.png' alt='feature density histogram'>"
    elif features_path.with_suffix(".all.npz").exists():
        counts = np.load(features_path.with_suffix(".all.npz"))["frequency"]
        plot_density(counts, out / "density.png")
        density = "<h2>Feature density</h2><img src='density.png' alt='feature density histogram'>"
    align = summary.get("alignment", {})
    shown = {**metrics, "median best tag AUROC": align.get("median_best_auroc"),
             "features with AUROC >= 0.8": align.get("fraction_auroc_ge_0.8")}
    chips = "".join(f"<span>{_esc(k)}: {v:.4g}</span>" for k, v in shown.items() if isinstance(v, (int, float)))
    rows = []
    for key, info in features.items():
        best = (info.get("aligned_tags") or [{}])[0]
        det = info.get("detection_score")
        rows.append(
            f"<tr><td data-v='{key}'><a href='f{key}.html'>{key}</a></td><td>{_esc(info['label'])}</td>"
            f"<td data-v='{info.get('frequency', 0)}'>{info.get('frequency', 0):.4g}</td>"
            f"<td data-v='{info.get('max_activation', 0)}'>{info.get('max_activation', 0):.3f}</td>"
            f"<td>{_esc(best.get('tag', '-'))}</td><td data-v='{best.get('auroc', 0)}'>{best.get('auroc', 0):.3f}</td>"
            f"<td data-v='{det if det is not None else -1}'>{'-' if det is None else f'{det:.2f}'}</td></tr>")
    body = (f"<h1>Features of layer {_esc(layer)}</h1><p class='metrics'>{chips}</p>"
            "<table><thead><tr><th>feature</th><th>label</th><th>frequency</th><th>max activation</th>"
            "<th>best tag</th><th>AUROC</th><th>detection</th></tr></thead><tbody>" + "".join(rows)
            + f"</tbody></table>{density}")
    (out / "index.html").write_text(_page(f"Features of layer {layer}", body, SORT_JS))


def main(argv: list[str] | None = None):
    from extractor.cli import run_main
    from jax_sae.checkpoint import CheckpointError
    from jax_sae.export import MissingExtraError, exit_missing_extra

    try:
        return run_main(ReportConfig, argv, prog="python -m discovery.report",
                        description="Build a static HTML report of discovered features.", run=build_report,
                        errors=(ReportError, StoreError, CheckpointError, ValueError))
    except MissingExtraError as err:
        exit_missing_extra(err)


if __name__ == "__main__":
    main()

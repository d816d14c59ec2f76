"""``python -m discovery.report``: a static, browsable report of discovered features.

``index.html`` lists every reported feature (sortable) with the layer's summary and density
histogram; ``f{N}.html`` shows each feature's top examples with an audio player and, under it,
the feature's activation over the clip's seconds. The pages are Jinja2 templates
(``discovery/templates``, autoescaped). Every input is read through its owner: the features and
their summary through ``FeatureFiles``, the training run through ``RunDir``, eval.json through
``sae_core.eval_file``. Audio is decoded from the stored codes by the torch side
(``extractor.render``, imported only here, lazily; a JAX-only install gets one line saying so, or
``--no-audio``). All paths are relative.

NaN/Inf rows in a shown sample do not stop the report: discovery skipped them, so its features
and examples come from the finite rows, and the report shows those. A non-finite row is not fed
to the SAE; it is a gap in the activation curve and never the peak a window centres on. The
report prints one line with how many such rows the shown samples hold (its pages carry no
numbers that could be NaN: a statistic that is missing or null shows as 0).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError
from sae_core.eval_file import read_eval
from sae_core.files import write_text
from jax_sae.plots import plot_density
from jax_sae.run_dir import RunDir

from .feature_files import FeatureFiles
from .examples import ExampleJob, ExampleWorkers
from .plotting import HistogramPlots
from .real_eval import output_path as real_eval_path


class ReportError(UsageError):
    """A report that cannot be built from what was given."""


@dataclass(frozen=True)
class ReportConfig:
    """Options of ``python -m discovery.report``."""

    features: tuple[str, ...] = ()
    """Features JSON written by discovery.discover; several (one per layer) make one report with a
    page set per layer, linked to each other."""
    store: str | None = None
    """Activation store (default: the one recorded beside the features; one features file only)."""
    sae: str | None = None
    """SAE checkpoint (default: the one recorded beside the features; one features file only)."""
    out: str | None = None
    """Report directory (default: beside the features, report_layer{N}/, or report/ for several layers)."""
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
    """Use the model: decode audio, and compute output effects unless --no-effects (off: plots and text
    only, no PyTorch needed)."""
    wav: bool = False
    """Write clips as 16-bit WAV instead of Ogg/Opus (about 8x the bytes; every browser plays both)."""
    steer: int = 0
    """Steer the first N reported features with extractor.steer (unsteered, steered and an equal-norm
    random control, one seed) and put the three clips on each one's page with the feature's measured
    activation in each (needs PyTorch)."""
    steer_prompt: str = "an upbeat pop song with drums and a catchy melody"
    """Prompt of the --steer generations."""
    steer_seconds: float = 5.0
    """Seconds generated per --steer clip."""
    steer_strength: float = 4.0
    """--steer adds this multiple of the feature's max activation along its direction."""
    effects: bool = True
    """Show each feature's output effects: the codes its decoder direction promotes and suppresses in
    each codebook's logits (needs PyTorch, as audio does)."""
    device: str = "auto"
    """Device for audio decoding."""
    plot_workers: int = 0
    """Processes writing the examples' clips and drawing their plots (0: one per core; 1: this
    process). Several are used from 48 examples on."""
    progress: bool = True
    """Show progress."""

    def __post_init__(self) -> None:
        if not self.features:
            raise ReportError("--features is required (results/features_layer{N}.json)")
        if len(self.features) > 1 and (self.store or self.sae):
            raise ReportError("--store and --sae name one layer's; with several --features each summary records its own")
        if not self.window > 0 or self.examples <= 0:
            raise ReportError("--window and --examples must be positive")
        if self.plot_workers < 0:
            raise ReportError(f"--plot_workers must be 0 (one per core) or positive, got {self.plot_workers}")
        if self.steer < 0 or (self.steer and not self.steer_seconds > 0):
            raise ReportError("--steer must be >= 0 and --steer_seconds > 0")


@functools.cache
def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("discovery", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def _write_page(path: Path, template: str, **context) -> None:
    write_text(path, _templates().get_template(template).render(**context))


def _summary_metrics(sae_path: Path, eval_path: str | None, summary: dict) -> list[tuple[str, float]]:
    """The index's headline numbers: the run's final validation metrics, the loss recovered (given
    eval.json), probing and absorption (when discovery.real_eval has run on the checkpoint) and the
    layer's tag alignment; those that are missing or undefined are left out."""
    final = RunDir.of_checkpoint(sae_path).final_val()
    metrics = {k: final[k] for k in ("fvu", "l0", "dead_fraction") if k in final}
    if eval_path:
        overall = read_eval(eval_path)["overall"]
        metrics.update({"loss recovered (zero abl.)": overall["loss_recovered_zero"],
                        "loss recovered (mean abl.)": overall["loss_recovered_mean"]})
    real = real_eval_path(sae_path)
    if real.exists():  # discovery.real_eval's results beside the checkpoint
        result = json.loads(real.read_text())
        probing = result["probing"]["mean"]
        metrics.update({"tag probe F1, top-1 latent": probing.get("top1", {}).get("f1"),
                        "tag probe F1, top-5 latents": probing.get("top5", {}).get("f1"),
                        "tag probe F1, dense": probing.get("dense", {}).get("f1"),
                        "absorption (mean over tag pairs)": result["absorption"]["mean"]})
    align = summary.get("alignment", {})
    metrics.update({"median best tag AUROC": align.get("median_best_auroc"),
                    "features with AUROC >= 0.8": align.get("fraction_auroc_ge_0.8")})
    return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]


def _torch_side(cfg: ReportConfig) -> list[tuple[str, str, str] | None]:
    """The torch-side modules this report uses (render, effects, steer; None where not), each with
    what needs it and what does without, after checking that their packages are installed
    (without importing them): a MissingExtraError naming the flag that does without, before any work."""
    from jax_sae.torch_side import require

    wanted = [("render", cfg.audio, "the report's audio needs PyTorch and transformers (they load the model)",
               "--no-audio builds the report without it"),
              ("effects", cfg.audio and cfg.effects,
               "the report's output effects need PyTorch and transformers (they load the model)",
               "--no-effects builds the report without it"),
              ("steer", bool(cfg.steer), "--steer needs PyTorch and transformers (they load the model)",
               "--steer 0 builds the report without it")]
    for module, used, need, instead in wanted:
        if used:
            require(module, need, instead)
    return [(module, need, instead) if used else None for module, used, need, instead in wanted]


def build_report(cfg: ReportConfig) -> Path:
    """The report of one layer's features, or of several layers with a page set per layer."""
    from jax_sae.runtime import use_compilation_cache
    from jax_sae.torch_side import torch_module

    modules = _torch_side(cfg)
    use_compilation_cache()
    files = [FeatureFiles(path) for path in cfg.features]
    layers = [(files_.read_summary() or {}).get("layer") for files_ in files]
    if len(files) > 1 and (None in layers or len(set(layers)) < len(layers)):
        raise ReportError(f"--features of several layers need each one's summary, one per layer; found layers {layers}")
    features = [files_.read_features() for files_ in files]
    expected = sum(min(len(info["top_examples"]), cfg.examples) for found in features for info in found.values())
    # The workers start first, so that their start-up overlaps the torch side's imports.
    with ExampleWorkers(expected, cfg.plot_workers, cfg.progress) as workers:
        torch_side = tuple(torch_module(*wanted) if wanted else None for wanted in modules)
        if len(files) == 1:
            return _build_layer(cfg, files[0], features[0], cfg.out, torch_side, [], workers)[0]
        out = Path(cfg.out or files[0].features.parent / "report")
        built = []
        for files_, found, layer in zip(files, features, layers):
            nav = [(other, f"../layer{other}/index.html", other == layer) for other in layers]
            built.append(_build_layer(cfg, files_, found, out / f"layer{layer}", torch_side, nav, workers))
    _write_page(out / "index.html", "layers.html", nav=[], layers=[(layer, f"layer{layer}/index.html", metrics)
                                                                  for layer, (_, metrics) in zip(layers, built)])
    print(f"report: {out / 'index.html'} ({len(layers)} layers)")
    return out / "index.html"


def _build_layer(cfg: ReportConfig, files: FeatureFiles, features: dict, out: Path | None, torch_side: tuple,
                 nav: list[tuple], workers: ExampleWorkers) -> tuple[Path, list[tuple[str, float]]]:
    """One layer's pages (into ``out``, default beside its features); ``nav`` links the other layers'.
    Its examples' clips and plots are made by ``workers``. Returns its index page and its headline metrics."""
    import jax_sae
    from sae_core.store import open_store  # here, not at the top: spawned example workers import this module

    render, effects, steering = torch_side
    summary = files.read_summary() or {}
    store_path, sae_path = cfg.store or summary.get("store"), cfg.sae or summary.get("sae_path")
    if not store_path or not sae_path:
        raise ReportError("pass --store and --sae (no summary file beside the features records them)")
    metrics = _summary_metrics(Path(sae_path), cfg.eval, summary)
    store, sae = open_store(store_path), jax_sae.load(sae_path)
    layer = summary.get("layer", sae.cfg.layer)
    out = Path(out or files.features.parent / f"report_layer{layer}")
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    gaps: dict[int, int] = {}
    examples = {key: _examples(cfg, store, sae, layer, int(key), info["top_examples"][: cfg.examples], out / "plots",
                               gaps)
                for key, info in features.items()}
    _make_examples(cfg, examples, out, store, render, workers)
    views = {key: _feature_view(key, info) for key, info in features.items()}
    histograms = HistogramPlots()
    try:
        for key, view in views.items():
            histogram = features[key].get("activation_histogram")
            if histogram and sum(histogram["counts"]):
                histograms.draw(histogram["edges"], histogram["counts"], view["frequency"],
                                out / "plots" / f"f{key}_hist.png")
                view["histogram"] = f"plots/f{key}_hist.png"
    finally:
        histograms.close()
    if effects is not None:
        directions = np.asarray(sae.params.W_dec_HD)[[int(key) for key in views]]
        per_feature = effects.output_effects(cfg.model or store.meta.model, directions, top=8, device=cfg.device,
                                             d_model=sae.cfg.d_model)
        for view, found in zip(views.values(), per_feature):
            view["effects"] = found
    if steering is not None:
        _steer(cfg, steering, list(views.values())[: cfg.steer], sae_path, store.meta.model, out)
    workers.finish()
    for key, view in views.items():
        _write_page(out / f"f{key}.html", "feature.html", f=view, examples=examples[key], layer=layer, audio=cfg.audio,
                    nav=nav)
    tags = sorted({a["tag"] for view in views.values() for a in view["aligned_tags"]})
    site = f"layer {layer}'s MLP ({sae.cfg.kind})" if sae.cfg.is_transcoder else None  # a transcoder reads the MLP
    _write_page(out / "index.html", "index.html", layer=layer, site=site, features=list(views.values()), metrics=metrics,
                tags=tags,
                density=_density(out / "density.png", Path(sae_path), files), nav=nav)
    if any(gaps.values()):
        print(f"report: {sum(gaps.values())} non-finite (NaN/Inf) rows of layer {layer} in "
              f"{sum(1 for n in gaps.values() if n)} of the shown samples are gaps in their activation curves")
    _print_size(out, sum(len(shown) for shown in examples.values()) if render is not None else 0)
    print(f"report: {out / 'index.html'}")
    return out / "index.html", metrics


def _print_size(out: Path, clips: int) -> None:
    """One line: the report's bytes, and its audio's per clip."""
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    audio = sum(f.stat().st_size for f in (out / "audio").iterdir() if f.is_file())
    per_clip = f", audio {audio / 1e6:.2f} MB in {clips} clips ({audio / max(1, clips) / 1e3:.0f} kB each)" if clips else ""
    print(f"report: {total / 1e6:.2f} MB{per_clip}")


def _activation_curve(store, sae, layer: int, sample: int, feature: int) -> tuple[np.ndarray, int]:
    """The feature's activation over a sample's frames, NaN at its non-finite rows (which the SAE
    never sees), and how many of those there are."""
    rows = store.sample_rows(sample, layer, sae.cfg.input_stream)
    finite = np.isfinite(rows).all(axis=1)
    if finite.all():
        return np.asarray(sae.encode(rows))[:, feature], 0
    curve = np.asarray(sae.encode(np.where(finite[:, None], rows, 0.0)))[:, feature].astype(np.float32)
    curve[~finite] = np.nan
    return curve, int(np.sum(~finite))


def _examples(cfg: ReportConfig, store, sae, layer: int, feature: int, top: list[dict], plots: Path,
              gaps: dict[int, int]) -> list[dict]:
    """Each example's window around its peak (or whole clip), with its activation plotted; ``gaps``
    gets each shown sample's count of non-finite rows."""
    rate = store.meta.frame_rate
    half = int(round(cfg.window * rate / 2))
    out = []
    for i, ex in enumerate(top):
        curve, nonfinite = _activation_curve(store, sae, layer, ex["sample_index"], feature)
        gaps[ex["sample_index"]] = nonfinite
        peak = ex["frame"] if "frame" in ex else int(np.argmax(np.where(np.isnan(curve), -np.inf, curve)))
        first, last = (0, len(curve)) if cfg.full_clips else (max(0, peak - half), min(len(curve), peak + half))
        stem = f"f{feature}_e{i}"
        clip = f"audio/{stem}.{'wav' if cfg.wav else 'ogg'}"
        out.append({"stem": stem, "audio": clip, "curve": curve[first:last], "sample": ex["sample_index"], "first": first, "last": last, "start": first / rate,
                    "end": last / rate, "activation": ex["activation"], "type": ex["type"], "prompt": ex["prompt"],
                    "tags": ex.get("tags", [])})
    return out


def _steer(cfg: ReportConfig, steering, views: list[dict], sae_path: str, store_model: str, out: Path) -> None:
    """Steer each of ``views``' features (the SAE exported to torch once, in a temporary directory);
    the page shows the three runs' clips and the feature's activation in each."""
    import tempfile

    from jax_sae.export import ExportConfig, export

    with tempfile.TemporaryDirectory(prefix="report-steer-") as tmp:
        exported = export(ExportConfig(checkpoint=str(sae_path), format="torch", out=str(Path(tmp) / "sae.pt")))
        for view in views:
            where = out / "steer" / f"f{view['key']}"
            found = steering.steer(steering.SteerConfig(
                model=cfg.model or store_model, sae=str(exported), feature=int(view["key"]), prompt=cfg.steer_prompt,
                duration=cfg.steer_seconds, strength=cfg.steer_strength, out=str(where), device=cfg.device,
                audio_format="wav" if cfg.wav else "ogg"))
            view["steer"] = {"prompt": cfg.steer_prompt, "strength": cfg.steer_strength, "runs": [
                {"name": name, "audio": f"steer/f{view['key']}/{run['audio']}",
                 "mean": run["feature_mean_activation"], "max": run["feature_max_activation"]}
                for name, run in ((n, found["runs"][n]) for n in ("unsteered", "steered", "control"))]}


def _make_examples(cfg: ReportConfig, examples: dict[str, list[dict]], out: Path, store, render,
                   workers: ExampleWorkers) -> None:
    """Hand every example to ``workers``: its activation curve, and with audio its clip's samples
    as the torch side decodes them (the workers write the clip, read it back for the spectrogram
    and draw the plot)."""
    shown = [ex for group in examples.values() for ex in group]
    jobs = {str(out / ex["audio"]): ExampleJob(ex.pop("curve"), store.meta.frame_rate, out / "plots" / f"{ex['stem']}.png",
                                               ex["start"], out / ex["audio"] if render is not None else None)
            for ex in shown}
    if render is None:
        for job in jobs.values():
            workers.add(job)
        return
    requests = [render.AudioRequest(ex["sample"], ex["first"], ex["last"], str(out / ex["audio"])) for ex in shown]
    for request, audio, rate in render.decode_windows(cfg.model or store.meta.model, store, requests, cfg.device,
                                                      cfg.progress, busy_cores=workers.processes):
        workers.add(jobs[request.path].with_audio(audio, rate))


def _feature_view(key: str, info: dict) -> dict:
    """What the pages show of a feature; a statistic a features file lacks (or holds as null) shows as 0."""
    aligned = [a for a in info.get("aligned_tags") or [] if a.get("auroc") is not None]
    best = aligned[0] if aligned else {}
    return {"key": key, "label": info["label"], "frequency": info.get("frequency") or 0,
            "max_activation": info.get("max_activation") or 0, "label_source": info.get("label_source", ""),
            "description": info.get("description"), "aligned_tags": aligned, "best_tag": best.get("tag", "-"),
            "best_auroc": best.get("auroc") or 0, "detection": info.get("detection_score"), "effects": [], "steer": None,
            "histogram": None}


def _density(path: Path, sae_path: Path, files: FeatureFiles) -> bool:
    """The training run's density histogram, else one drawn from ``--all``'s statistics; False if neither."""
    image = RunDir.of_checkpoint(sae_path).density_image()
    if image is not None:
        shutil.copyfile(image, path)
        return True
    all_stats = files.read_all_stats()
    if all_stats is not None:
        plot_density(all_stats["frequency"], path)
        return True
    return False


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(ReportConfig, argv, prog="python -m discovery.report",
                    description="Build a static HTML report of discovered features.", run=build_report)


if __name__ == "__main__":
    main()

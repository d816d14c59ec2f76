"""``python -m launch.study``: Singh et al. 2025's analysis of MusicGen in one command.

extract the layers -> sweep the grid of TopK SAEs (k x expansion, every layer) -> discover every
member (the 1-25% clip-firing filter is in its summary) -> score every member's labels with CLAP
against random clips -> steer each member's filtered features against random directions -> one
study page (``study.html``, ``study.json`` and a PNG of the per-layer trends) with the paper's
tables filled with this run's numbers, each linked to the files behind it.

Every stage runs in its own process through its own CLI (torch and JAX never share one) and is
skipped when its outputs exist and are complete, member by member, so a killed study resumes
where it stopped; ``--force`` redoes everything. ``--plan`` prints the work and the disk it
needs, then stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from discovery.feature_files import CLIP_FIRING
from sae_core.errors import UsageError
from sae_core.files import write_json, write_text

STAGES = ("extract", "sweep", "discover", "labels", "steer", "page")
STEER_BATCH = 16  # outputs per generate() in the steering stage


class StudyError(UsageError):
    """A stage that failed or settings that cannot work."""


@dataclass(frozen=True)
class StudyConfig:
    """Options of ``python -m launch.study`` (defaults: the paper's grid; pass a model and layers)."""

    model: str = "tiny-random"
    """MusicGen: tiny-random, random:FAMILY[:LAYERS], a hub name (facebook/musicgen-small) or a directory."""
    layers: tuple[int, ...] = (1, 2)
    """Decoder layers to study (the paper: 2,6,12,18,22 for small; 2,12,24,36,46 for large)."""
    prompt_file: str = "bundled"
    """Prompts: bundled, or a file from python -m extractor.prompts (MusicCaps captions)."""
    duration: float = 4.0
    """Seconds of audio per prompt."""
    extract_batch_size: int = 8
    """Prompts per generation batch."""
    expansions: tuple[int, ...] = (4, 32)
    """SAE widths as multiples of the layer's width (the paper: 4 and 32)."""
    top_ks: tuple[int, ...] = (32, 100)
    """TopK's k (the paper: 32 and 100)."""
    epochs: int = 10
    """Training epochs."""
    train_batch_size: int = 512
    """Rows per optimizer step."""
    max_features: int = 100
    """Features each member's discovery reports and labels: those firing on 1-25% of clips, by max activation."""
    steer_features: int = 20
    """Features steered per member: the first reported ones (all pass the clip-firing filter)."""
    strengths: tuple[float, ...] = (0.5, 1.0)
    """Steering strengths (python -m extractor.steer_study)."""
    seeds: int = 6
    """Steering seeds per direction and strength."""
    controls: int = 8
    """Random control directions per member."""
    steer_duration: float = 5.0
    """Seconds per steered output."""
    clap: str = "laion/clap-htsat-unfused"
    """CLAP for label scores and steering (tiny-random-clap offline)."""
    label_random: int = 20
    """Random clips each label is compared with."""
    out: str = "study"
    """Root of every output."""
    device: str = "auto"
    """Torch device."""
    stages: tuple[Literal["extract", "sweep", "discover", "labels", "steer", "page"], ...] = STAGES
    """Stages to run; they always run in study order."""
    force: bool = False
    """Redo stages whose outputs exist."""
    plan: bool = False
    """Print the work and the disk it needs, then stop."""
    plan_timing: bool = False
    """With --plan: time generation and training on this machine at the model's released widths
    (random weights, 1 and 3 decoder layers; a minute or two) and print the hours per stage."""

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0:
            raise StudyError(f"--layers takes decoder layer indices, got {self.layers}")
        if not self.expansions or not self.top_ks or min(self.expansions) <= 0 or min(self.top_ks) < 1:
            raise StudyError("--expansions and --top_ks take positive values")
        if self.steer_features < 0 or self.max_features < 1:
            raise StudyError("--max_features must be >= 1 and --steer_features >= 0")


@dataclass(frozen=True)
class Member:
    """One SAE of the sweep and where its study outputs go."""

    name: str
    layer: int
    top_k: int
    expansion: int | None
    hidden_dim: int
    run_dir: Path
    root: Path

    @property
    def sae(self) -> Path:
        return self.run_dir / "best"

    @property
    def features(self) -> Path:
        return self.root / "features" / f"{self.name}.json"

    @property
    def export(self) -> Path:
        return self.root / "exports" / f"{self.name}.pt"

    @property
    def labels(self) -> Path:
        return self.root / "labels" / f"{self.name}.json"

    @property
    def steering(self) -> Path:
        return self.root / "steering" / self.name


def _run(stage: str, command: list[str]) -> None:
    print(f"[{stage}] python -m {' '.join(command)}", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", *command])
    if result.returncode != 0:
        raise StudyError(f"stage {stage} failed (exit {result.returncode}); fix the error above and rerun: "
                         "finished work is skipped")
    print(f"[{stage}] finished in {time.time() - started:.1f} s", flush=True)


def _store(cfg: StudyConfig) -> Path:
    return Path(cfg.out) / "activations"


def _sweep_dir(cfg: StudyConfig) -> Path:
    return Path(cfg.out) / "sweep"


def members(cfg: StudyConfig) -> list[Member]:
    """The finished sweep's members, with their layer, k and width."""
    from jax_sae.sweep.page import read_summary

    out = []
    for record in read_summary(_sweep_dir(cfg))["members"]:
        if not record.get("stats"):
            continue
        config = record["stats"]["config"]
        out.append(Member(record["name"], int(config["layer_idx"]), int(config["top_k"]),
                          record["settings"].get("expansion"), int(config["hidden_dim"]), Path(record["run_dir"]),
                          Path(cfg.out)))
    return sorted(out, key=lambda m: (m.layer, m.top_k, m.hidden_dim))


def steer_ids(member: Member, limit: int, bounds: tuple[float, float] = CLIP_FIRING) -> list[int]:
    """The member's reported features that pass the clip-firing filter, by max activation, at most ``limit``."""
    from discovery.feature_files import FeatureFiles

    files = FeatureFiles(member.features)
    summary = files.read_summary()
    samples = max(int((summary.get("clip_firing") or {}).get("samples") or summary.get("samples") or 0), 1)
    kept = [int(k) for k, info in files.read_features().items()
            if bounds[0] <= int(info.get("sample_count", 0)) / samples <= bounds[1]]
    return kept[:limit]


def _stage_extract(cfg: StudyConfig) -> None:
    from sae_core.store import Store, StoreError

    try:
        if not cfg.force and Store(_store(cfg)).complete:
            print("[extract] done already, skipping")
            return
    except StoreError:
        pass
    _run("extract", ["extractor.extract", "--model", cfg.model, "--layers", ",".join(map(str, cfg.layers)),
                     "--prompt_file", cfg.prompt_file, "--duration", str(cfg.duration), "--batch_size",
                     str(cfg.extract_batch_size), "--out", str(_store(cfg)), "--device", cfg.device]
         + (["--overwrite"] if cfg.force else []))


def _stage_sweep(cfg: StudyConfig) -> None:
    from jax_sae.sweep.page import finished

    if not cfg.force and finished(_sweep_dir(cfg)):
        print("[sweep] done already, skipping")
        return
    _run("sweep", ["jax_sae.sweep", "--store", str(_store(cfg)), "--layers", ",".join(map(str, cfg.layers)),
                   "--sae_type", "topk", "--expansions", ",".join(map(str, cfg.expansions)), "--top_ks",
                   ",".join(map(str, cfg.top_ks)), "--epochs", str(cfg.epochs), "--batch_size",
                   str(cfg.train_batch_size), "--out", str(_sweep_dir(cfg))] + (["--overwrite"] if cfg.force else []))


def _stage_discover(cfg: StudyConfig, member: Member) -> None:
    from discovery.feature_files import FeatureFiles

    if not cfg.force and FeatureFiles(member.features).finished():
        return
    _run("discover", ["discovery.discover", "--sae_path", str(member.sae), "--store", str(_store(cfg)),
                      "--output", str(member.features), "--no_filter", "--clip_firing", ",".join(map(str, CLIP_FIRING)),
                      "--max_features", str(cfg.max_features), "--all", "--no-progress"])


def _stage_labels(cfg: StudyConfig, member: Member) -> None:
    if not cfg.force and member.labels.exists():
        return
    _run("labels", ["extractor.label_scores", "--features", str(member.features), "--store", str(_store(cfg)),
                    "--model", cfg.model, "--clap", cfg.clap, "--random", str(cfg.label_random), "--out",
                    str(member.labels), "--device", cfg.device, "--no-progress"])


def _stage_steer(cfg: StudyConfig, member: Member) -> None:
    ids = steer_ids(member, cfg.steer_features)
    if not ids or (not cfg.force and (member.steering / "steering.json").exists()):
        return
    if not member.export.exists() or cfg.force:
        _run("steer", ["jax_sae.export", "--checkpoint", str(member.sae), "--format", "torch", "--out",
                       str(member.export)])
    _run("steer", ["extractor.steer_study", "--model", cfg.model, "--sae", str(member.export), "--features",
                   str(member.features), "--feature_ids", ",".join(map(str, ids)), "--clap", cfg.clap,
                   "--strengths", ",".join(map(str, cfg.strengths)), "--seeds", str(cfg.seeds), "--controls",
                   str(cfg.controls), "--duration", str(cfg.steer_duration), "--store", str(_store(cfg)),
                   "--batch_size", str(STEER_BATCH), "--out", str(member.steering),
                   "--device", cfg.device, "--no-progress"])


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def study_rows(cfg: StudyConfig) -> list[dict]:
    """One row per member: the paper's numbers for it, with the files they come from."""
    from discovery.feature_files import FeatureFiles

    rows = []
    for m in members(cfg):
        files = FeatureFiles(m.features)
        summary = files.read_summary() if files.finished() else {}
        labels = _read(m.labels)
        steering = _read(m.steering / "steering.json")
        firing = summary.get("clip_firing") or {}
        rows.append({
            "member": m.name, "layer": m.layer, "top_k": m.top_k, "expansion": m.expansion,
            "hidden_dim": m.hidden_dim, "alive": summary.get("alive_features"), "kept": firing.get("kept"),
            "never": firing.get("never"), "rare": firing.get("rare"), "common": firing.get("common"),
            "label_gain": (labels or {}).get("summary", {}).get("mean_gain"),
            "label_gain_ci95": (labels or {}).get("summary", {}).get("gain_ci95"),
            "label_auroc": (labels or {}).get("summary", {}).get("mean_auroc"),
            "labels_preferring_top": (labels or {}).get("summary", {}).get("fraction_preferring_top"),
            "steerable": (steering or {}).get("fraction"), "controls_false_calls":
                (steering or {}).get("controls_false_calls"),
            "steerable_to_clips": ((steering or {}).get("by_top_clips") or {}).get("fraction"),
            "steerable_by_probe": ((steering or {}).get("by_tag_probe") or {}).get("fraction"),
            "files": {"features": str(m.features), "labels": str(m.labels) if labels else None,
                      "steering": str(m.steering / "steering.json") if steering else None,
                      "run": str(m.run_dir)},
        })
    return rows


def _stage_page(cfg: StudyConfig) -> Path:
    out = Path(cfg.out)
    rows = study_rows(cfg)
    layers = sorted({r["layer"] for r in rows})
    trends = []
    for layer in layers:
        at = [r for r in rows if r["layer"] == layer]
        steer = [r["steerable"] for r in at if r["steerable"]]
        k = sum(s["steerable"] for s in steer)
        n = sum(s["of"] for s in steer)
        trends.append({"layer": layer, "kept": sum(r["kept"] or 0 for r in at),
                       "steerable": k, "steered": n, "fraction": k / n if n else None})
    write_json(out / "study.json", {"model": cfg.model, "layers": list(cfg.layers), "clip_firing": list(CLIP_FIRING),
                                    "members": rows, "per_layer": trends})
    _plot_trends(rows, out / "study-trends.png")
    write_text(out / "study.html", _html(cfg, rows, trends))
    print(f"[page] wrote {out / 'study.html'}", flush=True)
    return out / "study.html"


def _plot_trends(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for setting in sorted({(r["top_k"], r["expansion"] or r["hidden_dim"]) for r in rows}):
        at = sorted((r for r in rows if (r["top_k"], r["expansion"] or r["hidden_dim"]) == setting),
                    key=lambda r: r["layer"])
        name = f"k={setting[0]}, x{setting[1]:g}"
        left.plot([r["layer"] for r in at], [r["kept"] or 0 for r in at], "o-", label=name)
        steered = [r for r in at if r["steerable"] and r["steerable"]["of"]]
        if steered:
            frac = [r["steerable"]["fraction"] for r in steered]
            lo = [f - r["steerable"]["ci95"][0] for f, r in zip(frac, steered)]
            hi = [r["steerable"]["ci95"][1] - f for f, r in zip(frac, steered)]
            right.errorbar([r["layer"] for r in steered], frac, yerr=[lo, hi], fmt="o-", capsize=3, label=name)
    left.set(xlabel="layer", ylabel="features firing on 1-25% of clips", title="surviving features")
    right.set(xlabel="layer", ylabel="positively steerable (95% CI)", title="steering success", ylim=(0, 1))
    for ax in (left, right):
        ax.set_xticks(sorted({r["layer"] for r in rows}))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fraction(share: dict | None) -> str:
    """``k/n = p% [lo, hi]`` of a steerable fraction (``discovery.steerability.fraction``)."""
    if not share or not share["of"]:
        return "-"
    return f"{share['steerable']}/{share['of']} = {share['fraction']:.0%} [{share['ci95'][0]:.0%}, {share['ci95'][1]:.0%}]"


def _cell(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _link(text: str, path: str | None, root: Path) -> str:
    if not path:
        return text
    import os
    from html import escape

    return f'<a href="{escape(os.path.relpath(path, root))}">{text}</a>'


def _html(cfg: StudyConfig, rows: list[dict], trends: list[dict]) -> str:
    from html import escape

    root = Path(cfg.out)
    body = [f"<h1>Study of {escape(cfg.model)}</h1>",
            "<p>Singh et al. 2025's analysis reproduced: TopK SAEs per layer, k and expansion; features firing on "
            "1-25% of clips; labels scored by CLAP against random clips; features steered against random "
            "directions of the same norm (<code>python -m launch.study</code>).</p>",
            '<img src="study-trends.png" alt="per-layer trends">',
            "<h2>Surviving features, label scores and steering per SAE</h2><table><tr><th>layer</th><th>k</th>"
            "<th>expansion</th><th>latents</th><th>alive</th><th>kept (1-25% of clips)</th><th>never / rare / "
            "common</th><th>label CLAP gain [95% CI]</th><th>label AUROC</th><th>steerable toward the label "
            "[95% CI]</th><th>controls called steerable</th><th>steerable toward the top clips</th>"
            "<th>steerable by the tag probe</th></tr>"]
    for r in rows:
        ci = r["label_gain_ci95"]
        gain = _cell(r["label_gain"], "{:+.4f}") + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        c = r["controls_false_calls"]
        steer, to_clips, by_probe = (_fraction(r[key]) for key in ("steerable", "steerable_to_clips",
                                                                    "steerable_by_probe"))
        false = "-" if not c or not c["of"] else f"{c['steerable']}/{c['of']}"
        body.append(
            f"<tr><td>{r['layer']}</td><td>{r['top_k']}</td><td>{_cell(r['expansion'], '{:g}')}</td>"
            f"<td>{_link(str(r['hidden_dim']), r['files']['run'], root)}</td><td>{_cell(r['alive'], '{}')}</td>"
            f"<td>{_link(_cell(r['kept'], '{}'), r['files']['features'], root)}</td>"
            f"<td>{_cell(r['never'], '{}')} / {_cell(r['rare'], '{}')} / {_cell(r['common'], '{}')}</td>"
            f"<td>{_link(gain, r['files']['labels'], root)}</td><td>{_cell(r['label_auroc'])}</td>"
            f"<td>{_link(steer, r['files']['steering'], root)}</td><td>{false}</td><td>{to_clips}</td><td>{by_probe}</td></tr>")
    body.append("</table><h2>Per layer</h2><table><tr><th>layer</th><th>kept features (all SAEs)</th>"
                "<th>steerable / steered</th></tr>")
    for t in trends:
        frac = f" ({t['fraction']:.0%})" if t["fraction"] is not None else ""
        body.append(f"<tr><td>{t['layer']}</td><td>{t['kept']}</td><td>{t['steerable']}/{t['steered']}{frac}</td></tr>")
    body.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>study</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def _known_layers(model: str) -> int | None:
    """How many decoder layers the model has, from the family's numbers (None when not known
    without loading it: a local directory)."""
    from extractor.families import TOY_LAYERS, FamilyError, get_family
    from extractor.models import TOY_MODELS

    if model in TOY_MODELS:
        return TOY_LAYERS
    parts = model.removeprefix("random:").split(":")
    try:
        family = get_family(parts[0].split("/")[-1])
    except FamilyError:
        return None
    return int(parts[1]) if model.startswith("random:") and len(parts) > 1 and parts[1].isdigit() \
        else family.num_layers


def check_layers(cfg: StudyConfig) -> None:
    """--layers within the model's decoder, before any work."""
    layers = _known_layers(cfg.model)
    if layers is not None and max(cfg.layers) >= layers:
        raise StudyError(f"--layers {','.join(map(str, cfg.layers))}: {cfg.model} has {layers} decoder layers "
                         f"(0-{layers - 1}); choose layers in that range")


def _width_and_rate(model: str) -> tuple[int, float]:
    """The decoder's width and the frame rate: from the released family's numbers for a hub name
    (no download), else from the model's config."""
    from extractor.families import FamilyError, get_family
    from extractor.models import load_config

    name = model.removeprefix("random:").split(":")[0].split("/")[-1]  # random:FAMILY[:LAYERS] or a hub name
    try:
        return get_family(name).hidden_size, 50.0  # every released MusicGen: 50 frames/s
    except FamilyError:
        config = load_config(model)
        return int(config.decoder.hidden_size), float(config.audio_encoder.frame_rate)


def plan(cfg: StudyConfig) -> dict:
    """The work and the disk it needs, from the model's config and the prompts (no weights loaded)."""
    from extractor.prompts import load_prompt_file

    width, rate = _width_and_rate(cfg.model)
    prompts = len(load_prompt_file(cfg.prompt_file))
    rows = int(prompts * round(cfg.duration * rate))
    grid = len(cfg.layers) * len(cfg.expansions) * len(cfg.top_ks)
    latents = [int(e * width) for e in cfg.expansions]
    per_member_steer = cfg.steer_features * len(cfg.strengths) * cfg.seeds
    steer_outputs = grid * (per_member_steer + (cfg.controls * len(cfg.strengths) + 1) * cfg.seeds)
    sae_bytes = len(cfg.layers) * len(cfg.top_ks) * sum(2 * h * width * 4 for h in latents) * 5  # best, final, ckpts
    store_bytes = rows * width * 2 * len(cfg.layers)
    scores_bytes = max(prompts * h * 2 for h in latents)
    work = {"prompts": prompts, "rows_per_layer": rows, "store_gb": store_bytes / 1e9, "saes": grid,
            "latents": latents, "sae_checkpoints_gb": sae_bytes / 1e9, "discovery_scores_gb_at_once": scores_bytes / 1e9,
            "training_tokens": rows * cfg.epochs * len(cfg.layers), "steering_outputs": steer_outputs,
            "steering_audio_seconds": steer_outputs * cfg.steer_duration}
    print(f"study of {cfg.model}: {prompts} prompts x {cfg.duration:g} s -> {rows:,} rows per layer, "
          f"{len(cfg.layers)} layers ({store_bytes / 1e9:.2f} GB of float16 activations)")
    print(f"  {grid} TopK SAEs ({len(cfg.layers)} layers x expansions {list(cfg.expansions)} x k {list(cfg.top_ks)}; "
          f"latents {latents}), {cfg.epochs} epochs: {work['training_tokens']:,} training rows; "
          f"~{sae_bytes / 1e9:.2f} GB of checkpoints")
    print(f"  discovery: {grid} passes; per-sample scores on disk up to {scores_bytes / 1e9:.2f} GB at a time")
    print(f"  steering: {steer_outputs:,} outputs of {cfg.steer_duration:g} s ({cfg.steer_features} features, "
          f"{len(cfg.strengths)} strengths, {cfg.seeds} seeds, {cfg.controls} controls per SAE)")
    if cfg.plan_timing:
        work["hours"] = _timed_plan(cfg, width, rate, prompts, rows, latents)
    return work


def _timed_plan(cfg: StudyConfig, width: int, rate: float, prompts: int, rows: int, latents: list[int]) -> dict:
    """Hours per stage on this machine (``launch.study_timing``), printed and returned."""
    import math

    from extractor.families import FamilyError, get_family

    from .study_timing import generation_seconds, measure

    name = cfg.model.removeprefix("random:").split(":")[0].split("/")[-1]
    try:
        family = get_family(name)
    except FamilyError:
        raise StudyError(f"--plan_timing times the released families at their widths; {cfg.model} is not one "
                         "(pass the hub name of the family it belongs to)") from None
    print(f"  timing {family.name} on this machine (random weights at its widths, 1 and 3 decoder layers) ...",
          flush=True)
    timing = measure(family.name, _known_layers(cfg.model) or family.num_layers, width, latents, list(cfg.top_ks),
                     extract_batch=cfg.extract_batch_size, steer_batch=STEER_BATCH, train_batch=cfg.train_batch_size,
                     device=cfg.device)
    delay = timing["max_delay"]
    extract = generation_seconds(timing, cfg.extract_batch_size, prompts, int(round(cfg.duration * rate)) + delay)
    steps = math.ceil(rows * cfg.epochs / cfg.train_batch_size)
    sweep = len(cfg.layers) * sum(steps * timing["training"][f"{h}x{k}"] + timing["compile"][f"{h}x{k}"]
                                  for h in latents for k in cfg.top_ks)
    per_seed = 1 + (cfg.steer_features + cfg.controls) * len(cfg.strengths)
    grid = len(cfg.layers) * len(cfg.expansions) * len(cfg.top_ks)
    steer = grid * cfg.seeds * generation_seconds(timing, STEER_BATCH, per_seed,
                                                  int(round(cfg.steer_duration * rate)) + delay)
    hours = {"extract": extract / 3600, "sweep": sweep / 3600, "steer": steer / 3600,
             "devices": {"torch": timing["torch_device"], "jax": timing["jax_device"]}}
    print(f"  time here (torch on {timing['torch_device']}, JAX on {timing['jax_device']}): extract ~{_took(extract)}, "
          f"sweep ~{_took(sweep)}, steering ~{_took(steer)}, together ~{_took(extract + sweep + steer)}; not timed: "
          "discovery, label scores, CLAP, the steering read-back (each smaller)")
    return hours


def _took(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def run_study(cfg: StudyConfig) -> Path | dict:
    check_layers(cfg)
    if cfg.plan:
        return plan(cfg)
    started = time.time()
    if "extract" in cfg.stages:
        _stage_extract(cfg)
    if "sweep" in cfg.stages:
        _stage_sweep(cfg)
    per_member = [s for s in ("discover", "labels", "steer") if s in cfg.stages]
    for stage in per_member:
        for member in members(cfg):
            {"discover": _stage_discover, "labels": _stage_labels, "steer": _stage_steer}[stage](cfg, member)
    page = _stage_page(cfg) if "page" in cfg.stages else Path(cfg.out) / "study.html"
    print(f"study finished in {time.time() - started:.1f} s; open {page}")
    return page


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(StudyConfig, argv, prog="python -m launch.study",
                    description="Singh et al. 2025's MusicGen study in one command.", run=run_study)


if __name__ == "__main__":
    main()

"""``python -m extractor.steer_study``: how many of an SAE's features steer MusicGen toward their label.

For each chosen feature of a discovery's features JSON, MusicGen generates from one neutral prompt
("Simple melody", as in Singh et al. 2025) with the feature's decoder direction added to the
layer's output at every generated position (conditional stream), at each ``--strengths`` and
over ``--seeds`` seeds; ``--controls`` random directions are pushed the same way. Every output is
embedded by CLAP and scored against each feature's label; ``discovery.steerability`` decides which
features are positively steerable (their direction an outlier among the random ones) and gives
the fraction with a 95% interval, and the controls judged the same way give the false-call rate.

With ``--store`` (the store the features were found in), two more judges score the same outputs:
CLAP against the audio of each feature's top clips (``by_top_clips``), and a tag probe on
MusicGen's own activations (``by_tag_probe``). For the feature's best-aligned tag, a logistic probe
is fitted on the store's activations at the steered layer, averaged over each sample's frames; each
output's codes are read back by the unsteered model (teacher-forced, the study prompt) and the
probe's logit on that layer's average is its score. The push itself never reaches the probe: it
sees only what was generated.

Push size: every direction, the features' and the controls', is added with the same norm,
``strength x`` the median over the chosen features of ``max activation x |decoder direction|``
(what the study adds for its features: strength times the feature's max activation times its
direction), so that one set of controls is norm-matched to every feature.

Generation is batched: each forward generates ``--batch_size`` outputs, each row with its own
push. The work is resumable seed by seed: each seed's CLAP embeddings go to ``seeds/`` once its
outputs are scored, and a rerun with the same settings starts from the first missing seed. The
settings that decide nothing generated (``--margin``, ``--alpha``, ``--store``), and those a resumed run may
need to change (``--batch_size``, ``--device``, more ``--seeds``), keep the scored seeds: each is
complete on its own, though sampling noise depends on the batching and the device. Anything that
changes a push (another SAE at the same path, other features, max activations, strengths or
controls) or the generation starts afresh: the seeds are filed under a digest of both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sae_core.errors import UsageError
from sae_core.files import write_json

from .clap import DEFAULT_CLAP, Clap

STUDY_PROMPT = "Simple melody"
PROBE_SAMPLES = 4000  # store samples a tag probe is fitted on, at most
MIN_PROBE_SIDE = 4  # samples with and without the tag, in the fitted and the held-out part each


@dataclass(frozen=True)
class SteerStudyConfig:
    """Options of ``python -m extractor.steer_study``."""

    model: str = "facebook/musicgen-small"
    """MusicGen to steer."""
    sae: str | None = None
    """Exported SAE (.pt or SAELens directory)."""
    features: str | None = None
    """Features JSON from discovery (labels and max activations)."""
    feature_ids: tuple[int, ...] = ()
    """Features to test (default: every feature of the JSON)."""
    clap: str = DEFAULT_CLAP
    """CLAP that scores the outputs against the labels (hub name, directory or tiny-random-clap)."""
    strengths: tuple[float, ...] = (0.5, 1.0)
    """Push sizes, as multiples of the features' median max-activation push."""
    seeds: int = 6
    """Seeds per direction and strength (at least 2)."""
    controls: int = 8
    """Random directions of the same norm (at least 3)."""
    prompt: str = STUDY_PROMPT
    """The text prompt every output shares."""
    duration: float = 5.0
    """Seconds of audio per output."""
    batch_size: int = 16
    """Outputs generated per forward."""
    margin: float = 0.0
    """CLAP cosine a feature must gain over the controls' mean (discovery.steerability)."""
    alpha: float = 0.05
    """Level of the test against the controls."""
    store: str | None = None
    """The store the features were found in: also score each output against the CLAP audio of the
    feature's top clips (the study's own criterion), and by a probe for the feature's best-aligned tag
    on the store's activations at the steered layer, beside its label."""
    layer: int | None = None
    """Decoder layer (default: the SAE's layer)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    top_k: int = 250
    """Top-k sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    out: str = "steering"
    """Output directory: steering.json, clips/ and seeds/."""
    audio_format: Literal["ogg", "wav", "none"] = "ogg"
    """Keep each output as Ogg/Opus, 16-bit WAV, or not at all."""
    device: str = "auto"
    """auto | cpu | cuda."""
    model_dtype: str = "auto"
    """Compute dtype."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        from discovery.steerability import MIN_CONTROLS

        if not self.sae or not self.features:
            raise UsageError("--sae and --features are required (an exported SAE and its discovery's features JSON)")
        if not self.strengths or min(self.strengths) <= 0:
            raise UsageError(f"--strengths takes positive push sizes, got {','.join(map(str, self.strengths))}")
        if self.seeds < 2:
            raise UsageError(f"--seeds must be at least 2, got {self.seeds}")
        if self.controls < MIN_CONTROLS:
            raise UsageError(f"--controls must be at least {MIN_CONTROLS} (the controls' spread is the test's "
                             f"yardstick), got {self.controls}")
        if not self.duration > 0 or self.batch_size < 1:
            raise UsageError(f"--duration must be > 0 and --batch_size >= 1, got {self.duration} and {self.batch_size}")
        if not 0 < self.alpha < 1:
            raise UsageError(f"--alpha must be in (0, 1), got {self.alpha}")

    def key(self, plan: Plan, layer: int) -> str:
        """What a scored seed depends on: the generation settings, the CLAP, the layer and every
        row's push (so another SAE or other max activations at the same paths start afresh),
        not the decision's settings, the files or the labels."""
        kept = {k: v for k, v in asdict(self).items()
                if k in ("model", "clap", "prompt", "duration", "guidance_scale", "top_k", "temperature",
                         "model_dtype")}
        digest = hashlib.sha256(json.dumps({**kept, "layer": layer}, sort_keys=True).encode())
        digest.update(plan.deltas.float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class Plan:
    """The chosen features, their labels, and the push of every row of a seed's outputs."""

    features: list[int]
    labels: list[str]
    push_norm: float
    rows: list[tuple[str, int, int]]  # (kind "none" | "feature" | "control", index, strength index)
    deltas: torch.Tensor  # [rows, d_model]


def read_features(cfg: SteerStudyConfig, hidden_dim: int) -> tuple[list[int], list[str], list[float]]:
    """The features to test with their labels and max activations, checked before any model loads."""
    from discovery.feature_files import FeatureFiles

    path = Path(cfg.features)
    found = FeatureFiles(path).read_features()
    ids = list(cfg.feature_ids) or [int(k) for k in found]
    missing = [f for f in ids if str(f) not in found]
    if missing:
        raise UsageError(f"features {missing[:5]} are not in {path}: choose among its {len(found)} features")
    out_of_range = [f for f in ids if not 0 <= f < hidden_dim]
    if out_of_range:
        raise UsageError(f"features {out_of_range[:5]} are out of range: the SAE has {hidden_dim} features")
    labels = [str(found[str(f)].get("label") or "").strip() for f in ids]
    if not ids or not all(labels):
        raise UsageError(f"every tested feature needs a label in {path}; run discovery (heuristic or --use_llm) first")
    peaks = [float(found[str(f)].get("max_activation") or 0.0) for f in ids]
    return ids, labels, peaks


def make_plan(cfg: SteerStudyConfig, sae, ids: list[int], labels: list[str], peaks: list[float]) -> Plan:
    directions = torch.stack([sae.feature_direction(f).float().cpu() for f in ids])  # [F, D]
    norms = directions.norm(dim=1)
    pushes = torch.tensor(peaks) * norms
    if not (pushes > 0).any():
        raise UsageError("every chosen feature has max activation 0 in the features JSON: nothing sets the push size")
    push_norm = float(np.median(pushes[pushes > 0].numpy()))
    units = directions / norms.clamp_min(1e-12)[:, None]
    generator = torch.Generator().manual_seed(12345)
    controls = torch.randn((cfg.controls, directions.shape[1]), generator=generator)
    controls = controls / controls.norm(dim=1, keepdim=True)
    rows, deltas = [("none", 0, 0)], [torch.zeros(directions.shape[1])]
    for kind, vectors in (("feature", units), ("control", controls)):
        for i, unit in enumerate(vectors):
            for a, strength in enumerate(cfg.strengths):
                rows.append((kind, i, a))
                deltas.append(strength * push_norm * unit)
    return Plan(ids, labels, push_norm, rows, torch.stack(deltas))


def _generate_seed(loaded, cfg: SteerStudyConfig, plan: Plan, layer: int, n_frames: int, seed: int, clap: Clap,
                   clips: Path | None, bar) -> tuple[np.ndarray, np.ndarray]:
    """Every row's output for one seed, embedded by CLAP [rows, dim], and its codes read back by the
    unsteered model: the layer's activations, averaged over the frames [rows, d_model]."""
    from sae_core.audio import write_audio

    from .capture import generate_batch, layer_hook, teacher_forced_batch

    guided = cfg.guidance_scale > 1
    embeddings, pooled = [], []
    for start in range(0, len(plan.rows), cfg.batch_size):
        deltas = plan.deltas[start:start + cfg.batch_size].to(loaded.device)
        batch = len(deltas)

        def push(hidden, _start, deltas=deltas, batch=batch):
            new = hidden.clone()
            new[:batch] = hidden[:batch] + deltas[:, None, :].to(hidden.dtype)  # the conditional rows
            return new

        with layer_hook(loaded, layer, push):
            out = generate_batch(loaded, [cfg.prompt] * batch, n_frames, [], guidance_scale=cfg.guidance_scale if guided
                                 else None, top_k=cfg.top_k, temperature=cfg.temperature,
                                 seed=seed * 1_000_003 + start)
        mono = out.audio.mean(axis=1)  # [B, samples]
        embeddings.append(clap.clips(list(mono), loaded.info.sampling_rate))
        read_back = teacher_forced_batch(loaded, [cfg.prompt] * batch, list(out.codes), [layer])[layer]
        pooled.append(np.stack([acts.mean(axis=0) for acts in read_back]))
        if clips is not None:
            for i in range(batch):
                kind, index, a = plan.rows[start + i]
                name = "unsteered" if kind == "none" else f"{kind}{plan.features[index] if kind == 'feature' else index}"
                write_audio(clips / f"{name}-s{a}-seed{seed}.{cfg.audio_format}", mono[i],
                            loaded.info.sampling_rate)
        bar.update(batch)
    return np.concatenate(embeddings), np.concatenate(pooled).astype(np.float32)


def _scores(cfg: SteerStudyConfig, plan: Plan, scores: dict[int, np.ndarray], margin: float) -> dict:
    """Verdicts per feature, the fraction steerable, and the controls' false calls. ``scores``: for
    the position of each judged feature in the plan, every output's score for it [seeds, rows]."""
    from discovery.steerability import control_verdicts, fraction, judge

    kinds = np.array([k for k, _, _ in plan.rows])
    index = np.array([i for _, i, _ in plan.rows])
    strength = np.array([a for _, _, a in plan.rows])
    n_a = len(cfg.strengths)

    def block(sims_SR: np.ndarray, kind: str, i: int) -> np.ndarray:  # [strengths, seeds]
        out = np.zeros((n_a, sims_SR.shape[0]))
        for a in range(n_a):
            out[a] = sims_SR[:, np.flatnonzero((kinds == kind) & (index == i) & (strength == a))[0]]
        return out

    results, verdicts, false_calls = {}, [], []
    for f, sims in scores.items():
        feature, sims = plan.features[f], np.asarray(sims, np.float64)
        steered = block(sims, "feature", f)
        controls = np.stack([block(sims, "control", c) for c in range(cfg.controls)])
        verdict = judge(steered, controls, margin, cfg.alpha)
        verdicts.append(verdict)
        false_calls += control_verdicts(controls, margin, cfg.alpha)
        results[str(feature)] = {
            "label": plan.labels[f], **verdict.to_json(),
            "unsteered": float(sims[:, 0].mean()),
            "steered_mean": [float(x) for x in steered.mean(axis=1)],
            "controls_mean": [float(x) for x in controls.mean(axis=(0, 2))],
            "controls_sd": [float(x) for x in controls.mean(axis=2).std(axis=0, ddof=1)],
            "clip": f"clips/feature{feature}-s{verdict.best_strength}-seed0.{cfg.audio_format}"
            if cfg.audio_format != "none" else None,
        }
    return {"features": results, "fraction": fraction(verdicts), "controls_false_calls": fraction(false_calls)}


def _cosines(audio_SRP: np.ndarray, target_FP: np.ndarray) -> dict[int, np.ndarray]:
    """Each output's CLAP cosine with each feature's target (its label's text, or its top clips' audio)."""
    audio = audio_SRP.astype(np.float64)
    return {f: audio @ target.astype(np.float64) for f, target in enumerate(target_FP)}


def _checked_store(cfg: SteerStudyConfig, ids: list[int]):
    """The features' top samples and the open store, checked before anything is generated."""
    from discovery.feature_files import FeatureFiles
    from sae_core.store import open_store

    from .label_scores import top_samples

    tops = top_samples(FeatureFiles(cfg.features).read_features(), 10)
    empty = [f for f in ids if not tops[str(f)]]
    if empty:
        raise UsageError(f"features {empty[:5]} of {cfg.features} have no top examples with a sample_index to score "
                         "against; rerun discovery, or leave out --store")
    return tops, open_store(cfg.store)


def _top_clips(cfg: SteerStudyConfig, clap: Clap, ids: list[int]) -> np.ndarray:
    """Each feature's target audio: the unit mean CLAP embedding of its top clips (the samples of
    its top examples, decoded from the store's codes)."""
    from .render import AudioRequest, decode_windows

    tops, store = _checked_store(cfg, ids)
    wanted = sorted({s for f in ids for s in tops[str(f)]})
    requests = [AudioRequest(s, 0, int(store.offsets[s + 1] - store.offsets[s]), "") for s in wanted]
    clips, rate = {}, 0
    for req, audio, rate in decode_windows(cfg.model, store, requests, cfg.device, cfg.progress):
        clips[req.sample] = audio.mean(axis=0)
    embedded = dict(zip(wanted, clap.clips([clips[s] for s in wanted], rate))) if wanted else {}
    targets = []
    for f in ids:
        centre = np.mean([embedded[s] for s in tops[str(f)]], axis=0)
        targets.append(centre / max(np.linalg.norm(centre), 1e-12))
    return np.stack(targets)


@dataclass
class TagProbe:
    """A logistic probe for one tag on a layer's activations averaged over each sample's frames."""

    tag: str
    logit: object  # [N, d_model] -> [N]
    positives: int  # samples with the tag among those fitted on
    samples: int  # samples fitted on
    heldout_auroc: float | None  # on the held-out quarter of the samples


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _pooled_store(store, layer: int, samples: np.ndarray) -> np.ndarray:
    """The chosen samples' activations at ``layer``, averaged over each sample's frames [N, d_model]."""
    out = np.zeros((len(samples), store.d_model), np.float64)
    where = {int(s): i for i, s in enumerate(samples)}
    offsets = store.offsets
    for block, x in store.iter_sample_blocks(layer, 1 << 16, samples=samples):
        lengths = (offsets[block + 1] - offsets[block]).astype(np.int64)
        sums = np.add.reduceat(x.astype(np.float64), np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        out[[where[int(b)] for b in block]] = sums / np.maximum(lengths, 1)[:, None]
    return out


def tag_probes(cfg: SteerStudyConfig, ids: list[int], layer: int) -> tuple[dict[int, TagProbe], dict[str, str]]:
    """For each feature's best-aligned tag (discovery's ``aligned_tags``), a probe fitted on up to
    ``PROBE_SAMPLES`` samples of the store at the steered layer (three quarters of the samples with
    the tag and of those without; the other quarter of each gives its held-out AUROC). Returns the probes by feature position, and why each other feature
    has none."""
    from discovery.feature_files import FeatureFiles
    from discovery.real_eval import fit_logit

    found = FeatureFiles(cfg.features).read_features()
    store = _checked_store(cfg, ids)[1]
    if layer not in store.layers:
        raise UsageError(f"the store {cfg.store} has layers {list(store.layers)}, not the steered layer {layer} its "
                         "tag probes read; pass the store the SAE was trained on")
    tag_of = {f: ((found[str(feature)].get("aligned_tags") or [{}])[0]).get("tag") for f, feature in enumerate(ids)}
    skipped = {str(ids[f]): "no aligned tag in the features JSON" for f, tag in tag_of.items() if not tag}
    if len(skipped) == len(ids):
        return {}, skipped
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(store.n_samples, min(store.n_samples, PROBE_SAMPLES), replace=False))
    x = _pooled_store(store, layer, chosen)
    finite = np.isfinite(x).all(axis=1)
    x, kept = x[finite], chosen[finite]
    samples = store.samples
    fitted: dict[str, TagProbe | str] = {}
    for tag in sorted({t for t in tag_of.values() if t}):
        y = np.array([tag in samples[int(s)].get("tags", ()) for s in kept])
        held_out = np.zeros(len(kept), bool)  # a quarter of each side, so that both sides are checked
        for side in (np.flatnonzero(y), np.flatnonzero(~y)):
            held_out[np.random.default_rng(0).permutation(side)[: len(side) // 4]] = True
        sides = [int(np.sum(y[part] == side)) for part in (~held_out, held_out) for side in (True, False)]
        if min(sides) < MIN_PROBE_SIDE:
            fitted[tag] = (f"tag {tag!r} has too few samples with and without it to fit and check a probe "
                           f"(at least {MIN_PROBE_SIDE} of each in both parts)")
            continue
        logit, _ = fit_logit(x[~held_out], y[~held_out])
        fitted[tag] = TagProbe(tag, logit, int(y[~held_out].sum()), int((~held_out).sum()),
                               _auroc(logit(x[held_out]), y[held_out]))
    probes = {}
    for f, tag in tag_of.items():
        if tag:
            if isinstance(fitted[tag], str):
                skipped[str(ids[f])] = fitted[tag]
            else:
                probes[f] = fitted[tag]
    return probes, skipped


def _probe_scores(cfg: SteerStudyConfig, plan: Plan, layer: int, pooled_SRD: np.ndarray,
                  probes: dict[int, TagProbe], skipped: dict[str, str]) -> dict:
    """The outputs judged by the tag probes: each output's probe logit for the feature's tag."""
    S, R, D = pooled_SRD.shape
    flat = pooled_SRD.reshape(S * R, D).astype(np.float64)
    judged = _scores(cfg, plan, {f: probe.logit(flat).reshape(S, R) for f, probe in probes.items()}, 0.0)
    for f, probe in probes.items():
        judged["features"][str(plan.features[f])] |= {
            "tag": probe.tag, "probe_heldout_auroc": probe.heldout_auroc, "probe_samples": probe.samples,
            "probe_positives": probe.positives}
    return {"layer": layer, "score": "probe logit", **judged, "skipped": skipped}


@torch.no_grad()
def steer_study(cfg: SteerStudyConfig) -> dict:
    from tqdm import tqdm

    from .evaluate import checked_layer
    from .models import load_config, load_model
    from .torch_sae import TorchSAE

    sae = TorchSAE.from_pretrained(cfg.sae)
    ids, labels, peaks = read_features(cfg, sae.hidden_dim)
    if cfg.store:
        _checked_store(cfg, ids)
    rate = float(load_config(cfg.model).audio_encoder.frame_rate)
    n_frames = max(1, int(round(cfg.duration * rate)))
    out = Path(cfg.out)
    seeds_dir, clips = out / "seeds", (out / "clips" if cfg.audio_format != "none" else None)
    clap = Clap.load(cfg.clap, cfg.device)
    loaded = load_model(cfg.model, cfg.device, cfg.model_dtype)
    layer = checked_layer(sae, cfg.layer, loaded, cfg.model)
    plan = make_plan(cfg, sae, ids, labels, peaks)
    probes = tag_probes(cfg, ids, layer) if cfg.store else None  # before anything is generated
    for directory in (seeds_dir, clips):
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
    key = cfg.key(plan, layer)
    done = {seed: seeds_dir / f"seed{seed}-{key}.npy" for seed in range(cfg.seeds)}
    read_back = {seed: seeds_dir / f"pooled{seed}-{key}.npy" for seed in range(cfg.seeds)}
    todo = [seed for seed, path in done.items() if not (path.exists() and read_back[seed].exists())]
    with tqdm(total=len(todo) * len(plan.rows), desc=f"steer {len(ids)} features", unit="output",
              disable=not cfg.progress) as bar:
        for seed in todo:
            embedded, pooled = _generate_seed(loaded, cfg, plan, layer, n_frames, seed, clap, clips, bar)
            for path, values in ((read_back[seed], pooled), (done[seed], embedded)):
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, values)
                tmp.replace(path)  # a seed counts once both its files are in place
    audio = np.stack([np.load(done[seed]) for seed in range(cfg.seeds)])  # [S, R, P]
    by_clips = _scores(cfg, plan, _cosines(audio, _top_clips(cfg, clap, ids)), cfg.margin) if cfg.store else None
    by_probe = _probe_scores(cfg, plan, layer, np.stack([np.load(read_back[seed]) for seed in range(cfg.seeds)]),
                             *probes) if probes else None
    report = {"model": cfg.model, "sae": str(cfg.sae), "layer": layer, "features_json": str(cfg.features),
              "clap": cfg.clap, "prompt": cfg.prompt, "duration": cfg.duration, "strengths": list(cfg.strengths),
              "seeds": cfg.seeds, "controls": cfg.controls, "margin": cfg.margin, "alpha": cfg.alpha,
              "push_norm": plan.push_norm, "outputs": int(audio.shape[0] * audio.shape[1]),
              "resumed_seeds": cfg.seeds - len(todo),
              **_scores(cfg, plan, _cosines(audio, clap.texts(plan.labels)), cfg.margin),
              "by_top_clips": by_clips, "by_tag_probe": by_probe}
    write_json(out / "steering.json", report)
    share, false = report["fraction"], report["controls_false_calls"]
    print(f"{out / 'steering.json'}: {share['steerable']} of {share['of']} features positively steerable "
          f"({share['fraction']:.1%}, 95% CI {share['ci95'][0]:.1%}-{share['ci95'][1]:.1%}); random directions "
          f"called steerable {false['steerable']} of {false['of']} times" + (
              f"; against their top clips' audio {by_clips['fraction']['steerable']} of {by_clips['fraction']['of']}"
              if by_clips else "") + (
              f"; by their tag's probe {by_probe['fraction']['steerable']} of {by_probe['fraction']['of']}"
              if by_probe else ""))
    return report


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(SteerStudyConfig, argv, prog="python -m extractor.steer_study",
                    description="Count the features that steer MusicGen toward their label, against random directions.",
                    run=steer_study)


if __name__ == "__main__":
    main()

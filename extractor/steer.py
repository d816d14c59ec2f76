"""``python -m extractor.steer``: generate with an SAE feature pushed into MusicGen's residual stream.

At the SAE's layer, every generated position in the chosen window gets
``strength * max_activation * d_j`` added, where ``d_j`` is what one unit of feature j adds to
the reconstruction (or, with ``--clamp``, the feature is set to a value). Three runs share one
seed: unsteered, steered, and a control that adds a random direction of the same norm. Each
writes a WAV; ``steer.json`` holds feature j's activation at the layer in each run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sae_core.audio import write_audio
from .capture import generate_batch, layer_hook, mlp_module, module_hook
from sae_core.errors import UsageError
from .evaluate import checked_layer
from sae_core.files import write_json
from .models import load_config, load_model
from .torch_sae import TorchSAE


@dataclass(frozen=True)
class SteerConfig:
    """Options of ``python -m extractor.steer``."""

    model: str = "facebook/musicgen-small"
    """MusicGen to steer."""
    sae: str | None = None
    """Exported SAE (.pt or SAELens directory)."""
    feature: int | None = None
    """Feature index to steer."""
    strength: float = 4.0
    """Multiple of the feature's max activation to add (negative values push away)."""
    clamp: float | None = None
    """Instead of adding, set the feature's activation to this value."""
    max_activation: float | None = None
    """The feature's max activation (default: its max in the unsteered run)."""
    prompt: str = "an upbeat pop song with drums and a catchy melody"
    """Text prompt."""
    duration: float = 5.0
    """Seconds of audio."""
    start: float = 0.0
    """Steer from this time (seconds)."""
    end: float | None = None
    """... until this time (default: the end)."""
    streams: Literal["cond", "both"] = "cond"
    """Steer the conditional stream only, or both guidance streams."""
    layer: int | None = None
    """Decoder layer (default: the SAE's layer)."""
    out: str = "steer"
    """Output directory."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    top_k: int = 250
    """Top-k sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    seed: int = 0
    """Seed shared by the three runs."""
    device: str = "auto"
    """auto | cpu | cuda."""
    model_dtype: str = "auto"
    """Compute dtype."""
    audio_format: Literal["wav", "ogg"] = "wav"
    """Clips as 16-bit WAV, or Ogg/Opus (about an eighth of the bytes)."""

    def __post_init__(self) -> None:
        if not self.sae or self.feature is None:
            raise UsageError("--sae and --feature are required")
        if not self.duration > 0:
            raise UsageError(f"--duration must be > 0, got {self.duration}")
        if not 0 <= self.start < self.duration:
            raise UsageError(f"--start {self.start} s is outside the {self.duration} s clip: give 0 <= --start < "
                             "--duration (or a longer --duration)")
        if self.end is not None and not self.start < self.end <= self.duration:
            raise UsageError(f"--end {self.end} s must be after --start ({self.start} s) and within the "
                             f"{self.duration} s clip: give --start < --end <= --duration (or a longer --duration)")


@contextmanager
def add_to_layer(loaded, layer: int, delta_fn, first_pos: int, last_pos: int, rows: slice, transcoder: bool = False):
    """Add ``delta_fn(x)`` to the block's output at decoder positions [first_pos, last_pos) on ``rows``,
    ``x`` being that output; for a transcoder, to the block's MLP output (its fc2), ``x`` being the
    MLP's input of the same pass (a push to the MLP output reaches the residual stream unchanged)."""
    seen = {}

    def steer_positions(hidden, start):
        pos = start + torch.arange(hidden.shape[1], device=hidden.device)
        window = ((pos >= first_pos) & (pos < last_pos)).to(hidden.dtype)[None, :, None]
        source = seen["x"] if transcoder else hidden
        new = hidden.clone()
        new[rows] = hidden[rows] + window * delta_fn(source[rows].float()).to(hidden.dtype)
        return new

    if not transcoder:
        with layer_hook(loaded, layer, steer_positions):
            yield
        return
    with module_hook(loaded, mlp_module(loaded, layer, "mlp_in"), lambda hidden, _start: seen.update(x=hidden)), \
            module_hook(loaded, mlp_module(loaded, layer, "mlp_out"), steer_positions):
        yield


def _run(loaded, cfg: SteerConfig, layer: int, n_frames: int, mlp: bool = False):
    return generate_batch(loaded, [cfg.prompt], n_frames, [layer], guidance_scale=cfg.guidance_scale,
                          top_k=cfg.top_k, temperature=cfg.temperature, seed=cfg.seed, mlp=mlp)


def _window_frames(cfg: SteerConfig, rate: float) -> tuple[int, int, int]:
    """Frames to generate, and the first and (exclusive) last frame to steer."""
    n_frames = max(1, int(round(cfg.duration * rate)))
    first = int(round(cfg.start * rate))
    last = int(round(cfg.end * rate)) if cfg.end is not None else 10**9
    return n_frames, first, last


def _control_delta(delta: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random direction with the norm of ``delta``."""
    generator = torch.Generator().manual_seed(seed + 1)
    control = torch.randn(delta.shape, generator=generator).to(delta.device)
    return control / control.norm() * delta.norm()


def _steer_fn(cfg: SteerConfig, sae: TorchSAE, direction: torch.Tensor, delta: torch.Tensor):
    """What the steered run adds to the layer's output: ``delta``, or with ``--clamp`` what sets the
    feature to the clamp value."""
    if cfg.clamp is not None:
        return lambda h: (cfg.clamp - sae.encode(h)[..., cfg.feature:cfg.feature + 1]) * direction
    return lambda h: delta.expand_as(h)


def _write_runs(out: Path, report: dict, runs: dict, feature_acts, window: slice, sampling_rate: int,
                audio_format: str = "wav") -> None:
    """Each run's clip and its feature activation figures (into ``report``), then steer.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name, batch in runs.items():
        clip = f"{name}.{audio_format}"
        write_audio(out / clip, batch.audio[0], sampling_rate)
        f = feature_acts(batch)[window]
        report["runs"][name] = {"audio": clip, **({"wav": clip} if audio_format == "wav" else {}),
                                "feature_mean_activation": float(f.mean()),
                                "feature_max_activation": float(f.max()), "feature_active_fraction": float((f > 0).mean())}
    write_json(out / "steer.json", report)


@torch.no_grad()
def steer(cfg: SteerConfig) -> dict:
    sae = TorchSAE.from_pretrained(cfg.sae)
    direction = sae.feature_direction(cfg.feature)  # checks the index first
    rate = float(load_config(cfg.model).audio_encoder.frame_rate)  # the window is checked before loading weights
    n_frames, first, last = _window_frames(cfg, rate)
    if first >= min(last, n_frames):  # seconds inside the clip that round to no frame at this frame rate
        raise UsageError(f"--start {cfg.start} s to --end {cfg.end if cfg.end is not None else cfg.duration} s holds "
                         f"no frame of the {n_frames}-frame clip at {rate:g} frames/s: widen the window")
    loaded = load_model(cfg.model, cfg.device, cfg.model_dtype)
    layer = checked_layer(sae, cfg.layer, loaded, cfg.model)
    sae = sae.to(loaded.device)
    direction = direction.to(loaded.device)
    rows = slice(None) if cfg.streams == "both" or not cfg.guidance_scale > 1 else slice(0, 1)

    transcoder = sae.is_transcoder
    stream = "mlp_in" if transcoder else "cond"  # what the encoder reads

    def feature_acts(batch) -> np.ndarray:
        acts = torch.from_numpy(batch.acts[stream][layer][0]).to(loaded.device)
        return sae.encode(acts)[:, cfg.feature].cpu().numpy()

    plain = _run(loaded, cfg, layer, n_frames, transcoder)
    max_act = cfg.max_activation if cfg.max_activation is not None else float(feature_acts(plain).max())
    if not max_act > 0:  # the feature is silent on this prompt: use the SAE's typical strong activation
        max_act = float(sae.encode(torch.from_numpy(plain.acts[stream][layer][0]).to(loaded.device)).max())
    delta = cfg.strength * max_act * direction
    control = _control_delta(delta, cfg.seed)
    with add_to_layer(loaded, layer, _steer_fn(cfg, sae, direction, delta), first, last, rows, transcoder):
        steered = _run(loaded, cfg, layer, n_frames, transcoder)
    with add_to_layer(loaded, layer, lambda h: control.expand_as(h), first, last, rows, transcoder):
        controlled = _run(loaded, cfg, layer, n_frames, transcoder)

    out = Path(cfg.out)
    report = {"model": cfg.model, "sae": str(cfg.sae), "layer": layer, "site": "mlp_out" if transcoder else "layer_out",
              "feature": cfg.feature,
              "strength": cfg.strength, "clamp": cfg.clamp, "max_activation": max_act, "prompt": cfg.prompt,
              "seed": cfg.seed, "window_seconds": [cfg.start, min(last, n_frames) / rate], "streams": cfg.streams,
              "delta_norm": float(delta.norm()), "runs": {}}
    _write_runs(out, report, {"unsteered": plain, "steered": steered, "control": controlled}, feature_acts,
                slice(first, min(last, n_frames)), loaded.info.sampling_rate, cfg.audio_format)
    runs = report["runs"]
    print(f"{out}: feature {cfg.feature} mean activation unsteered {runs['unsteered']['feature_mean_activation']:.3f}, "
          f"steered {runs['steered']['feature_mean_activation']:.3f}, control "
          f"{runs['control']['feature_mean_activation']:.3f}")
    return report


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(SteerConfig, argv, prog="python -m extractor.steer",
                    description="Steer MusicGen generation with an SAE feature.", run=steer)


if __name__ == "__main__":
    main()

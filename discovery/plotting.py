"""Plots for the report (matplotlib, PNG, no display): each example's log-mel spectrogram above the
feature's activation on the same time axis."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jax_sae.plots import pyplot

N_MELS = 64


def mel_filters(rate: int, n_fft: int, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, equally spaced on the HTK mel scale from 0 Hz
    to Nyquist, each normalised to unit area (Slaney-style)."""
    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(0.0, mel(rate / 2), n_mels + 2))
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins) / np.maximum(upper - centre, 1e-9)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / np.maximum(upper - lower, 1e-9))


def mel_centres(rate: int, n_mels: int = N_MELS) -> np.ndarray:
    """The centre frequencies (Hz) of ``mel_filters``' bands."""
    top = 2595.0 * np.log10(1 + rate / 2 / 700.0)
    edges = 700.0 * (10.0 ** (np.linspace(0.0, top, n_mels + 2) / 2595.0) - 1)
    return edges[1:-1]


FFT_BUDGET = 1 << 24
"""Most window samples transformed in one FFT call (64 MB of float32 frames)."""


def _stft_power(x_BN: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|^2 [B, frames, n_fft // 2 + 1] of equally long clips, as ``scipy.signal.stft`` computes it
    (periodic Hann window scaled to unit sum, even extension of n_fft // 2 at both ends, zeros
    padding the end to whole hops), with the frames as strided views and the FFT on every core."""
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy import fft
    from scipy.signal import get_window

    half = n_fft // 2
    x = np.concatenate([x_BN[:, half:0:-1], x_BN, x_BN[:, -2:-(half + 2):-1]], axis=1)
    extra = (-(x.shape[1] - n_fft) % hop) % n_fft
    if extra:
        x = np.pad(x, ((0, 0), (0, extra)))
    window = get_window("hann", n_fft).astype(np.float32)
    window /= window.sum()
    frames = sliding_window_view(x, n_fft, axis=1)[:, ::hop]
    per_call = max(1, FFT_BUDGET // (frames.shape[1] * n_fft))
    power = []
    for i in range(0, len(frames), per_call):
        spec = fft.rfft(frames[i:i + per_call] * window, axis=-1, workers=-1)
        power.append(spec.real ** 2 + spec.imag ** 2)
    return np.concatenate(power)


def log_mels(clips: Sequence[np.ndarray], rate: int, hop_seconds: float = 0.01) -> list[np.ndarray]:
    """dB [n_mels, frames] of each mono clip (or [samples, channels], channels averaged): a
    Hann-windowed STFT of ~46 ms, hop ``hop_seconds``, floored 80 dB below the clip's peak. Clips
    of equal length go through one batched STFT and filter product; one shorter than a window is
    padded with silence."""
    n_fft = 1 << int(np.ceil(np.log2(0.046 * rate)))
    monos = [np.asarray(c, np.float32).mean(axis=1) if np.ndim(c) == 2 else np.asarray(c, np.float32) for c in clips]
    # A clip shorter than one window is padded with silence to just over one.
    monos = [np.pad(m, (0, max(0, n_fft + 1 - len(m)))) for m in monos]
    hop = max(1, int(round(hop_seconds * rate)))
    filters = mel_filters(rate, n_fft).astype(np.float32)
    out: list[np.ndarray | None] = [None] * len(monos)
    by_length: dict[int, list[int]] = {}
    for i, mono in enumerate(monos):
        by_length.setdefault(len(mono), []).append(i)
    for indices in by_length.values():
        power = _stft_power(np.stack([monos[i] for i in indices]), n_fft, hop) @ filters.T  # [B, frames, n_mels]
        db = 10.0 * np.log10(np.maximum(power.transpose(0, 2, 1), 1e-10))
        db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - 80.0)
        for i, one in zip(indices, db):
            out[i] = one
    return out


def log_mel(audio: np.ndarray, rate: int, hop_seconds: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(dB [n_mels, frames], the mel bands' centre frequencies in Hz) of one clip (``log_mels``)."""
    return log_mels([audio], rate, hop_seconds)[0], mel_centres(rate)


DPI = 90


def save_rgb(fig, path: Path) -> None:
    """The figure as an opaque RGB PNG at ``DPI``: the pixels ``savefig`` writes, without its alpha
    channel (always opaque here), which made the files 10% larger and their encoding 40% slower."""
    from PIL import Image

    fig.set_dpi(DPI)
    fig.canvas.draw()
    Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).save(path, format="PNG")


class ExamplePlots:
    """Draws example plots - a feature's activation over a clip (x: seconds into the clip, as the
    audio player counts), under the clip's log-mel spectrogram when given - through one figure
    per layout whose artists are updated for each example: building a figure costs more than
    drawing it."""

    def __init__(self) -> None:
        self._figures: dict[bool, tuple] = {}
        self._drawn: list = []

    def _figure(self, spectrogram: bool):
        if spectrogram not in self._figures:
            plt = pyplot()
            if spectrogram:
                fig, (top, ax) = plt.subplots(2, 1, figsize=(8, 3.4), sharex=True,
                                              gridspec_kw={"height_ratios": [1.6, 1]})
                image = top.imshow(np.zeros((N_MELS, 2)), origin="lower", aspect="auto", cmap="magma")
                top.set_ylabel("mel (Hz)", fontsize=8)
                top.tick_params(labelsize=7)
                # Fixed margins: tight_layout measures every label and took ~40% of a report's build.
                fig.subplots_adjust(left=0.08, right=0.99, bottom=0.13, top=0.97, hspace=0.08)
            else:
                fig, ax = plt.subplots(figsize=(8, 1.6))
                image = top = None
                fig.subplots_adjust(left=0.08, right=0.99, bottom=0.27, top=0.95)
            ax.set_ylabel("activation", fontsize=8)
            ax.tick_params(labelsize=7)
            self._figures[spectrogram] = (fig, top, ax, image)
        return self._figures[spectrogram]

    def warm_up(self) -> None:
        """Build the spectrogram layout and draw it once (fonts, caches), before the first example."""
        self._figure(True)[0].canvas.draw()

    def draw(self, curve: np.ndarray, frame_rate: float, path: Path, offset_seconds: float,
             db: np.ndarray | None = None, audio_seconds: float = 0.0, centres: np.ndarray | None = None) -> None:
        """One example's PNG: ``curve`` per frame; ``db`` (``log_mels``) of ``audio_seconds`` of audio
        with its bands' ``centres`` above it."""
        fig, top, ax, image = self._figure(db is not None)
        if db is not None:
            image.set_data(db)
            image.set_clim(float(db.min()), float(db.max()))
            image.set_extent((0.0, audio_seconds, 0, len(centres)))
            ticks = [i for i in (0, 16, 32, 48, 63) if i < len(centres)]
            top.set_yticks(ticks, [f"{centres[i] / 1000:.1f}k" if centres[i] >= 1000 else f"{centres[i]:.0f}"
                                   for i in ticks])
        for artist in self._drawn:
            artist.remove()
        ax.set_autoscaley_on(True)
        ax.ignore_existing_data_limits = True  # the limits come from this example's curve alone
        t = np.arange(len(curve)) / frame_rate
        self._drawn = [ax.fill_between(t, curve, step="post", alpha=0.35, facecolor="C0"),
                       *ax.plot(t, curve, drawstyle="steps-post", lw=1, color="C0")]
        ax.set_xlim(0, max(len(curve) / frame_rate, 1e-3))
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"seconds into clip (clip starts at {offset_seconds:.2f} s of the sample)", fontsize=8)
        save_rgb(fig, path)

    def close(self) -> None:
        for fig, *_ in self._figures.values():
            pyplot().close(fig)
        self._figures.clear()


class HistogramPlots:
    """Draws features' activation histograms over the rows where each fires - half-octave bins on a
    log axis, the outer bins holding what lies below the first edge and above the last - through one
    reused figure (as ``ExamplePlots``)."""

    def __init__(self) -> None:
        self._figure = None
        self._bars = None

    def draw(self, edges: np.ndarray, counts: np.ndarray, frequency: float, path: Path) -> None:
        if self._figure is None:
            fig, ax = pyplot().subplots(figsize=(6, 1.9))
            ax.set_xscale("log", base=2)
            ax.set_ylabel("rows", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.subplots_adjust(left=0.11, right=0.98, bottom=0.25, top=0.95)
            self._figure = fig, ax
        fig, ax = self._figure
        edges = np.asarray(edges, np.float64)
        counts = np.asarray(counts, np.float64)
        lows = np.concatenate([[edges[0] / np.sqrt(2)], edges])  # the outer bins drawn half an octave wide
        highs = np.concatenate([edges, [edges[-1] * np.sqrt(2)]])
        used = np.flatnonzero(counts)
        if self._bars is not None:
            self._bars.remove()
        ax.set_autoscale_on(True)
        ax.ignore_existing_data_limits = True  # the limits come from this histogram alone
        self._bars = ax.bar(lows, counts, width=highs - lows, align="edge", alpha=0.75, color="C0")
        if len(used):
            ax.set_xlim(lows[used[0]], highs[used[-1]])
        ax.set_xlabel(f"activation where the feature fires (density: {frequency:.3%} of rows)", fontsize=8)
        save_rgb(fig, path)

    def close(self) -> None:
        if self._figure is not None:
            pyplot().close(self._figure[0])
            self._figure = None

"""Plots for the report (matplotlib, PNG, no display): each example's log-mel spectrogram above the
feature's activation on the same time axis."""

from __future__ import annotations

from pathlib import Path

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


def log_mel(audio: np.ndarray, rate: int, hop_seconds: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(dB [n_mels, frames], the mel bands' centre frequencies in Hz) of mono or [samples, channels]
    audio (channels averaged): a Hann-windowed STFT of ~46 ms, hop ``hop_seconds``."""
    from scipy.signal import stft

    mono = np.asarray(audio, np.float32)
    mono = mono.mean(axis=1) if mono.ndim == 2 else mono
    n_fft = 1 << int(np.ceil(np.log2(0.046 * rate)))
    hop = max(1, int(round(hop_seconds * rate)))
    _, _, spec = stft(mono, fs=rate, window="hann", nperseg=n_fft, noverlap=n_fft - hop, boundary="even",
                      padded=True)
    power = mel_filters(rate, n_fft) @ (np.abs(spec) ** 2)
    db = 10.0 * np.log10(np.maximum(power, 1e-10))
    edges = 700.0 * (10.0 ** (np.linspace(0.0, 2595.0 * np.log10(1 + rate / 2 / 700.0), N_MELS + 2) / 2595.0) - 1)
    return np.maximum(db, db.max() - 80.0), edges[1:-1]


def plot_example(curve: np.ndarray, frame_rate: float, path: Path, offset_seconds: float,
                 audio: np.ndarray | None = None, rate: int | None = None) -> None:
    """A feature's activation over a clip (x: seconds into the clip, as the audio player counts),
    under the clip's log-mel spectrogram when its audio is given."""
    plt = pyplot()
    seconds = max(len(curve) / frame_rate, 1e-3)
    if audio is None:
        fig, ax = plt.subplots(figsize=(8, 1.6))
    else:
        fig, (top, ax) = plt.subplots(2, 1, figsize=(8, 3.4), sharex=True, gridspec_kw={"height_ratios": [1.6, 1]})
        db, centres = log_mel(audio, rate)
        top.imshow(db, origin="lower", aspect="auto", cmap="magma", extent=(0.0, len(audio) / rate, 0, len(centres)))
        ticks = [i for i in (0, 16, 32, 48, 63) if i < len(centres)]
        top.set_yticks(ticks, [f"{centres[i] / 1000:.1f}k" if centres[i] >= 1000 else f"{centres[i]:.0f}"
                               for i in ticks])
        top.set_ylabel("mel (Hz)", fontsize=8)
        top.tick_params(labelsize=7)
    t = np.arange(len(curve)) / frame_rate
    ax.fill_between(t, curve, step="post", alpha=0.35)
    ax.plot(t, curve, drawstyle="steps-post", lw=1)
    ax.set_xlim(0, seconds)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("activation", fontsize=8)
    ax.set_xlabel(f"seconds into clip (clip starts at {offset_seconds:.2f} s of the sample)", fontsize=8)
    ax.tick_params(labelsize=7)
    # Fixed margins: tight_layout measures every label and took ~40% of a report's build.
    if audio is None:
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.27, top=0.95)
    else:
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.13, top=0.97, hspace=0.08)
    fig.savefig(path, dpi=90)
    plt.close(fig)



def plot_histogram(edges: np.ndarray, counts: np.ndarray, frequency: float, path: Path) -> None:
    """A feature's activation histogram over the rows where it fires: half-octave bins on a log axis
    (the outer bins hold what lies below the first edge and above the last)."""
    plt = pyplot()
    edges = np.asarray(edges, np.float64)
    counts = np.asarray(counts, np.float64)
    lows = np.concatenate([[edges[0] / np.sqrt(2)], edges])  # the outer bins drawn half an octave wide
    highs = np.concatenate([edges, [edges[-1] * np.sqrt(2)]])
    used = np.flatnonzero(counts)
    fig, ax = plt.subplots(figsize=(6, 1.9))
    ax.bar(lows, counts, width=highs - lows, align="edge", alpha=0.75)
    ax.set_xscale("log", base=2)
    if len(used):
        ax.set_xlim(lows[used[0]], highs[used[-1]])
    ax.set_xlabel(f"activation where the feature fires (density: {frequency:.3%} of rows)", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.25, top=0.95)
    fig.savefig(path, dpi=90)
    plt.close(fig)

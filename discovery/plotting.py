"""Plots for the report (matplotlib, PNG, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jax_sae.plots import pyplot


def plot_activation(curve: np.ndarray, frame_rate: float, path: Path, offset_seconds: float) -> None:
    """A feature's activation over a clip; x is seconds into the clip, as the audio player counts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.6))
    t = np.arange(len(curve)) / frame_rate
    ax.fill_between(t, curve, step="post", alpha=0.35)
    ax.plot(t, curve, drawstyle="steps-post", lw=1)
    ax.set_xlim(0, max(len(curve) / frame_rate, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"seconds into clip (clip starts at {offset_seconds:.2f} s of the sample)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

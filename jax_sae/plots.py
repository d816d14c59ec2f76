"""Training plots (matplotlib, written to PNG without a display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Loss, FVU (train and validation), L0, dead fraction and learning rate against step."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    panels = [("loss", "loss", True), ("fvu", "FVU", True), ("l0", "L0", False),
              ("dead_fraction", "dead fraction", False), ("lr", "learning rate", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    steps = [r["step"] for r in train]
    for ax, (key, label, log) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in train], lw=0.8, label="train")
        if key in ("fvu", "l0", "dead_fraction") and val:
            ax.plot([r["step"] for r in val], [r["val"][key] for r in val], "o-", ms=3, label="validation")
            ax.legend(fontsize=7)
        if log and train and min(r[key] for r in train) > 0:
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.suptitle(title)
    # Fixed margins: tight_layout measures every label (most of a short run's plotting time).
    fig.subplots_adjust(left=0.035, right=0.99, bottom=0.15, top=0.83, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_density(density_H: np.ndarray, path: Path) -> None:
    """Histogram of log10 feature density (fraction of tokens each latent fires on); dead ones
    are counted in the title, not drawn."""
    plt = pyplot()
    alive = density_H[density_H > 0]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if len(alive):
        ax.hist(np.log10(alive), bins=50)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(alive)} alive, {int(np.sum(density_H == 0))} dead of {len(density_H)}")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)

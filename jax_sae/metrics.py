"""Evaluation metrics, accumulated over batches so any number of rows fits in memory.

Definitions (all over the evaluation set, inference-mode codes; x is what is reconstructed: the
input of an SAE, the MLP output of a transcoder):
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, numerator and denominator summed
  separately, the mean taken over the whole set; explained variance = 1 - FVU.
- MSE = mean over rows and dimensions of (x - x_hat)^2, in the store's units.
- L0 = mean number of non-zero latents per row; dead fraction = latents that never fire;
  dense fractions = latents firing on more than 1% / 10% of rows.
- cosine = mean cos(x, x_hat); l2 ratio = mean ||x_hat|| / ||x||.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from sae_core.errors import UsageError

from . import model as M
from .config import SAEConfig


@functools.partial(jax.jit, static_argnums=0)
def batch_sums(cfg: SAEConfig, params: M.SAEParams, threshold, scale, z_BZ):
    """Per-batch partial sums of every metric (raw units in, raw units compared) over a batch of
    training rows; a transcoder's are its input and target side by side, and x is the target."""
    in_BD, x_BD = M.split_batch(cfg, z_BZ.astype(jnp.float32))
    f_BH = M.encode_infer(cfg, params, threshold, in_BD * scale)
    x_hat_BD = M.decode(params, f_BH, in_BD * scale) / scale
    err_B = jnp.sum((x_BD - x_hat_BD) ** 2, axis=-1)
    norm_x = jnp.linalg.norm(x_BD, axis=-1)
    norm_hat = jnp.linalg.norm(x_hat_BD, axis=-1)
    safe = jnp.maximum(norm_x * norm_hat, 1e-12)
    return {
        "sq_err": jnp.sum(err_B),
        "sum_x_D": jnp.sum(x_BD, axis=0),
        "sum_sq_x": jnp.sum(x_BD**2),
        "l0": jnp.sum(f_BH > 0),
        "fired_H": jnp.sum(f_BH > 0, axis=0),
        "cos": jnp.sum(jnp.sum(x_BD * x_hat_BD, axis=-1) / safe),
        "l2_ratio": jnp.sum(norm_hat / jnp.maximum(norm_x, 1e-12)),
    }


class MetricAccumulator:
    """Sums batch partials in float64 on the host and turns them into the metrics above."""

    def __init__(self, cfg: SAEConfig):
        self.cfg = cfg
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}

    def add(self, n_rows: int, partial: dict) -> None:
        self.n += n_rows
        for key, value in partial.items():
            value = np.asarray(value, dtype=np.float64)
            self.sums[key] = self.sums.get(key, 0.0) + value

    def result(self) -> dict:
        if self.n == 0:
            raise UsageError("no rows to evaluate")
        s, n, d = self.sums, self.n, self.cfg.d_model
        total_var = s["sum_sq_x"] - float(np.sum(s["sum_x_D"] ** 2)) / n
        fvu = float(s["sq_err"] / max(total_var, 1e-12))
        density = s["fired_H"] / n
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": float(s["sq_err"] / (n * d)),
            "l0": float(s["l0"] / n),
            "dead_fraction": float(np.mean(density == 0)),
            "dense_fraction_1pct": float(np.mean(density > 0.01)),
            "dense_fraction_10pct": float(np.mean(density > 0.10)),
            "cosine": float(s["cos"] / n),
            "l2_ratio": float(s["l2_ratio"] / n),
            "rows": int(n),
        }

    @property
    def density_H(self) -> np.ndarray:
        return self.sums["fired_H"] / max(self.n, 1)


def evaluate_batches(cfg: SAEConfig, params, threshold, scale, batches: Iterable[np.ndarray]) -> MetricAccumulator:
    acc = MetricAccumulator(cfg)
    for x in batches:
        acc.add(len(x), batch_sums(cfg, params, threshold, scale, jnp.asarray(x)))
    return acc

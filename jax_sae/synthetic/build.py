"""Building a synthetic model's fixed arrays once per configuration, and caching them on disk.

Everything is drawn from numpy generators seeded by (seed, part), so a configuration always builds
the same model on any machine. The slow part of SAELens's construction, orthogonalising 16,384
directions (~4.4 s per chunked iteration on 2 cores, about 2 hours), is fast here: the gradient of
the pairwise-overlap loss sum_{i!=j} (e_i . e_j)^2 is 4 (E (E^T E) - diag(|e_i|^2) E), which needs
only the d x d Gram matrix E^T E, never the n x n one (O(n d^2) per step instead of O(n^2 d))."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from scipy.special import ndtri

from sae_core.files import staged_file

from .config import SynthConfig

ARRAYS = ("directions", "bias", "probability", "threshold", "factor", "noise_scale", "mean", "std")
BUILD_VERSION = 1  # bump when the construction changes: cached models of other versions are rebuilt


@struct.dataclass
class SynthModel:
    """The fixed arrays of a synthetic model (a pytree; ``cfg`` is static)."""

    directions: jax.Array  # [N, D] unit rows
    bias: jax.Array  # [D], added to every sample
    probability: jax.Array  # [N] firing probability before the hierarchy (children compensated)
    threshold: jax.Array  # [N] the copula's threshold: fires when its standard normal exceeds it
    factor: jax.Array  # [N, R] low-rank loadings of the copula
    noise_scale: jax.Array  # [N] sqrt(1 - |factor_i|^2): each latent normal has variance 1
    mean: jax.Array  # [N] mean magnitude
    std: jax.Array  # [N] magnitude spread
    cfg: SynthConfig = struct.field(pytree_node=False)


def zipf_probabilities(cfg: SynthConfig) -> np.ndarray:
    """rank^-exponent, min-max rescaled to [p_min, p_max]; feature 0 the most frequent."""
    q = np.arange(1, cfg.n_features + 1, dtype=np.float64) ** -cfg.zipf_exponent
    if cfg.n_features == 1:
        return np.array([cfg.p_max])
    return cfg.p_min + (cfg.p_max - cfg.p_min) * (q - q[-1]) / (q[0] - q[-1])


def parents(cfg: SynthConfig) -> np.ndarray:
    """Each feature's parent (-1: a root or outside the trees)."""
    parent = np.full(cfg.n_features, -1, np.int64)
    starts = cfg.level_starts()
    for level in range(1, cfg.depth + 1) if cfg.roots else ():
        children = np.arange(starts[level], starts[level + 1])
        parent[children] = starts[level - 1] + (children - starts[level]) // cfg.branching
    return parent


def compensated(cfg: SynthConfig, p: np.ndarray) -> np.ndarray:
    """Children's probabilities raised for firing only with their parent and with one sibling at most:
    p_i / p_P * (1 + (sum of the siblings' p) / p_P), at most 1 (from the uncompensated p)."""
    parent = parents(cfg)
    child = parent >= 0
    out = p.copy()
    if child.any():
        family = np.zeros(cfg.n_features)
        np.add.at(family, parent[child], p[child])  # per parent: the sum of its children's p
        p_parent = p[parent[child]]
        siblings = family[parent[child]] - p[child]
        out[child] = np.minimum(1.0, p[child] / p_parent * (1.0 + siblings / p_parent))
    return out


def _rng(cfg: SynthConfig, part: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, part])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def overlap_loss(E: jax.Array) -> jax.Array:
    """sum_{i!=j} (e_i . e_j)^2 + n sum_i (|e_i|^2 - 1)^2, through the d x d Gram matrix."""
    norms = jnp.sum(E * E, axis=1)
    gram = E.T @ E
    return jnp.sum(gram * gram) - jnp.sum(norms**2) + E.shape[0] * jnp.sum((norms - 1.0) ** 2)


def overlap_grad(E: jax.Array) -> jax.Array:
    """The gradient of ``overlap_loss`` in closed form (tested against autodiff)."""
    norms = jnp.sum(E * E, axis=1, keepdims=True)
    return 4.0 * (E @ (E.T @ E) - norms * E) + 4.0 * E.shape[0] * (norms - 1.0) * E


def orthogonalise(E: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """``steps`` full-batch Adam steps on ``overlap_loss``, then unit rows again."""
    if steps == 0:
        return E
    optimizer = optax.adam(lr)

    @jax.jit
    def run(E):
        def step(_, carry):
            E, state = carry
            updates, state = optimizer.update(overlap_grad(E), state, E)
            return optax.apply_updates(E, updates), state
        return jax.lax.fori_loop(0, steps, step, (E, optimizer.init(E)))[0]

    return _unit_rows(np.asarray(run(jnp.asarray(E, jnp.float32)), np.float64))


def build(cfg: SynthConfig) -> SynthModel:
    """The model's arrays, drawn afresh (``load`` caches them)."""
    directions = _unit_rows(_rng(cfg, 0).standard_normal((cfg.n_features, cfg.d_model)))
    directions = orthogonalise(directions, cfg.ortho_steps, cfg.ortho_lr)
    bias = _rng(cfg, 1).standard_normal(cfg.d_model)
    bias = cfg.bias_norm * bias / np.linalg.norm(bias)
    p = compensated(cfg, zipf_probabilities(cfg))
    factor = cfg.corr_scale * _rng(cfg, 2).standard_normal((cfg.n_features, cfg.corr_rank))
    loading = np.sum(factor**2, axis=1)
    too_strong = loading > 0.99  # keep each latent's own noise variance at least 0.01
    factor[too_strong] *= np.sqrt(0.99 / loading[too_strong])[:, None]
    noise_scale = np.sqrt(1.0 - np.sum(factor**2, axis=1))
    mean = np.linspace(cfg.mean_first, cfg.mean_last, cfg.n_features)
    std = np.abs(cfg.std_mean + cfg.std_std * _rng(cfg, 3).standard_normal(cfg.n_features))
    arrays = dict(directions=directions, bias=bias, probability=p, threshold=ndtri(1.0 - p), factor=factor,
                  noise_scale=noise_scale, mean=mean, std=std)
    return SynthModel(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}, cfg=cfg)


def cache_dir() -> Path:
    root = os.environ.get("SAE_MUSIC_CACHE") or Path.home() / ".cache" / "sae-music-jax"
    return Path(root) / "synthetic"


def cache_path(cfg: SynthConfig) -> Path:
    """Where ``load`` keeps the model of ``cfg`` (an ``.npz`` of ``ARRAYS``)."""
    return cache_dir() / f"v{BUILD_VERSION}-{cfg.digest()}.npz"


def load(cfg: SynthConfig, *, cache: bool = True) -> SynthModel:
    """The model of ``cfg``, read from the cache (``$SAE_MUSIC_CACHE``/synthetic, else
    ~/.cache/sae-music-jax/synthetic) or built and cached there."""
    path = cache_path(cfg)
    if cache and path.exists():
        try:
            with np.load(path) as saved:
                return SynthModel(**{k: jnp.asarray(saved[k]) for k in ARRAYS}, cfg=cfg)
        except (OSError, ValueError, KeyError):  # damaged or partial: rebuilt below
            pass
    model = build(cfg)
    if cache:
        try:
            with staged_file(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: np.asarray(getattr(model, k)) for k in ARRAYS})
        except OSError:  # an unwritable cache only costs the next run a rebuild
            pass
    return model

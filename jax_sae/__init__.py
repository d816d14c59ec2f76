"""JAX side of sae-music-jax: Flax SAEs (vanilla, TopK, BatchTopK, Matryoshka), training,
checkpoints and evaluation. Never imports torch; heavy modules load on first use."""

from sae_core.lazy import lazy_getattr

__all__ = ["SAE", "SAEConfig", "TrainConfig", "evaluate", "load", "train"]

_LOCATIONS = {
    "SAE": "jax_sae.api",
    "load": "jax_sae.api",
    "evaluate": "jax_sae.api",
    "SAEConfig": "jax_sae.config",
    "TrainConfig": "jax_sae.train",
    "train": "jax_sae.train",
}

__getattr__ = lazy_getattr("jax_sae", _LOCATIONS)

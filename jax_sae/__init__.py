"""JAX side of sae-music-jax: Flax SAEs (vanilla, TopK, BatchTopK, Matryoshka), training,
checkpoints and evaluation. Never imports torch; heavy modules load on first use."""

from importlib import import_module

__all__ = ["SAE", "SAEConfig", "TrainConfig", "evaluate", "load", "train"]

_LOCATIONS = {
    "SAE": "jax_sae.api",
    "load": "jax_sae.api",
    "evaluate": "jax_sae.api",
    "SAEConfig": "jax_sae.config",
    "TrainConfig": "jax_sae.train",
    "train": "jax_sae.train",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        return getattr(import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'jax_sae' has no attribute {name!r}")

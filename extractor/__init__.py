"""PyTorch side of sae-music-jax: prompts, MusicGen loading, activation capture and the store.

Importing this package is light: ``extractor.store`` and ``extractor.prompts`` need no torch,
and the torch-backed names below are imported on first use.
"""

from .lazy import lazy_getattr

__all__ = [
    "ExtractConfig",
    "Prompt",
    "Store",
    "StoreError",
    "extract",
    "load_model",
    "load_prompt_file",
    "open_store",
]

_LOCATIONS = {
    "ExtractConfig": "extractor.extract",
    "extract": "extractor.extract",
    "load_model": "extractor.models",
    "Prompt": "extractor.prompts",
    "load_prompt_file": "extractor.prompts",
    "Store": "extractor.store",
    "StoreError": "extractor.store",
    "open_store": "extractor.store",
}

__getattr__ = lazy_getattr("extractor", _LOCATIONS)

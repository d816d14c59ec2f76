"""PyTorch side of sae-music-jax: prompts, MusicGen loading, activation capture, the torch SAE,
spliced-in evaluation, steering and audio decoding. What it shares with the JAX side (the store,
files, errors, the CLI runner, export formats) is ``sae_core``.

Importing this package is light: the names below are imported on first use.
"""

from sae_core.lazy import lazy_getattr

__all__ = [
    "ExtractConfig",
    "Prompt",
    "extract",
    "load_model",
    "load_prompt_file",
]

_LOCATIONS = {
    "ExtractConfig": "extractor.extract",
    "extract": "extractor.extract",
    "load_model": "extractor.models",
    "Prompt": "extractor.prompts",
    "load_prompt_file": "extractor.prompts",
}

__getattr__ = lazy_getattr("extractor", _LOCATIONS)

"""Reading SAELens-format SAE directories (cfg.json + sae_weights.safetensors) with numpy only,
so both the torch and the JAX side can load them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class SAEFormatError(ValueError):
    """A file that is not an SAE export this code can read, or refuses to be read safely."""


def is_saelens_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists()


def read_saelens_export(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(cfg.json contents, arrays) of a SAELens-format directory."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not is_saelens_dir(path):
        raise SAEFormatError(f"{path} is not a SAELens directory (needs cfg.json and sae_weights.safetensors)")
    return json.loads((path / "cfg.json").read_text()), load_file(path / "sae_weights.safetensors")

"""Synthetic activations with known features (SynthSAEBench), generated on the device, and the
benchmark's scores of an SAE against them."""

from .build import SynthModel, load
from .config import PRESETS, SynthConfig, from_store_arg, is_synthetic, preset
from .sample import activations, batch_x, samples

__all__ = ["PRESETS", "SynthConfig", "SynthModel", "activations", "batch_x", "from_store_arg", "is_synthetic", "load",
           "preset", "samples"]

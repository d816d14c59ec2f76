"""The one door from the JAX side (``jax_sae``, ``discovery``) to the PyTorch side (``extractor``).

The JAX side never imports ``extractor`` at the top of a module (``tests/test_layers.py`` walks
every import to make sure); what needs torch - a ``.pt`` file, the report's audio, output effects
and steering - asks this module for the torch-side module by name, when it is about to use it. On
a JAX-only install (no ``extract`` extra) that is one line naming the extra and what does without.
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec
from types import ModuleType

from sae_core.errors import UsageError

MODULES = {
    "torch_sae": ("torch",),
    "render": ("torch", "transformers"),
    "effects": ("torch", "transformers"),
    "steer": ("torch", "transformers"),
    "evaluate": ("torch", "transformers"),
}
"""The torch-side modules the JAX side uses, with the packages each needs."""


class MissingExtraError(UsageError):
    """A step needs packages this install left out; the message names the extra that brings them."""


def missing_extract(need: str, instead: str) -> MissingExtraError:
    """The error for a step that needs the torch side (``need``) on a JAX-only install."""
    return MissingExtraError(f"{need}, which this JAX-only install left out: pip install -e '.[extract]' (or rerun "
                             f"scripts/install.sh without SAE_MUSIC_JAX_ONLY); {instead}")


def require(name: str, need: str, instead: str) -> None:
    """Check, without importing them, that the packages ``extractor.{name}`` needs are installed."""
    if not all(find_spec(package) for package in MODULES[name]):
        raise missing_extract(need, instead)


def torch_module(name: str, need: str, instead: str) -> ModuleType:
    """``extractor.{name}``, imported now; a MissingExtraError saying ``need`` and ``instead`` where
    its packages are not installed."""
    require(name, need, instead)
    try:
        return importlib.import_module(f"extractor.{name}")
    except ModuleNotFoundError as err:
        if err.name not in MODULES[name]:
            raise
        raise missing_extract(need, instead) from None

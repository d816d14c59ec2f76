"""Lazy package attributes: each package lists its public names and where they live; a name's
module is imported on first use, so importing a package stays light."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_getattr(package: str, locations: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` serving ``locations`` (name -> module path)."""

    def __getattr__(name: str):
        if name in locations:
            return getattr(import_module(locations[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

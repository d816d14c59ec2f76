"""Feature discovery in JAX: a streaming pass over the store, labels, tag alignment and reports.
Never imports torch; heavy modules load on first use."""

from importlib import import_module

__all__ = ["DiscoverConfig", "FeatureDiscovery", "discover"]

_LOCATIONS = {
    "DiscoverConfig": "discovery.discover",
    "discover": "discovery.discover",
    "FeatureDiscovery": "discovery.features",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        return getattr(import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'discovery' has no attribute {name!r}")

"""Feature discovery in JAX: a streaming pass over the store, labels, tag alignment and reports.
Never imports torch; heavy modules load on first use."""

from sae_core.lazy import lazy_getattr

__all__ = ["DiscoverConfig", "FeatureDiscovery", "FeatureFiles", "discover"]

_LOCATIONS = {
    "DiscoverConfig": "discovery.discover",
    "discover": "discovery.discover",
    "FeatureFiles": "discovery.feature_files",
    "FeatureDiscovery": "discovery.features",
}

__getattr__ = lazy_getattr("discovery", _LOCATIONS)

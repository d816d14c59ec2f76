"""The files of one discovery run, and their one reader and writer: ``FeatureFiles``. Imports
neither JAX nor torch, so the report, the pipeline and users' scripts read features cheaply."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from sae_core.errors import UsageError

CLIP_FIRING = (0.01, 0.25)  # Singh et al. 2025 keep the features firing on 1% to 25% of clips
from sae_core.files import write_json, write_text


class DiscoverError(UsageError):
    """Discovery arguments that cannot work, or a discovery file that cannot be read."""


class FeatureFiles:
    """The files of one discovery run, named after its features JSON, and the one place that writes
    and reads them: ``X.json`` (feature id -> label, top examples, statistics), ``X.summary.json``
    (layer-level numbers, settings, the SAE and store used) and, with ``--all``, ``X.all.npz`` (every
    feature's statistics). Imports neither JAX nor torch."""

    def __init__(self, features: str | os.PathLike):
        self.features = Path(features)
        self.summary = self.features.with_suffix(".summary.json")
        self.all_stats = self.features.with_suffix(".all.npz")

    def finished(self) -> bool:
        return self.features.exists() and self.summary.exists()

    def write(self, features: dict, summary: dict, all_stats: Mapping[str, np.ndarray] | None = None) -> None:
        """Each file atomically, the features last; without ``all_stats`` an older run's ``.all.npz`` goes."""
        if all_stats is None:
            self.all_stats.unlink(missing_ok=True)
        else:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **all_stats)
            write_text(self.all_stats, buffer.getvalue())
        write_json(self.summary, summary, allow_nan=False)
        self.write_features(features)

    def write_features(self, features: dict) -> None:
        write_json(self.features, features, allow_nan=False)

    def read_features(self) -> dict:
        """``{"42": {"label": ..., "top_examples": [...], ...}}``; a DiscoverError naming the file if unusable."""
        features = self._read_json(self.features)
        if features is None:
            raise DiscoverError(f"no features file at {self.features}; run python -m discovery.discover first")
        if not isinstance(features, dict):
            raise DiscoverError(f"{self.features} is not a features file (not a JSON object)")
        for key, info in features.items():
            if not isinstance(info, dict) or not {"label", "top_examples"} <= info.keys():
                raise DiscoverError(f"{self.features} is not a features file: feature {key} lacks label or "
                                    "top_examples")
        return features

    def read_summary(self) -> dict | None:
        """The summary, or None when there is none (a features file written by other means)."""
        return self._read_json(self.summary)

    def read_all_stats(self) -> dict[str, np.ndarray] | None:
        if not self.all_stats.exists():
            return None
        with np.load(self.all_stats) as data:
            return {name: data[name] for name in data.files}

    @staticmethod
    def _read_json(path: Path):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DiscoverError(f"{path} cannot be read: {err}") from None

"""What a synthetic activation model is: SynthSAEBench's generative process (Chanin &
Garriga-Alonso 2026, arXiv 2602.14687) as one frozen config, and its named presets.

The process, as SAELens (>= 6.36, ``sae_lens.synthetic``) defines it: ``n_features`` unit
directions in ``d_model`` dimensions, nudged toward orthogonality by ``ortho_steps`` Adam steps;
feature i (0 the most frequent) fires with a Zipfian probability from ``p_max`` down to ``p_min``;
the first ``roots * (1 + b + b^2 + ... + b^depth)`` features form trees (breadth-first, consecutive
indices), a child fires only with its parent, siblings exclude each other, and a child's magnitude
is scaled by its parent's relative strength; firing is correlated through a Gaussian copula of
rank ``corr_rank``; magnitudes are ReLU(normal(mean_i, std_i)); a sample is the magnitudes times
the directions plus one fixed bias of norm ``bias_norm``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from sae_core.errors import UsageError

PREFIX = "synthetic:"
"""A store argument that names a synthetic model instead of a directory (``synthetic:synthsaebench-16k``)."""


@dataclass(frozen=True)
class SynthConfig:
    n_features: int = 16_384
    d_model: int = 768
    zipf_exponent: float = 0.5
    p_max: float = 0.4
    p_min: float = 5e-4
    roots: int = 128
    branching: int = 4
    depth: int = 3
    """Levels below the roots (leaves at this depth)."""
    corr_rank: int = 25
    corr_scale: float = 0.1
    ortho_steps: int = 100
    ortho_lr: float = 3e-4
    mean_first: float = 5.0
    mean_last: float = 4.0
    std_mean: float = 0.5
    std_std: float = 0.5
    bias_norm: float = 0.5
    seed: int = 42

    def __post_init__(self):
        checks = [
            (self.n_features > 0 and self.d_model > 0, "n_features and d_model must be positive"),
            (0 < self.p_min <= self.p_max <= 1, f"need 0 < p_min <= p_max <= 1, got {self.p_min}, {self.p_max}"),
            (self.roots >= 0 and self.branching >= 1 and self.depth >= 0, "roots, branching and depth must be >= 0, 1, 0"),
            (self.tree_features <= self.n_features,
             f"the hierarchy needs {self.tree_features} features but there are {self.n_features}"),
            (0 < self.corr_rank and self.corr_scale >= 0, "corr_rank must be positive, corr_scale >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"synthetic model: {message}")

    def level_starts(self) -> list[int]:
        """The first feature of each hierarchy level 0..depth, and one past the last tree feature."""
        starts, start = [], 0
        for level in range(self.depth + 1):
            starts.append(start)
            start += self.roots * self.branching ** level
        return starts + [start]

    @property
    def tree_features(self) -> int:
        return self.level_starts()[-1] if self.roots else 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short name for this exact process (the dictionary cache's key)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # The benchmark's own configuration (SAELens's decoderesearch/synth-sae-bench-16k-v1).
    "synthsaebench-16k": SynthConfig(),
    # The scaled-down variant of issue 26's first table: 4,096 features in 256 dimensions, 32 roots.
    "synthsaebench-4k": SynthConfig(n_features=4096, d_model=256, roots=32),
    # Small enough for tests (a tree of 8 roots, 3 levels below).
    "synthsaebench-tiny": SynthConfig(n_features=1024, d_model=64, roots=4, corr_rank=5, ortho_steps=20),
}


def preset(name: str) -> SynthConfig:
    """A named configuration, with an optional ``@seed`` (``synthsaebench-16k@7``)."""
    base, _, seed = name.partition("@")
    if base not in PRESETS:
        raise UsageError(f"unknown synthetic model {base!r}; choose one of {', '.join(PRESETS)}")
    if not seed:
        return PRESETS[base]
    if not seed.isdigit():
        raise UsageError(f"the seed after @ in {name!r} must be a non-negative integer")
    return dataclasses.replace(PRESETS[base], seed=int(seed))


def is_synthetic(store: str | None) -> bool:
    return bool(store) and str(store).startswith(PREFIX)


def from_store_arg(store: str) -> tuple[str, SynthConfig]:
    """(name, config) of a ``synthetic:NAME[@SEED]`` store argument."""
    name = store[len(PREFIX):]
    return name, preset(name)

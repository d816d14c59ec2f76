"""The SAE's architecture as a typed, frozen config. It round-trips through JSON and is saved
inside every checkpoint, so a model is rebuilt from its checkpoint alone (a training run's
settings are ``train.TrainConfig``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from sae_core.errors import UsageError

SAEType = Literal["vanilla", "topk", "batch_topk", "matryoshka"]
SAE_TYPES: tuple[str, ...] = ("vanilla", "topk", "batch_topk", "matryoshka")


class ConfigError(UsageError):
    """A configuration that cannot describe a working SAE or run."""


def default_group_sizes(hidden_dim: int) -> tuple[int, ...]:
    """h/16, h/16, h/8, h/4, h/2 (the last group absorbs rounding)."""
    head = [hidden_dim // 16, hidden_dim // 16, hidden_dim // 8, hidden_dim // 4]
    return tuple(head + [hidden_dim - sum(head)])


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild an SAE's computation (weights live in the checkpoint)."""

    sae_type: SAEType
    d_model: int
    hidden_dim: int
    top_k: int = 64
    group_sizes: tuple[int, ...] = ()
    layer: int | None = None
    model: str | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        if self.sae_type not in SAE_TYPES:
            raise ConfigError(f"unknown sae_type {self.sae_type!r}; choose one of {', '.join(SAE_TYPES)}")
        if self.d_model <= 0 or self.hidden_dim <= 0:
            raise ConfigError(f"d_model and hidden_dim must be positive, got {self.d_model} and {self.hidden_dim}")
        if self.sae_type != "vanilla" and not 0 < self.top_k <= self.hidden_dim:
            raise ConfigError(f"--top_k must be in 1..hidden_dim ({self.hidden_dim}), got {self.top_k}")
        if self.sae_type == "matryoshka":
            if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
                raise ConfigError("matryoshka needs positive --group_sizes")
            if sum(self.group_sizes) != self.hidden_dim:
                raise ConfigError(
                    f"--group_sizes {','.join(map(str, self.group_sizes))} sum to {sum(self.group_sizes)}, "
                    f"not hidden_dim {self.hidden_dim}"
                )

    @property
    def uses_threshold(self) -> bool:
        """BatchTopK and Matryoshka use a learned JumpReLU threshold at inference."""
        return self.sae_type in ("batch_topk", "matryoshka")

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """Matryoshka's nested dictionary sizes (cumulative group sizes)."""
        ends, total = [], 0
        for g in self.group_sizes:
            total += g
            ends.append(total)
        return tuple(ends)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"group_sizes": list(self.group_sizes)}

    @classmethod
    def from_json(cls, data: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "group_sizes" else v) for k, v in data.items() if k in names})

"""Whether a sweep fits: its members' states and step temporaries, estimated from their shapes
before anything is allocated, against the memory the devices have.

Per member, with d inputs, h latents and batch B (float32):
- state: parameters P = 2dh + h + d (+ d^2 for a skip transcoder's W_skip), Adam's two moments
  (2P), the dead-latent counters (h);
- step temporaries: gradients and updates (2P), and about 4Bh + 6Bd activations (pre-activations,
  codes and their gradients; input, reconstruction, residuals), 8Bd for a transcoder (its batch
  holds the MLP's input and output).
One compiled step holds every member, so the estimate adds them all (XLA may reuse some
temporaries; the estimate does not count on it). On the CPU every device shares the host's memory,
and the state is replicated over the data axis; on an accelerator each device holds its share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Member, SweepError

FLOAT = 4
HEADROOM = 0.9
"""The fraction of the available memory a sweep may plan to use."""


@dataclass(frozen=True)
class MemberBytes:
    name: str
    state: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.state + self.gradients + self.activations


def member_bytes(member: Member, d_model: int) -> MemberBytes:
    h, b, transcoder = member.cfg.sae.hidden_dim, member.cfg.train.batch_size, member.cfg.sae.transcoder
    params = 2 * d_model * h + h + d_model + (d_model * d_model if transcoder == "skip" else 0)
    rows = 8 if transcoder != "none" else 6  # a transcoder's batch holds the MLP's input and output
    return MemberBytes(member.name, FLOAT * (3 * params + h), FLOAT * 2 * params, FLOAT * (4 * b * h + rows * b * d_model))


def needed_bytes(members: list[Member], d_model: int, platform: str, mesh_data: int, mesh_model: int) -> int:
    """Bytes the sweep needs: of host memory on the CPU, of each device's memory elsewhere."""
    held, activations = _parts(members, d_model, platform, mesh_data, mesh_model)
    return held + activations


def _parts(members: list[Member], d_model: int, platform: str, mesh_data: int, mesh_model: int) -> tuple[int, int]:
    """(states and gradients, activations) in the measure of ``needed_bytes``."""
    sizes = [member_bytes(m, d_model) for m in members]
    held = sum(s.state + s.gradients for s in sizes)
    activations = sum(s.activations for s in sizes)
    if platform == "cpu":
        return held * mesh_data, activations
    return held // mesh_model, activations // (mesh_data * mesh_model)


def available_bytes(platform: str) -> int | None:
    """Memory the sweep may use: the host's available memory on the CPU, one device's limit elsewhere
    (None when the device does not say)."""
    if platform == "cpu":
        return _host_available()
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check_fits(members: list[Member], d_model: int, platform: str, mesh_data: int, mesh_model: int,
               available: int | None = None) -> int:
    """Refuse, in one line naming what to shrink, a sweep that would not fit; returns the estimate."""
    needed = needed_bytes(members, d_model, platform, mesh_data, mesh_model)
    available = available_bytes(platform) if available is None else available
    if available is None or needed <= HEADROOM * available:
        return needed
    def need(member: Member) -> tuple[int, int]:
        return _parts([member], d_model, platform, mesh_data, mesh_model)

    largest = max(members, key=lambda m: sum(need(m)))
    held, activations = need(largest)
    shrink = "--hidden_dims (or --expansions)" if held >= activations else "--batch_size"
    where = "of host memory" if platform == "cpu" else "per device"
    count = f"{len(members)} member{'s' if len(members) != 1 else ''}"
    raise SweepError(f"the sweep needs about {_gib(needed)} {where} for {count} (the largest, {largest.name}, "
                     f"about {_gib(held + activations)}) but {_gib(available)} is available; shrink {shrink}, "
                     "or split the sweep in parts")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _host_available() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

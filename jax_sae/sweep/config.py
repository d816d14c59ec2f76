"""What a sweep trains: ``SweepConfig`` (every training flag, plus the lists that vary) and its
members, one ``TrainConfig`` each, named by the settings in which they differ.

A member is exactly the run ``python -m jax_sae.train`` makes with its settings and
``--out {sweep out}/{member name}``: the sweep changes how the runs are scheduled, never what they
learn. What every member must share (the store, the batch, the data order, the budget, where it
runs) cannot vary: one read of the store feeds them all."""

from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sae_core.cli import to_flags
from sae_core.errors import UsageError

from ..config import RuntimeSettings, SAESettings, TrainConfig, TrainingSettings


class SweepError(UsageError):
    """A sweep that cannot run as asked."""


SHARED = ("store", "out", "num_samples", "max_tokens", "val_fraction", "val_max_tokens", "val_split", "data_lanes",
          "skip_nonfinite", "epochs", "batch_size", "data_seed", "eval_every", "checkpoint_every")
"""Training settings every member shares: they decide which rows arrive in which batch, and when."""

AXES = {"layers": "layer_idx", "sae_types": "sae_type", "hidden_dims": "hidden_dim", "top_ks": "top_k", "lrs": "lr",
        "seeds": "seed"}
"""The sweep's list flags, and the training setting each one varies."""

SHORT = {"layer_idx": "layer", "hidden_dim": "h", "top_k": "k", "lr": "lr", "seed": "seed", "expansion": "x"}
"""How a member's name spells a setting (the SAE type is spelled by itself)."""


@dataclass(frozen=True)
class SweepSettings:
    """What varies across the members; a list left empty keeps the single flag's value."""

    layers: tuple[int, ...] = ()
    """Decoder layers (default: --layer_idx); every epoch reads each layer once for all its members."""
    sae_types: tuple[Literal["vanilla", "topk", "batch_topk", "matryoshka", "jumprelu"], ...] = ()
    """SAE types (default: --sae_type)."""
    hidden_dims: tuple[int, ...] = ()
    """Numbers of latents (default: --hidden_dim)."""
    expansions: tuple[int, ...] = ()
    """Numbers of latents as multiples of the store's width (instead of --hidden_dims), e.g. 4,32."""
    top_ks: tuple[int, ...] = ()
    """Active latents per token (default: --top_k)."""
    lrs: tuple[float, ...] = ()
    """Peak learning rates (default: --lr)."""
    seeds: tuple[int, ...] = ()
    """Initialisation seeds (default: --seed); the data order stays --data_seed's (default: --seed)."""
    sweep_file: str | None = None
    """A JSON or TOML file: {"setting": [values], ...} grids over any training setting, and "members":
    [{"setting": value, ...}, ...] lists members; the file's grid, the lists above and the members multiply."""
    evaluate_model: str | None = None
    """The MusicGen the store was extracted from: evaluate every member spliced in (loss recovered, its own process)."""
    evaluate_samples: int = 32
    """Samples of the store each spliced-in evaluation runs on."""
    evaluate_device: str = "auto"
    """Torch device of the spliced-in evaluations (auto | cpu | cuda)."""
    probe: bool = False
    """Give every member the real-activation evaluation (tag probing, absorption); needs a store with tagged samples."""
    threads: int = 0
    """Programs run side by side, each updating its share of the members from the same batch (0: auto,
    2 on a one-device CPU, where much of a step keeps one core busy and leaves the other idle, unless
    the SAEs are tiny; 1 on GPUs, TPUs and meshes of several devices, where one program is faster)."""


@dataclass(frozen=True)
class SweepConfig:
    """Options of ``python -m jax_sae.sweep``: every flag of ``python -m jax_sae.train`` (the base
    every member starts from) and the lists that vary."""

    sae: SAESettings = field(default_factory=SAESettings)
    train: TrainingSettings = field(default_factory=TrainingSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)

    def __post_init__(self) -> None:
        if self.sweep.hidden_dims and self.sweep.expansions:
            raise SweepError("give --hidden_dims or --expansions, not both")
        if any(e <= 0 for e in self.sweep.expansions):
            raise SweepError(f"--expansions must be positive, got {','.join(map(str, self.sweep.expansions))}")
        if self.sweep.threads < 0:
            raise SweepError(f"--threads must be 0 (auto) or positive, got {self.sweep.threads}")
        if self.sweep.evaluate_samples <= 0:
            raise SweepError(f"--evaluate_samples must be positive, got {self.sweep.evaluate_samples}")
        if self.runtime.compile_only:
            raise SweepError("--compile_only is for one run: compile a member with python -m jax_sae.train")

    @property
    def base(self) -> TrainConfig:
        return TrainConfig(self.sae, self.train, self.runtime)

    @property
    def out(self) -> Path:
        return Path(self.train.out)


@dataclass(frozen=True)
class Member:
    """One SAE of a sweep: its name (also its directory under the sweep's --out), what sets it apart
    from the base flags, and its full config."""

    name: str
    settings: dict
    cfg: TrainConfig


def grid(cfg: SweepConfig) -> list[dict]:
    """The members' settings as the user wrote them (``expansion`` still unresolved), in grid order:
    the file's members, times the file's grid, times the list flags."""
    axes: dict[str, list] = {}
    explicit = [{}]
    if cfg.sweep.sweep_file:
        file_grid, explicit = _read_file(Path(cfg.sweep.sweep_file))
        axes.update(file_grid)
    for flag, setting in list(AXES.items()) + [("expansions", "expansion")]:
        values = list(getattr(cfg.sweep, flag))
        if not values:
            continue
        if setting in axes:
            raise SweepError(f"{setting} varies both in {cfg.sweep.sweep_file} and through --{flag}; keep one")
        axes[setting] = values
    settings = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    rows = [one | row for one in explicit for row in settings]
    names = [k for row in rows for k in row]
    shared = sorted({k for k in names if k in SHARED or k in to_flags(RuntimeSettings())})
    if shared:
        raise SweepError(f"{shared[0]} cannot vary within a sweep: every member reads the same batches on the same "
                         f"devices; run one sweep per value")
    unknown = sorted({k for k in names if k not in to_flags(TrainConfig()) and k != "expansion"})
    if unknown:
        raise SweepError(f"{unknown[0]} is not a training setting (see python -m jax_sae.train --help)")
    return rows


def members(cfg: SweepConfig, d_model: int) -> list[Member]:
    """Every member's config, checked (a member whose settings cannot work is named); ``d_model``
    resolves --expansions. With --seeds, the data order is pinned to --data_seed (default --seed)
    so that every member reads the same batches."""
    rows = [_resolved(row, d_model) for row in grid(cfg)]
    varying = [k for k in dict.fromkeys(k for row in rows for k in row) if len({_key(r.get(k)) for r in rows}) > 1
               or len(rows) == 1]
    base = cfg.base.settings()
    pinned = {"data_seed": cfg.base.data_seed} if any("seed" in row for row in rows) else {}
    found, seen = [], set()
    for row in rows:
        name = _name({k: row[k] for k in varying if k in row}) or "run"
        try:
            member_cfg = TrainConfig.of(**(base | pinned | {k: v for k, v in row.items() if k != "expansion"}))
        except UsageError as err:
            raise SweepError(f"member {name}: {err}") from None
        except (TypeError, ValueError) as err:
            raise SweepError(f"member {name}: a value has the wrong type ({err})") from None
        if name in seen:
            raise SweepError(f"member {name} appears twice in the sweep; drop the repeat")
        seen.add(name)
        member_cfg = member_cfg.replace(out=str(cfg.out / name))
        found.append(Member(name, row, member_cfg))
    return found


def _resolved(row: dict, d_model: int) -> dict:
    if "expansion" not in row:
        return row
    return row | {"hidden_dim": int(row["expansion"]) * d_model}


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _name(settings: dict) -> str:
    """``layer12-batch_topk-h2048-k32``: the varying settings, in the order they vary."""
    parts = []
    for key, value in settings.items():
        if key == "hidden_dim" and "expansion" in settings:
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else f"{value:g}" if isinstance(
            value, float) else str(value)
        if key == "transcoder":  # spelled as the run directory spells it: -transcoder, -skip_transcoder
            parts.append({"none": "sae", "plain": "transcoder", "skip": "skip_transcoder"}.get(text, text))
            continue
        parts.append(text if key == "sae_type" else f"{SHORT.get(key, key)}{text}")
    return "-".join(p.replace("/", "_").replace(" ", "") for p in parts)


def _read_file(path: Path) -> tuple[dict[str, list], list[dict]]:
    """A sweep file's grid (setting -> list of values) and its explicit members."""
    if not path.is_file():
        raise SweepError(f"--sweep_file {path} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise SweepError(f"--sweep_file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'} "
                         f"({' '.join(str(err).split())}); fix it") from None
    if not isinstance(data, dict):
        raise SweepError(f"--sweep_file {path} must hold an object of settings")
    explicit = data.pop("members", [{}])
    if not isinstance(explicit, list) or not explicit or not all(isinstance(m, dict) for m in explicit):
        raise SweepError(f"\"members\" in {path} must be a non-empty list of objects of settings")
    bad = [k for k, v in data.items() if not isinstance(v, list) or not v]
    if bad:
        raise SweepError(f"{bad[0]} in {path} must be a non-empty list of values (members go under \"members\")")
    grid_values = {k: [_as_setting(x) for x in v] for k, v in data.items()}
    return grid_values, [{k: _as_setting(v) for k, v in m.items()} for m in explicit]


def _as_setting(value):
    """JSON lists become the tuples the configs hold."""
    return tuple(value) if isinstance(value, list) else value

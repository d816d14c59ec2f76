"""``python -m jax_sae.export``: a trained SAE's parameters in the torch or SAELens format.

Parameters only. Each tensor is written from a declared table (its source, whether it is
transposed, its expected shape); the dataset input scale is kept apart in the torch format
and folded into the weights for SAELens. Writing a ``.pt`` file needs torch, which the torch
side (``extractor.torch_sae``) owns and this module imports only when asked for that format; on a
JAX-only install (no ``extract`` extra) that format is refused with one line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np

from .checkpoint import CheckpointError, load_model_tree
from .config import SAEConfig

# name in the export -> (key in our checkpoint, transposed?); both layouts are [in, out].
EXPORT_TABLE = {
    "W_enc": ("W_enc", False),
    "b_enc": ("b_enc", False),
    "W_dec": ("W_dec", False),
    "b_dec": ("b_dec", False),
}
SAELENS_ARCHITECTURE = {"vanilla": "standard", "topk": "topk", "batch_topk": "jumprelu", "matryoshka": "jumprelu"}


class ExportError(ValueError):
    """An export that cannot be made."""


class MissingExtraError(RuntimeError):
    """A step needs packages this install left out; the message names the extra that brings them."""


def missing_extract(need: str, instead: str) -> MissingExtraError:
    """The error for a step that needs the torch side (``need``) on a JAX-only install."""
    return MissingExtraError(f"{need}, which this JAX-only install left out: pip install -e '.[extract]' (or rerun "
                             f"scripts/install.sh without SAE_MUSIC_JAX_ONLY); {instead}")


def exit_missing_extra(err: MissingExtraError) -> NoReturn:
    """How an entry point ends on a MissingExtraError: one line, exit status 2, no traceback."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``python -m jax_sae.export``."""

    checkpoint: str | None = None
    """A finished model checkpoint directory (best/ or final/)."""
    format: Literal["torch", "saelens"] = "torch"
    """torch: one .pt file; saelens: a directory with cfg.json and sae_weights.safetensors."""
    out: str | None = None
    """Output path (.pt file or directory)."""

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.out:
            raise ExportError("--checkpoint and --out are required")


def _shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, h = cfg.d_model, cfg.hidden_dim
    return {"W_enc": (d, h), "b_enc": (h,), "W_dec": (h, d), "b_dec": (d,)}


def exported_arrays(cfg: SAEConfig, tree: dict) -> dict[str, np.ndarray]:
    shapes = _shapes(cfg)
    out = {}
    for name, (source, transpose) in EXPORT_TABLE.items():
        value = np.asarray(tree[source], dtype=np.float32)
        value = value.T if transpose else value
        if value.shape != shapes[name]:
            raise ExportError(f"{name} has shape {value.shape}, expected {shapes[name]}")
        out[name] = value
    return out


def torch_config(cfg: SAEConfig, tree: dict, info: dict) -> dict:
    """Every field needed to rebuild the model, as plain Python values."""
    return {
        **cfg.to_json(),
        "threshold": float(np.asarray(tree["threshold"])),
        "input_scale": float(np.asarray(tree["input_scale"])),
        "hook": f"decoder.model.decoder.layers[{cfg.layer}]",
        "trained_step": info.get("step"),
    }


def fold_scale(cfg: SAEConfig, tree: dict) -> dict[str, np.ndarray]:
    """Weights acting on raw activations: x*s - b_dec = s(x - b_dec/s), x_hat = (f W_dec + b_dec)/s."""
    arrays = exported_arrays(cfg, tree)
    s = float(np.asarray(tree["input_scale"]))
    return {"W_enc": arrays["W_enc"] * s, "b_enc": arrays["b_enc"], "W_dec": arrays["W_dec"] / s,
            "b_dec": arrays["b_dec"] / s}


def write_saelens(path: Path, cfg: SAEConfig, tree: dict, info: dict) -> None:
    from safetensors.numpy import save_file

    arrays = fold_scale(cfg, tree)
    architecture = SAELENS_ARCHITECTURE[cfg.sae_type]
    if architecture == "jumprelu":
        arrays["threshold"] = np.full(cfg.hidden_dim, float(np.asarray(tree["threshold"])), np.float32)
    sae_cfg = {
        "architecture": architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.hidden_dim,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "model_name": cfg.model,
            "hook_name": f"decoder.model.decoder.layers.{cfg.layer}",
            "hook_layer": cfg.layer,
            "sae_music_jax": {"sae_type": cfg.sae_type, "group_sizes": list(cfg.group_sizes), "store": cfg.store,
                              "input_scale_folded": float(np.asarray(tree["input_scale"]))},
        },
    }
    if architecture == "topk":
        sae_cfg["k"] = cfg.top_k
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(sae_cfg, indent=2) + "\n")


def _torch_writer():
    """``save_torch_export`` of the torch side; a MissingExtraError where torch is not installed."""
    try:
        from extractor.torch_sae import save_torch_export
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise missing_extract("the torch export format needs PyTorch", "--format saelens needs no torch") from None
    return save_torch_export


def export(cfg: ExportConfig) -> Path:
    save_torch_export = _torch_writer() if cfg.format == "torch" else None  # before any work
    try:
        sae_cfg, tree, info = load_model_tree(cfg.checkpoint)
    except CheckpointError:
        raise
    except Exception as err:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"cannot read checkpoint {cfg.checkpoint} ({type(err).__name__}); it is corrupt or "
                              "unfinished: export best/ or final/ of a finished run") from None
    out = Path(cfg.out)
    if save_torch_export is not None:
        save_torch_export(out, torch_config(sae_cfg, tree, info), exported_arrays(sae_cfg, tree))
    else:
        write_saelens(out, sae_cfg, tree, info)
    print(f"exported {cfg.checkpoint} ({sae_cfg.sae_type}, {sae_cfg.d_model} -> {sae_cfg.hidden_dim}) to {out} "
          f"[{cfg.format}]")
    return out


def main(argv: list[str] | None = None):
    from extractor.cli import run_main

    try:
        return run_main(ExportConfig, argv, prog="python -m jax_sae.export",
                        description="Export a trained SAE to the torch or SAELens format.", run=export,
                        errors=(ExportError, CheckpointError))
    except MissingExtraError as err:
        exit_missing_extra(err)


if __name__ == "__main__":
    main()

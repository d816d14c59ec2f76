"""``python -m jax_sae.export``: a trained SAE's parameters in the torch or SAELens format.

Parameters only. Both formats (tensor names and shapes, config fields, the SAELens architecture
and cfg.json) are defined in ``sae_core.formats``, torch-free like the rest of the core. The checkpoint's
tensors keep their names and [in, out] layout in both formats (none is transposed) and each shape
is checked before writing; the dataset input scale is kept apart in the torch format and folded
into the weights for SAELens. Writing a ``.pt`` file needs torch, which the torch side
(``extractor.torch_sae``) owns and this module reaches through ``torch_side`` only when asked for
that format; on a JAX-only install (no ``extract`` extra) that format is refused with one line and
exit status 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core import formats
from sae_core.errors import UsageError

from .config import SAEConfig
from .torch_side import torch_module

# Tensors the formats store transposed relative to the checkpoint: none, both are [in, out] under
# the same names.
TRANSPOSED: frozenset[str] = frozenset()

class ExportError(UsageError):
    """An export that cannot be made."""


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


def exported_arrays(cfg: SAEConfig, tree: dict, source="the checkpoint") -> dict[str, np.ndarray]:
    """The checkpoint's tensors as the formats hold them, float32, each shape checked."""
    shapes = formats.export_shapes(cfg.sae_type, cfg.d_model, cfg.hidden_dim, cfg.transcoder)
    arrays = {name: np.asarray(tree[name]).T if name in TRANSPOSED else tree[name] for name in shapes}
    return formats.checked_tensors(arrays, shapes, source)


def _scalar(tree: dict, name: str) -> float:
    return float(np.asarray(tree[name]))


def write_export(out: Path, cfg: SAEConfig, tree: dict, info: dict, save_torch_export=None,
                 source="the checkpoint") -> None:
    """The torch format through ``save_torch_export`` where given, else the SAELens directory."""
    arrays = exported_arrays(cfg, tree, source)  # a JumpReLU's thresholds among them
    threshold = arrays["threshold"] if cfg.learned_threshold else _scalar(tree, "threshold")
    input_scale = _scalar(tree, "input_scale")
    sae_config = cfg.to_json()
    if save_torch_export is not None:
        save_torch_export(out, formats.torch_config(sae_config, 0.0 if cfg.learned_threshold else threshold,
                                                    input_scale, info.get("step")), arrays)
    else:
        lens_arrays = formats.saelens_arrays(sae_config, arrays, threshold, input_scale)
        formats.write_saelens(out, formats.saelens_cfg(sae_config, input_scale), lens_arrays)


def _torch_writer():
    """``save_torch_export`` of the torch side; a MissingExtraError where torch is not installed."""
    return torch_module("torch_sae", "the torch export format needs PyTorch",
                        "--format saelens needs no torch").save_torch_export


def _check_out(out: Path, fmt: str) -> None:
    """Refuse an ``--out`` of the wrong kind (a directory for a .pt file, a file for a SAELens directory) or
    one that cannot be written, before anything is read or written."""
    if fmt == "torch" and out.is_dir():
        raise ExportError(f"--out {out} is a directory, but the torch format writes one file: give a file path "
                          f"such as {out / 'sae.pt'}")
    if fmt == "saelens" and out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, but the SAELens format writes a directory (cfg.json and "
                          "sae_weights.safetensors): give a new or existing directory")
    # The directory that will receive a new entry: the SAELens directory itself when it exists, else the
    # nearest existing ancestor of the path (the missing ones are created in it).
    target = out if fmt == "saelens" and out.is_dir() else out.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise ExportError(f"cannot write --out {out}: {target} is a file, not a directory; choose another --out")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write --out {out}: {target} is not writable; choose another --out or make it "
                          "writable")


def export(cfg: ExportConfig) -> Path:
    save_torch_export = _torch_writer() if cfg.format == "torch" else None  # before any work
    out = Path(cfg.out)
    _check_out(out, cfg.format)
    from .checkpoint import load_model_tree, read_config  # orbax and JAX load only when exporting

    if cfg.format == "saelens":
        formats.saelens_architecture(read_config(cfg.checkpoint)[0].to_json())  # one a SAELens class can run
    sae_cfg, tree, info = load_model_tree(cfg.checkpoint)
    write_export(out, sae_cfg, tree, info, save_torch_export, source=cfg.checkpoint)
    print(f"exported {cfg.checkpoint} ({sae_cfg.kind}, {sae_cfg.d_model} -> {sae_cfg.hidden_dim}) to {out} "
          f"[{cfg.format}]")
    return out


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(ExportConfig, argv, prog="python -m jax_sae.export",
                    description="Export a trained SAE to the torch or SAELens format.", run=export)


if __name__ == "__main__":
    main()

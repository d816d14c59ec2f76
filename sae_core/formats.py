"""The two SAE export formats, owned here and nowhere else; numpy only, so both sides use it.

- torch: one ``.pt`` file ``{"config": {...}, "state_dict": {...}}`` of plain float32 tensors and
  plain Python values, input scale kept apart in the config. This module builds and checks that
  payload; ``extractor.torch_sae`` only runs ``torch.save``/``torch.load`` on it.
- SAELens: a directory with ``cfg.json`` and ``sae_weights.safetensors`` in SAELens's layout
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, and ``threshold
  [d_sae]`` for JumpReLU), the input scale folded into the weights so they act on raw activations.
  ``cfg.json`` carries ``metadata.sae_lens_version`` = ``SAELENS_VERSION`` ("6.0.0") and
  ``reshape_activations: "none"``: SAELens 6 (``handle_config_defaulting`` in
  ``sae_lens/loading/pretrained_sae_loaders.py``) sends any config whose version is missing or
  below ``6.0.0-rc.0`` through its pre-6 rewrite, which drops metadata it does not know; 6.0.0 is
  the first 6.x release, so every SAELens 6 loader takes our config as written.

Torch-free and JAX-free, like the rest of ``sae_core``; writes go through ``sae_core.files`` so a
reader never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import UsageError
from .files import write_all

TORCH_FORMAT_VERSION = 1
SAELENS_VERSION = "6.0.0"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

# our sae_type -> SAELens architecture; BatchTopK and Matryoshka run as JumpReLU at inference.
SAELENS_ARCHITECTURE = {"vanilla": "standard", "topk": "topk", "batch_topk": "jumprelu", "matryoshka": "jumprelu",
                        "jumprelu": "jumprelu"}
# SAELens architecture -> our sae_type (a Matryoshka or JumpReLU export says which in metadata.sae_music_jax).
SAE_TYPE_OF_ARCHITECTURE = {"standard": "vanilla", "topk": "topk", "jumprelu": "batch_topk"}
# our sae_type -> the activation the torch SAE applies at inference.
INFERENCE_KIND = {"vanilla": "relu", "topk": "topk", "batch_topk": "jumprelu", "matryoshka": "jumprelu",
                  "jumprelu": "jumprelu"}
# Types whose threshold is one per latent (a tensor of both formats), not one number.
PER_LATENT_THRESHOLD = ("jumprelu",)
# Transcoders (our "transcoder" setting: plain or skip) in SAELens 6.54, by the activation they run:
# a ReLU one for Vanilla, a JumpReLU one for the BatchTopK family and JumpReLU; it has none for TopK.
SAELENS_TRANSCODER = {("relu", "plain"): "transcoder", ("relu", "skip"): "skip_transcoder",
                      ("jumprelu", "plain"): "jumprelu_transcoder", ("jumprelu", "skip"): "jumprelu_skip_transcoder"}
TRANSCODER_OF_ARCHITECTURE = {arch: (kind, transcoder) for (kind, transcoder), arch in SAELENS_TRANSCODER.items()}
# Where a transcoder of decoder block N reads and writes (submodules of MusicGen's decoder layer).
MLP_HOOKS = ("final_layer_norm", "fc2")
# Fields every torch-format config holds; the rest of our SAE config rides along.
TORCH_CONFIG_FIELDS = ("sae_type", "d_model", "hidden_dim", "threshold", "input_scale")
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class SAEFormatError(UsageError):
    """A file that is not an SAE export this code can read, or refuses to be read safely."""


def tensor_shapes(d_model: int, hidden_dim: int) -> dict[str, tuple[int, ...]]:
    """The tensors of both formats (``TENSOR_NAMES``) and their shapes; both store [in, out]."""
    shapes = ((d_model, hidden_dim), (hidden_dim,), (hidden_dim, d_model), (d_model,))
    return dict(zip(TENSOR_NAMES, shapes))


def export_shapes(sae_type: str, d_model: int, hidden_dim: int, transcoder: str = "none") -> dict[str, tuple[int, ...]]:
    """``tensor_shapes``, with the per-latent ``threshold [hidden_dim]`` of a JumpReLU and a skip
    transcoder's ``W_skip [d_model, d_model]`` ([in, out] like the rest)."""
    shapes = tensor_shapes(d_model, hidden_dim)
    if sae_type in PER_LATENT_THRESHOLD:
        shapes["threshold"] = (hidden_dim,)
    if transcoder == "skip":
        shapes["W_skip"] = (d_model, d_model)
    return shapes


def hook_names(sae_config: dict, joiner: str = ".") -> tuple[str, str]:
    """(input, output) module paths in MusicGen of an SAE (the decoder layer, both) or a transcoder
    (the layer's MLP layer norm and its fc2), with ``joiner`` "." (SAELens) or "[]" (the torch format)."""
    layer = sae_config.get("layer")
    block = f"decoder.model.decoder.layers.{layer}" if joiner == "." else f"decoder.model.decoder.layers[{layer}]"
    if sae_config.get("transcoder", "none") == "none":
        return block, block
    return tuple(f"{block}.{module}" for module in MLP_HOOKS)


def checked_tensors(arrays: Mapping, shapes: Mapping[str, tuple[int, ...]], source) -> dict[str, np.ndarray]:
    """``arrays`` as float32 numpy, each shape checked; the error names ``source`` and the tensor."""
    missing = set(shapes) - set(arrays)
    if missing:
        raise SAEFormatError(f"{source} lacks tensors {sorted(missing)}")
    out = {}
    for name, shape in shapes.items():
        value = np.asarray(arrays[name], dtype=np.float32)
        if value.shape != tuple(shape):
            raise SAEFormatError(f"{source}: tensor {name} has shape {value.shape}, expected {tuple(shape)}")
        out[name] = value
    return out


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_torch_config(config: dict, source) -> None:
    missing = [f for f in TORCH_CONFIG_FIELDS if f not in config]
    if missing:
        raise SAEFormatError(f"{source} lacks config fields {missing}")
    if config["sae_type"] not in INFERENCE_KIND:
        raise SAEFormatError(f"{source}: unknown sae_type {config['sae_type']!r}")
    for name in ("d_model", "hidden_dim"):
        if not _positive_int(config[name]):
            raise SAEFormatError(f"{source}: {name} must be a positive integer, got {config[name]!r}")
    if config["sae_type"] == "topk" and not _positive_int(config.get("top_k")):
        raise SAEFormatError(f"{source}: a topk SAE needs a positive top_k, got {config.get('top_k')!r}")
    if config.get("transcoder", "none") not in ("none", "plain", "skip"):
        raise SAEFormatError(f"{source}: unknown transcoder {config.get('transcoder')!r}")


def torch_config(sae_config: dict, threshold: float, input_scale: float, trained_step: int | None) -> dict:
    """The config of a torch export: our SAE config's JSON fields, the scalar threshold and input
    scale, the hooked modules (an SAE's input and output are the layer's; a transcoder's, its MLP's
    layer norm and fc2) and the training step."""
    hook_in, hook_out = hook_names(sae_config, "[]")
    return {**sae_config, "threshold": float(threshold), "input_scale": float(input_scale),
            "hook": hook_out, "hook_in": hook_in, "trained_step": trained_step}


def torch_payload(config: dict, arrays: Mapping, source="torch export") -> dict:
    """What ``torch.save`` writes (tensors still numpy): every field and tensor shape checked first."""
    _check_torch_config(config, source)
    state = checked_tensors(arrays, _config_shapes(config), source)
    return {"config": {**config, "format_version": TORCH_FORMAT_VERSION}, "state_dict": state}


def read_torch_payload(data, source) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, float32 arrays) of what ``torch.load`` returned, checked like ``torch_payload``."""
    if not isinstance(data, dict) or "config" not in data or "state_dict" not in data:
        raise SAEFormatError(f"{source} is a torch file but not an SAE export (needs config and state_dict)")
    config, state = data["config"], data["state_dict"]
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise SAEFormatError(f"{source} is a torch file but not an SAE export (config and state_dict must be dicts)")
    missing = set(TENSOR_NAMES) - set(state)
    if missing:
        raise SAEFormatError(f"{source} lacks tensors {sorted(missing)}")
    _check_torch_config(config, source)
    return config, checked_tensors(state, _config_shapes(config), source)


def _config_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    return export_shapes(config["sae_type"], config["d_model"], config["hidden_dim"], config.get("transcoder", "none"))


class SAELensExport(NamedTuple):
    """A SAELens directory as read: ``cfg`` is cfg.json as written, ``config`` our SAE config's
    fields rebuilt from it, ``arrays`` the weights (threshold included for JumpReLU; a skip
    transcoder's W_skip in our [in, out] layout)."""

    cfg: dict
    config: dict
    arrays: dict[str, np.ndarray]


def is_saelens_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / SAELENS_CFG).exists() and (path / SAELENS_WEIGHTS).exists()


def saelens_shapes(architecture: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a SAELens directory (a transcoder's d_out is its d_in here: MusicGen's MLP keeps
    the width; a skip transcoder's W_skip is SAELens's [d_out, d_in])."""
    shapes = tensor_shapes(d_in, d_sae)
    if architecture in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        shapes["threshold"] = (d_sae,)
    if architecture in ("skip_transcoder", "jumprelu_skip_transcoder"):
        shapes["W_skip"] = (d_in, d_in)
    return shapes


def saelens_architecture(sae_config: dict) -> str:
    """The SAELens architecture of an export; a TopK transcoder has none (SAELens 6.54 has no such class)."""
    transcoder = sae_config.get("transcoder", "none")
    if transcoder == "none":
        return SAELENS_ARCHITECTURE[sae_config["sae_type"]]
    kind = INFERENCE_KIND[sae_config["sae_type"]]
    if kind == "topk":
        raise SAEFormatError("SAELens has no TopK transcoder class: export this one with --format torch, or train "
                             "the transcoder as batch_topk (it runs as a JumpReLU transcoder in SAELens)")
    return SAELENS_TRANSCODER[(kind, transcoder)]


def saelens_cfg(sae_config: dict, input_scale: float) -> dict:
    """cfg.json of an export of an SAE with config ``sae_config`` (our SAE config's JSON fields); a
    transcoder's names its output width and both hooks (``hook_name`` in, ``hook_name_out`` out)."""
    architecture = saelens_architecture(sae_config)
    transcoder = sae_config.get("transcoder", "none") != "none"
    hook_in, hook_out = hook_names(sae_config)
    cfg = {
        "architecture": architecture,
        "d_in": sae_config["d_model"],
        "d_sae": sae_config["hidden_dim"],
        **({"d_out": sae_config["d_model"]} if transcoder else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": sae_config.get("model"),
            "hook_name": hook_in,
            **({"hook_name_out": hook_out} if transcoder else {}),
            "hook_layer": sae_config.get("layer"),
            "sae_music_jax": {"sae_type": sae_config["sae_type"],
                              "group_sizes": list(sae_config.get("group_sizes", ())),
                              "store": sae_config.get("store"), "input_scale_folded": float(input_scale)},
        },
    }
    if architecture == "topk":
        cfg["k"] = sae_config["top_k"]
    return cfg


def saelens_arrays(sae_config: dict, arrays: Mapping, threshold, input_scale: float) -> dict[str, np.ndarray]:
    """Weights acting on raw activations: x*s - b_dec = s(x - b_dec/s), x_hat = (f W_dec + b_dec)/s
    (the pre-activations, and so the threshold, are unchanged; a transcoder's encoder has no b_dec,
    and its skip term (s x W_skip)/s = x W_skip is unchanged, stored transposed as SAELens's
    [d_out, d_in]); JumpReLU gets the threshold per feature (BatchTopK's one number repeated, a
    JumpReLU's own)."""
    d, h = sae_config["d_model"], sae_config["hidden_dim"]
    transcoder = sae_config.get("transcoder", "none")
    ours = checked_tensors(arrays, export_shapes("", d, h, transcoder), "the SAE to export")
    s = float(input_scale)
    out = {"W_enc": ours["W_enc"] * s, "b_enc": ours["b_enc"], "W_dec": ours["W_dec"] / s, "b_dec": ours["b_dec"] / s}
    architecture = saelens_architecture(sae_config)
    if "threshold" in saelens_shapes(architecture, d, h):
        out["threshold"] = np.ascontiguousarray(np.broadcast_to(np.asarray(threshold, np.float32), (h,)))
    if transcoder == "skip":
        out["W_skip"] = np.ascontiguousarray(ours["W_skip"].T)
    return out


def write_saelens(path: str | Path, cfg: dict, arrays: Mapping) -> None:
    """Writes both files complete beside their final names, then renames them into place (weights,
    then cfg.json), so a failure part-way leaves the old export or none; shapes checked against ``cfg``.
    Other files in the directory are left alone."""
    from safetensors.numpy import save

    path = Path(path)
    shapes = saelens_shapes(cfg["architecture"], cfg["d_in"], cfg["d_sae"])
    arrays = checked_tensors(arrays, shapes, path / SAELENS_WEIGHTS)
    weights = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    write_all({path / SAELENS_WEIGHTS: weights, path / SAELENS_CFG: json.dumps(cfg, indent=2) + "\n"})


def check_saelens_cfg(cfg, source) -> None:
    """One SAEFormatError naming ``source`` and the first thing this code cannot read right."""
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    known = list(SAE_TYPE_OF_ARCHITECTURE) + list(TRANSCODER_OF_ARCHITECTURE)
    if cfg.get("architecture") not in known:
        raise SAEFormatError(f"{source}: SAELens architecture {cfg.get('architecture')!r} is not supported "
                             f"(supported: {', '.join(known)})")
    transcoder = cfg["architecture"] in TRANSCODER_OF_ARCHITECTURE
    if transcoder and cfg.get("d_out", cfg.get("d_in")) != cfg.get("d_in"):
        raise SAEFormatError(f"{source}: a transcoder with d_out {cfg.get('d_out')!r} other than d_in "
                             f"{cfg.get('d_in')!r} is not supported (MusicGen's MLP keeps the width)")
    for name in ("d_in", "d_sae"):
        if not _positive_int(cfg.get(name)):
            raise SAEFormatError(f"{source}: {name} must be a positive integer, got {cfg.get(name)!r}")
    if cfg["architecture"] == "topk" and not (_positive_int(cfg.get("k")) and cfg["k"] <= cfg["d_sae"]):
        raise SAEFormatError(f"{source}: a topk SAE needs k in 1..d_sae ({cfg['d_sae']}), got {cfg.get('k')!r}")
    for name in ("normalize_activations", "reshape_activations"):
        if cfg.get(name) not in (None, "none"):
            raise SAEFormatError(f"{source}: {name} {cfg[name]!r} is not supported (only 'none')")
    if cfg.get("apply_b_dec_to_input", not transcoder) is not (not transcoder):
        raise SAEFormatError(f"{source}: apply_b_dec_to_input {str(transcoder).lower()} is not supported"
                             + (" for a transcoder" if transcoder else ""))
    if not isinstance(cfg.get("metadata") or {}, dict):
        raise SAEFormatError(f"{source}: metadata must be a JSON object")


def _config_of(cfg: dict) -> dict:
    """Our SAE config's fields from a checked cfg.json."""
    metadata = cfg.get("metadata") or {}
    ours = metadata.get("sae_music_jax") or {}
    transcoder = "none"
    if cfg["architecture"] in TRANSCODER_OF_ARCHITECTURE:
        kind, transcoder = TRANSCODER_OF_ARCHITECTURE[cfg["architecture"]]
        sae_type = "vanilla" if kind == "relu" else "batch_topk"
    else:
        sae_type = SAE_TYPE_OF_ARCHITECTURE[cfg["architecture"]]
    if sae_type == "batch_topk" and ours.get("sae_type") in ("matryoshka", "jumprelu"):
        sae_type = ours["sae_type"]
    hidden = cfg["d_sae"]
    return {"sae_type": sae_type, "d_model": cfg["d_in"], "hidden_dim": hidden,
            "top_k": int(cfg.get("k") or min(64, hidden)),
            "group_sizes": list(ours.get("group_sizes") or ()) if sae_type == "matryoshka" else [],
            "layer": metadata.get("hook_layer"), "model": metadata.get("model_name"), "store": ours.get("store"),
            "transcoder": transcoder}


def read_saelens(path: str | Path) -> SAELensExport:
    """A SAELens directory, cfg.json and every tensor's shape checked."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not is_saelens_dir(path):
        raise SAEFormatError(f"{path} is not a SAELens directory (needs {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{path / SAELENS_CFG}: not valid JSON ({err})") from None
    check_saelens_cfg(cfg, path / SAELENS_CFG)
    try:
        raw = load_file(path / SAELENS_WEIGHTS)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise SAEFormatError(f"{path / SAELENS_WEIGHTS}: not a readable safetensors file ({err})") from None
    shapes = saelens_shapes(cfg["architecture"], cfg["d_in"], cfg["d_sae"])
    arrays = checked_tensors(raw, shapes, path / SAELENS_WEIGHTS)
    if "W_skip" in arrays:  # SAELens's [d_out, d_in] back to our [in, out]
        arrays["W_skip"] = np.ascontiguousarray(arrays["W_skip"].T)
    return SAELensExport(cfg, _config_of(cfg), arrays)

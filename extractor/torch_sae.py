"""The SAE in PyTorch, loaded from either export format, for use beside the PyTorch MusicGen.

Formats (written by ``python -m jax_sae.export``):
- torch: one ``.pt`` file ``{"config": {...}, "state_dict": {...}}`` of plain tensors and plain
  Python values, loadable with ``torch.load(weights_only=True)``; input scale kept separate.
- saelens: a directory with ``cfg.json`` and ``sae_weights.safetensors`` in SAELens's layout
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold`` for
  JumpReLU), the input scale folded into the weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

try:
    import torch
    from torch import nn
except ModuleNotFoundError as err:  # a JAX-only install (SAE_MUSIC_JAX_ONLY=1) leaves torch out
    if err.name != "torch":
        raise
    raise ModuleNotFoundError("the torch SAE needs PyTorch, which this install left out: pip install -e '.[extract]' "
                              "(or rerun scripts/install.sh without SAE_MUSIC_JAX_ONLY)", name="torch") from None

from .saelens import SAEFormatError, read_saelens_export

TORCH_FORMAT_VERSION = 1
# Tensors of the torch format: name -> shape as a function of (d_model, hidden_dim).
TENSOR_SHAPES = {
    "W_enc": lambda d, h: (d, h),
    "b_enc": lambda d, h: (h,),
    "W_dec": lambda d, h: (h, d),
    "b_dec": lambda d, h: (d,),
}


def save_torch_export(path: str | Path, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the torch format; every tensor's shape is checked against the config first."""
    d, h = config["d_model"], config["hidden_dim"]
    state = {}
    for name, shape in TENSOR_SHAPES.items():
        value = np.asarray(arrays[name], dtype=np.float32)
        if value.shape != shape(d, h):
            raise SAEFormatError(f"{name} has shape {value.shape}, expected {shape(d, h)}")
        state[name] = torch.from_numpy(value.copy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": {**config, "format_version": TORCH_FORMAT_VERSION}, "state_dict": state}, tmp)
    tmp.replace(path)


def read_torch_export(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, arrays) of a torch-format export; pickles that need code execution are refused."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SAEFormatError(
            f"{path} is not a plain-tensor SAE export (refusing a pickle that needs code execution: "
            f"{str(err).splitlines()[0][:120]})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse means: not our format
        raise SAEFormatError(f"{path} is not a torch SAE export ({type(err).__name__}); re-export it") from None
    if not isinstance(data, dict) or "config" not in data or "state_dict" not in data:
        raise SAEFormatError(f"{path} is a torch file but not an SAE export (needs config and state_dict)")
    config = data["config"]
    arrays = {k: v.numpy() for k, v in data["state_dict"].items()}
    missing = set(TENSOR_SHAPES) - set(arrays)
    if missing:
        raise SAEFormatError(f"{path} lacks tensors {sorted(missing)}")
    return config, arrays


class TorchSAE(nn.Module):
    """Encode/decode in the store's units. ``kind`` is relu (vanilla), topk, or jumprelu
    (BatchTopK and Matryoshka at inference, and SAELens JumpReLU)."""

    def __init__(self, kind: str, W_enc, b_enc, W_dec, b_dec, *, threshold=0.0, input_scale: float = 1.0,
                 top_k: int | None = None, config: dict | None = None):
        super().__init__()
        if kind not in ("relu", "topk", "jumprelu"):
            raise SAEFormatError(f"unknown SAE kind {kind!r}")
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.kind, self.top_k, self.config = kind, top_k, config or {}
        self.W_enc = nn.Parameter(as_tensor(W_enc), requires_grad=False)
        self.b_enc = nn.Parameter(as_tensor(b_enc), requires_grad=False)
        self.W_dec = nn.Parameter(as_tensor(W_dec), requires_grad=False)
        self.b_dec = nn.Parameter(as_tensor(b_dec), requires_grad=False)
        self.register_buffer("threshold", as_tensor(threshold))
        self.register_buffer("input_scale", as_tensor(input_scale))

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.W_enc.shape[1]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TorchSAE":
        """Load a torch-format ``.pt`` file or a SAELens directory."""
        path = Path(path)
        if path.is_dir():
            if (path / "state").exists() and (path / "config.json").exists():
                raise SAEFormatError(
                    f"{path} is a JAX checkpoint; export it first: python -m jax_sae.export --checkpoint {path} "
                    "--format torch --out sae.pt"
                )
            cfg, arrays = read_saelens_export(path)
            kind = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(cfg.get("architecture"))
            if kind is None:
                raise SAEFormatError(f"SAELens architecture {cfg.get('architecture')!r} is not supported")
            return cls(kind, arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"],
                       threshold=arrays.get("threshold", 0.0), top_k=cfg.get("k"), config=cfg)
        if not path.exists():
            raise SAEFormatError(f"no SAE at {path}")
        cfg, arrays = read_torch_export(path)
        kind = {"vanilla": "relu", "topk": "topk"}.get(cfg["sae_type"], "jumprelu")
        return cls(kind, arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"],
                   threshold=cfg.get("threshold", 0.0), input_scale=cfg.get("input_scale", 1.0),
                   top_k=cfg.get("top_k"), config=cfg)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype) * self.input_scale
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "topk":
            vals, idx = torch.topk(pre, self.top_k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def feature_direction(self, feature: int) -> torch.Tensor:
        """What one unit of ``feature`` adds to the reconstruction, in the store's units."""
        if not 0 <= feature < self.hidden_dim:
            raise SAEFormatError(f"feature {feature} is out of range: the SAE has {self.hidden_dim} features "
                                 f"(0-{self.hidden_dim - 1})")
        return self.W_dec[feature] / self.input_scale

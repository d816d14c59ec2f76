"""The SAE in PyTorch, loaded from either export format, for use beside the PyTorch MusicGen.

Both formats (written by ``python -m jax_sae.export``) are defined in ``sae_core.formats``; this
module only moves the torch format's payload through ``torch.save`` and ``torch.load``, the one
step that needs torch. The JAX side never imports this module at import time.
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

from sae_core.files import staged_file
from sae_core.formats import INFERENCE_KIND, SAEFormatError, read_saelens, read_torch_payload, torch_payload


def save_torch_export(path: str | Path, config: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the torch format atomically; the config's fields and every tensor's shape are checked first."""
    payload = torch_payload(config, arrays, source=path)
    payload["state_dict"] = {name: torch.from_numpy(value.copy()) for name, value in payload["state_dict"].items()}
    with staged_file(path) as tmp:
        torch.save(payload, tmp)


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
    return read_torch_payload(data, path)


class TorchSAE(nn.Module):
    """Encode/decode in the store's units. ``kind`` is relu (vanilla), topk, or jumprelu
    (BatchTopK and Matryoshka at inference, and SAELens JumpReLU). ``transcoder`` plain or skip:
    it encodes a layer's MLP input (uncentred) and decodes that MLP's output (plus x @ W_skip)."""

    def __init__(self, kind: str, W_enc, b_enc, W_dec, b_dec, *, threshold=0.0, input_scale: float = 1.0,
                 top_k: int | None = None, config: dict | None = None, transcoder: str = "none", W_skip=None):
        super().__init__()
        if kind not in set(INFERENCE_KIND.values()):
            raise SAEFormatError(f"unknown SAE kind {kind!r}")
        if (transcoder == "skip") != (W_skip is not None):
            raise SAEFormatError("a skip transcoder needs W_skip, and only a skip transcoder has one")
        as_tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.kind, self.top_k, self.config, self.transcoder = kind, top_k, config or {}, transcoder
        self.W_enc = nn.Parameter(as_tensor(W_enc), requires_grad=False)
        self.b_enc = nn.Parameter(as_tensor(b_enc), requires_grad=False)
        self.W_dec = nn.Parameter(as_tensor(W_dec), requires_grad=False)
        self.b_dec = nn.Parameter(as_tensor(b_dec), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(as_tensor(W_skip), requires_grad=False)
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
            lens = read_saelens(path)
            return cls(INFERENCE_KIND[lens.config["sae_type"]], lens.arrays["W_enc"], lens.arrays["b_enc"],
                       lens.arrays["W_dec"], lens.arrays["b_dec"], threshold=lens.arrays.get("threshold", 0.0),
                       top_k=lens.config["top_k"], config=lens.cfg, transcoder=lens.config["transcoder"],
                       W_skip=lens.arrays.get("W_skip"))
        if not path.exists():
            raise SAEFormatError(f"no SAE at {path}")
        cfg, arrays = read_torch_export(path)
        return cls(INFERENCE_KIND[cfg["sae_type"]], arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"],
                   threshold=arrays.get("threshold", cfg["threshold"]), input_scale=cfg["input_scale"],
                   top_k=cfg.get("top_k"), config=cfg, transcoder=cfg.get("transcoder", "none"),
                   W_skip=arrays.get("W_skip"))

    @property
    def is_transcoder(self) -> bool:
        return self.transcoder != "none"

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype) * self.input_scale
        return (x if self.is_transcoder else x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "topk":
            vals, idx = torch.topk(pre, self.top_k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction (a transcoder's MLP output); a skip transcoder adds x @ W_skip of its input ``x``."""
        out = (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale
        if self.W_skip is not None:
            if x is None:
                raise SAEFormatError("a skip transcoder's output needs its input: call decode(f, x)")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def feature_direction(self, feature: int) -> torch.Tensor:
        """What one unit of ``feature`` adds to the reconstruction, in the store's units."""
        if not 0 <= feature < self.hidden_dim:
            raise SAEFormatError(f"feature {feature} is out of range: the SAE has {self.hidden_dim} features "
                                 f"(0-{self.hidden_dim - 1})")
        return self.W_dec[feature] / self.input_scale

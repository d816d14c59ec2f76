"""Output effects of SAE features: what each decoder direction does to MusicGen's next-code logits,
the audio analogue of a text dashboard's top logits.

A direction in the residual stream reaches the logits through the decoder's final layer norm and
one linear head per codebook. As a logit lens does, the direction is centred and scaled by the
norm's gain (its division by the residual's spread is a positive factor common to every entry,
so it changes no ranking), then multiplied by each head: the entries with the largest values are
the codes the feature promotes, the smallest those it suppresses. The report asks for these
through a lazy import (torch loads only then).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae_core.errors import UsageError
from .models import shared_model


@dataclass(frozen=True)
class CodebookEffect:
    """One codebook's most promoted and most suppressed entries, (code, logit change) each."""

    codebook: int
    promoted: list[tuple[int, float]]
    suppressed: list[tuple[int, float]]


def logit_effects(norm_weight: torch.Tensor, heads: list[torch.Tensor], directions_FD: np.ndarray,
                  top: int) -> list[list[CodebookEffect]]:
    """Per direction (unit-normalised), per codebook head [vocab, d]: the ``top`` entries raised and lowered most."""
    d = torch.as_tensor(np.asarray(directions_FD, np.float32), dtype=torch.float32)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    through = (d - d.mean(dim=-1, keepdim=True)) * norm_weight.float()
    out: list[list[CodebookEffect]] = [[] for _ in range(len(d))]
    for k, head in enumerate(heads):
        logits = through @ head.float().T  # [F, vocab]
        n = min(top, logits.shape[1])
        up, down = torch.topk(logits, n, dim=1), torch.topk(-logits, n, dim=1)
        for f in range(len(d)):
            out[f].append(CodebookEffect(
                k, [(int(i), float(v)) for i, v in zip(up.indices[f], up.values[f])],
                [(int(i), -float(v)) for i, v in zip(down.indices[f], down.values[f])]))
    return out


@torch.no_grad()
def output_effects(model: str, directions_FD: np.ndarray, top: int = 8, device: str = "auto",
                   d_model: int | None = None) -> list[list[CodebookEffect]]:
    """Load ``model`` and give each direction's per-codebook effects (see the module's docstring)."""
    loaded = shared_model(model, device, "float32")
    if d_model is not None and d_model != loaded.info.d_model:
        raise UsageError(f"the SAE's width {d_model} is not {model}'s d_model {loaded.info.d_model}; pass --model, "
                         "the model the store was made with")
    heads = [head.weight.cpu() for head in loaded.model.decoder.lm_heads]
    return logit_effects(loaded.decoder.layer_norm.weight.cpu(), heads, directions_FD, top)

"""Audio for stored examples: decode a window of a sample's stored codes with the model's EnCodec.

The JAX side asks for audio through ``render_windows`` (imported lazily), so torch loads only
when a report wants sound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .audio import write_audio
from .capture import decode_codes
from .errors import UsageError
from .models import load_model
from .store import Store


@dataclass(frozen=True)
class AudioRequest:
    """Decode frames [first, last) of a sample into ``path``."""

    sample: int
    first: int
    last: int
    path: str


@torch.no_grad()
def render_windows(model: str, store: Store, requests: Sequence[AudioRequest], device: str = "auto",
                   progress: bool = True) -> list[Path]:
    """Write one clip per request (stereo for stereo checkpoints), in the format of its path's suffix
    (``extractor.audio.write_audio``); returns the paths."""
    from tqdm import tqdm

    if not requests:
        return []
    loaded = load_model(model, device, "float32")
    if loaded.info.num_codebooks != store.meta.n_codebooks:
        raise UsageError(f"store {store.path} has {store.meta.n_codebooks} codebooks but {model} has "
                         f"{loaded.info.num_codebooks}; pass the model the store was made with")
    written = []
    for req in tqdm(requests, desc="decoding audio", unit="clip", disable=not progress):
        audio = decode_codes(loaded, store.sample_codes(req.sample)[req.first:req.last])
        path = Path(req.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, audio, loaded.info.sampling_rate)
        written.append(path)
    return written

"""The melody condition of MusicGen-melody: a one-hot chromagram of the conditioning audio.

transformers' ``MusicgenMelodyFeatureExtractor`` computes it with torchaudio, which is not
installable beside every torch build. This computes the same features with ``torch.stft``:
the first ``chunk_length`` seconds, a power spectrogram (Hann window, centred, reflect
padding, normalised by the window's norm, as ``torchaudio.transforms.Spectrogram(normalized=True)``),
transformers' chroma filter bank, and the strongest pitch class of each frame set to 1.
The model repeats or cuts the chroma to ``chroma_length`` frames; ``chroma_indices`` does
the same per sample so that a batch of different lengths equals each sample alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class ChromaExtractor:
    """Settings from a melody checkpoint's ``preprocessor_config.json``."""

    sampling_rate: int = 32000
    n_fft: int = 16384
    hop_length: int = 4096
    chunk_length: int = 30
    num_chroma: int = 12

    @classmethod
    def from_pretrained(cls, source: str | Path) -> ChromaExtractor:
        """From a checkpoint directory or hub name; the released defaults where it saved none."""
        from transformers.utils import cached_file

        path = cached_file(str(source), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        saved = json.loads(Path(path).read_text()) if path else {}
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})

    def filters(self) -> torch.Tensor:
        from transformers.audio_utils import chroma_filter_bank

        bank = chroma_filter_bank(sampling_rate=self.sampling_rate, num_frequency_bins=self.n_fft, tuning=0,
                                  num_chroma=self.num_chroma)
        return torch.from_numpy(bank).float()

    def chroma(self, waveform: np.ndarray) -> np.ndarray:
        """Strongest pitch class per chroma frame, [n_chroma_frames] int, of mono audio at ``sampling_rate``."""
        wave = torch.from_numpy(np.asarray(waveform, np.float32).reshape(-1)[: self.chunk_length * self.sampling_rate])
        if wave.numel() < self.n_fft:
            pad = self.n_fft - wave.numel()
            wave = torch.nn.functional.pad(wave, (pad // 2, pad - pad // 2))
        window = torch.hann_window(self.n_fft)
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=window, center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)
        power = (spec.abs() / window.pow(2).sum().sqrt()) ** 2  # [freq, frames]
        raw = self.filters() @ power  # [chroma, frames]
        norm = raw / raw.abs().amax(dim=0, keepdim=True).clamp_min(1e-6)
        return norm.argmax(dim=0).numpy().astype(np.int64)


def chroma_features(indices: list[np.ndarray | list[int] | None], chroma_length: int, num_chroma: int) -> torch.Tensor:
    """One-hot ``input_features`` [B, chroma_length, num_chroma]: each sample's chroma repeated or cut to
    ``chroma_length`` frames as the model does; ``None`` is the model's null melody (pitch class 0)."""
    out = torch.zeros(len(indices), chroma_length, num_chroma)
    for i, idx in enumerate(indices):
        idx = np.zeros(1, np.int64) if idx is None or len(idx) == 0 else np.asarray(idx, np.int64)
        tiled = np.tile(idx, -(-chroma_length // len(idx)))[:chroma_length]
        out[i, np.arange(chroma_length), torch.from_numpy(tiled)] = 1.0
    return out

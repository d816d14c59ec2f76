"""CLAP (contrastive language-audio pretraining): how well a text describes a clip.

The study (Singh et al. 2025) scores feature labels and steered generations with CLAP. The
model loads the way MusicGen does: a hub name (``laion/clap-htsat-unfused``, the default), a
local directory saved with ``save_pretrained``, or ``tiny-random-clap``: a real ``ClapModel``
built from small configs with seeded random weights and an offline byte-level tokenizer, saved
once into the cache and loaded back through the same ``from_pretrained`` path (there is no model
hub here; its scores mean nothing, every path is real).

Clips are resampled to the model's rate and cut to its window (the first ``max_length_s``
seconds, not a random crop, so a score is the same every time); embeddings are L2-normalised, so
a similarity is a cosine in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sae_core.audio import resample
from sae_core.errors import UsageError

from .models import _built, cache_dir, resolve_device

DEFAULT_CLAP = "laion/clap-htsat-unfused"
TINY_CLAP = "tiny-random-clap"
TINY_CLAP_VERSION = 1
TINY_CLAP_SEED = 0
BATCH = 16  # clips or texts per forward


class ClapError(UsageError):
    """A CLAP that cannot be loaded or clips it cannot score."""


def clap_source(name: str) -> Path | str:
    """The directory or hub name ``from_pretrained`` loads for ``--clap name``."""
    if name == TINY_CLAP:
        return _built(cache_dir() / f"{TINY_CLAP}-v{TINY_CLAP_VERSION}", build_tiny_clap)
    if not Path(name).exists() and "/" not in name:
        raise ClapError(f"unknown CLAP {name!r}: give a hub name ({DEFAULT_CLAP}), a local directory, or {TINY_CLAP}")
    return name


def build_tiny_clap(path: Path, seed: int = TINY_CLAP_SEED) -> None:
    """A ClapModel from small configs with seeded random weights, its processor (byte-level
    tokenizer, 16 mel bins, 48 kHz, 2 s window), saved with ``save_pretrained``."""
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor,
                              ClapTextConfig, RobertaTokenizer)

    tokenizer = RobertaTokenizer(vocab=_byte_vocab(), merges=[])
    text = ClapTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=130, projection_dim=16)
    audio = ClapAudioConfig(spec_size=64, num_mel_bins=16, window_size=4, patch_stride=(2, 2), hidden_size=32,
                            patch_embeds_hidden_size=16, depths=(1, 1), num_attention_heads=(2, 2),
                            num_hidden_layers=2, projection_dim=16, enable_fusion=False)
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)).eval()
    features = ClapFeatureExtractor(feature_size=16, sampling_rate=48_000, max_length_s=2, truncation="rand_trunc",
                                    padding="repeatpad")
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(tmp)
    tmp.rename(path)


def _byte_vocab() -> dict[str, int]:
    """RoBERTa's special tokens and the 256 byte-level symbols (no merges: one token per byte)."""
    symbols = [chr(b) for b in range(ord("!"), ord("~") + 1)] + [chr(b) for b in range(ord("\xa1"), ord("\xac") + 1)] \
        + [chr(b) for b in range(ord("\xae"), ord("\xff") + 1)]
    n = 0
    for b in range(256):
        if chr(b) not in symbols:
            symbols.append(chr(256 + n))
            n += 1
    return {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *symbols, "<mask>"])}


@dataclass
class Clap:
    """A loaded CLAP: ``texts`` and ``clips`` give unit embeddings, ``similarity`` their cosines."""

    name: str
    model: object
    processor: object
    device: torch.device

    @classmethod
    def load(cls, name: str = DEFAULT_CLAP, device: str = "auto") -> Clap:
        from transformers import ClapModel, ClapProcessor

        source = clap_source(name)
        dev = resolve_device(device)
        try:
            model = ClapModel.from_pretrained(source).to(dev).eval()
            processor = ClapProcessor.from_pretrained(source)
        except OSError as err:
            raise ClapError(f"cannot load CLAP {name!r} ({str(err).splitlines()[0]}); give a local directory or "
                            f"{TINY_CLAP} where the hub cannot be reached") from None
        return cls(name, model, processor, dev)

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    @property
    def window_samples(self) -> int:
        return int(self.processor.feature_extractor.nb_max_samples)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` unit text embeddings."""
        out = []
        for i in range(0, len(texts), BATCH):
            inputs = self.processor(text=list(texts[i:i + BATCH]), return_tensors="pt", padding=True)
            out.append(_embedding(self.model.get_text_features(**inputs.to(self.device))))
        return _unit(np.concatenate(out)) if out else np.zeros((0, self._dim()), np.float32)

    @torch.no_grad()
    def clips(self, waves: Sequence[np.ndarray], rate: int) -> np.ndarray:
        """``[len(waves), dim]`` unit audio embeddings of mono clips at ``rate`` Hz."""
        ready = []
        for wave in waves:
            wave = np.asarray(wave, np.float32)
            if wave.ndim != 1 or not len(wave):
                raise ClapError(f"CLAP scores mono clips; got one of shape {wave.shape}")
            ready.append(resample(wave, rate, self.sampling_rate)[: self.window_samples])  # the first window
        out = []
        for i in range(0, len(ready), BATCH):
            inputs = self.processor(audio=ready[i:i + BATCH], sampling_rate=self.sampling_rate, return_tensors="pt")
            out.append(_embedding(self.model.get_audio_features(**inputs.to(self.device))))
        return _unit(np.concatenate(out)) if out else np.zeros((0, self._dim()), np.float32)

    def _dim(self) -> int:
        return int(self.model.config.projection_dim)


def similarity(a_ND: np.ndarray, b_MD: np.ndarray) -> np.ndarray:
    """Cosines ``[N, M]`` of unit embeddings."""
    return np.asarray(a_ND, np.float64) @ np.asarray(b_MD, np.float64).T


def _embedding(output) -> np.ndarray:
    """The projected embedding (a tensor in transformers 4, ``pooler_output`` of an output in 5)."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.float().cpu().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def label_score(label_D: np.ndarray, top_ND: np.ndarray, random_MD: np.ndarray) -> dict:
    """How much better a label describes a feature's top clips than random clips (the study's
    check of automatic labels): mean CLAP cosine of the label with each set, their difference
    (``gain``), and the AUROC of the cosine separating top clips from random ones (0.5: no better
    than chance)."""
    top = similarity(label_D[None], top_ND)[0]
    rand = similarity(label_D[None], random_MD)[0]
    if not len(top) or not len(rand):
        raise ClapError("a label score needs at least one top clip and one random clip")
    wins = (top[:, None] > rand[None, :]).mean() + 0.5 * (top[:, None] == rand[None, :]).mean()
    return {"top": float(top.mean()), "random": float(rand.mean()), "gain": float(top.mean() - rand.mean()),
            "auroc": float(wins), "top_clips": len(top), "random_clips": len(rand)}

"""Capturing MusicGen decoder activations: during sampled generation, or by teacher forcing.

Row convention (both modes): row ``p`` of a sample is decoder position ``p``. That position
has read codebook k of frames < p - k and predicts codebook 0 of frame ``p`` (codebook k of
frame p - k), so its frame is ``p`` and its time ``p / frame_rate`` seconds. The K - 1 tail
positions of the delay pattern, which predict only the last frames' fine codebooks, are not
kept: a sample of n audio frames has exactly n rows, row p beside the codes of frame p.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .models import LoadedModel


@dataclass
class CapturedBatch:
    """Activations per stream and layer, [B, n_frames, d_model] each, codes [B, n_frames, K] and,
    from generate mode, the decoded audio [B, channels, samples]."""

    acts: dict[str, dict[int, np.ndarray]]
    codes: np.ndarray
    audio: np.ndarray | None = None


def _as_tensor(output) -> torch.Tensor:
    # transformers 5.x decoder layers return a tensor, 4.x a tuple whose first item it is.
    return output if torch.is_tensor(output) else output[0]


@contextmanager
def capture_layers(loaded: LoadedModel, layers: Sequence[int]):
    """Forward hooks that record every output of the given decoder blocks, in call order."""
    calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        def hook(_module, _inputs, output, layer=layer):
            calls[layer].append(_as_tensor(output).detach())

        handles.append(loaded.layer(layer).register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _capture_codes(loaded: LoadedModel):
    """Record the de-delayed codes that ``generate()`` hands to EnCodec (it returns only audio)."""
    audio_encoder = loaded.model.audio_encoder
    original = audio_encoder.decode
    seen: list[torch.Tensor] = []

    def decode(audio_codes, *args, **kwargs):
        seen.append(audio_codes.detach())
        return original(audio_codes, *args, **kwargs)

    audio_encoder.decode = decode
    try:
        yield seen
    finally:
        del audio_encoder.decode  # drop the instance attribute, the class method shows again


def tokenize(loaded: LoadedModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    inputs = loaded.processor(text=list(texts), padding=True, return_tensors="pt")
    return {k: v.to(loaded.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}


def _stack_positions(calls: list[torch.Tensor], n_positions: int) -> torch.Tensor:
    """Concatenate per-step outputs along time, dropping generate()'s repeated first step."""
    lengths = [c.shape[1] for c in calls]
    if sum(lengths) == n_positions + lengths[0] and len(calls) > 1:
        calls = calls[1:]  # the first decoder step is run twice (prefill, then the loop)
    stacked = torch.cat(calls, dim=1)
    if stacked.shape[1] != n_positions:
        raise RuntimeError(
            f"captured {stacked.shape[1]} decoder positions, expected {n_positions}; "
            "this transformers version runs generate() differently"
        )
    return stacked


@torch.no_grad()
def generate_batch(
    loaded: LoadedModel,
    texts: Sequence[str],
    n_frames: int,
    layers: Sequence[int],
    *,
    guidance_scale: float,
    top_k: int,
    temperature: float,
    seed: int,
    keep_uncond: bool = False,
) -> CapturedBatch:
    """Sample ``n_frames`` frames per prompt with guidance and capture the given layers."""
    batch = len(texts)
    k = loaded.info.num_codebooks
    n_positions = n_frames + k - 1
    inputs = tokenize(loaded, texts)
    torch.manual_seed(seed)
    with capture_layers(loaded, layers) as calls, _capture_codes(loaded) as codes_seen:
        audio = loaded.model.generate(
            **inputs,
            do_sample=True,
            guidance_scale=guidance_scale if guidance_scale and guidance_scale > 1 else None,
            top_k=top_k,
            temperature=temperature,
            max_new_tokens=n_positions,
            min_new_tokens=n_positions,
        )
    guided = guidance_scale is not None and guidance_scale > 1
    streams = {"cond": slice(0, batch)}
    if keep_uncond:
        if not guided:
            raise ValueError("--keep_uncond needs classifier-free guidance (--guidance_scale > 1)")
        streams["uncond"] = slice(batch, 2 * batch)
    acts: dict[str, dict[int, np.ndarray]] = {s: {} for s in streams}
    for layer in layers:
        full = _stack_positions(calls[layer], n_positions)[:, :n_frames]
        for stream, rows in streams.items():
            acts[stream][layer] = full[rows].float().cpu().numpy()
    codes = codes_seen[-1][0].permute(0, 2, 1)  # [1, B, K, T] -> [B, T, K]
    if codes.shape[1] != n_frames:
        raise RuntimeError(f"generate() returned {codes.shape[1]} frames, expected {n_frames}")
    return CapturedBatch(acts=acts, codes=codes.cpu().numpy().astype(np.int32), audio=audio.float().cpu().numpy())


def delayed_input_ids(codes: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs for positions 0..n-1 from codes [B, n, K], with generate()'s delay pattern:
    codebook k at position p holds frame p - 1 - k, and the pad/BOS token where that is < 0."""
    batch, n, k = codes.shape
    ids = torch.full((batch, k, n), pad_token_id, dtype=torch.long, device=codes.device)
    for book in range(k):
        if n > book + 1:
            ids[:, book, book + 1 :] = codes[:, : n - book - 1, book]
    return ids.reshape(batch * k, n)


@torch.no_grad()
def teacher_forced_batch(
    loaded: LoadedModel,
    texts: Sequence[str],
    codes: Sequence[np.ndarray],
    layers: Sequence[int],
) -> dict[int, list[np.ndarray]]:
    """One forward pass over stored codes; returns per layer a list of [n_i, d_model] arrays.

    Samples of different lengths are right-padded: attention is causal, so padding after a
    sample cannot change its rows.
    """
    n_max = max(len(c) for c in codes)
    k = loaded.info.num_codebooks
    padded = np.full((len(codes), n_max, k), 0, dtype=np.int64)
    for i, c in enumerate(codes):
        padded[i, : len(c)] = c
    ids = delayed_input_ids(torch.from_numpy(padded).to(loaded.device), loaded.info.pad_token_id)
    inputs = tokenize(loaded, texts)
    with capture_layers(loaded, layers) as calls:
        loaded.model(**inputs, decoder_input_ids=ids)
    out: dict[int, list[np.ndarray]] = {}
    for layer in layers:
        full = calls[layer][-1].float().cpu().numpy()
        out[layer] = [full[i, : len(c)] for i, c in enumerate(codes)]
    return out


@torch.no_grad()
def encode_audio(loaded: LoadedModel, waveform: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Encode a mono waveform with the model's EnCodec; returns codes [n_frames, K]."""
    if sampling_rate != loaded.info.sampling_rate:
        raise ValueError(
            f"audio at {sampling_rate} Hz, model expects {loaded.info.sampling_rate} Hz; resample it first"
        )
    features = loaded.processor(audio=waveform, sampling_rate=sampling_rate, return_tensors="pt")
    values = features["input_values"].to(loaded.device, loaded.dtype)
    mask = features.get("padding_mask")
    encoded = loaded.model.audio_encoder.encode(values, mask.to(loaded.device) if mask is not None else None)
    codes = encoded.audio_codes[0, 0]  # [1, B, K, T] -> [K, T]
    return codes.permute(1, 0).cpu().numpy().astype(np.int32)

"""Capturing MusicGen decoder activations: during sampled generation, or by teacher forcing.

Row convention (both modes, every family): row ``p`` of a sample is decoder position ``p``.
That position has read codebook k of frames < p - delay_k and predicts codebook 0 of frame
``p`` (codebook k of frame p - delay_k), so its frame is ``p`` and its time ``p / frame_rate``
seconds. delay_k is k for mono checkpoints; stereo ones interleave two streams of K/2 codebooks
(left 0, right 0, left 1, ...) and delay both of pair k by k. The tail positions of the delay
pattern, which predict only the last frames' fine codebooks, are not kept: a sample of n audio
frames has exactly n rows, row p beside the codes of frame p. Melody checkpoints prepend the
chroma and text condition to the decoder's inputs; those leading positions are never rows.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from sae_core.errors import UsageError
from sae_core.store import MLP_STREAMS
from .models import LoadedModel


@dataclass
class CapturedBatch:
    """Activations per stream and layer, [B, n_frames, d_model] each, codes [B, n_frames, K] and,
    from generate mode, the decoded audio [B, channels, samples]."""

    acts: dict[str, dict[int, np.ndarray]]
    codes: np.ndarray
    audio: np.ndarray | None = None


def _as_tensor(output) -> torch.Tensor:
    # Decoder layers return a tensor (transformers 5.x MusicGen) or a tuple whose first item it is.
    return output if torch.is_tensor(output) else output[0]


@contextmanager
def _decoder_calls(loaded: LoadedModel):
    """Track each decoder call: ``prefix``, its leading conditioning positions (melody
    checkpoints prepend chroma and text on the call that has them), and ``start``, the decoder
    position of the first position after them."""
    state = {"prefix": 0, "start": 0, "condition": 0}

    def before(_module, _args, kwargs):
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        condition = kwargs.get("encoder_hidden_states")
        if loaded.info.melody and condition is not None:
            state.update(prefix=condition.shape[1], condition=condition.shape[1], start=cached)
        else:
            state.update(prefix=0, start=cached - (state["condition"] if loaded.info.melody else 0))

    handle = loaded.decoder.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def mlp_module(loaded: LoadedModel, layer: int, stream: str):
    """The submodule of decoder block ``layer`` whose output is that ``MLP_STREAMS`` stream."""
    block = loaded.layer(layer)
    return {"mlp_in": block.final_layer_norm, "mlp_out": block.fc2}[stream]


@contextmanager
def layer_hook(loaded: LoadedModel, layer: int, fn: Callable[[torch.Tensor, int], torch.Tensor | None]):
    """Call ``fn(hidden, start)`` on every output of decoder block ``layer``, with ``hidden`` the
    [B, n, d] decoder positions (conditioning positions left out) and ``start`` the first one's
    position; a tensor it returns replaces those positions."""
    with module_hook(loaded, loaded.layer(layer), fn):
        yield


@contextmanager
def module_hook(loaded: LoadedModel, module, fn: Callable[[torch.Tensor, int], torch.Tensor | None]):
    """``layer_hook`` on any module of the decoder stack whose output runs over the positions."""
    with _decoder_calls(loaded) as calls:
        def hook(_module, _inputs, output):
            hidden = _as_tensor(output)
            prefix = calls["prefix"]
            new = fn(hidden[:, prefix:], calls["start"])
            if new is None:
                return None
            new = new.to(hidden.dtype)
            full = torch.cat([hidden[:, :prefix], new], dim=1) if prefix else new
            return full if torch.is_tensor(output) else (full, *output[1:])

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@contextmanager
def capture_layers(loaded: LoadedModel, layers: Sequence[int]):
    """Record every output of the given decoder blocks (decoder positions only), in call order."""
    calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer_hook(loaded, layer, lambda hidden, _start, layer=layer: calls[layer].append(
                hidden.detach())))
        yield calls


@contextmanager
def capture_mlp(loaded: LoadedModel, layers: Sequence[int], streams: Sequence[str]):
    """Record every output of the given layers' MLP input and output (``MLP_STREAMS``), in call order:
    {stream: {layer: [tensors]}}."""
    calls = {stream: {layer: [] for layer in layers} for stream in streams}
    with ExitStack() as stack:
        for stream in streams:
            for layer in layers:
                stack.enter_context(module_hook(
                    loaded, mlp_module(loaded, layer, stream),
                    lambda hidden, _start, stream=stream, layer=layer: calls[stream][layer].append(hidden.detach())))
        yield calls


@contextmanager
def _capture_codes(loaded: LoadedModel):
    """Record the de-delayed codes that ``generate()`` hands to EnCodec (it returns only audio);
    stereo checkpoints decode the left and then the right stream."""
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


def _interleave(streams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel codes [B, T, K/C] each -> the decoder's interleaved [B, T, K] (left 0, right 0, left 1, ...)."""
    stacked = torch.stack(list(streams), dim=-1)
    return stacked.reshape(*stacked.shape[:2], -1)


def text_length(loaded: LoadedModel, texts: Sequence[str]) -> int:
    """The longest of these prompts in tokens."""
    return max(len(ids) for ids in loaded.tokenizer(list(texts))["input_ids"])


def model_inputs(loaded: LoadedModel, texts: Sequence[str], melodies: Sequence | None = None,
                 pad_to: int | None = None) -> dict:
    """Tokens, and for melody checkpoints the chroma condition (``melodies``: per sample chroma
    indices from ``extractor.melody``, or None for the model's null melody).

    Melody checkpoints put the (padded) text in front of the decoder's positions, so a sample's
    rows depend on how far its batch is padded: ``pad_to`` fixes that length for a whole store.
    """
    padding = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    tokens = loaded.tokenizer(list(texts), return_tensors="pt", **padding)
    inputs = {k: v.to(loaded.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    if loaded.info.melody:
        from .melody import chroma_features

        features = chroma_features(list(melodies or [None] * len(texts)), loaded.info.chroma_length,
                                   loaded.chroma.num_chroma)
        inputs["input_features"] = features.to(loaded.device, loaded.dtype)
    elif melodies is not None and any(m is not None for m in melodies):
        raise UsageError(f"{loaded.info.name} takes no melody condition (only melody checkpoints do)")
    return inputs


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
    melodies: Sequence | None = None,
    pad_to: int | None = None,
    mlp: bool = False,
) -> CapturedBatch:
    """Sample ``n_frames`` frames per prompt with guidance and capture the given layers (and, with
    ``mlp``, their MLP inputs and outputs, conditional stream, as ``MLP_STREAMS``)."""
    batch = len(texts)
    n_positions = n_frames + loaded.info.max_delay
    guided = guidance_scale is not None and guidance_scale > 1
    if keep_uncond and not guided:
        raise UsageError("--keep_uncond needs classifier-free guidance (--guidance_scale > 1)")
    inputs = model_inputs(loaded, texts, melodies, pad_to)
    torch.manual_seed(seed)
    with capture_layers(loaded, layers) as calls, _capture_codes(loaded) as codes_seen, \
            capture_mlp(loaded, layers, MLP_STREAMS if mlp else ()) as mlp_calls:
        audio = loaded.model.generate(
            **inputs,
            do_sample=True,
            guidance_scale=guidance_scale if guided else None,
            top_k=top_k,
            temperature=temperature,
            max_new_tokens=n_positions,
            min_new_tokens=n_positions,
        )
    streams = {"cond": slice(0, batch)}
    if keep_uncond:
        streams["uncond"] = slice(batch, 2 * batch)
    acts: dict[str, dict[int, np.ndarray]] = {s: {} for s in streams}
    for layer in layers:
        full = _stack_positions(calls[layer], n_positions)[:, :n_frames]
        for stream, rows in streams.items():
            acts[stream][layer] = full[rows].float().cpu().numpy()
    for stream, per_layer in mlp_calls.items():
        acts[stream] = {layer: _stack_positions(seen, n_positions)[:batch, :n_frames].float().cpu().numpy()
                        for layer, seen in per_layer.items()}
    channels = loaded.info.audio_channels
    codes = _interleave([c[0].permute(0, 2, 1) for c in codes_seen[-channels:]])  # [1, B, K/C, T] -> [B, T, K]
    if codes.shape[1] != n_frames:
        raise RuntimeError(f"generate() returned {codes.shape[1]} frames, expected {n_frames}")
    return CapturedBatch(acts=acts, codes=codes.cpu().numpy().astype(np.int32), audio=audio.float().cpu().numpy())


def delayed_input_ids(codes: torch.Tensor, pad_token_id: int, delays: Sequence[int]) -> torch.Tensor:
    """Decoder inputs for positions 0..n-1 from codes [B, n, K], with generate()'s delay pattern:
    codebook k at position p holds frame p - 1 - delay_k, and the pad/BOS token where that is < 0."""
    batch, n, k = codes.shape
    ids = torch.full((batch, k, n), pad_token_id, dtype=torch.long, device=codes.device)
    for book, delay in enumerate(delays):
        if n > delay + 1:
            ids[:, book, delay + 1 :] = codes[:, : n - delay - 1, book]
    return ids.reshape(batch * k, n)


def padded_input_ids(loaded: LoadedModel, codes: Sequence[np.ndarray]) -> torch.Tensor:
    """Delayed decoder inputs for samples of different lengths, right-padded to the longest:
    attention is causal, so padding after a sample cannot change its positions."""
    n_max = max(len(c) for c in codes)
    padded = np.zeros((len(codes), n_max, loaded.info.num_codebooks), dtype=np.int64)
    for i, c in enumerate(codes):
        padded[i, : len(c)] = c
    return delayed_input_ids(torch.from_numpy(padded).to(loaded.device), loaded.info.pad_token_id, loaded.info.delays)


@torch.no_grad()
def teacher_forced_batch(
    loaded: LoadedModel,
    texts: Sequence[str],
    codes: Sequence[np.ndarray],
    layers: Sequence[int],
    melodies: Sequence | None = None,
    pad_to: int | None = None,
) -> dict[int, list[np.ndarray]]:
    """One forward pass over stored codes; returns per layer a list of [n_i, d_model] arrays."""
    return teacher_forced_streams(loaded, texts, codes, layers, melodies, pad_to)["cond"]


@torch.no_grad()
def teacher_forced_streams(
    loaded: LoadedModel,
    texts: Sequence[str],
    codes: Sequence[np.ndarray],
    layers: Sequence[int],
    melodies: Sequence | None = None,
    pad_to: int | None = None,
    mlp: bool = False,
) -> dict[str, dict[int, list[np.ndarray]]]:
    """``teacher_forced_batch`` per stream: "cond" (the residual stream) and, with ``mlp``, the
    ``MLP_STREAMS``; each {layer: [n_i, d_model] arrays}."""
    ids = padded_input_ids(loaded, codes)
    inputs = model_inputs(loaded, texts, melodies, pad_to)
    with capture_layers(loaded, layers) as calls, capture_mlp(loaded, layers, MLP_STREAMS if mlp else ()) as more:
        loaded.model(**inputs, decoder_input_ids=ids)
    out: dict[str, dict[int, list[np.ndarray]]] = {}
    for stream, seen in {"cond": calls, **more}.items():
        out[stream] = {}
        for layer in layers:
            full = seen[layer][-1].float().cpu().numpy()
            out[stream][layer] = [full[i, : len(c)] for i, c in enumerate(codes)]
    return out


@torch.no_grad()
def encode_audio(loaded: LoadedModel, waveform: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Encode audio [channels, samples] (or mono [samples]) with the model's EnCodec; returns
    codes [n_frames, K]. Stereo checkpoints encode the left and right channel each (a mono file
    on both), mono ones the channels' mean."""
    if sampling_rate != loaded.info.sampling_rate:
        raise UsageError(
            f"audio at {sampling_rate} Hz, model expects {loaded.info.sampling_rate} Hz; resample it first"
        )
    wave = np.atleast_2d(np.asarray(waveform, np.float32))
    if loaded.info.audio_channels == 1:
        channels = [wave.mean(axis=0)]
    else:
        channels = [wave[0], wave[min(1, len(wave) - 1)]]
    streams = []
    for channel in channels:
        values = torch.from_numpy(np.ascontiguousarray(channel))[None, None].to(loaded.device, loaded.dtype)
        codes = loaded.model.audio_encoder.encode(values).audio_codes[0]  # [1, 1, K/C, T] -> [1, K/C, T]
        streams.append(codes.permute(0, 2, 1))
    return _interleave(streams)[0].cpu().numpy().astype(np.int32)


@torch.no_grad()
def decode_codes(loaded: LoadedModel, codes: np.ndarray) -> np.ndarray:
    """Codes [n_frames, K] back to audio [channels, samples] with the model's EnCodec."""
    return decode_codes_batch(loaded, np.asarray(codes)[None])[0]


@torch.no_grad()
def decode_codes_batch(loaded: LoadedModel, codes_BTK: np.ndarray) -> np.ndarray:
    """Codes of equally long clips [B, n_frames, K] to audio [B, channels, samples]: one EnCodec
    forward per channel for the whole batch."""
    ids = torch.from_numpy(np.ascontiguousarray(np.asarray(codes_BTK).transpose(0, 2, 1))).long()[None]
    ids = ids.to(loaded.device)
    channels = loaded.info.audio_channels
    audio = [loaded.model.audio_encoder.decode(ids[:, :, c::channels], [None]).audio_values[:, 0]
             for c in range(channels)]
    return torch.stack(audio, dim=1).float().cpu().numpy()

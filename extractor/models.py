"""Loading MusicGen (hub name, local directory, or the offline ``tiny-random`` model)."""

from __future__ import annotations

import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_MODELS = (
    "facebook/musicgen-small",
    "facebook/musicgen-medium",
    "facebook/musicgen-large",
    "facebook/musicgen-melody",
)
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0
# Bump when the tiny model's recipe changes so stale caches are rebuilt, not reused.
TINY_RANDOM_VERSION = 1


class ModelError(ValueError):
    """A model that cannot be found, loaded or placed on the requested device."""


@dataclass(frozen=True)
class ModelInfo:
    """What extraction needs to know about a loaded MusicGen."""

    name: str
    num_layers: int
    d_model: int
    num_codebooks: int
    frame_rate: float
    sampling_rate: int
    pad_token_id: int
    hop_length: int


@dataclass
class LoadedModel:
    """A MusicGen with its processor, device and dtype."""

    model: Any
    processor: Any
    info: ModelInfo
    device: Any
    dtype: Any

    def layer(self, index: int):
        """The decoder block whose output is the residual stream after block ``index``."""
        return self.model.decoder.model.decoder.layers[index]


def cache_dir() -> Path:
    """Where built models live: $SAE_MUSIC_CACHE, else ~/.cache/sae-music-jax."""
    root = os.environ.get("SAE_MUSIC_CACHE") or Path.home() / ".cache" / "sae-music-jax"
    return Path(root)


def resolve_device(device: str):
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """``auto`` is float16 on CUDA and float32 on CPU (half precision is slow on CPUs)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ModelError(f"unknown model dtype {dtype!r}; use auto, float16, bfloat16 or float32") from None


def _tiny_vocab() -> list[tuple[str, float]]:
    """A small sentencepiece-style vocabulary: words of our prompts, then single characters."""
    from .prompts import bundled_prompts

    words: list[str] = []
    for prompt in bundled_prompts():
        for word in prompt.text.lower().replace(",", " ").replace(".", " ").split():
            if word not in words:
                words.append(word)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - i * 1e-3) for i, w in enumerate(words)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("\u2581", -8.0)] + [(c, -10.0) for c in chars]
    return pieces


def _quiet_transformers() -> None:
    """Its per-weight progress bars and token-id warnings only add noise to our own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_tiny_random(path: str | os.PathLike) -> Path:
    """Build a real MusicGen with small dims and seeded random weights, save it with
    ``save_pretrained`` (model and processor) and return its directory.

    EnCodec runs at 32 kHz with hop 640 (50 frames/s) and 4 codebooks, like musicgen-small.
    """
    import torch
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
        T5Config,
        T5Tokenizer,
    )

    _quiet_transformers()
    path = Path(path)
    tokenizer = T5Tokenizer(vocab=_tiny_vocab(), extra_ids=0)
    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    codebook_size = 64
    # num_quantizers = bandwidth / (frame_rate * log2(codebook_size)) must equal num_codebooks.
    audio = EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,
        num_filters=4,
        codebook_size=codebook_size,
        codebook_dim=16,
        hidden_size=16,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[1.2],
        num_lstm_layers=1,
        num_residual_layers=1,
        normalize=False,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=128,
        num_codebooks=4,
        max_position_embeddings=4096,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        decoder_start_token_id=codebook_size,
    )
    config = MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)
    if audio.num_quantizers != decoder.num_codebooks:
        raise ModelError("tiny-random recipe is inconsistent: EnCodec quantizers != decoder codebooks")
    torch.manual_seed(TINY_RANDOM_SEED)
    model = MusicgenForConditionalGeneration(config).eval()
    # A wider init than the default 0.02 so activations and sampled codes are not degenerate.
    with torch.no_grad():
        for param in model.decoder.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
    model.generation_config.do_sample = True
    model.generation_config.guidance_scale = 3.0
    model.generation_config.top_k = 50
    model.generation_config.max_new_tokens = 256
    feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0)
    processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    tmp = path.with_name(path.name + f".building-{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
    return path


def tiny_random_dir() -> Path:
    """The cached tiny-random model directory, built on first use."""
    path = cache_dir() / f"tiny-random-v{TINY_RANDOM_VERSION}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_random(path)
    return path


def model_info(name: str, model) -> ModelInfo:
    audio = model.config.audio_encoder
    decoder = model.config.decoder
    hop = 1
    for ratio in audio.upsampling_ratios:
        hop *= ratio
    return ModelInfo(
        name=name,
        num_layers=decoder.num_hidden_layers,
        d_model=decoder.hidden_size,
        num_codebooks=decoder.num_codebooks,
        frame_rate=float(audio.frame_rate),
        sampling_rate=int(audio.sampling_rate),
        pad_token_id=int(model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else decoder.pad_token_id),
        hop_length=hop,
    )


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a MusicGen by hub name, local directory, or ``tiny-random``."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = tiny_random_dir() if name == TINY_RANDOM else name
    if name != TINY_RANDOM and not Path(name).exists() and "/" not in name:
        raise ModelError(
            f"unknown model {name!r}: give a hub name ({', '.join(HUB_MODELS)}), a local directory, or {TINY_RANDOM}"
        )
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    _quiet_transformers()

    try:
        model = MusicgenForConditionalGeneration.from_pretrained(source, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(source)
    except OSError as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0]}); check the name, your network, "
            f"or pass a local directory"
        ) from None
    model = model.to(dev).eval()
    return LoadedModel(model=model, processor=processor, info=model_info(name, model), device=dev, dtype=torch_dtype)

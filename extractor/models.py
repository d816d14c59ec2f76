"""Loading MusicGen: every released family (extractor.families) by hub name or local directory,
and offline random builds of them (``tiny-random*`` toys, ``random:FAMILY[:LAYERS]`` at real widths)."""

from __future__ import annotations

import functools

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_core.errors import UsageError
from .families import (
    SUPPORTED,
    FamilyError,
    build_random,
    codebook_delays,
    family_of,
    get_family,
    quiet_transformers,
)

TINY_RANDOM = "tiny-random"
# Toy builds of the structurally different families (tiny-random itself is the mono one).
TOY_MODELS = {
    TINY_RANDOM: "musicgen-small",
    "tiny-random-melody": "musicgen-melody",
    "tiny-random-stereo": "musicgen-stereo-small",
    "tiny-random-stereo-melody": "musicgen-stereo-melody",
}
RANDOM_PREFIX = "random:"
TINY_RANDOM_SEED = 0
# Bump when a random build's recipe changes so stale caches are rebuilt, not reused.
TINY_RANDOM_VERSION = 2  # 2: EnCodec's codebooks seeded (audio follows the codes)
MODEL_CLASSES = {"musicgen": "MusicgenForConditionalGeneration",
                 "musicgen_melody": "MusicgenMelodyForConditionalGeneration"}


class ModelError(UsageError):
    """A model that cannot be found, loaded or placed on the requested device."""


@dataclass(frozen=True)
class ModelInfo:
    """What extraction needs to know about a loaded MusicGen."""

    name: str
    family: str
    """The released family the architecture matches (extractor.families), or 'custom ...'."""
    num_layers: int
    d_model: int
    num_codebooks: int
    audio_channels: int
    """1, or 2 for stereo: two EnCodec streams whose codebooks the decoder interleaves."""
    melody: bool
    """Melody checkpoints prepend chroma and text to the decoder's inputs."""
    chroma_length: int
    frame_rate: float
    sampling_rate: int
    pad_token_id: int

    @property
    def delays(self) -> tuple[int, ...]:
        """Each decoder codebook's delay in positions."""
        return codebook_delays(self.num_codebooks, self.audio_channels)

    @property
    def max_delay(self) -> int:
        return max(self.delays)


@dataclass
class LoadedModel:
    """A MusicGen with its tokenizer, melody feature settings (melody checkpoints), device and dtype."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    device: Any
    dtype: Any
    chroma: Any = None

    @property
    def decoder(self):
        """The decoder stack whose forward pre-hook sees each call's conditioning and cache."""
        return self.model.decoder.model.decoder

    def layer(self, index: int):
        """The decoder block whose output is the residual stream after block ``index``."""
        return self.decoder.layers[index]


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


def _built(directory: Path, build) -> Path:
    """A cached random build, made on first use."""
    if not (directory / "config.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {directory.name} into {directory.parent} (once)", flush=True)
        build(directory)
    return directory


def tiny_random_dir(name: str = TINY_RANDOM) -> Path:
    """The cached toy build of a family (``tiny-random``, ``tiny-random-melody``, ...), built on first use."""
    family = TOY_MODELS[name]
    return _built(cache_dir() / f"{name}-v{TINY_RANDOM_VERSION}",
                  lambda path: build_random(family, path, size="toy", seed=TINY_RANDOM_SEED))


def random_model_dir(name: str) -> Path:
    """``random:FAMILY[:LAYERS]``: the family at its released widths with seeded random weights
    (all its layers, or LAYERS of them), built once into the cache."""
    parts = name[len(RANDOM_PREFIX):].split(":")
    try:
        family = get_family(parts[0])
        layers = int(parts[1]) if len(parts) > 1 else family.num_layers
        if len(parts) > 2 or not 1 <= layers <= family.num_layers:
            raise ValueError
    except FamilyError as err:
        raise ModelError(str(err)) from None
    except ValueError:
        raise ModelError(f"model {name!r}: use random:FAMILY or random:FAMILY:LAYERS with 1 <= LAYERS <= the "
                         "family's layers, e.g. random:musicgen-small:2") from None
    return _built(cache_dir() / f"random-{family.name}-L{layers}-v{TINY_RANDOM_VERSION}",
                  lambda path: build_random(family, path, size="real", num_layers=layers, seed=TINY_RANDOM_SEED))


def model_source(name: str) -> Path | str:
    """The directory or hub name that ``from_pretrained`` loads for ``--model name``."""
    if name in TOY_MODELS:
        return tiny_random_dir(name)
    if name.startswith(RANDOM_PREFIX):
        return random_model_dir(name)
    if not Path(name).exists() and "/" not in name:
        raise ModelError(f"unknown model {name!r}: give a hub name (facebook/{{{SUPPORTED}}}), a local directory, "
                         f"{', '.join(TOY_MODELS)}, or random:FAMILY[:LAYERS]")
    return name


def model_info(name: str, model) -> ModelInfo:
    config = model.config
    audio, decoder = config.audio_encoder, config.decoder
    melody = config.model_type == "musicgen_melody"
    pad = model.generation_config.pad_token_id
    return ModelInfo(
        name=name,
        family=family_of(decoder, melody),
        num_layers=decoder.num_hidden_layers,
        d_model=decoder.hidden_size,
        num_codebooks=decoder.num_codebooks,
        audio_channels=int(getattr(decoder, "audio_channels", 1)),
        melody=melody,
        chroma_length=int(getattr(config, "chroma_length", 0)) if melody else 0,
        frame_rate=float(audio.frame_rate),
        sampling_rate=int(audio.sampling_rate),
        pad_token_id=int(pad if pad is not None else decoder.pad_token_id),
    )


def _check_supported(name: str, config) -> str:
    """The model class for a configuration, or one line naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        raise ModelError(f"{name} is a {model_type!r} model, not MusicGen; supported: the MusicGen families "
                         f"({SUPPORTED}) and random builds of them")
    decoder, audio = config.decoder, config.audio_encoder
    channels = getattr(decoder, "audio_channels", 1)
    if channels not in (1, 2) or audio.num_quantizers * channels != decoder.num_codebooks:
        raise ModelError(f"{name}: {decoder.num_codebooks} decoder codebooks for {channels} audio channel(s) of "
                         f"{audio.num_quantizers} EnCodec codebooks is not a MusicGen layout this code handles; "
                         f"supported: {SUPPORTED}")
    return MODEL_CLASSES[model_type]


def load_config(name: str):
    """The model's configuration alone (cheap: no weights), after resolving ``name``."""
    from transformers import AutoConfig

    source = model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0]}); check the name, your network, "
            f"or pass a local directory"
        ) from None
    _check_supported(name, config)
    return config


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load any MusicGen family by hub name, local directory, toy name or ``random:FAMILY[:LAYERS]``."""
    import transformers

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quiet_transformers()
    config = load_config(name)
    source = model_source(name)
    model_cls = getattr(transformers, MODEL_CLASSES[config.model_type])
    try:
        model = model_cls.from_pretrained(source, dtype=torch_dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelError(
            f"cannot load model {name!r} ({str(err).splitlines()[0]}); check the name, your network, "
            f"or pass a local directory"
        ) from None
    model = model.to(dev).eval()
    info = model_info(name, model)
    chroma = None
    if info.melody:
        from .melody import ChromaExtractor

        chroma = ChromaExtractor.from_pretrained(source)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=dev, dtype=torch_dtype, chroma=chroma)


@functools.lru_cache(maxsize=1)
def shared_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """``load_model``, kept for the next caller in this process that asks for the same model (a
    report decodes audio and computes output effects with one load); one model is kept at a time."""
    return load_model(name, device, dtype)

"""The released MusicGen checkpoints as families, and random-weight builds of each.

Every family shares the recipe of the released checkpoints: a T5-base text encoder, the 32 kHz
EnCodec (50 frames/s, 4 codebooks of 2048 codes per audio channel) and a decoder of the
family's width. Stereo families run two EnCodec streams whose codebooks the decoder
interleaves (left 0, right 0, left 1, ...); melody families prepend a chroma condition
(``chroma_length`` frames of 12 pitch classes) and the text to the decoder's own inputs.

``build_random`` makes a real model of a family with seeded random weights and saves it with
``save_pretrained``, so that it loads through the same ``from_pretrained`` path as a hub
checkpoint: at the released widths (``size="real"``, optionally with fewer layers) or at toy
widths that keep the family's codebooks, channels, frame rate and chroma (``size="toy"``).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sae_core.errors import UsageError
from sae_core.files import staged_dir, write_json

CODEBOOK_SIZE = 2048
NUM_CHROMA = 12
CHROMA_LENGTH = 235  # 30 s of chroma at 32 kHz / hop 4096
# facebook/encodec_32khz as transformers' conversion script configures it.
ENCODEC_32KHZ = dict(sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
                     num_filters=64, hidden_size=128, codebook_size=CODEBOOK_SIZE, num_lstm_layers=2,
                     use_causal_conv=False, use_conv_shortcut=False, normalize=False)
T5_BASE = dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu")
# The melody feature extractor's settings as the released checkpoints save them.
MELODY_FEATURES = dict(feature_extractor_type="MusicgenMelodyFeatureExtractor", processor_class="MusicgenMelodyProcessor",
                       feature_size=NUM_CHROMA, num_chroma=NUM_CHROMA, sampling_rate=32000, hop_length=4096,
                       n_fft=16384, chunk_length=30, padding_side="right", padding_value=0.0,
                       return_attention_mask=False, stem_indices=[3, 2])

# Toy widths: small enough for the test suite, with the family's codebooks, channels and chroma.
TOY_CODEBOOK_SIZE = 64
TOY_ENCODEC = dict(sampling_rate=32000, audio_channels=1, num_filters=4, codebook_size=TOY_CODEBOOK_SIZE,
                   codebook_dim=16, hidden_size=16, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.2],
                   num_lstm_layers=1, num_residual_layers=1, normalize=False)
TOY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TOY_DECODER = dict(hidden_size=64, num_attention_heads=4, ffn_dim=128)
TOY_LAYERS = 4


class FamilyError(UsageError):
    """A family name, or a model configuration, this code does not know."""


@dataclass(frozen=True)
class Family:
    """One released MusicGen checkpoint's architecture."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    audio_channels: int = 1
    melody: bool = False

    @property
    def hub_name(self) -> str:
        return f"facebook/{self.name}"

    @property
    def num_codebooks(self) -> int:
        return 4 * self.audio_channels

    @property
    def ffn_dim(self) -> int:
        return 4 * self.hidden_size


FAMILIES = {f.name: f for f in (
    Family("musicgen-small", 1024, 24, 16),
    Family("musicgen-medium", 1536, 48, 24),
    Family("musicgen-large", 2048, 48, 32),
    Family("musicgen-melody", 1536, 48, 24, melody=True),
    Family("musicgen-melody-large", 2048, 48, 32, melody=True),
    Family("musicgen-stereo-small", 1024, 24, 16, audio_channels=2),
    Family("musicgen-stereo-medium", 1536, 48, 24, audio_channels=2),
    Family("musicgen-stereo-large", 2048, 48, 32, audio_channels=2),
    Family("musicgen-stereo-melody", 1536, 48, 24, audio_channels=2, melody=True),
    Family("musicgen-stereo-melody-large", 2048, 48, 32, audio_channels=2, melody=True),
)}
SUPPORTED = ", ".join(FAMILIES)


def get_family(name: str) -> Family:
    key = name.removeprefix("facebook/")
    if key not in FAMILIES:
        raise FamilyError(f"unknown MusicGen family {name!r}; supported: {SUPPORTED}")
    return FAMILIES[key]


def family_of(decoder_config, melody: bool) -> str:
    """The released family a configuration matches by width, channels and conditioning, else a description."""
    channels = getattr(decoder_config, "audio_channels", 1)
    for family in FAMILIES.values():
        if (family.hidden_size, family.audio_channels, family.melody) == (decoder_config.hidden_size, channels, melody):
            return family.name
    return f"custom {'stereo' if channels == 2 else 'mono'}{' melody' if melody else ''}"


def codebook_delays(num_codebooks: int, audio_channels: int) -> tuple[int, ...]:
    """The delay of each decoder codebook: k for mono; stereo interleaves two streams of K/2, both delayed by k."""
    return tuple(book // audio_channels for book in range(num_codebooks))


def tiny_vocab() -> list[tuple[str, float]]:
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


def _configs(family: Family, size: Literal["toy", "real"], num_layers: int, vocab_size: int):
    """Text, audio and decoder configurations of a build (transformers' config classes)."""
    from transformers import EncodecConfig, MusicgenDecoderConfig, MusicgenMelodyDecoderConfig, T5Config

    if size == "toy":
        text = T5Config(vocab_size=vocab_size, **TOY_TEXT)
        audio = EncodecConfig(**TOY_ENCODEC)
        codebook_size, widths = TOY_CODEBOOK_SIZE, dict(TOY_DECODER)
    else:
        # T5-base's widths; its depth follows a reduced decoder so that few-layer builds stay small.
        text = T5Config(vocab_size=max(4096, vocab_size), **{**T5_BASE, "num_layers": min(12, num_layers)})
        audio = EncodecConfig(**ENCODEC_32KHZ)
        codebook_size = CODEBOOK_SIZE
        widths = dict(hidden_size=family.hidden_size, num_attention_heads=family.num_heads, ffn_dim=family.ffn_dim)
    decoder_cls = MusicgenMelodyDecoderConfig if family.melody else MusicgenDecoderConfig
    decoder = decoder_cls(vocab_size=codebook_size, num_hidden_layers=num_layers, num_codebooks=family.num_codebooks,
                          audio_channels=family.audio_channels, max_position_embeddings=2048 if size == "real" else 4096,
                          pad_token_id=codebook_size, bos_token_id=codebook_size, decoder_start_token_id=codebook_size,
                          **widths)
    if audio.num_quantizers * family.audio_channels != decoder.num_codebooks or audio.frame_rate != 50:
        raise FamilyError(f"{family.name} recipe: EnCodec gives {audio.num_quantizers} codebooks at "
                          f"{audio.frame_rate} Hz per channel; the decoder wants {decoder.num_codebooks} at 50 Hz")
    return text, audio, decoder


def quiet_transformers() -> None:
    """Its per-weight progress bars and token-id warnings only add noise to our own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_random(family: Family | str, path: str | os.PathLike, size: Literal["toy", "real"] = "toy",
                 num_layers: int | None = None, seed: int = 0) -> Path:
    """Build ``family`` with seeded random weights, save model and tokenizer (and the melody
    feature settings) with ``save_pretrained`` into ``path``, and return it."""
    import torch
    from transformers import (
        MusicgenConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyForConditionalGeneration,
        T5Tokenizer,
    )

    quiet_transformers()
    family = get_family(family) if isinstance(family, str) else family
    layers = num_layers or (TOY_LAYERS if size == "toy" else family.num_layers)
    tokenizer = T5Tokenizer(vocab=tiny_vocab(), extra_ids=0)
    text, audio, decoder = _configs(family, size, layers, len(tokenizer))
    if family.melody:
        config = MusicgenMelodyConfig(text_encoder=text, audio_encoder=audio, decoder=decoder, num_chroma=NUM_CHROMA,
                                      chroma_length=CHROMA_LENGTH)
        model_cls = MusicgenMelodyForConditionalGeneration
    else:
        config = MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)
        model_cls = MusicgenForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if size == "toy":  # a wider init than the default 0.02 so activations and sampled codes are not degenerate
        with torch.no_grad():
            for param in model.decoder.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.1)
    _seed_codebooks(model, seed)
    pad = decoder.pad_token_id
    model.generation_config.update(do_sample=True, guidance_scale=3.0, top_k=50 if size == "toy" else 250,
                                   max_new_tokens=256, pad_token_id=pad, decoder_start_token_id=pad, bos_token_id=pad)
    path = Path(path)
    with staged_dir(path) as tmp:  # several processes may build the same path: one wins, the others use it
        _save_build(tmp, model, tokenizer, family)
    return path


def _seed_codebooks(model, seed: int) -> None:
    """transformers starts EnCodec's codebooks at zero (training fills them by k-means), so every
    code of a random build would decode to the same audio; seeded normal entries make its audio
    follow its codes (drawn from their own generator: the other weights stay as they were)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=generator))
            layer.codebook.embed_avg.copy_(layer.codebook.embed)


def _save_build(root: Path, model, tokenizer, family: Family) -> None:
    """Model, tokenizer and feature-extractor settings of a random build, as ``save_pretrained`` writes them."""
    model.save_pretrained(root)
    if family.melody:
        # transformers' melody feature extractor needs torchaudio even to be saved; write its settings as it
        # would (extractor.melody computes the chroma without torchaudio).
        tokenizer.save_pretrained(root)
        write_json(root / "preprocessor_config.json", MELODY_FEATURES)
    else:
        from transformers import EncodecFeatureExtractor, MusicgenProcessor

        features = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0)
        MusicgenProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(root)

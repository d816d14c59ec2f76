"""Reading and writing audio files through ``soundfile`` (libsndfile): WAV (integer or float PCM),
FLAC, OGG/Vorbis and MP3 in; 16-bit PCM WAV out."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import UsageError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class AudioError(UsageError):
    """An audio file that cannot be read."""


def _soundfile():
    try:
        import soundfile
    except ImportError:
        raise AudioError("reading and writing audio needs the soundfile package: pip install -e '.[extract]'") from None
    return soundfile


def list_audio_files(directory: str | Path) -> list[Path]:
    """Audio files in a directory (not recursive), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AudioError(f"--audio_dir {directory} is not a directory")
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)


def read_audio(path: str | Path, channels: int = 1) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 in [-1, 1]; returns (waveform, sampling_rate): mono [samples]
    (the channels' mean) for ``channels=1``, else [channels, samples] (a mono file repeated)."""
    path = Path(path)
    soundfile = _soundfile()
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # any decoder failure means: this file is unreadable
        raise AudioError(f"{path}: unreadable audio ({type(err).__name__}: {err})") from None
    if data.size == 0:
        raise AudioError(f"{path}: no audio samples")
    if channels == 1:
        return data.mean(axis=1).astype(np.float32), int(rate)
    picked = [data[:, min(c, data.shape[1] - 1)] for c in range(channels)]
    return np.stack(picked).astype(np.float32), int(rate)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling to ``target`` Hz along the last axis."""
    if rate == target:
        return waveform
    from scipy.signal import resample_poly

    ratio = Fraction(target, rate).limit_denominator(1000)
    return resample_poly(waveform, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)


OPUS_RATE = 48_000  # Opus encodes 8, 12, 16, 24 or 48 kHz; MusicGen's 32 kHz is resampled up to 48


def write_audio(path: str | Path, waveform: np.ndarray, rate: int) -> None:
    """Write float audio, mono [samples] or [channels, samples], in the format of ``path``'s suffix:
    ``.ogg`` Ogg/Opus (lossy, about an eighth of WAV's bytes, at 48 kHz), ``.flac``, else 16-bit WAV."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ogg":
        frames = np.atleast_2d(resample(np.asarray(waveform, dtype=np.float32), int(rate), OPUS_RATE)).T
        _soundfile().write(str(path), np.clip(frames, -1.0, 1.0), OPUS_RATE, format="OGG", subtype="OPUS")
    elif suffix == ".flac":
        frames = np.atleast_2d(np.asarray(waveform, dtype=np.float32)).T
        _soundfile().write(str(path), np.clip(frames, -1.0, 1.0), int(rate), format="FLAC", subtype="PCM_16")
    else:
        write_wav(path, waveform, rate)


def write_wav(path: str | Path, waveform: np.ndarray, rate: int) -> None:
    """Write float audio, mono [samples] or [channels, samples], as 16-bit PCM WAV."""
    frames = np.atleast_2d(np.asarray(waveform, dtype=np.float32)).T  # [samples, channels]
    # libsndfile does not clip when it converts floats to integers.
    _soundfile().write(str(path), np.clip(frames, -1.0, 1.0), int(rate), subtype="PCM_16", format="WAV")

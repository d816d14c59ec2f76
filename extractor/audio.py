"""Reading and writing audio files (WAV with the standard library; other formats via soundfile)."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class AudioError(ValueError):
    """An audio file that cannot be read."""


def list_audio_files(directory: str | Path) -> list[Path]:
    """Audio files in a directory (not recursive), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AudioError(f"--audio_dir {directory} is not a directory")
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        rate, channels, width, n = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
        raw = f.readframes(n)
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise AudioError(f"{path}: unsupported WAV sample width {width}")
    return data.reshape(-1, channels), rate


def read_audio(path: str | Path, channels: int = 1) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 in [-1, 1]; returns (waveform, sampling_rate): mono [samples]
    (the channels' mean) for ``channels=1``, else [channels, samples] (a mono file repeated)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".wav":
            data, rate = _read_wav(path)
        else:
            try:
                import soundfile
            except ImportError:
                raise AudioError(f"{path}: reading {path.suffix} needs the soundfile package (pip install soundfile)") from None
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except AudioError:
        raise
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


def write_wav(path: str | Path, waveform: np.ndarray, rate: int) -> None:
    """Write float audio, mono [samples] or [channels, samples], as 16-bit PCM WAV."""
    frames = np.atleast_2d(np.asarray(waveform, dtype=np.float32)).T  # [samples, channels], interleaved on write
    pcm = (np.clip(frames, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm.tobytes())

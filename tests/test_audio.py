"""Audio input through soundfile: integer and float WAV, FLAC and OGG read alike; a file that cannot be
read stops extraction with its name, never a silent skip; written WAVs are 16-bit PCM."""

import wave

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile", reason="the extract extra (soundfile) is not installed")

from sae_core.audio import AudioError, read_audio, write_audio, write_wav  # noqa: E402

RATE = 16000


def _tone(seconds=0.25, hz=440.0, amplitude=0.5, rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("fmt, subtype, tolerance", [
    ("WAV", "FLOAT", 0.0),        # IEEE float WAV: what the standard library's wave module refuses
    ("WAV", "DOUBLE", 1e-7),
    ("WAV", "PCM_16", 1 / 32768),
    ("WAV", "PCM_24", 1 / 2**23),
    ("FLAC", "PCM_16", 1 / 32768),
])
def test_lossless_formats_read_back_the_samples_written(tmp_path, fmt, subtype, tolerance):
    tone = _tone()
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(str(path), tone, RATE, format=fmt, subtype=subtype)
    got, rate = read_audio(path)
    assert rate == RATE and got.dtype == np.float32 and got.shape == tone.shape
    np.testing.assert_allclose(got, tone, atol=tolerance + 1e-7)


def test_ogg_vorbis_reads_as_the_same_tone(tmp_path):
    tone = _tone(0.5)
    path = tmp_path / "a.ogg"
    soundfile.write(str(path), tone, RATE, format="OGG", subtype="VORBIS")
    got, rate = read_audio(path)
    assert rate == RATE and abs(len(got) - len(tone)) < RATE // 100
    n = min(len(got), len(tone))
    assert np.corrcoef(got[:n], tone[:n])[0, 1] > 0.99, "lossy, but the same tone"


def test_stereo_is_averaged_to_mono_and_mono_is_repeated_for_stereo_models(tmp_path):
    left, right = _tone(hz=220), _tone(hz=330)
    soundfile.write(str(tmp_path / "s.flac"), np.stack([left, right], axis=1), RATE, subtype="PCM_24")
    mono, _ = read_audio(tmp_path / "s.flac")
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-6)
    soundfile.write(str(tmp_path / "m.wav"), left, RATE, subtype="FLOAT")
    both, _ = read_audio(tmp_path / "m.wav", channels=2)
    assert both.shape == (2, len(left)) and np.array_equal(both[0], both[1])


@pytest.mark.parametrize("name, content", [("broken.wav", b"not a wave file at all"), ("empty.flac", b"")])
def test_an_unreadable_file_is_an_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AudioError, match=f"{name}: unreadable audio"):
        read_audio(tmp_path / name)


def test_write_wav_is_16_bit_pcm_and_clips(tmp_path):
    stereo = np.stack([_tone(), 2.0 * np.ones(int(0.25 * RATE), np.float32)])  # the second channel overflows
    write_wav(tmp_path / "o.wav", stereo, RATE)
    with wave.open(str(tmp_path / "o.wav"), "rb") as f:  # the plainest reader there is
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (2, 2, RATE)
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, 2)
    np.testing.assert_allclose(pcm[:, 0] / 32767, stereo[0], atol=2 / 32767)
    assert (pcm[:, 1] == 32767).all(), "out-of-range samples are clipped, not wrapped"


def test_report_clips_in_opus_take_under_a_quarter_of_wav_and_keep_their_length_and_pitch(tmp_path):
    """What the report writes: Ogg/Opus at 48 kHz from 32 kHz audio (a 4 s chord with noise, mono
    and stereo); the length and the dominant frequency survive, the bytes shrink."""
    rate, seconds = 32000, 4.0
    mono = _tone(seconds, 440.0, 0.4, rate) + _tone(seconds, 660.0, 0.2, rate)
    mono += 0.02 * np.random.default_rng(0).standard_normal(len(mono)).astype(np.float32)
    for audio in (mono, np.stack([mono, mono[::-1]])):
        write_wav(tmp_path / "a.wav", audio, rate)
        write_audio(tmp_path / "a.ogg", audio, rate)
        ratio = (tmp_path / "a.ogg").stat().st_size / (tmp_path / "a.wav").stat().st_size
        assert ratio < 0.25, ratio
        back, back_rate = soundfile.read(str(tmp_path / "a.ogg"), dtype="float32", always_2d=True)
        assert back_rate == 48000 and back.shape[1] == np.atleast_2d(audio).shape[0]
        assert abs(len(back) / back_rate - seconds) < 0.03
        spectrum = np.abs(np.fft.rfft(back[:, 0]))
        assert abs(np.argmax(spectrum) * back_rate / len(back) - 440.0) < 2.0
    write_audio(tmp_path / "a.flac", mono, rate)
    np.testing.assert_allclose(soundfile.read(str(tmp_path / "a.flac"), dtype="float32")[0], mono, atol=1 / 32768)


def test_extract_reads_float_wav_and_flac_and_names_an_unreadable_file(tmp_path):
    pytest.importorskip("torch", reason="extraction needs the extract extra")
    from extractor.extract import ExtractConfig, extract, main

    audio = tmp_path / "audio"
    audio.mkdir()
    soundfile.write(str(audio / "a.wav"), _tone(0.5, rate=32000), 32000, subtype="FLOAT")
    soundfile.write(str(audio / "b.flac"), _tone(0.3), RATE)  # resampled to the model's 32 kHz
    cfg = dict(model="tiny-random", layers="2", mode="teacher_forced", audio_dir=str(audio), device="cpu",
               dtype="float32", batch_size=2)
    store = extract(ExtractConfig(**cfg, out=str(tmp_path / "s")))
    assert [s["source_id"] for s in store.samples] == ["a.wav", "b.flac"]
    assert [s["n_frames"] for s in store.samples] == [25, 15]

    (audio / "c.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "s2"
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--layers", "2", "--mode", "teacher_forced", "--audio_dir", str(audio),
              "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    text = str(exc.value)
    assert text.startswith("error: ") and f"{audio / 'c.wav'}: unreadable audio" in text and "\n" not in text
    assert not out.exists(), "nothing is written before every file has been read"

"""Every MusicGen family: melody (chroma condition in front of the decoder's positions) and stereo
(two interleaved codebook streams) extract, re-extract by teacher forcing, evaluate and steer.

The default suite runs the toy builds (``tiny-random-*``); the slow suite runs every released
family at its real widths with two layers (``random:FAMILY:2``)."""

import json
import wave

import numpy as np
import pytest

from extractor.extract import ExtractConfig, extract, main
from extractor.families import FAMILIES

from .conftest import assert_same_rows
from .test_torch_side import _sae

PROMPTS = ["a slow sad jazz piece with a mellow piano", "fast energetic rock", "hip hop beat",
           "calm folk song with an acoustic guitar played gently at a medium tempo by a campfire at night"]
TOYS = ["tiny-random-melody", "tiny-random-stereo", "tiny-random-stereo-melody"]


def _write_wav(path, channels, rate=32000):
    pcm = (np.clip(np.stack(channels, axis=1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def _tone(hz, seconds=1.0, rate=32000):
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * hz * t)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _extract(model, out, **kw):
    base = dict(model=model, layers="1", batch_size=3, duration=0.3, out=str(out), device="cpu", dtype="float32",
                top_k=50, seed=5)
    return extract(ExtractConfig(**{**base, **kw}))


def _rows_equal_after_teacher_forcing(model, root, prompt_file, **kw):
    """Generate with batches of 3, re-extract by teacher forcing one sample at a time, compare."""
    gen = _extract(model, root / "gen", prompt_file=str(prompt_file), **kw)
    tf = _extract(model, root / "tf", mode="teacher_forced", codes_from=str(root / "gen"), batch_size=1)
    a = np.asarray(gen.acts(1).read().result())
    b = np.asarray(tf.acts(1).read().result())
    np.testing.assert_array_equal(np.asarray(gen.array("codes").read().result()),
                                  np.asarray(tf.array("codes").read().result()))
    assert_same_rows(b, a, f"{model}: generate vs teacher-forced")
    return gen


@pytest.mark.parametrize("model", TOYS)
def test_toy_families_generate_and_teacher_force_the_same_rows(model, tmp_path, prompt_file):
    from extractor.models import load_model

    info = load_model(model, "cpu", "float32").info
    gen = _rows_equal_after_teacher_forcing(model, tmp_path, prompt_file)
    assert gen.meta.n_codebooks == info.num_codebooks == 4 * info.audio_channels
    assert gen.n_rows == len(PROMPTS) * 15 and gen.complete  # 0.3 s at 50 frames/s, no conditioning rows
    assert (gen.meta.generation.get("text_length") is not None) == info.melody


def test_stereo_codes_are_two_interleaved_encodec_streams(tmp_path):
    """A stereo file with different channels: the even codebooks are the left channel's EnCodec codes,
    the odd ones the right's; decoding gives two channels again."""
    from extractor.capture import decode_codes, encode_audio
    from extractor.models import load_model

    loaded = load_model("tiny-random-stereo", "cpu", "float32")
    left, right = _tone(220), _tone(660)
    both = encode_audio(loaded, np.stack([left, right]).astype(np.float32), 32000)
    mono = load_model("tiny-random", "cpu", "float32")
    assert both.shape == (50, 8)
    # tiny-random-stereo's EnCodec is built from the same seed and recipe as tiny-random's
    np.testing.assert_array_equal(both[:, 0::2], encode_audio(mono, left.astype(np.float32), 32000))
    np.testing.assert_array_equal(both[:, 1::2], encode_audio(mono, right.astype(np.float32), 32000))
    assert decode_codes(loaded, both).shape == (2, 32000)


def test_stereo_audio_dir_extracts_and_renders_two_channels(tmp_path):
    from extractor.render import AudioRequest, render_windows

    audio = tmp_path / "wavs"
    audio.mkdir()
    _write_wav(audio / "a.wav", [_tone(220), _tone(330)])
    _write_wav(audio / "b.wav", [_tone(440, 0.6)])  # mono: both channels
    (audio / "a.txt").write_text("two tones")
    store = _extract("tiny-random-stereo", tmp_path / "store", mode="teacher_forced", audio_dir=str(audio))
    assert store.n_samples == 2 and store.sample_codes(0).shape == (50, 8) and store.sample_codes(1).shape == (30, 8)
    codes_b = store.sample_codes(1)
    np.testing.assert_array_equal(codes_b[:, 0::2], codes_b[:, 1::2])  # a mono file is the same on both sides
    (path,) = render_windows("tiny-random-stereo", store, [AudioRequest(0, 0, 25, str(tmp_path / "clip.wav"))],
                             device="cpu", progress=False)
    with wave.open(str(path)) as f:
        assert f.getnchannels() == 2 and f.getnframes() == 16000


def test_chroma_finds_the_pitch_class_of_a_tone():
    from extractor.melody import ChromaExtractor

    chroma = ChromaExtractor()
    for hz, pitch_class in ((440.0, 9), (261.63, 0), (392.0, 7)):  # A4, C4, G4 (C = 0)
        idx = chroma.chroma(_tone(hz, 3.0).astype(np.float32))
        assert len(idx) == 24 and np.bincount(idx).argmax() == pitch_class


def test_melody_condition_from_audio_dir_is_recorded_and_steers_generation(tmp_path):
    """generate + --audio_dir on a melody checkpoint: each file's caption is the prompt and its chroma
    the melody; the store records both, the melody changes the rows, and teacher forcing reproduces them."""
    audio = tmp_path / "melodies"
    audio.mkdir()
    for name, hz, text in (("a", 440.0, "a slow sad jazz piece"), ("g", 392.0, "fast energetic rock")):
        _write_wav(audio / f"{name}.wav", [_tone(hz, 2.0)])
        (audio / f"{name}.txt").write_text(text)
    gen = _extract("tiny-random-melody", tmp_path / "gen", audio_dir=str(audio), batch_size=2)
    assert [s["prompt"] for s in gen.samples] == ["a slow sad jazz piece", "fast energetic rock"]
    assert np.bincount(gen.samples[0]["melody_chroma"]).argmax() == 9
    assert np.bincount(gen.samples[1]["melody_chroma"]).argmax() == 7
    assert gen.meta.generation["melody_condition"].startswith("2 of 2")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a slow sad jazz piece\nfast energetic rock\n")
    plain = _extract("tiny-random-melody", tmp_path / "plain", prompt_file=str(prompts), batch_size=2)
    assert np.abs(gen.sample_rows(0, 1) - plain.sample_rows(0, 1)).max() > 1e-2, "the melody must change the rows"
    tf = _extract("tiny-random-melody", tmp_path / "tf", mode="teacher_forced", codes_from=str(tmp_path / "gen"),
                  batch_size=1)
    assert tf.samples[0]["melody_chroma"] == gen.samples[0]["melody_chroma"]
    assert_same_rows(tf.sample_rows(1, 1), gen.sample_rows(1, 1), "melody: teacher-forced vs generate")


def test_melody_audio_dir_in_generate_mode_needs_a_melody_checkpoint(tmp_path, capsys):
    audio = tmp_path / "wavs"
    audio.mkdir()
    _write_wav(audio / "a.wav", [_tone(440)])
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--audio_dir", str(audio), "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert "gives the melody condition, which tiny-random does not take" in str(exc.value)
    assert not (tmp_path / "s").exists()


def test_codes_from_another_codebook_layout_is_refused_before_the_store(tmp_path, prompt_file):
    _extract("tiny-random-stereo", tmp_path / "stereo", prompt_file=str(prompt_file), max_prompts=1, batch_size=1)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--mode", "teacher_forced", "--codes_from", str(tmp_path / "stereo"),
              "--out", str(tmp_path / "tf"), "--device", "cpu"])
    assert "holds 8 codebooks but tiny-random has 4" in str(exc.value)
    assert not (tmp_path / "tf").exists()


@pytest.mark.parametrize("bad, message", [
    ("random:musicgen-tiny", "unknown MusicGen family 'musicgen-tiny'; supported: musicgen-small, musicgen-medium"),
    ("random:musicgen-small:99", "use random:FAMILY or random:FAMILY:LAYERS"),
    ("t5-dir", "is a 't5' model, not MusicGen; supported: the MusicGen families (musicgen-small"),
])
def test_a_model_the_code_cannot_handle_gets_one_line_naming_the_families(bad, message, tmp_path):
    if bad == "t5-dir":
        from transformers import T5Config

        T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
        bad = str(tmp_path / "t5")
    with pytest.raises(SystemExit) as exc:
        main(["--model", bad, "--prompt_file", "bundled", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _evaluate_and_steer(model, store_dir, d, tmp_path, channels):
    from extractor.evaluate import main as evaluate_main
    from extractor.steer import main as steer_main

    exact = _sae(tmp_path / "exact.pt", "exact", d=d, layer=1, model=model)
    out = tmp_path / "eval.json"
    evaluate_main(["--model", model, "--sae", str(exact), "--store", str(store_dir), "--out", str(out),
                   "--device", "cpu", "--batch_size", "2", "--no-progress"])
    result = json.loads(out.read_text())
    assert result["overall"]["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-3)
    assert result["overall"]["kl_sae"] < 1e-6 and len(result["per_codebook"]) == 4 * channels
    steer_main(["--model", model, "--sae", str(_sae(tmp_path / "random.pt", "random", d=d, layer=1, model=model)),
                "--feature", "5", "--strength", "3", "--prompt", "calm folk guitar", "--duration", "0.3", "--out",
                str(tmp_path / "steer"), "--device", "cpu", "--top_k", "50", "--start", "0.1"])
    runs = json.loads((tmp_path / "steer" / "steer.json").read_text())["runs"]
    assert runs["steered"]["feature_mean_activation"] > runs["unsteered"]["feature_mean_activation"]
    with wave.open(str(tmp_path / "steer" / "steered.wav")) as f:
        assert f.getnchannels() == channels


@pytest.mark.parametrize("model, channels", [("tiny-random-melody", 1), ("tiny-random-stereo", 2)])
def test_spliced_evaluation_and_steering_on_melody_and_stereo(model, channels, tmp_path, prompt_file):
    _extract(model, tmp_path / "store", prompt_file=str(prompt_file), max_prompts=2, batch_size=2)
    _evaluate_and_steer(model, tmp_path / "store", 64, tmp_path, channels)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_at_real_widths(family, tmp_path, prompt_file):
    """random:FAMILY:2 - the released widths, heads, codebooks, channels and chroma, two layers."""
    from extractor.models import load_model

    model = f"random:{family}:2"
    info = load_model(model, "cpu", "float32").info
    spec = FAMILIES[family]
    assert (info.family, info.d_model, info.num_codebooks, info.audio_channels, info.melody, info.frame_rate) == \
        (family, spec.hidden_size, spec.num_codebooks, spec.audio_channels, spec.melody, 50.0)
    gen = _rows_equal_after_teacher_forcing(model, tmp_path, prompt_file, max_prompts=2, batch_size=2,
                                            duration=0.2, top_k=250)
    _evaluate_and_steer(model, tmp_path / "gen", info.d_model, tmp_path, info.audio_channels)
    assert gen.meta.n_codebooks == spec.num_codebooks

"""CLAP loads the way MusicGen does: tiny-random-clap is a real ClapModel with seeded random
weights, built once, saved and loaded back through ``from_pretrained``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="CLAP runs on the torch side (pip install -e .[torch])")

from extractor.clap import TINY_CLAP, Clap, ClapError, clap_source, label_score  # noqa: E402


@pytest.fixture(scope="module")
def clap(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SAE_MUSIC_CACHE")
    os.environ["SAE_MUSIC_CACHE"] = str(cache)
    try:
        yield Clap.load(TINY_CLAP, device="cpu")
    finally:
        if old is None:
            os.environ.pop("SAE_MUSIC_CACHE")
        else:
            os.environ["SAE_MUSIC_CACHE"] = old


def test_tiny_clap_is_built_once_and_loaded_from_disk(clap):
    source = clap_source(TINY_CLAP)
    assert (source / "config.json").exists() and (source / "processor_config.json").exists()
    again = Clap.load(TINY_CLAP, device="cpu")
    text = ["a calm piano melody", "distorted electric guitar"]
    np.testing.assert_allclose(again.texts(text), clap.texts(text), rtol=1e-5, atol=1e-6)


def test_embeddings_are_unit_and_clips_are_cut_to_the_window(clap):
    t = clap.texts(["a calm piano melody", "distorted electric guitar", "a calm piano melody"])
    assert t.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t[0], t[2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(t[0], t[1])
    rate = 32_000
    rng = np.random.default_rng(0)
    window = clap.window_samples * rate // clap.sampling_rate  # 2 s at 32 kHz
    long = rng.normal(0, 0.1, size=window * 2).astype(np.float32)
    quiet = 0.01 * np.sin(np.linspace(0, 2000, window)).astype(np.float32)
    a = clap.clips([long, long[:window], quiet], rate)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a[0], a[1], rtol=1e-4, atol=1e-5)  # the first window, never a random crop
    assert not np.allclose(a[0], a[2], atol=1e-3)
    with pytest.raises(ClapError, match="mono clips"):
        clap.clips([np.zeros((2, 100), np.float32)], rate)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_label_score_counts_top_clips_above_random_ones():
    rng = np.random.default_rng(1)
    label = np.eye(8)[0]
    top = _unit(rng.normal(0, 0.1, size=(10, 8)) + label)
    random = _unit(rng.normal(0, 0.1, size=(30, 8)) + np.eye(8)[1])
    score = label_score(label, top, random)
    assert score["gain"] > 0.5 and score["auroc"] == 1.0 and score["top_clips"] == 10
    swapped = label_score(label, random, top)
    assert swapped["auroc"] == 0.0 and swapped["gain"] == pytest.approx(-score["gain"])
    with pytest.raises(ClapError, match="at least one"):
        label_score(label, top[:0], random)


def test_unknown_clap_is_one_line():
    with pytest.raises(ClapError, match="unknown CLAP 'clapp'"):
        clap_source("clapp")

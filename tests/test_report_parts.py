"""The report's fast paths make what the plain ones make: a reused figure draws the pixels a fresh
one draws, batched spectrograms equal scipy's STFT, overlapping windows of a sample are decoded
once and cut to each window's length, and worker processes draw what one process draws."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from discovery.examples import ExampleJob, ExampleWorkers, make_examples
from discovery.plotting import ExamplePlots, HistogramPlots, log_mels, mel_centres, mel_filters


def _tone_clip(seconds: float, rate: int, hz: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(scale=0.05, size=len(t))
    return (0.5 * np.sin(2 * np.pi * hz * t) * np.linspace(0, 1, len(t)) + noise).astype(np.float32)


def _curve(frames: int, seed: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(size=frames)).astype(np.float32) * (seed + 1)


def test_batched_spectrograms_equal_scipys_stft_clip_by_clip():
    """Clips of two lengths (three of one) in one call; each equals scipy.signal.stft's log-mel
    within 1e-3 dB (float32 against float64 arithmetic)."""
    from scipy.signal import stft

    rate = 48_000
    clips = [_tone_clip(1.0, rate, 440, 0), _tone_clip(1.0, rate, 3000, 1), _tone_clip(0.7, rate, 880, 2),
             _tone_clip(1.0, rate, 6000, 3)]
    n_fft, hop = 4096, 480
    for clip, db in zip(clips, log_mels(clips, rate)):
        _, _, spec = stft(clip, fs=rate, window="hann", nperseg=n_fft, noverlap=n_fft - hop, boundary="even",
                          padded=True)
        want = 10 * np.log10(np.maximum(mel_filters(rate, n_fft) @ np.abs(spec) ** 2, 1e-10))
        want = np.maximum(want, want.max() - 80.0)
        assert db.shape == want.shape
        np.testing.assert_allclose(db, want, atol=1e-3)
    short = log_mels([np.ones(100, np.float32)], rate)[0]  # shorter than one window: padded, not an error
    assert short.shape[0] == 64 and np.isfinite(short).all()


def test_a_reused_figure_draws_the_pixels_a_fresh_one_draws(tmp_path):
    """Examples of other lengths, limits, a NaN gap and an all-zero curve drawn one after another
    through one ExamplePlots equal each drawn alone through a new one; histograms likewise."""
    rate = 48_000
    clips = [_tone_clip(s, rate, 500 * (i + 1), i) for i, s in enumerate((2.0, 1.4, 2.0, 0.9))]
    dbs = log_mels(clips, rate)
    curves = [_curve(len(c) * 50 // rate, i) for i, c in enumerate(clips)]
    curves[2][10:14] = np.nan
    curves[3][:] = 0
    shared = ExamplePlots()
    for i, (curve, db, clip) in enumerate(zip(curves, dbs, clips)):
        shared.draw(curve, 50.0, tmp_path / f"shared{i}.png", 0.25 * i, db, len(clip) / rate, mel_centres(rate))
    shared.draw(curves[0], 50.0, tmp_path / "shared_curve.png", 1.5)  # the curve-only layout between
    shared.draw(curves[1], 50.0, tmp_path / "shared_after.png", 0.0, dbs[1], len(clips[1]) / rate, mel_centres(rate))
    shared.close()
    alone = {f"shared{i}.png": (curves[i], 0.25 * i, dbs[i], len(clips[i]) / rate) for i in range(4)}
    alone |= {"shared_curve.png": (curves[0], 1.5, None, 0.0),
              "shared_after.png": (curves[1], 0.0, dbs[1], len(clips[1]) / rate)}
    for name, (curve, offset, db, seconds) in alone.items():
        fresh = ExamplePlots()
        fresh.draw(curve, 50.0, tmp_path / f"fresh_{name}", offset, db, seconds, mel_centres(rate) if db is not None else None)
        fresh.close()
        np.testing.assert_array_equal(imread(tmp_path / name), imread(tmp_path / f"fresh_{name}"), err_msg=name)
    edges = 2.0 ** np.arange(-3, 4, 0.5)
    counts = [np.r_[0, 0, 5, 9, 3, np.zeros(len(edges) - 4)], np.r_[np.zeros(len(edges) - 2), 7, 1, 2]]
    shared = HistogramPlots()
    for i, c in enumerate(counts):
        shared.draw(edges, c, 0.01 * (i + 1), tmp_path / f"h{i}.png")
    for i, c in enumerate(counts):
        fresh = HistogramPlots()
        fresh.draw(edges, c, 0.01 * (i + 1), tmp_path / f"hfresh{i}.png")
        fresh.close()
        np.testing.assert_array_equal(imread(tmp_path / f"h{i}.png"), imread(tmp_path / f"hfresh{i}.png"))


def test_overlapping_windows_are_one_span_and_equal_lengths_batch_together():
    pytest.importorskip("torch", reason="the extract extra (torch) is not installed")
    from extractor.render import AudioRequest, decode_batches, spans_of

    requests = [AudioRequest(0, 10, 60, "a"), AudioRequest(0, 50, 90, "b"), AudioRequest(0, 90, 120, "c"),
                AudioRequest(0, 150, 200, "d"), AudioRequest(1, 0, 50, "e"), AudioRequest(2, 30, 80, "f")]
    spans = {(s.sample, s.first, s.last): [r.path for r in s.requests] for s in spans_of(requests)}
    assert spans == {(0, 10, 120): ["a", "b", "c"], (0, 150, 200): ["d"], (1, 0, 50): ["e"], (2, 30, 80): ["f"]}
    batches = decode_batches(spans_of(requests), max_frames=100)
    assert sorted(len(b) for b in batches) == [1, 1, 2]  # three 50-frame spans: two, then one; the 110 alone
    assert all(len({s.frames for s in b}) == 1 for b in batches)
    assert [len(b) for b in decode_batches(spans_of(requests), max_frames=0)] == [1, 1, 1, 1]


def test_render_cuts_each_window_from_its_span_at_its_length(tmp_path):
    """A window inside another is the same stretch of the same decoded span: its samples equal the
    outer clip's at the same time, and every clip has its window's length."""
    pytest.importorskip("torch", reason="the extract extra (torch) is not installed")
    from extractor.render import AudioRequest, decode_windows

    from .test_discovery import planted_store

    store, _ = planted_store(tmp_path / "store", n_samples=2, d=64, lengths=[60, 60])
    store.write_rows("codes", 0, np.random.default_rng(0).integers(0, 64, size=(store.n_rows, 4)).astype(np.int32))
    requests = [AudioRequest(0, 5, 45, "outer"), AudioRequest(0, 20, 30, "inner"), AudioRequest(1, 0, 50, "other")]
    clips = {req.path: (req, audio, rate) for req, audio, rate in decode_windows("tiny-random", store, requests, "cpu",
                                                                              progress=False)}
    hop = clips["outer"][2] // 50  # tiny-random: 32 kHz audio, 50 frames/s
    for req, audio, _ in clips.values():
        assert audio.shape == (1, (req.last - req.first) * hop)
    np.testing.assert_array_equal(clips["inner"][1], clips["outer"][1][:, 15 * hop:25 * hop])


def test_worker_processes_make_what_one_process_makes(tmp_path):
    """Clips written from audio, read back and drawn under their spectrograms: two spawned workers
    give the same plot pixels and the same clips as this process."""
    rate = 32_000
    jobs = []
    for where in ("one", "two"):
        (tmp_path / where).mkdir()
        jobs.append([ExampleJob(_curve(40, i), 50.0, tmp_path / where / f"p{i}.png", 0.1 * i,
                                tmp_path / where / f"c{i}.wav", _tone_clip(0.8, rate, 300 * (i + 1), i)[None], rate)
                     for i in range(6)])
    make_examples(jobs[0])
    import discovery.examples as examples

    original = examples.PARALLEL_FROM
    examples.PARALLEL_FROM = 2  # six examples are enough to use the processes here
    try:
        with ExampleWorkers(len(jobs[1]), workers=2, progress=False) as workers:
            assert workers.processes == 2
            for job in jobs[1]:
                workers.add(job)
            workers.finish()
    finally:
        examples.PARALLEL_FROM = original
    for i in range(6):
        np.testing.assert_array_equal(imread(tmp_path / "one" / f"p{i}.png"), imread(tmp_path / "two" / f"p{i}.png"))
        assert (tmp_path / "one" / f"c{i}.wav").read_bytes() == (tmp_path / "two" / f"c{i}.wav").read_bytes()


def test_a_failing_worker_job_raises_in_the_report(tmp_path):
    """An example whose clip cannot be written stops the build with that error, not a hang."""
    import discovery.examples as examples

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    job = ExampleJob(_curve(40, 0), 50.0, tmp_path / "p.png", 0.0, blocked / "c.wav",
                     _tone_clip(0.5, 32_000, 440, 0)[None], 32_000)
    original = examples.PARALLEL_FROM
    examples.PARALLEL_FROM = 1
    try:
        with pytest.raises(OSError):
            with ExampleWorkers(1, workers=2, progress=False) as workers:
                workers.add(job)
                workers.finish()
    finally:
        examples.PARALLEL_FROM = original
    assert not Path(tmp_path / "p.png").exists()

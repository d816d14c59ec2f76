"""Extraction on tiny-random: both modes agree, rows are attributed right, runs resume and shard."""

import json
import signal
import subprocess
import time
import wave

import jax
import numpy as np
import pytest

from extractor.extract import ExtractConfig, extract, main, parse_layers
from sae_core.store import open_store

from .conftest import assert_same_rows, cli

PROMPTS = [
    "a slow sad jazz piece with a mellow piano",
    "fast energetic rock",
    "calm folk song with an acoustic guitar played gently at a medium tempo by a campfire at night",
    "hip hop beat",
    "an energetic electronic track with a bright synthesizer lead",
]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _cfg(out, prompt_file, **kw):
    base = dict(model="tiny-random", layers="1,3", prompt_file=str(prompt_file), batch_size=2, duration=0.4,
                out=str(out), device="cpu", dtype="float32", top_k=50, seed=7)
    base.update(kw)
    return ExtractConfig(**base)


def _arrays(store):
    names = ["offsets", "codes", "frames"] + [f"layer{layer}/acts" for layer in store.layers]
    return {n: np.asarray(store.array(n).read().result()) for n in names}


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """One uninterrupted extraction (batch 1, seed 7), shared by the tests that compare with it."""
    root = tmp_path_factory.mktemp("reference")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return extract(_cfg(root / "ref", prompts, batch_size=1)).path


@pytest.fixture(scope="module")
def reference(reference_store):
    """The arrays of the reference extraction."""
    return _arrays(open_store(reference_store))


def test_generate_and_teacher_forced_give_the_same_rows(tmp_path, prompt_file):
    gen = extract(_cfg(tmp_path / "gen", prompt_file, batch_size=3))
    assert gen.n_rows == len(PROMPTS) * 20 and gen.complete
    # batch_size 1: each prompt alone, so this also checks rows inside a padded batch of
    # prompts of different lengths equal the prompt's rows on its own.
    tf = extract(_cfg(tmp_path / "tf", prompt_file, mode="teacher_forced", codes_from=str(tmp_path / "gen"),
                      batch_size=1))
    a, b = _arrays(gen), _arrays(tf)
    for name in ("offsets", "codes", "frames"):
        np.testing.assert_array_equal(a[name], b[name])
    for layer in (1, 3):
        assert_same_rows(b[f"layer{layer}/acts"], a[f"layer{layer}/acts"], f"layer {layer}: generate vs teacher-forced")
    assert [s["prompt"] for s in tf.samples] == PROMPTS
    assert a["frames"][:20].tolist() == list(range(20))


def test_mlp_inputs_and_outputs_are_stored_beside_the_residual_stream(tmp_path, prompt_file, reference):
    """--mlp: each layer's MLP input (after its layer norm) and output, in both modes; the output is
    the layer's MLP applied to the stored input; the residual stream is what it is without --mlp."""
    import torch

    from extractor.models import load_model

    gen = extract(_cfg(tmp_path / "gen", prompt_file, batch_size=1, mlp=True))
    assert gen.meta.streams == ("cond", "mlp_in", "mlp_out")
    for layer in (1, 3):  # capturing more changes nothing that was captured before
        np.testing.assert_array_equal(np.asarray(gen.acts(layer).read().result()), reference[f"layer{layer}/acts"])
    tf = extract(_cfg(tmp_path / "tf", prompt_file, mode="teacher_forced", codes_from=str(tmp_path / "gen"),
                      batch_size=2, mlp=True))
    block = load_model("tiny-random", "cpu", "float32").layer(3)
    for store in (gen, tf):
        x = np.asarray(store.acts(3, "mlp_in").read().result())
        y = np.asarray(store.acts(3, "mlp_out").read().result())
        assert x.shape == y.shape == (store.n_rows, store.d_model) and np.abs(x - y).max() > 0
        with torch.no_grad():
            mlp = block.fc2(block.activation_fn(block.fc1(torch.from_numpy(x)))).numpy()
        np.testing.assert_allclose(y, mlp, atol=1e-4 * np.abs(y).max())
    for stream in ("mlp_in", "mlp_out"):
        assert_same_rows(np.asarray(tf.acts(1, stream).read().result()), np.asarray(gen.acts(1, stream).read().result()),
                         f"layer 1 {stream}: generate vs teacher-forced")


def test_conditional_rows_belong_to_their_own_prompt(tmp_path, prompt_file, tiny_model):
    """Guidance doubles the batch; the stored rows must be the conditional half, prompt by prompt."""
    from extractor.capture import teacher_forced_batch

    store = extract(_cfg(tmp_path / "gen", prompt_file, batch_size=5, keep_uncond=True))
    for i, text in enumerate(PROMPTS):
        alone = teacher_forced_batch(tiny_model, [text], [store.sample_codes(i)], [3])[3][0]
        assert_same_rows(store.sample_rows(i, 3), alone, f"prompt {i}")
    uncond = store.sample_rows(0, 3, stream="uncond")
    assert np.abs(uncond - store.sample_rows(0, 3)).max() > 1e-2, "uncond stream must be its own stream"


def test_extraction_is_seeded(tmp_path, prompt_file, reference):
    again = _arrays(extract(_cfg(tmp_path / "again", prompt_file, batch_size=1)))
    for name in reference:
        np.testing.assert_array_equal(again[name], reference[name])
    other = _arrays(extract(_cfg(tmp_path / "other", prompt_file, batch_size=1, seed=8)))
    assert not np.array_equal(reference["codes"], other["codes"])


def _args(out, prompt_file, *extra):
    return ["extractor.extract", "--model", "tiny-random", "--layers", "1,3", "--prompt_file", str(prompt_file),
            "--batch_size", "1", "--duration", "0.4", "--out", str(out), "--device", "cpu", "--dtype",
            "float32", "--top_k", "50", "--seed", "7", *extra]


@pytest.mark.slow  # kills are also tried by tests/test_faults.py (slow) and bench.faults; training's kill test is default
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, prompt_file, reference):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(*_args(out, prompt_file)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress" / "shard-0-of-1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_store(out, require_complete=False)
    assert 0 < len(partial.committed_units()) < len(PROMPTS), "the kill should land mid-run"
    rerun = subprocess.run(cli(*_args(out, prompt_file)), capture_output=True, text=True, check=True)
    assert "resuming" in rerun.stdout
    got = _arrays(open_store(out))
    for name in reference:
        np.testing.assert_array_equal(reference[name], got[name])


@pytest.mark.slow  # two shards also fill the bucket store of the next test by default (and race in bench.faults)
def test_two_shards_fill_one_store(tmp_path, prompt_file, reference):
    out = tmp_path / "sharded"
    procs = [subprocess.Popen(cli(*_args(out, prompt_file, "--shard", f"{i}/2")), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    got = _arrays(open_store(out))
    for name in reference:
        np.testing.assert_array_equal(reference[name], got[name])
    assert sorted(f.name for f in (out / "progress").iterdir()) == ["shard-0-of-2.jsonl", "shard-1-of-2.jsonl"]


def test_a_bucket_store_filled_by_two_shards_one_killed_and_resumed_trains_and_discovers_as_a_local_one(
        tmp_path, prompt_file, reference_store, reference, faulty):
    """extract -> train -> discover with the store at s3://... on a real S3-compatible server behind a
    proxy that answers 5% of the requests with 503 SlowDown, 500 or a connection reset mid-body, after
    0-2 ms each; every result equals the same run on the local reference store."""
    import discovery.discover
    import jax_sae
    from sae_core.location import Location
    from jax_sae.train import TrainConfig, train

    url, proxy, _ = faulty("extract", faults=0.05, latency=(0.0, 0.002), seed=3)
    units = Location.parse(url)
    killed = subprocess.Popen(cli(*_args(url, prompt_file, "--shard", "0/2")), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None and not units.list("progress/units/"):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = open_store(url, require_complete=False).committed_units()
    assert done and done < {0, 2, 4}, f"the kill should land inside shard 0's three batches, got {done}"
    procs = [subprocess.Popen(cli(*_args(url, prompt_file, "--shard", f"{i}/2")), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(out)
    assert "resuming" in outs[0]
    bucket = open_store(url)
    got = _arrays(bucket)
    for name in reference:
        np.testing.assert_array_equal(reference[name], got[name], err_msg=name)
    assert bucket.samples == open_store(reference_store).samples

    saes, features = [], []
    for name, store in (("bucket", url), ("local", str(reference_store))):
        out = tmp_path / name
        train(TrainConfig.of(sae_type="topk", layer_idx=3, hidden_dim=16, top_k=2, batch_size=16, epochs=2,
                          store=store, out=str(out / "models"), progress=False, patience=0))
        sae = out / "models" / "topk" / "layer3" / "dim16" / "final"
        saes.append(jax_sae.load(sae))
        discovery.discover.main(["--sae_path", str(sae), "--store", store, "--output", str(out / "f.json"),
                                 "--max_features", "8", "--no_filter", "--no-progress"])
        features.append(json.loads((out / "f.json").read_text()))
    for a, b in zip(jax.tree.leaves(saes[0].params), jax.tree.leaves(saes[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert features[0] == features[1] and len(features[0]) == 8
    counts = proxy.counts()
    assert sum(counts.get(kind, 0) for kind in ("503", "500", "reset")) >= 10, counts


def _write_wav(path, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate), f.writeframes(pcm.tobytes())


def test_teacher_forced_from_audio_files_with_their_texts_and_rates(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    _write_wav(audio / "a.wav", 0.5, 32000)
    _write_wav(audio / "b.wav", 0.3, 16000)  # resampled to the model's rate
    (audio / "b.txt").write_text("a sine tone\n")
    store = extract(ExtractConfig(model="tiny-random", layers="2", mode="teacher_forced", audio_dir=str(audio),
                                  out=str(tmp_path / "s"), device="cpu", dtype="float32", batch_size=2))
    assert [s["source_id"] for s in store.samples] == ["a.wav", "b.wav"]
    assert [s["n_frames"] for s in store.samples] == [25, 15]
    assert store.samples[1]["prompt"] == "a sine tone"
    assert store.complete and np.abs(store.sample_rows(1, 2)).sum() > 0


def test_musiccaps_prompts_extract(tmp_path, musiccaps_csv):
    from extractor.prompts import PromptsConfig, build_prompts

    paths = build_prompts(PromptsConfig(csv=musiccaps_csv, out=tmp_path / "data"))
    store = extract(_cfg(tmp_path / "s", paths["quick_test"], max_prompts=6, batch_size=3, layers="0"))
    assert store.n_samples == 6 and store.complete
    assert all(s["tags"] and s["source_id"] for s in store.samples), "MusicCaps tags and ytids are kept"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "9"], "layer 9 is out of range: tiny-random has 4 decoder layers (0-3)"),
        (["--layers", "2-x"], "is not a layer list"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--device", "cuda"], "no CUDA GPU is visible"),
        (["--shard", "2/2"], "need 0 <= i < N"),
        (["--mode", "teacher_forced"], "needs exactly one of --codes_from"),
    ],
)
def test_bad_arguments_exit_with_one_line_and_write_nothing(tmp_path, prompt_file, capsys, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as exc:
        main([a for a in _args(out, prompt_file)[1:]] + extra)
    text = str(exc.value)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not out.exists()


@pytest.mark.parametrize("content, message", [(None, "prompt file not found"), ("\n\n", "no prompts in")])
def test_missing_or_empty_prompt_file(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(_args(tmp_path / "s", path)[1:])
    assert message in str(exc.value) and not (tmp_path / "s").exists()


def test_existing_store_with_other_settings_is_refused_unless_overwrite(tmp_path, prompt_file):
    out = tmp_path / "s"
    extract(_cfg(out, prompt_file, layers="1"))
    with pytest.raises(SystemExit) as exc:
        main(_args(out, prompt_file)[1:])  # layers 1,3
    assert "layers=[1] (asked [1, 3])" in str(exc.value) and "--overwrite" in str(exc.value)
    assert open_store(out).layers == (1,), "the old store is untouched"
    main(_args(out, prompt_file, "--overwrite")[1:])
    assert open_store(out).layers == (1, 3)


def test_out_of_disk_is_refused_before_writing(tmp_path, prompt_file, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(SystemExit) as exc:
        main(_args(tmp_path / "s", prompt_file)[1:])
    assert "GB is free" in str(exc.value) and not (tmp_path / "s").exists()


def test_parse_layers_forms():
    assert parse_layers("12", 24) == (12,)
    assert parse_layers("6,12,18", 24) == (6, 12, 18)
    assert parse_layers("0-2,10", 24) == (0, 1, 2, 10)
    assert parse_layers("all", 3) == (0, 1, 2)


def test_tiny_random_is_a_saved_musicgen_loaded_by_path(tiny_model):
    import dataclasses

    import torch

    from extractor.models import load_model, tiny_random_dir

    path = tiny_random_dir()
    assert (path / "config.json").exists() and (path / "processor_config.json").exists()
    by_path = load_model(str(path), device="cpu", dtype="float32")
    assert dataclasses.replace(by_path.info, name=tiny_model.info.name) == tiny_model.info
    assert (by_path.info.num_codebooks, by_path.info.frame_rate, by_path.info.d_model) == (4, 50.0, 64)
    by_name, saved = tiny_model.model.state_dict(), by_path.model.state_dict()
    assert by_name.keys() == saved.keys() and all(torch.equal(by_name[k], saved[k]) for k in by_name), \
        "loading by name and by path must give the same weights"

"""Discovery: planted concepts are found and named, streaming equals brute force, JSON and LLM paths hold."""

import json

import jax
import numpy as np
import pytest

import jax_sae
from discovery.align import align, average_precision
from discovery.discover import DiscoverError, FeatureFiles, main
from discovery.features import FeatureDiscovery
from discovery.labels import Corpus, heuristic_label
from discovery.stats import HIST_EDGES, feature_pass
from sae_core.store import StoreMeta, acts_name, create_store, open_store
from jax_sae.train import TrainConfig, train

TAGS = ["distorted electric guitar", "piano", "violin", "drums", "synthesizer", "flute"]
MOODS = ["calm", "happy", "sad", "dark"]


def planted_store(path, n_samples=300, d=32, seed=0, lengths=None):
    """Samples whose captions carry 1-2 instrument tags; each tag adds its own direction to the
    sample's rows. Captions share MusicCaps-style boilerplate."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(TAGS), d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = lengths if lengths is not None else [40] * n_samples
    samples, rows = [], []
    for i in range(n_samples):
        chosen = sorted(rng.choice(len(TAGS), size=rng.integers(1, 3), replace=False))
        mood = MOODS[rng.integers(len(MOODS))]
        caption = (f"The low quality recording features a {mood} song with "
                   + " and ".join(TAGS[t] for t in chosen) + ". It sounds like a live performance.")
        x = 0.3 * rng.normal(size=(lengths[i], d))
        for t in chosen:
            on = rng.random(lengths[i]) < 0.8
            x += on[:, None] * rng.uniform(1.0, 2.0, size=(lengths[i], 1)) * directions[t]
        rows.append(x)
        samples.append({"index": i, "prompt": caption, "source_id": f"p{i}", "tags": [TAGS[t] for t in chosen] + [mood],
                        "n_frames": lengths[i]})
    x = np.concatenate(rows).astype(np.float32)
    meta = StoreMeta(model="synthetic", layers=(0,), d_model=d, n_codebooks=4, frame_rate=50.0, sampling_rate=32000,
                     dtype="float32", mode="generate", n_samples=n_samples, n_rows=len(x), n_units=1)
    store = create_store(path, meta, samples, lengths)
    store.write_rows(acts_name(0), 0, x)
    store.commit_unit(0, "shard-0-of-1")
    return open_store(path), x


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    store, x = planted_store(root / "store")
    train(TrainConfig.of(sae_type="topk", layer_idx=0, hidden_dim=32, top_k=4, batch_size=256, epochs=8, lr=4e-3,
                      store=str(root / "store"), out=str(root / "models"), progress=False, patience=0))
    return root, store, jax_sae.load(root / "models" / "topk" / "layer0" / "dim32" / "final"), x


def test_each_planted_concept_gets_a_feature_named_after_it(planted):
    root, store, sae, _ = planted
    features = FeatureDiscovery(sae, progress=False).discover_and_label(
        store, filter_features=False, max_features=32, examples=20)
    for tag in TAGS:
        named = [k for k, f in features.items() if f["label"] == tag]
        assert named, f"no feature labelled {tag!r}: {sorted(f['label'] for f in features.values())}"
        best = max(features[k]["aligned_tags"][0]["auroc"] for k in named
                   if features[k]["aligned_tags"][0]["tag"] == tag)
        assert best >= 0.95, f"{tag}: best AUROC {best}"
    assert all(f["label"] != "recording" and "quality" not in f["label"] for f in features.values())


@pytest.mark.parametrize("devices", [1, 4])
def test_streaming_statistics_equal_brute_force(tmp_path, planted, devices):
    """Also on 4 devices: rows split over them, statistics and top examples merged by collectives."""
    import jax

    if jax.local_device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    _, _, sae, _ = planted
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(5, 60, size=40)]
    store, x = planted_store(tmp_path / "s", n_samples=40, lengths=lengths, seed=4)
    result = feature_pass(sae, store, 0, examples=5, block_rows=64, progress=False, devices=devices)
    f = np.asarray(sae.encode(x))
    np.testing.assert_array_equal(result.token_count, (f > 0).sum(0))
    np.testing.assert_allclose(result.max, f.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.sum, f.sum(0), rtol=1e-4, atol=1e-4)
    offsets = store.offsets
    smax = np.stack([f[offsets[i]:offsets[i + 1]].max(0) for i in range(40)])
    smean = np.stack([f[offsets[i]:offsets[i + 1]].mean(0) for i in range(40)])
    np.testing.assert_allclose(result.sample_max.dense(), smax, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(result.sample_mean.dense(), smean, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(result.sample_count, (smax > 0).sum(0))
    edges = np.concatenate([[0.0], HIST_EDGES, [np.inf]])  # the first bin is (0, 2^-8], the last above 2^8
    for h in range(f.shape[1]):
        fired = f[f[:, h] > 0, h]
        want = [int(np.sum((fired > lo) & (fired <= hi))) for lo, hi in zip(edges[:-1], edges[1:])]
        assert result.histogram[h].tolist() == want, h
        want = np.sort(smax[:, h])[::-1][:5]
        np.testing.assert_allclose(result.top["max"][0][h], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.top["moments"][0][h], np.sort(f[:, h])[::-1][:5], rtol=1e-5, atol=1e-6)
        rows = result.top["moments"][1][h]
        np.testing.assert_allclose(f[rows, h], result.top["moments"][0][h], rtol=1e-5, atol=1e-6)
    lean = feature_pass(sae, store, 0, examples=5, block_rows=64, progress=False, devices=devices,
                        token_examples=False)
    np.testing.assert_array_equal(lean.token_count, result.token_count)
    np.testing.assert_array_equal(lean.sample_max.dense(), result.sample_max.dense())
    np.testing.assert_array_equal(lean.top["max"][1], result.top["max"][1])
    assert (lean.top["moments"][1] == -1).all(), "no token examples unless asked for"


def _same_json(a, b, where="features"):
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_json(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_processes_discover_the_same_features_as_one(planted, tmp_path):
    """2 processes x 2 CPU devices (gloo collectives on localhost) == 1 process x 4 devices, each
    process reading only the rows of its own devices."""
    import os
    import subprocess

    from .conftest import cli
    from .test_sharding import _free_port

    root, store, _, _ = planted
    args = ["discovery.discover", "--sae_path", str(root / "models" / "topk" / "layer0" / "dim32" / "final"),
            "--store", str(root / "store"), "--max_features", "32", "--no_filter", "--aggregation", "moments",
            "--no-progress"]

    def env(devices):
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}

    assert jax.device_count() == 4  # the reference: this process, 4 devices (conftest)
    main(args[1:] + ["--output", str(tmp_path / "one.json")])
    port = _free_port()
    procs = [subprocess.Popen(cli(*args, "--output", str(tmp_path / "two.json"), "--coordinator_address",
                                  f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)),
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    one, two = FeatureFiles(tmp_path / "one.json"), FeatureFiles(tmp_path / "two.json")
    a, b = one.read_features(), two.read_features()
    assert len(a) == 32 and all(ex["type"] == "token-level" for ex in a["0"]["top_examples"])
    _same_json(a, b)  # labels, example rows and samples, tags: equal; numbers: equal to float32 rounding
    _same_json(one.read_summary()["alignment"], two.read_summary()["alignment"], "alignment")
    read_one, read_two = one.read_summary()["rows_read_per_process"], two.read_summary()["rows_read_per_process"]
    assert read_one == [store.n_rows] and sum(read_two) == store.n_rows
    assert all(abs(n - store.n_rows / 2) <= 0.1 * store.n_rows for n in read_two), read_two
    assert not (tmp_path / "two.summary.json").read_text().count("NaN")


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 3)), 1)  # many ties
    samples = [{"tags": ["a"] if rng.random() < 0.4 else ["b"]} for _ in range(60)]
    result = align(scores, samples, min_support=5)
    pos = np.array(["a" in s["tags"] for s in samples])
    for h in range(3):
        p, n = scores[pos, h], scores[~pos, h]
        pairwise = ((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n))
        assert result.auroc_TH[result.tags.index("a"), h] == pytest.approx(pairwise)
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)
    from scipy.stats import rankdata

    from discovery.align import average_ranks

    np.testing.assert_array_equal(average_ranks(scores), rankdata(scores, axis=0, method="average"))


def test_heuristic_label_sees_past_boilerplate():
    base = "The low quality recording features a song with {}. The recording is noisy."
    samples = [{"prompt": base.format("distorted electric guitar" if i < 10 else other), "tags": []}
               for i, other in enumerate(["mellow piano", "soft strings", "a flute"] * 10)]
    corpus = Corpus.from_samples(samples)
    assert heuristic_label(corpus, list(range(10))).text == "distorted electric guitar"


def _no_nan(name):
    raise AssertionError(f"{name} in a features JSON")


def test_moments_examples_carry_time_and_json_round_trips(planted, tmp_path, capsys):
    root, store, sae, _ = planted
    out = tmp_path / "features_layer0.json"
    main(["--sae_path", str(root / "models" / "topk" / "layer0" / "dim32" / "best"), "--store", str(root / "store"),
          "--output", str(out), "--aggregation", "moments", "--no_filter", "--max_features", "3", "--examples", "4",
          "--all", "--no-progress"])
    files = FeatureFiles(out)
    features = files.read_features()
    assert features == FeatureDiscovery.load_features(out)
    stats = files.read_all_stats()
    live = np.flatnonzero(stats["token_count"] > 0)
    assert [int(k) for k in features] == list(live[np.argsort(-stats["max"][live], kind="stable")][:3]), \
        "the reported features are the three live ones with the largest activations, in that order"
    for key, info in features.items():
        assert info["max_activation"] == pytest.approx(float(stats["max"][int(key)]), rel=1e-6)
        ex = info["top_examples"][0]
        assert ex["type"] == "token-level" and ex["time_seconds"] == pytest.approx(ex["frame"] / 50.0)
        sample = store.samples[ex["sample_index"]]
        assert ex["prompt"] == sample["prompt"] and store.offsets[ex["sample_index"]] + ex["frame"] == ex["row"]
    copy = tmp_path / "copy.json"
    FeatureDiscovery.save_features(features, copy)
    assert json.loads(copy.read_text(), parse_constant=_no_nan) == features, "saved JSON is strict and equal"
    summary = files.read_summary()
    assert summary["alignment"]["median_best_auroc"] > 0.5
    n = jax.local_device_count()  # discovery splits rows over every local device, and says so
    assert f"jax: cpu, {n} devices (cpu), mesh data={n} model=1" in capsys.readouterr().out.splitlines()
    assert summary["runtime"] == {"platform": "cpu", "device_count": n, "local_device_count": n,
                                  "device_kinds": ["cpu"], "process_count": 1, "mesh": {"data": n, "model": 1}}
    assert files.read_all_stats()["token_count"].shape == (32,)
    assert files.finished() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left"


def test_feature_files_round_trip_and_name_a_bad_file(tmp_path):
    files = FeatureFiles(tmp_path / "features_layer3.json")
    assert not files.finished() and files.read_summary() is None and files.read_all_stats() is None
    with pytest.raises(DiscoverError, match="no features file at .*features_layer3.json; run python -m discovery"):
        files.read_features()
    features = {"7": {"label": "piano", "top_examples": []}}
    files.write(features, {"layer": 3}, {"frequency": np.arange(4.0)})
    assert files.read_features() == features and files.read_summary() == {"layer": 3} and files.finished()
    np.testing.assert_array_equal(files.read_all_stats()["frequency"], np.arange(4.0))
    files.write(features, {"layer": 3})
    assert files.read_all_stats() is None, "a rerun without --all leaves no stale statistics behind"
    files.features.write_text(json.dumps({"7": {"label": "piano"}}))
    with pytest.raises(DiscoverError, match="features_layer3.json is not a features file: feature 7 lacks"):
        files.read_features()
    files.summary.write_text("{not json")
    with pytest.raises(DiscoverError, match="features_layer3.summary.json cannot be read"):
        files.read_summary()


def test_cli_errors_are_one_line(tmp_path):
    for argv, message in [([], "--sae_path is required"),
                          (["--sae_path", str(tmp_path)], "is not a finished sae-music-jax checkpoint")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert message in str(exc.value) and "\n" not in str(exc.value)

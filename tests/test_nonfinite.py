"""NaN/Inf rows in a store: discovery and the report skip them and say how many, spliced-in
evaluation leaves them out of the ablation mean and says how many, and no JSON output ever holds
NaN or Infinity."""

import json
import shutil

import numpy as np
import pytest

import jax_sae
from discovery.discover import FeatureFiles
from discovery.discover import main as discover
from discovery.report import main as report
from discovery.stats import feature_pass
from sae_core.store import Store, StoreMeta, acts_name, create_store, open_store
from jax_sae.train import TrainConfig, train

from .synthetic import write_store
from .test_discovery import planted_store

ROWS_PER_SAMPLE = 40  # planted_store's default
# a NaN in sample 1, +Inf in sample 2, every row of sample 5, -Inf in sample 7
BAD_ROWS = [45, 101, *range(200, 240), 302]


def _strict(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    def refuse(name):
        raise AssertionError(f"{name} in a JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """An SAE trained on a clean planted store, and a copy of that store with NaN/Inf rows planted."""
    root = tmp_path_factory.mktemp("nonfinite")
    _, x = planted_store(root / "clean", n_samples=40)
    train(TrainConfig.of(sae_type="topk", layer_idx=0, hidden_dim=32, top_k=4, batch_size=256, epochs=1, lr=4e-3,
                      store=str(root / "clean"), out=str(root / "models"), progress=False, patience=0))
    shutil.copytree(root / "clean", root / "dirty")
    bad = x.copy()
    bad[45, 3] = np.nan
    bad[101, 0] = np.inf
    bad[200:240] = np.nan
    bad[302, 7] = -np.inf
    Store(root / "dirty").write_rows(acts_name(0), 0, bad)
    return root, x, bad, root / "models/topk/layer0/dim32/best"


def test_discovery_skips_nonfinite_rows_says_how_many_and_describes_the_rest(dirty, capsys):
    root, x, _, sae_path = dirty
    out = root / "results" / "features_layer0.json"
    discover(["--sae_path", str(sae_path), "--store", str(root / "dirty"), "--output", str(out), "--aggregation",
              "moments", "--no_filter", "--max_features", "32", "--examples", "4", "--all", "--no-progress"])
    printed = capsys.readouterr().out
    assert (f"skipped {len(BAD_ROWS)} non-finite (NaN/Inf) rows of layer 0 of {root / 'dirty'} (first: row 45); "
            f"the features describe the other {len(x) - len(BAD_ROWS)} rows") in printed
    files = FeatureFiles(out)
    summary = _strict(files.summary.read_text())
    features = _strict(files.features.read_text())
    assert summary["nonfinite_rows"] == len(BAD_ROWS) and summary["first_nonfinite_row"] == 45
    assert summary["samples_without_finite_rows"] == 1 and summary["rows"] == len(x)
    assert features, "the good rows still have features"
    for info in features.values():
        for ex in info["top_examples"]:
            assert ex["row"] not in BAD_ROWS and ex["sample_index"] != 5, "an example from a skipped row"

    # the statistics are exactly those of the finite rows
    good = np.setdiff1d(np.arange(len(x)), BAD_ROWS)
    f = np.asarray(jax_sae.load(sae_path).encode(x[good]))
    stats = files.read_all_stats()
    np.testing.assert_array_equal(stats["token_count"], (f > 0).sum(0))
    np.testing.assert_allclose(stats["max"], f.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["frequency"], (f > 0).mean(0), rtol=1e-6)
    for key, info in features.items():
        assert info["frequency"] == pytest.approx((f[:, int(key)] > 0).mean(), rel=1e-6)


def test_sample_scores_come_from_the_finite_rows_alone(dirty):
    root, x, _, sae_path = dirty
    sae = jax_sae.load(sae_path)
    result = feature_pass(sae, open_store(root / "dirty"), 0, examples=4, progress=False)
    np.testing.assert_array_equal(result.nonfinite_rows, BAD_ROWS)
    assert result.finite_rows_per_sample[1] == ROWS_PER_SAMPLE - 1 and result.finite_rows_per_sample[5] == 0
    finite_of_sample_1 = np.delete(x[40:80], 45 - 40, axis=0)
    f1 = np.asarray(sae.encode(finite_of_sample_1))
    np.testing.assert_allclose(result.sample_mean.dense()[1], f1.mean(0), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(result.sample_max.dense()[1], f1.max(0), rtol=2e-3, atol=2e-3)
    assert not result.sample_max.dense()[5].any(), "a sample with no finite row scores nothing"


def test_a_layer_with_no_finite_row_stops_with_one_line(dirty, tmp_path):
    _, _, _, sae_path = dirty
    write_store(tmp_path / "broken", np.full((80, 32), np.nan, np.float32), rows_per_sample=40)
    with pytest.raises(SystemExit) as exc:
        discover(["--sae_path", str(sae_path), "--store", str(tmp_path / "broken"), "--output",
                  str(tmp_path / "f.json"), "--no-progress"])
    assert exc.value.code == 2 and "\n" not in str(exc.value)
    assert f"every row of layer 0 of {tmp_path / 'broken'} is non-finite (NaN/Inf)" in str(exc.value)
    assert "re-extract the store" in str(exc.value) and not (tmp_path / "f.json").exists()


def test_the_report_draws_nonfinite_rows_as_gaps_and_never_centres_on_them(dirty, capsys):
    root, _, bad, sae_path = dirty
    features = root / "results" / "features_layer0.json"
    if not features.exists():
        discover(["--sae_path", str(sae_path), "--store", str(root / "dirty"), "--output", str(features),
                  "--no_filter", "--max_features", "3", "--examples", "4", "--no-progress"])
    found = FeatureFiles(features).read_features()
    key = next(iter(found))
    # sample-level examples of the two samples with one broken row each: the window centres on the peak
    shown = [{"activation": 1.0, "prompt": "p", "type": "sample-level", "aggregation": "max", "sample_index": s,
              "source_id": f"p{s}", "tags": []} for s in (1, 2)]
    hand = root / "results" / "hand.json"
    FeatureFiles(hand).write({key: found[key] | {"top_examples": shown}},
                             FeatureFiles(features).read_summary())
    capsys.readouterr()
    report(["--features", str(hand), "--out", str(root / "report"), "--examples", "2", "--window", "0.5",
            "--no-audio", "--no-progress"])
    assert ("report: 2 non-finite (NaN/Inf) rows of layer 0 in 2 of the shown samples are gaps in their "
            "activation curves") in capsys.readouterr().out
    sae = jax_sae.load(sae_path)
    page = (root / "report" / f"f{key}.html").read_text()
    for sample in (1, 2):
        rows = bad[sample * ROWS_PER_SAMPLE:(sample + 1) * ROWS_PER_SAMPLE]
        finite = np.isfinite(rows).all(axis=1)
        curve = np.asarray(sae.encode(np.where(finite[:, None], rows, 0)))[:, int(key)]
        peak = int(np.argmax(np.where(finite, curve, -np.inf)))
        first, last = max(0, peak - 12), min(ROWS_PER_SAMPLE, peak + 12)
        assert f"sample {sample}, {first / 50:.2f}-{last / 50:.2f} s)" in page
    assert len(list((root / "report" / "plots").glob(f"f{key}_e*.png"))) == 2


def _tiny_random_store(path, n_samples: int = 3, frames: int = 20):
    """A complete store for tiny-random (4 codebooks of 64 codes, width 64, layer 2) with random codes
    and activations: spliced evaluation reads the codes, the prompts and layer 2's mean."""
    rng = np.random.default_rng(0)
    n_rows = n_samples * frames
    meta = StoreMeta(model="tiny-random", layers=(2,), d_model=64, n_codebooks=4, frame_rate=50.0,
                     sampling_rate=32000, dtype="float32", mode="teacher_forced", n_samples=n_samples, n_rows=n_rows,
                     n_units=1)
    samples = [{"prompt": prompt, "source_id": f"t{i}", "tags": [], "n_frames": frames}
               for i, prompt in enumerate(["a slow sad jazz piano", "fast energetic rock drums", "calm folk guitar"])]
    store = create_store(path, meta, samples[:n_samples], [frames] * n_samples,
                         codes=rng.integers(0, 64, size=(n_rows, 4)))
    x = rng.normal(size=(n_rows, 64)).astype(np.float32)
    store.write_rows(acts_name(2), 0, x)
    store.commit_unit(0, "shard-0-of-1")
    return x


def test_evaluation_leaves_nonfinite_rows_out_of_the_ablation_mean(tmp_path, capsys):
    from extractor.evaluate import _layer_mean
    from extractor.evaluate import main as evaluate

    from .test_torch_side import _sae

    x = _tiny_random_store(tmp_path / "store")
    store = open_store(tmp_path / "store")
    store.write_rows(acts_name(2), 3, np.full((1, 64), np.nan, np.float32))
    mean, skipped = _layer_mean(store, 2, 64)
    np.testing.assert_array_equal(skipped, [3])
    np.testing.assert_allclose(mean, np.delete(x, 3, axis=0).mean(0), rtol=1e-5, atol=1e-6)

    out = tmp_path / "eval.json"
    capsys.readouterr()
    evaluate(["--model", "tiny-random", "--sae", str(_sae(tmp_path / "exact.pt", "exact")), "--store",
              str(tmp_path / "store"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert (f"mean ablation: skipped 1 non-finite (NaN/Inf) rows of layer 2 of {tmp_path / 'store'} (first: row 3); "
            f"the mean is over the other {len(x) - 1} rows") in capsys.readouterr().out
    result = _strict(out.read_text())
    assert result["mean_ablation_nonfinite_rows"] == 1
    overall = result["overall"]
    assert overall["ce_mean"] is not None and "notes" not in overall, "a NaN row must not make the mean NaN"
    assert overall["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-2), "the exact SAE recovers everything"

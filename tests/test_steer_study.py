"""The steering study on tiny-random with tiny-random-clap: every output generated, scored and
judged, resumable seed by seed, and bad input refused before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="steering runs on the torch side (pip install -e .[torch])")

from extractor.torch_sae import save_torch_export  # noqa: E402

from . import test_torch_side  # noqa: E402

store = test_torch_side.store  # the module's tiny-random store (4 prompts, 0.6 s), as this module's fixture

D = 64  # tiny-random's decoder width


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("steerstudy")
    rng = np.random.default_rng(0)
    W = rng.normal(size=(16, D))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    save_torch_export(root / "sae.pt", {"sae_type": "topk", "d_model": D, "hidden_dim": 16, "top_k": 4, "layer": 3,
                                        "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0,
                                        "group_sizes": []},
                      {"W_enc": W.T, "b_enc": np.zeros(16), "W_dec": W, "b_dec": np.zeros(D)})
    features = {"2": {"label": "calm piano", "top_examples": [], "max_activation": 3.0},
                "9": {"label": "loud rock drums", "top_examples": [], "max_activation": 5.0}}
    (root / "features.json").write_text(json.dumps(features))
    return root


def _args(root, *extra):
    return ["--model", "tiny-random", "--sae", str(root / "sae.pt"), "--features", str(root / "features.json"),
            "--clap", "tiny-random-clap", "--strengths", "1,4", "--controls", "4", "--duration", "0.3",
            "--batch_size", "8", "--out", str(root / "out"), "--device", "cpu", "--no-progress", *extra]


def test_every_output_is_scored_judged_and_resumable(inputs, capsys):
    from discovery.steerability import judge
    from extractor.steer_study import main

    main(_args(inputs, "--seeds", "2"))
    report = json.loads((inputs / "out" / "steering.json").read_text())
    rows = 1 + 2 * 2 + 4 * 2  # unsteered, 2 features x 2 strengths, 4 controls x 2 strengths
    assert report["outputs"] == 2 * rows and report["resumed_seeds"] == 0
    assert sorted(report["features"]) == ["2", "9"] and report["fraction"]["of"] == 2
    assert report["controls_false_calls"]["of"] == 2 * 4, "each control judged against the other three, per label"
    assert report["push_norm"] == pytest.approx(4.0)  # the median of 3 x |d_2| and 5 x |d_9| (unit rows)
    feature = report["features"]["2"]
    assert len(feature["steered_mean"]) == 2 and feature["label"] == "calm piano"
    assert (inputs / "out" / feature["clip"]).stat().st_size > 100
    assert len(list((inputs / "out" / "clips").iterdir())) == 2 * rows
    assert "features positively steerable" in capsys.readouterr().out

    main(_args(inputs, "--seeds", "3"))  # one more seed: only its outputs are generated
    more = json.loads((inputs / "out" / "steering.json").read_text())
    assert more["resumed_seeds"] == 2 and more["outputs"] == 3 * rows
    main(_args(inputs, "--seeds", "3", "--margin", "0.5"))  # the decision's settings reuse every output
    strict = json.loads((inputs / "out" / "steering.json").read_text())
    assert strict["resumed_seeds"] == 3 and strict["fraction"]["steerable"] == 0
    for key in ("2", "9"):
        assert strict["features"][key]["steered_mean"] == more["features"][key]["steered_mean"]

    from extractor.clap import Clap
    from extractor.steer_study import SteerStudyConfig, make_plan, read_features
    from extractor.torch_sae import TorchSAE

    cfg = SteerStudyConfig(sae=str(inputs / "sae.pt"), features=str(inputs / "features.json"),
                           strengths=(1.0, 4.0), seeds=3, controls=4, clap="tiny-random-clap", duration=0.3)
    plan = make_plan(cfg, TorchSAE.from_pretrained(cfg.sae), *read_features(cfg, 16))
    seeds = sorted((inputs / "out" / "seeds").glob("seed*.npy"))
    audio = np.stack([np.load(p) for p in seeds])
    text = Clap.load("tiny-random-clap", "cpu").texts(plan.labels)
    sims = audio.astype(np.float64) @ text[0].astype(np.float64)  # feature 2's label, [seeds, rows]
    steered = np.stack([sims[:, 1 + a] for a in range(2)])
    controls = np.stack([np.stack([sims[:, 1 + 4 + 2 * c + a] for a in range(2)]) for c in range(4)])
    verdict = judge(steered, controls)
    assert more["features"]["2"]["p_value"] == pytest.approx(verdict.p_value, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--controls", "2"], "--controls must be at least 3"),
    (["--feature_ids", "2,5"], "features [5] are not in"),
    (["--strengths", "0"], "--strengths takes positive push sizes"),
])
def test_bad_input_is_one_line_before_any_model_loads(inputs, extra, message):
    from extractor.steer_study import main

    with pytest.raises(SystemExit) as exc:
        main(_args(inputs, "--out", str(inputs / "bad"), *extra))
    assert message in str(exc.value) and not (inputs / "bad").exists()


def test_outputs_are_also_scored_against_the_top_clips(inputs, store, tmp_path):
    """--store: each feature's target is also the CLAP audio of its top clips (the study's criterion)."""
    from extractor.steer_study import main

    store = store / "store"
    clips = {"2": {"label": "calm piano", "top_examples": [{"sample_index": 0}, {"sample_index": 2}],
                   "max_activation": 3.0},
             "9": {"label": "loud rock drums", "top_examples": [{"sample_index": 3}], "max_activation": 5.0}}
    (tmp_path / "clips.json").write_text(json.dumps(clips))
    args = _args(inputs, "--seeds", "2", "--store", str(store), "--out", str(tmp_path / "out"), "--features",
                 str(tmp_path / "clips.json"))
    main(args)
    report = json.loads((tmp_path / "out" / "steering.json").read_text())
    by_clips = report["by_top_clips"]
    assert by_clips["fraction"]["of"] == 2 and sorted(by_clips["features"]) == ["2", "9"]
    assert by_clips["features"]["2"]["steered_mean"] != report["features"]["2"]["steered_mean"]

    with pytest.raises(SystemExit) as exc:  # features without top clips: refused before anything is generated
        main(_args(inputs, "--seeds", "2", "--store", str(store), "--out", str(tmp_path / "none")))
    assert "have no top examples with a sample_index" in str(exc.value) and not (tmp_path / "none").exists()



def test_another_sae_at_the_same_path_starts_afresh(inputs, tmp_path):
    """Scored seeds are kept for the pushes that made them: a retrained SAE exported to the same
    path (or other max activations) generates again instead of reusing them."""
    import shutil

    from extractor.steer_study import main

    shutil.copy(inputs / "sae.pt", tmp_path / "sae.pt")
    args = ["--model", "tiny-random", "--sae", str(tmp_path / "sae.pt"), "--features", str(inputs / "features.json"),
            "--clap", "tiny-random-clap", "--strengths", "1", "--controls", "3", "--seeds", "2", "--duration", "0.3",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--audio_format", "none"]
    main(args)
    main(args)
    assert json.loads((tmp_path / "out" / "steering.json").read_text())["resumed_seeds"] == 2
    rng = np.random.default_rng(1)
    W = rng.normal(size=(16, D))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    save_torch_export(tmp_path / "sae.pt", {"sae_type": "topk", "d_model": D, "hidden_dim": 16, "top_k": 4, "layer": 3,
                                            "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0,
                                            "group_sizes": []},
                      {"W_enc": W.T, "b_enc": np.zeros(16), "W_dec": W, "b_dec": np.zeros(D)})
    main(args)
    assert json.loads((tmp_path / "out" / "steering.json").read_text())["resumed_seeds"] == 0

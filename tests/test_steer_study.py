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
    W = np.eye(16, D)
    save_torch_export(tmp_path / "sae.pt", {"sae_type": "topk", "d_model": D, "hidden_dim": 16, "top_k": 4,
                                            "layer": 2, "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0,
                                            "group_sizes": []},  # the store's layer
                      {"W_enc": W.T, "b_enc": np.zeros(16), "W_dec": W, "b_dec": np.zeros(D)})
    args = _args(inputs, "--seeds", "2", "--store", str(store), "--out", str(tmp_path / "out"), "--features",
                 str(tmp_path / "clips.json"), "--sae", str(tmp_path / "sae.pt"))
    main(args)
    report = json.loads((tmp_path / "out" / "steering.json").read_text())
    by_clips = report["by_top_clips"]
    assert by_clips["fraction"]["of"] == 2 and sorted(by_clips["features"]) == ["2", "9"]
    assert by_clips["features"]["2"]["steered_mean"] != report["features"]["2"]["steered_mean"]
    assert report["by_tag_probe"]["fraction"]["of"] == 0, "no feature here has an aligned tag to probe"
    assert report["by_tag_probe"]["skipped"] == {f: "no aligned tag in the features JSON" for f in ("2", "9")}

    with pytest.raises(SystemExit) as exc:  # features without top clips: refused before anything is generated
        main(_args(inputs, "--seeds", "2", "--store", str(store), "--out", str(tmp_path / "none")))
    assert "have no top examples with a sample_index" in str(exc.value) and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as exc:  # an SAE of another layer than the store's: refused before generation
        main(_args(inputs, "--seeds", "2", "--store", str(store), "--out", str(tmp_path / "other"), "--features",
                   str(tmp_path / "clips.json")))
    assert "not the steered layer 3" in str(exc.value) and not (tmp_path / "other").exists()



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


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store where half the samples were generated with a push that really changes the music
    (along the LM heads' rows for code 5, at the last layer: about 60% of the codes become 5) and
    are tagged "planted", the other half generated plainly; activations read back by the unsteered
    model. An SAE whose feature 0 is that push, and whose features 1-3 are random directions."""
    import torch

    from extractor.capture import generate_batch, layer_hook, teacher_forced_batch
    from extractor.models import load_model
    from sae_core.store import StoreMeta, acts_name, create_store

    root = tmp_path_factory.mktemp("planted")
    loaded = load_model("tiny-random", "cpu", "float32")
    layer, frames, prompt = loaded.info.num_layers - 1, 15, "Simple melody"
    heads = torch.stack([head.weight[5].detach() for head in loaded.model.decoder.lm_heads]).sum(dim=0)
    push = heads / heads.norm()
    n = 48  # one batch: the first half pushed (conditional rows), the second plain

    def add(hidden, _start):
        new = hidden.clone()
        new[: n // 2] = hidden[: n // 2] + 16.0 * push
        return new

    with layer_hook(loaded, layer, add):
        out = generate_batch(loaded, [prompt] * n, frames, [], guidance_scale=3.0, top_k=250, temperature=1.0, seed=0)
    codes, tags = list(out.codes), [["planted"]] * (n // 2) + [["plain"]] * (n // 2)
    acts = np.concatenate(teacher_forced_batch(loaded, [prompt] * n, codes, [layer])[layer])
    meta = StoreMeta(model="tiny-random", layers=(layer,), d_model=D, n_codebooks=loaded.info.num_codebooks,
                     frame_rate=float(loaded.info.frame_rate), sampling_rate=loaded.info.sampling_rate,
                     dtype="float32", mode="generate", n_samples=n, n_rows=n * frames, n_units=1)
    samples = [{"index": i, "prompt": prompt, "source_id": f"planted-{i}", "tags": tags[i], "n_frames": frames}
               for i in range(n)]
    store = create_store(root / "store", meta, samples, [frames] * n, codes=np.concatenate(codes))
    store.write_rows(acts_name(layer), 0, acts)
    store.commit_unit(0, "shard-0-of-1")
    rng = np.random.default_rng(3)
    W = np.concatenate([push.numpy()[None], rng.normal(size=(3, D))])
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    save_torch_export(root / "sae.pt", {"sae_type": "topk", "d_model": D, "hidden_dim": 4, "top_k": 2, "layer": layer,
                                        "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0,
                                        "group_sizes": []},
                      {"W_enc": W.T, "b_enc": np.zeros(4), "W_dec": W, "b_dec": np.zeros(D)})
    tops = [{"sample_index": i} for i in range(n) if tags[i] == ["planted"]][:10]
    features = {str(f): {"label": "planted", "top_examples": tops, "max_activation": 16.0,
                         "aligned_tags": [{"tag": "planted", "auroc": 1.0, "ap": 1.0}]} for f in range(4)}
    (root / "features.json").write_text(json.dumps(features))
    return root


def test_a_push_that_changes_the_music_is_steerable_and_random_ones_are_not(planted):
    """The generation-level planted case, judged by the tag probe on MusicGen's own activations:
    the planted push raises the "planted" probe's score far beyond the controls; random directions
    of the same norm do not."""
    from extractor.steer_study import main

    main(["--model", "tiny-random", "--sae", str(planted / "sae.pt"), "--features", str(planted / "features.json"),
          "--store", str(planted / "store"), "--clap", "tiny-random-clap", "--strengths", "1", "--seeds", "3",
          "--controls", "6", "--duration", "0.3", "--batch_size", "16", "--out", str(planted / "out"),
          "--device", "cpu", "--no-progress", "--audio_format", "none"])
    report = json.loads((planted / "out" / "steering.json").read_text())
    probe = report["by_tag_probe"]
    assert probe["features"]["0"]["probe_heldout_auroc"] > 0.9 and probe["features"]["0"]["tag"] == "planted"
    # Here: the planted push's effect is 5.2 times the controls' spread (t), p = 0.002; the random features'
    # t are -2.3 to 0.0, where 2.0 would call one steerable: the verdicts do not hang on a sampled code.
    assert probe["features"]["0"]["steerable"] and probe["features"]["0"]["effect"] > 0
    assert not any(probe["features"][f]["steerable"] for f in ("1", "2", "3"))

"""Spliced-in evaluation, steering and output effects on tiny-random."""

import json

import numpy as np
import pytest
import torch

from extractor.extract import ExtractConfig, extract
from extractor.torch_sae import save_torch_export

D = 64  # tiny-random's decoder width


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchside")
    (root / "p.txt").write_text("a slow sad jazz piano\nfast energetic rock drums\ncalm folk guitar\nhip hop beat\n")
    extract(ExtractConfig(model="tiny-random", layers="2", prompt_file=str(root / "p.txt"), batch_size=4,
                          duration=0.6, out=str(root / "store"), device="cpu", dtype="float32", top_k=50))
    return root


def _sae(path, kind, d=D, layer=2, model="tiny-random"):
    """An exported SAE of width ``d``: 'exact' reconstructs its input bit for bit, 'random' is a TopK on
    random unit directions."""
    if kind == "exact":  # relu(x + 100) - 100 == x: a lossless SAE
        arrays = {"W_enc": np.eye(d), "b_enc": np.zeros(d), "W_dec": np.eye(d), "b_dec": np.full(d, -100.0)}
        config = {"sae_type": "vanilla", "d_model": d, "hidden_dim": d}
    else:
        rng = np.random.default_rng(0)
        W = rng.normal(size=(256, d))
        W /= np.linalg.norm(W, axis=1, keepdims=True)
        arrays = {"W_enc": W.T, "b_enc": np.zeros(256), "W_dec": W, "b_dec": np.zeros(d)}
        config = {"sae_type": "topk", "d_model": d, "hidden_dim": 256, "top_k": 4}
    save_torch_export(path, {**config, "layer": layer, "model": model, "threshold": 0.0, "input_scale": 1.0,
                             "top_k": config.get("top_k", 4), "group_sizes": []}, arrays)
    return path


def test_spliced_evaluation_recovers_all_with_an_exact_sae_and_less_with_a_random_one(store):
    from extractor.evaluate import main

    results = {}
    for kind in ("exact", "random"):
        out = store / f"{kind}.json"
        main(["--model", "tiny-random", "--sae", str(_sae(store / f"{kind}.pt", kind)), "--store",
              str(store / "store"), "--out", str(out), "--device", "cpu", "--batch_size", "3", "--no-progress"])
        results[kind] = json.loads(out.read_text())
    exact, rand = results["exact"]["overall"], results["random"]["overall"]
    assert exact["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-3)
    assert exact["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-2)
    assert exact["kl_sae"] < 1e-6 and exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    # seeded model, store and SAE: 0.336 against zeroing the layer, -2.39 against its mean (README, section 7)
    assert rand["loss_recovered_zero"] == pytest.approx(0.34, abs=0.05) and rand["kl_sae"] > 0.1
    assert rand["loss_recovered_mean"] < 0, "a random SAE should cost more than replacing the layer by its mean"
    assert len(results["exact"]["per_codebook"]) == 4 and results["exact"]["predictions"] > 0


def test_width_mismatch_is_refused(store, tmp_path):
    from extractor.evaluate import main

    arrays = {"W_enc": np.eye(8), "b_enc": np.zeros(8), "W_dec": np.eye(8), "b_dec": np.zeros(8)}
    save_torch_export(tmp_path / "narrow.pt", {"sae_type": "vanilla", "d_model": 8, "hidden_dim": 8, "layer": 2,
                                               "threshold": 0.0, "input_scale": 1.0}, arrays)
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--sae", str(tmp_path / "narrow.pt"), "--store", str(store / "store"),
              "--out", str(tmp_path / "e.json"), "--device", "cpu"])
    assert "the SAE is 8 wide but layer 2 of tiny-random is 64" in str(exc.value)


def test_steering_raises_the_feature_and_the_control_does_not(store, tmp_path):
    from extractor.steer import main

    sae = _sae(tmp_path / "random.pt", "random")
    main(["--model", "tiny-random", "--sae", str(sae), "--feature", "5", "--strength", "3", "--prompt",
          "calm folk guitar", "--duration", "0.6", "--out", str(tmp_path / "steer"), "--device", "cpu",
          "--top_k", "50", "--start", "0.2"])
    report = json.loads((tmp_path / "steer" / "steer.json").read_text())
    runs = report["runs"]
    assert runs["steered"]["feature_mean_activation"] > runs["unsteered"]["feature_mean_activation"] + 0.5
    assert abs(runs["control"]["feature_mean_activation"] - runs["unsteered"]["feature_mean_activation"]) < \
        0.25 * (runs["steered"]["feature_mean_activation"] - runs["unsteered"]["feature_mean_activation"])
    for name in ("steered", "unsteered", "control"):
        assert (tmp_path / "steer" / f"{name}.wav").stat().st_size > 1000
    assert report["window_seconds"] == [0.2, 0.6]


def test_steering_rejects_a_feature_out_of_range(store, tmp_path):
    from extractor.steer import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-random", "--sae", str(_sae(tmp_path / "r.pt", "random")), "--feature", "256",
              "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert "feature 256 is out of range: the SAE has 256 features (0-255)" in str(exc.value)


def test_output_effects_rank_the_codes_a_direction_writes_toward(tiny_model):
    """A direction built from head k's row for code j (through the final norm's gain) promotes j in
    codebook k above every other code, and its negation suppresses j; the model's own logits agree
    on the sign when the direction is added to a real final hidden state."""
    from extractor.effects import logit_effects

    heads = [h.weight.detach() for h in tiny_model.model.decoder.lm_heads]
    gain = tiny_model.decoder.layer_norm.weight.detach()
    k, j = 2, 17
    direction = (heads[k][j] / gain).numpy()
    effects = logit_effects(gain, heads, np.stack([direction, -direction]), top=5)
    assert [e.codebook for e in effects[0]] == list(range(len(heads)))
    assert effects[0][k].promoted[0][0] == j and effects[1][k].suppressed[0][0] == j
    values = [v for _, v in effects[0][k].promoted]
    assert values == sorted(values, reverse=True) and all(v < 0 for _, v in effects[0][k].suppressed)
    h = torch.randn(64, generator=torch.Generator().manual_seed(0))
    before = tiny_model.model.decoder.lm_heads[k](tiny_model.decoder.layer_norm(h))
    after = tiny_model.model.decoder.lm_heads[k](tiny_model.decoder.layer_norm(h + 0.5 * torch.as_tensor(direction)))
    assert int(torch.argmax(after - before)) == j

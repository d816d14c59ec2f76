"""Export to torch and SAELens formats, loading back, and torch/JAX parity for every SAE type."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from packaging.version import Version
from safetensors.numpy import load_file, save_file

import jax_sae
from sae_core.formats import SAEFormatError
from extractor.torch_sae import TorchSAE, save_torch_export
from jax_sae import model as M
from jax_sae.checkpoint import model_tree, save_model
from jax_sae.config import SAEConfig
from jax_sae.export import main

TYPES = ["vanilla", "topk", "batch_topk", "matryoshka", "jumprelu"]


def _checkpoint(tmp_path, sae_type, d=24, h=96):
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=8, layer=2, model="tiny-random",
                    group_sizes=(32, 64) if sae_type == "matryoshka" else ())
    rng = np.random.default_rng(0)
    params = M.init_params(jax.random.PRNGKey(1), cfg, rng.normal(size=d).astype(np.float32))
    params = params.replace(W_enc_DH=params.W_enc_DH + 0.05 * rng.normal(size=(d, h)).astype(np.float32),
                            b_enc_H=0.1 * rng.normal(size=h).astype(np.float32))
    path = tmp_path / sae_type / "best"
    threshold = rng.uniform(0.1, 0.6, size=h).astype(np.float32) if sae_type == "jumprelu" else 0.3  # one per latent
    save_model(path, cfg, model_tree(params, threshold, 0.37), {"step": 5})
    return path


def _x(d=24, n=64):
    return (np.random.default_rng(7).normal(size=(n, d)) * 3 + 0.5).astype(np.float32)


@pytest.mark.parametrize("sae_type", TYPES)
def test_round_trips_and_torch_parity(tmp_path, sae_type):
    ckpt = _checkpoint(tmp_path, sae_type)
    ours = jax_sae.load(ckpt)
    x = _x()
    main(["--checkpoint", str(ckpt), "--format", "torch", "--out", str(tmp_path / "sae.pt")])
    main(["--checkpoint", str(ckpt), "--format", "saelens", "--out", str(tmp_path / "lens")])

    raw = torch.load(tmp_path / "sae.pt", weights_only=True)
    assert raw["config"]["sae_type"] == sae_type and raw["config"]["input_scale"] == pytest.approx(0.37)
    assert {"layer", "model", "threshold", "hidden_dim", "group_sizes", "top_k", "store"} <= set(raw["config"])

    back = jax_sae.load(tmp_path / "sae.pt")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_array_equal(np.asarray(getattr(back.params, name)), np.asarray(getattr(ours.params, name)))
    assert back.cfg == ours.cfg
    np.testing.assert_array_equal(np.asarray(back.threshold), np.asarray(ours.threshold))
    assert np.asarray(ours.threshold).shape == ((96,) if sae_type == "jumprelu" else ())

    lens = jax_sae.load(tmp_path / "lens")
    np.testing.assert_allclose(np.asarray(lens.encode(x)), np.asarray(ours.encode(x)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lens(x)), np.asarray(ours(x)), atol=1e-5, rtol=1e-5)

    for path in (tmp_path / "sae.pt", tmp_path / "lens"):
        sae = TorchSAE.from_pretrained(path)
        f = sae.encode(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(f, np.asarray(ours.encode(x)), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(sae.decode(torch.from_numpy(f)).numpy(), np.asarray(ours.decode(f)), atol=1e-5,
                                   rtol=1e-5)
        np.testing.assert_allclose(sae(torch.from_numpy(x)).numpy(), np.asarray(ours(x)), atol=1e-5, rtol=1e-5)
    assert int((f > 0).sum(1).max()) > 0


def test_bad_files_are_refused_clearly(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": Evil()}, evil)
    with pytest.raises(SAEFormatError, match="refusing a pickle that needs code execution"):
        TorchSAE.from_pretrained(evil)
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"config": {}, "state_dict": Evil()}))
    with pytest.raises(SAEFormatError):
        TorchSAE.from_pretrained(tmp_path / "raw.pt")
    torch.save({"config": {"x": 1}, "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SAEFormatError, match="lacks tensors"):
        TorchSAE.from_pretrained(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SAEFormatError, match="not a torch SAE export"):
        TorchSAE.from_pretrained(tmp_path / "notes.txt")
    ckpt = _checkpoint(tmp_path, "topk")
    with pytest.raises(SAEFormatError, match="export it first"):
        TorchSAE.from_pretrained(ckpt)


@pytest.mark.parametrize("damage", ["unfinished", "corrupt"])
def test_exporting_a_broken_checkpoint_is_one_line(tmp_path, damage):
    ckpt = _checkpoint(tmp_path, "topk")
    if damage == "unfinished":
        (ckpt / "config.json").unlink()
    else:
        for f in (ckpt / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 100:
                f.write_bytes(b"\0" * 10)
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(ckpt), "--format", "torch", "--out", str(tmp_path / "x.pt")])
    text = str(exc.value)
    assert text.startswith("error: ") and "\n" not in text and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("sae_type,architecture", [("vanilla", "standard"), ("topk", "topk"),
                                                   ("matryoshka", "jumprelu"), ("jumprelu", "jumprelu")])
def test_saelens_cfg_holds_what_saelens_6_reads(tmp_path, sae_type, architecture):
    ckpt = _checkpoint(tmp_path, sae_type)
    main(["--checkpoint", str(ckpt), "--format", "saelens", "--out", str(tmp_path / "lens")])
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    # SAELens 6 rewrites (and strips the metadata of) any config older than 6.0.0-rc.0 or unversioned.
    assert Version(cfg["metadata"]["sae_lens_version"]) >= Version("6.0.0-rc.0")
    assert cfg["reshape_activations"] == "none" and cfg["normalize_activations"] == "none"
    assert cfg["architecture"] == architecture and (cfg["d_in"], cfg["d_sae"]) == (24, 96)
    assert cfg.get("k") == (8 if sae_type == "topk" else None)
    assert cfg["metadata"]["sae_music_jax"]["input_scale_folded"] == pytest.approx(0.37)
    weights = load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (24, 96) and weights["W_dec"].shape == (96, 24)
    assert ("threshold" in weights) == (architecture == "jumprelu")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_a_wrong_shaped_tensor_is_refused_naming_it(tmp_path):
    config = {"sae_type": "vanilla", "d_model": 4, "hidden_dim": 8, "threshold": 0.0, "input_scale": 1.0}
    good = {"W_enc": np.ones((4, 8)), "b_enc": np.zeros(8), "W_dec": np.ones((8, 4)), "b_dec": np.zeros(4)}
    with pytest.raises(SAEFormatError, match=r"tensor W_dec has shape \(4, 8\), expected \(8, 4\)"):
        save_torch_export(tmp_path / "bad.pt", config, {**good, "W_dec": np.ones((4, 8))})
    assert list(tmp_path.iterdir()) == []  # nothing half-written

    torch.save({"config": config, "state_dict": {k: torch.from_numpy(v).float() for k, v in
                                                {**good, "b_enc": np.zeros(7)}.items()}}, tmp_path / "hand.pt")
    with pytest.raises(SAEFormatError, match=r"hand\.pt: tensor b_enc has shape \(7,\), expected \(8,\)"):
        TorchSAE.from_pretrained(tmp_path / "hand.pt")

    ckpt = _checkpoint(tmp_path, "batch_topk")
    lens = tmp_path / "lens"
    main(["--checkpoint", str(ckpt), "--format", "saelens", "--out", str(lens)])
    weights = load_file(lens / "sae_weights.safetensors")
    save_file({**weights, "threshold": weights["threshold"][:-1].copy()}, lens / "sae_weights.safetensors")
    for load in (jax_sae.load, TorchSAE.from_pretrained):
        with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: tensor threshold has shape \(95,\)"):
            load(lens)


@pytest.mark.parametrize("change,problem", [
    ({"architecture": "gated"}, "SAELens architecture 'gated' is not supported"),
    ({"architecture": "topk", "k": None}, "a topk SAE needs k"),
    ({"d_sae": "96"}, "d_sae must be a positive integer"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
])
def test_a_saelens_cfg_we_cannot_read_right_is_refused_naming_the_file(tmp_path, change, problem):
    ckpt = _checkpoint(tmp_path, "topk")
    lens = tmp_path / "lens"
    main(["--checkpoint", str(ckpt), "--format", "saelens", "--out", str(lens)])
    cfg = json.loads((lens / "cfg.json").read_text())
    (lens / "cfg.json").write_text(json.dumps({**cfg, **change}))
    for load in (jax_sae.load, TorchSAE.from_pretrained):
        with pytest.raises(SAEFormatError, match="cfg.json: " + problem):
            load(lens)
    (lens / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json: not valid JSON"):
        jax_sae.load(lens)


def test_the_jax_side_imports_no_torch():
    probe = ("import importlib, pkgutil, sys, jax_sae\n"
             "for m in pkgutil.iter_modules(jax_sae.__path__):\n"
             "    importlib.import_module('jax_sae.' + m.name)\n"
             "import sae_core.formats, sae_core.files\n"
             "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers'))\n"
             "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], check=False,
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

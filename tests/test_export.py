"""Export to torch and SAELens formats, loading back, and torch/JAX parity for every SAE type."""

import pickle

import jax
import numpy as np
import pytest
import torch

import jax_sae
from extractor.saelens import SAEFormatError
from extractor.torch_sae import TorchSAE
from jax_sae import model as M
from jax_sae.checkpoint import model_tree, save_model
from jax_sae.config import SAEConfig
from jax_sae.export import main

TYPES = ["vanilla", "topk", "batch_topk", "matryoshka"]


def _checkpoint(tmp_path, sae_type, d=24, h=96):
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=8, layer=2, model="tiny-random",
                    group_sizes=(32, 64) if sae_type == "matryoshka" else ())
    rng = np.random.default_rng(0)
    params = M.init_params(jax.random.PRNGKey(1), cfg, rng.normal(size=d).astype(np.float32))
    params = params.replace(W_enc_DH=params.W_enc_DH + 0.05 * rng.normal(size=(d, h)).astype(np.float32),
                            b_enc_H=0.1 * rng.normal(size=h).astype(np.float32))
    path = tmp_path / sae_type / "best"
    save_model(path, cfg, model_tree(params, 0.3, 0.37), {"step": 5})
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
    assert back.cfg == ours.cfg and float(back.threshold) == float(ours.threshold)

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
    text = str(exc.value.code)
    assert text.startswith("error: ") and "\n" not in text and not (tmp_path / "x.pt").exists()

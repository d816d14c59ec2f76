"""Transcoders: MusicGen's MLP output predicted from its input through a sparse dictionary. The
loss equals autodiff of the definition written out on every mesh; each sparse type recovers a
planted MLP; exports load back (torch, SAELens) with the same outputs; spliced in, the
transcoder replaces the MLP's output and nothing else."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sae
from jax_sae import model as M
from jax_sae.config import SAEConfig
from jax_sae.forward import LossSettings, sharded_loss_and_grads
from jax_sae.sharding import make_mesh
from jax_sae.train import TrainConfig, main, train
from sae_core.errors import UsageError

from .synthetic import mean_max_cosine, planted_mlp, write_store

D, F = 32, 64  # planted MLP width and features


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder")
    x, y, out_directions = planted_mlp(D, F, 24_000, active=3.0, seed=0)
    write_store(root / "store", x, mlp={0: (x, y)})
    return root, x, y, out_directions


def _cfg(root, sae_type, transcoder, **kw):
    settings = dict(store=str(root / "store"), layer_idx=0, out=str(root / "runs"), sae_type=sae_type,
                    hidden_dim=128, top_k=4, transcoder=transcoder, epochs=12, batch_size=512, progress=False)
    return TrainConfig.of(**(settings | kw))


@pytest.mark.parametrize("sae_type, transcoder", [  # every type: python -m bench.transcoder_bench
    ("batch_topk", "plain"),
    pytest.param("batch_topk", "skip", marks=pytest.mark.slow), pytest.param("jumprelu", "plain", marks=pytest.mark.slow),
    pytest.param("topk", "plain", marks=pytest.mark.slow), pytest.param("matryoshka", "plain", marks=pytest.mark.slow),
    pytest.param("vanilla", "plain", marks=pytest.mark.slow)])
def test_a_transcoder_recovers_the_planted_mlp(planted, sae_type, transcoder):
    """The planted MLP sends sparse input features, each past a threshold, along known output
    directions: the decoder must find them (mean best cosine >= 0.9, as the issue asks), and predict
    the output far better than the best linear map of the input can."""
    root, x, y, out_directions = planted
    stats = train(_cfg(root, sae_type, transcoder))
    sae = jax_sae.load(_cfg(root, sae_type, transcoder).run_dir() / "final")
    assert sae.cfg.is_transcoder and sae.cfg.transcoder == transcoder
    cosine = mean_max_cosine(out_directions, np.asarray(sae.params.W_dec_HD))
    # A skip term takes the output's linear part (a linear map alone explains 46% of it here), so a
    # skip transcoder's decoder rows hold the rest and sit a little further from the planted
    # directions: 0.93 against 0.99 for BatchTopK (bench.transcoder_bench), hence its lower bar.
    floor = 0.9 if transcoder == "plain" else 0.85
    assert cosine >= floor, f"{sae_type} {transcoder}: mean best cosine to the planted output directions {cosine:.3f}"
    # The best linear predictor of y from x (least squares with a bias) leaves far more unexplained.
    X = np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    residual = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    linear_fvu = float((residual**2).sum() / ((y - y.mean(0)) ** 2).sum())
    fvu = stats["final_val"]["fvu"]
    assert fvu < 0.6 * linear_fvu, f"transcoder FVU {fvu:.3f} against the linear map's {linear_fvu:.3f}"
    # The same FVU from the model loaded back, on the MLP output it predicts from the store's MLP input.
    whole = jax_sae.evaluate(sae, root / "store", 0)
    assert whole["fvu"] == pytest.approx(fvu, rel=0.15)


def _reference_loss(params: M.SAEParams, x, y, k):
    """A TopK transcoder's loss written out: uncentred encoder, output b_dec and skip term."""
    pre = x @ params.W_enc_DH + params.b_enc_H
    f = M.topk_rows(jax.nn.relu(pre), k)
    y_hat = f @ params.W_dec_HD + params.b_dec_D + (0.0 if params.W_skip_DD is None else x @ params.W_skip_DD)
    return jnp.mean(jnp.sum((y - y_hat) ** 2, axis=1))


@pytest.mark.parametrize("transcoder", ["plain", "skip"])
@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 2), pytest.param((1, 4), marks=pytest.mark.slow)])
def test_the_loss_and_its_gradients_equal_autodiff_of_the_definition(transcoder, mesh_shape):
    d, h, k, batch = 16, 64, 4, 64
    cfg = SAEConfig(sae_type="topk", d_model=d, hidden_dim=h, top_k=k, transcoder=transcoder)
    rng = np.random.default_rng(0)
    params = M.init_params(jax.random.PRNGKey(0), cfg, 0.3 * rng.normal(size=d).astype(np.float32))
    params = params.replace(b_enc_H=jnp.asarray(0.1 * rng.normal(size=h), jnp.float32))
    if transcoder == "skip":
        params = params.replace(W_skip_DD=jnp.asarray(0.1 * rng.normal(size=(d, d)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(batch, d)) + 0.5, jnp.float32)
    y = jnp.asarray(np.tanh(np.asarray(x)) @ rng.normal(size=(d, d)) - 1.0, jnp.float32)
    settings = LossSettings(cfg, 0.0, 1, 1 / 32, 10**9)
    loss, grads, metrics, _ = jax.jit(sharded_loss_and_grads(settings, make_mesh(*mesh_shape), batch))(
        params, jnp.zeros(h, jnp.int32), jnp.int32(0), jnp.concatenate([x, y], axis=1))
    ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, x, y, k)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    fields = ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D") + (("W_skip_DD",) if transcoder == "skip" else ())
    for name in fields:
        ref, got = np.asarray(getattr(ref_grads, name)), np.asarray(getattr(grads, name))
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    assert (grads.W_skip_DD is None) == (transcoder == "plain")
    y_mean = np.asarray(y).mean(0)
    assert float(metrics["fvu"]) == pytest.approx(float(ref_loss) * batch / float(((y - y_mean) ** 2).sum()), rel=1e-4)


def test_exports_load_back_with_the_same_outputs(tmp_path):
    """A skip transcoder with perturbed weights through both export formats and back, in JAX and in
    torch: the same codes and outputs (the torch format keeps the input scale; SAELens folds it in)."""
    from extractor.torch_sae import TorchSAE
    from jax_sae.checkpoint import model_tree, save_model
    from jax_sae.export import main as export

    d, h = 24, 96
    cfg = SAEConfig(sae_type="batch_topk", d_model=d, hidden_dim=h, top_k=8, layer=2, model="tiny-random",
                    transcoder="skip")
    rng = np.random.default_rng(3)
    params = M.init_params(jax.random.PRNGKey(1), cfg, rng.normal(size=d).astype(np.float32))
    params = params.replace(b_enc_H=jnp.asarray(0.1 * rng.normal(size=h), jnp.float32),
                            W_skip_DD=jnp.asarray(0.2 * rng.normal(size=(d, d)), jnp.float32))
    save_model(tmp_path / "ckpt", cfg, model_tree(params, 0.3, 0.37), {"step": 1})
    export(["--checkpoint", str(tmp_path / "ckpt"), "--format", "torch", "--out", str(tmp_path / "tc.pt")])
    export(["--checkpoint", str(tmp_path / "ckpt"), "--format", "saelens", "--out", str(tmp_path / "lens")])
    lens_cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert lens_cfg["architecture"] == "jumprelu_skip_transcoder" and lens_cfg["apply_b_dec_to_input"] is False
    assert lens_cfg["metadata"]["hook_name"] == "decoder.model.decoder.layers.2.final_layer_norm"
    assert lens_cfg["metadata"]["hook_name_out"] == "decoder.model.decoder.layers.2.fc2"
    x = (rng.normal(size=(64, d)) * 3 + 0.5).astype(np.float32)
    ours = jax_sae.load(tmp_path / "ckpt")
    f, out = np.asarray(ours.encode(x)), np.asarray(ours(x))
    assert 0 < (f > 0).sum(1).mean() < h and np.abs(out).max() > 0
    with pytest.raises(UsageError, match="needs its input"):
        ours.decode(f)
    for path in (tmp_path / "tc.pt", tmp_path / "lens"):
        back = jax_sae.load(path)
        assert back.cfg.transcoder == "skip"
        np.testing.assert_allclose(np.asarray(back.encode(x)), f, atol=1e-4, err_msg=str(path))
        np.testing.assert_allclose(np.asarray(back(x)), out, atol=1e-4 * np.abs(out).max(), err_msg=str(path))
        import torch

        torch_sae = TorchSAE.from_pretrained(path)
        with torch.no_grad():
            np.testing.assert_allclose(torch_sae(torch.from_numpy(x)).numpy(), out, atol=1e-4 * np.abs(out).max(),
                                       err_msg=f"torch {path}")


def test_a_topk_transcoder_is_refused_by_the_saelens_format_before_anything_is_written(tmp_path, capsys):
    from jax_sae.checkpoint import model_tree, save_model
    from jax_sae.export import main as export

    cfg = SAEConfig(sae_type="topk", d_model=8, hidden_dim=16, top_k=2, layer=0, transcoder="plain")
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(8, np.float32))
    save_model(tmp_path / "ckpt", cfg, model_tree(params, 0.0, 1.0), {"step": 1})
    with pytest.raises(SystemExit) as exc:
        export(["--checkpoint", str(tmp_path / "ckpt"), "--format", "saelens", "--out", str(tmp_path / "lens")])
    assert exc.value.code == 2 and not (tmp_path / "lens").exists()
    assert "SAELens has no TopK transcoder class: export this one with --format torch" in capsys.readouterr().err


def test_a_store_without_mlp_streams_is_refused_in_one_line(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    write_store(tmp_path / "store", x)
    with pytest.raises(SystemExit) as exc:
        main(["--store", str(tmp_path / "store"), "--layer_idx", "0", "--out", str(tmp_path / "runs"),
              "--transcoder", "plain", "--hidden_dim", "16", "--top_k", "2", "--batch_size", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "has no mlp_in or mlp_out stream" in err and "extract the store again with --mlp" in err
    assert not (tmp_path / "runs").exists()


def test_the_paired_stream_reads_the_mlp_input_and_output_side_by_side(planted):
    from sae_core.store import open_store

    root, x, y, _ = planted
    store = open_store(root / "store")
    assert store.width("mlp") == 2 * D and store.chunk_rows(0, "mlp") == store.chunk_rows(0, "mlp_in")
    rows = np.concatenate(list(store.iter_rows(0, 1000, stream="mlp")))
    np.testing.assert_array_equal(rows, np.hstack([x, y])[: len(rows)])
    assert store.sample_rows(3, 0, "mlp").shape == (50, 2 * D)


# Spliced into tiny-random.
TINY_D = 64


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from extractor.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("tiny-transcoder")
    (root / "p.txt").write_text("a slow sad jazz piano\nfast energetic rock drums\ncalm folk guitar\nhip hop beat\n")
    extract(ExtractConfig(model="tiny-random", layers="2", prompt_file=str(root / "p.txt"), batch_size=4,
                          duration=0.6, out=str(root / "store"), device="cpu", dtype="float32", top_k=50, mlp=True))
    return root


def _constant_transcoder(path, b_dec):
    """A transcoder whose output is the constant ``b_dec`` whatever its input (no latent ever fires)."""
    from extractor.torch_sae import save_torch_export

    h = 8
    arrays = {"W_enc": np.zeros((TINY_D, h)), "b_enc": np.full(h, -1.0), "W_dec": np.eye(h, TINY_D),
              "b_dec": np.asarray(b_dec, np.float64)}
    save_torch_export(path, {"sae_type": "vanilla", "d_model": TINY_D, "hidden_dim": h, "layer": 2,
                             "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0, "transcoder": "plain"},
                      arrays)
    return path


def test_spliced_in_a_transcoder_replaces_the_mlp_output_and_nothing_else(tiny_store, tiny_model):
    """A transcoder that outputs zeros is exactly the MLP's zero ablation, one that outputs the store's
    mean MLP output is exactly its mean ablation; the replaced site is fc2 (whose input path the
    transcoder reads from the layer's final_layer_norm in the same pass)."""
    import torch

    from extractor.capture import capture_mlp, model_inputs, padded_input_ids
    from extractor.evaluate import main as evaluate, spliced
    from sae_core.store import open_store

    store = open_store(tiny_store / "store")
    mean = np.asarray(store.iter_rows(2, 10**6, stream="mlp_out").__next__()).mean(0)
    results = {}
    for name, b_dec in (("zero", np.zeros(TINY_D)), ("mean", mean)):
        out = tiny_store / f"{name}.json"
        evaluate(["--model", "tiny-random", "--sae", str(_constant_transcoder(tiny_store / f"{name}.pt", b_dec)),
                  "--store", str(tiny_store / "store"), "--out", str(out), "--device", "cpu", "--batch_size", "3",
                  "--no-progress"])
        results[name] = json.loads(out.read_text())
    zero, mean_ = results["zero"]["overall"], results["mean"]["overall"]
    assert results["zero"]["replaced"] == "mlp_out" and results["zero"]["transcoder"] == "plain"
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero"], abs=1e-6) and zero["ce_zero"] != zero["ce_clean"]
    assert mean_["ce_sae"] == pytest.approx(mean_["ce_mean"], abs=1e-5)
    # The replacement sees the MLP's own input and output of the pass.
    codes = [store.sample_codes(0)]
    inputs = model_inputs(tiny_model, [store.samples[0]["prompt"]], [None], store.meta.generation.get("text_length"))
    seen = {}

    def record(h, x):
        seen["h"], seen["x"] = h.clone(), x.clone()

    with torch.no_grad(), capture_mlp(tiny_model, [2], ("mlp_in", "mlp_out")) as calls, \
            spliced(tiny_model, 2, True, record):
        tiny_model.model(**inputs, decoder_input_ids=padded_input_ids(tiny_model, codes))
    torch.testing.assert_close(seen["x"], calls["mlp_in"][2][-1])
    torch.testing.assert_close(seen["h"], calls["mlp_out"][2][-1])


@pytest.mark.slow  # the sweep's equality with runs alone is default-tested for SAEs (tests/test_sweep.py)
def test_a_sweep_trains_a_transcoder_beside_an_sae_of_the_same_layer(planted, tmp_path):
    """The transcoder reads the MLP's input and output and the SAE the residual stream of the same
    layer, in one sweep; each equals the same model trained alone (same batches, same parameters)."""
    from jax_sae.sweep import SweepConfig, sweep
    from jax_sae.sweep.config import members
    from sae_core.cli import from_flags

    root = planted[0]
    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps({"members": [{"sae_type": "batch_topk", "transcoder": "skip"},
                                            {"sae_type": "topk", "transcoder": "none"}]}))
    cfg = from_flags(SweepConfig, dict(store=str(root / "store"), out=str(tmp_path / "sweep"), batch_size=256, epochs=1,
                                       patience=0, layer_idx=0, hidden_dim=64, top_k=4, progress=False,
                                       max_tokens=8000, sweep_file=str(spec)))
    sweep(cfg)
    grid = members(cfg, D)
    assert [m.name for m in grid] == ["batch_topk-skip_transcoder", "topk-sae"]
    for member in grid:
        alone = member.cfg.replace(out=str(tmp_path / "alone" / member.name))
        train(alone)
        ours, theirs = jax_sae.load(member.cfg.run_dir() / "final"), jax_sae.load(alone.run_dir() / "final")
        assert ours.cfg.transcoder == member.cfg.sae.transcoder
        for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=member.name)


def _steering_export(path, transcoder: str):
    """An SAE or transcoder of tiny-random's layer 2 with the same decoder (random unit rows) and
    encoders that read their own input."""
    from extractor.torch_sae import save_torch_export

    rng = np.random.default_rng(0)
    W = rng.normal(size=(32, TINY_D))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    arrays = {"W_enc": W.T, "b_enc": np.zeros(32), "W_dec": W, "b_dec": np.zeros(TINY_D)}
    save_torch_export(path, {"sae_type": "topk", "d_model": TINY_D, "hidden_dim": 32, "top_k": 4, "layer": 2,
                             "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0, "transcoder": transcoder},
                      arrays)
    return path


def test_steering_a_transcoder_feature_pushes_the_mlp_output_as_the_same_push_on_the_layer(tmp_path):
    """A push added to the MLP's output reaches the residual stream unchanged: steering a
    transcoder's feature gives the same audio (steered, control and unsteered) as steering an SAE's
    feature of the same decoder direction and size at the layer's output."""
    from extractor.steer import main as steer

    reports = {}
    for transcoder in ("none", "plain"):
        out = tmp_path / transcoder
        steer(["--model", "tiny-random", "--sae", str(_steering_export(tmp_path / f"{transcoder}.pt", transcoder)),
               "--feature", "5", "--strength", "3", "--max_activation", "2", "--prompt", "calm folk guitar",
               "--duration", "0.6", "--out", str(out), "--device", "cpu", "--top_k", "50", "--start", "0.2"])
        reports[transcoder] = json.loads((out / "steer.json").read_text())
    assert reports["plain"]["site"] == "mlp_out" and reports["none"]["site"] == "layer_out"
    from sae_core.audio import read_audio

    for name in ("steered", "control", "unsteered"):
        a, _ = read_audio(tmp_path / "none" / f"{name}.wav")
        b, _ = read_audio(tmp_path / "plain" / f"{name}.wav")
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
    # The SAE's feature is read after the push (at the layer's output) and so rises with it; the
    # transcoder's is read at the MLP's input, upstream of its own push at that position.
    assert reports["none"]["runs"]["steered"]["feature_mean_activation"] > 1.0
    assert reports["plain"]["runs"]["steered"]["feature_mean_activation"] < 1.0


def test_discovery_encodes_the_mlp_input_of_a_transcoder(planted):
    """Discovery's pass over a transcoder reads the MLP input stream: its firing counts are those
    of the transcoder's codes of the stored MLP inputs."""
    from discovery.stats import feature_pass
    from sae_core.store import open_store

    root, x, _, _ = planted
    cfg = _cfg(root, "batch_topk", "plain")
    sae = jax_sae.load(cfg.run_dir() / "final") if (cfg.run_dir() / "final").exists() else None
    if sae is None:
        train(cfg)
        sae = jax_sae.load(cfg.run_dir() / "final")
    store = open_store(root / "store")
    result = feature_pass(sae, store, 0, progress=False)
    codes = np.asarray(sae.encode(np.asarray(store.iter_rows(0, 10**6, stream="mlp_in").__next__())))
    np.testing.assert_array_equal(np.asarray(result.token_count), (codes > 0).sum(0))


def test_compile_only_compiles_a_transcoders_step_on_its_paired_batch(capsys):
    main(["--compile_only", "--d_model", "16", "--transcoder", "skip", "--hidden_dim", "64", "--top_k", "4",
          "--batch_size", "64", "--no-progress"])
    assert "compiled batch_topk d=16 h=64 k=4 batch=64" in capsys.readouterr().out


@pytest.mark.parametrize("sae_type, transcoder, mesh_shape", [
    ("batch_topk", "skip", (2, 2)), pytest.param("topk", "plain", (1, 1), marks=pytest.mark.slow),
    pytest.param("matryoshka", "skip", (1, 2), marks=pytest.mark.slow),
    pytest.param("batch_topk", "plain", (1, 1), marks=pytest.mark.slow),
    pytest.param("topk", "skip", (2, 2), marks=pytest.mark.slow)])
def test_the_sparse_backward_equals_the_dense_one_for_transcoders(sae_type, transcoder, mesh_shape):
    """The hand-written sparse path (k decoder rows per token; heavy tokens of the batch-wide
    selection done densely) gives a transcoder the dense path's loss, metrics and gradients."""
    d, h, k, batch = 16, 128, 4, 64
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=k, transcoder=transcoder,
                    group_sizes=(32, 96) if sae_type == "matryoshka" else ())
    rng = np.random.default_rng(1)
    params = M.init_params(jax.random.PRNGKey(2), cfg, 0.3 * rng.normal(size=d).astype(np.float32))
    params = params.replace(b_enc_H=jnp.asarray(0.1 * rng.normal(size=h), jnp.float32))
    if transcoder == "skip":
        params = params.replace(W_skip_DD=jnp.asarray(0.1 * rng.normal(size=(d, d)), jnp.float32))
    x = rng.normal(size=(batch, d)).astype(np.float32)
    x[:1] *= 30.0  # a heavy token keeping more latents than its candidates: an overflow row, done densely
    z = jnp.concatenate([jnp.asarray(x), jnp.asarray(np.tanh(x) @ rng.normal(size=(d, d)) - 1.0, jnp.float32)], 1)
    counters = jnp.zeros(h, jnp.int32).at[:8].set(10**9)  # a few dead latents: AuxK's term too
    out = {}
    for backward in ("sparse", "dense"):
        settings = LossSettings(cfg, 0.0, 1, 1 / 32, 10**6, backward=backward)
        out[backward] = jax.jit(sharded_loss_and_grads(settings, make_mesh(*mesh_shape), batch))(
            params, counters, jnp.int32(0), z)
    (loss_s, grads_s, metrics_s, _), (loss_d, grads_d, metrics_d, _) = out["sparse"], out["dense"]
    np.testing.assert_allclose(float(loss_s), float(loss_d), rtol=1e-5)
    np.testing.assert_allclose(float(metrics_s["fvu"]), float(metrics_d["fvu"]), rtol=1e-5)
    assert float(metrics_s["dense_fallback"]) == 0.0  # the sparse path itself, not its whole-dense fallback
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D") + (("W_skip_DD",) if transcoder == "skip" else ()):
        dense = np.asarray(getattr(grads_d, name))
        np.testing.assert_allclose(np.asarray(getattr(grads_s, name)), dense, atol=1e-5 * np.abs(dense).max(),
                                   err_msg=name)

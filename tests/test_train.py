"""The trainer: each SAE type recovers a planted dictionary; the formulas hold; runs resume exactly;
bad input stops before any compute with one line."""

import json
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax_sae
from jax_sae import model as M
from jax_sae.config import ConfigError, SAEConfig
from jax_sae.data import split_samples
from jax_sae.run_dir import RunDir
from jax_sae.train import TrainConfig, main, train
from sae_core.store import open_store

from .conftest import cli
from .synthetic import mean_max_cosine, planted_dictionary, sparse_data, write_store

D_MODEL, N_FEATURES = 32, 64


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    directions = planted_dictionary(D_MODEL, N_FEATURES, seed=0)
    write_store(root / "store", sparse_data(directions, 40_000, active=4, noise=0.05, seed=0))
    return root, directions


def _cfg(root, sae_type, **kw):
    base = dict(sae_type=sae_type, layer_idx=0, hidden_dim=128, top_k=6, batch_size=256, epochs=8, lr=4e-3,
                store=str(root / "store"), out=str(root / "models"), progress=False, patience=0,
                sparsity_coef=0.5, group_sizes=(64, 64) if sae_type == "matryoshka" else (),
                mesh_data=1)  # one device: the mesh equivalence tests cover the sharded paths
    base.update(kw)
    return TrainConfig.of(**base)


@pytest.mark.parametrize("sae_type, min_cosine, backward", [
    ("topk", 0.9, "auto"), ("batch_topk", 0.9, "auto"), ("matryoshka", 0.9, "auto"), ("vanilla", 0.8, "auto"),
    ("jumprelu", 0.9, "auto"),
    pytest.param("batch_topk", 0.9, "sparse", marks=pytest.mark.slow)])  # auto is dense at this width;
# the sparse path trains as well (slow suite; test_sparse checks its gradients against autodiff by default)
def test_each_type_recovers_the_planted_dictionary(planted, sae_type, min_cosine, backward, capsys):
    root, directions = planted
    # JumpReLU: this test's rate (4e-3, 2.7x --lr auto) moves thresholds fast enough without the default 10x
    extra = {"jumprelu_threshold_lr": 1.0} if sae_type == "jumprelu" else {}
    cfg = _cfg(root, sae_type, backward=backward, out=str(root / ("models" if backward == "auto" else backward)),
               **extra)
    stats = train(cfg)
    run = cfg.run_dir()
    sae = jax_sae.load(run / "final")
    cosine = mean_max_cosine(directions, np.asarray(sae.params.W_dec_HD))
    assert cosine >= min_cosine, f"{sae_type}: mean max cosine {cosine:.3f}"
    assert stats["final_val"]["fvu"] <= 0.1, stats["final_val"]
    for name in ("best", "final", "metrics.jsonl", "training_stats.json", "training_curves.png", "density.png"):
        assert (run / name).exists(), name
    recorded = json.loads((run / "training_stats.json").read_text())["runtime"]
    assert recorded == {"platform": "cpu", "device_count": jax.device_count(), "device_kinds": ["cpu"],
                        "local_device_count": jax.local_device_count(), "process_count": 1,
                        "mesh": {"data": 1, "model": 1}}
    assert f"jax: cpu, {jax.device_count()} devices (cpu), mesh data=1 model=1" in capsys.readouterr().out
    if sae_type in ("batch_topk", "matryoshka", "jumprelu"):  # JumpReLU: pulled toward its target, k
        l0 = stats["final_val"]["l0"]
        assert abs(l0 - 6) <= 0.2 * 6, f"inference L0 {l0} is not within 20% of k=6"
    if sae_type == "matryoshka":
        x = sparse_data(directions, 4000, active=4, noise=0.05, seed=9)
        f = np.array(sae.encode(x))
        f[:, 64:] = 0
        x_hat = np.asarray(sae.decode(f))
        fvu_prefix = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert fvu_prefix <= 0.2, f"the first prefix alone explains too little (FVU {fvu_prefix:.3f})"


def test_batch_topk_keeps_exactly_k_times_batch():
    from jax_sae.select import top_mask

    pre = jax.random.normal(jax.random.PRNGKey(0), (64, 512)) + 0.5
    mask, tau = top_mask(pre, 8 * 64, (), row_wise=False)
    assert int(jnp.sum(mask)) == 8 * 64
    assert float(tau) == float(jnp.sort(pre.reshape(-1))[-8 * 64]), "the threshold is the kB-th largest value"
    per_row = jnp.sum(mask, axis=1)
    assert int(per_row.max()) > 8 > int(per_row.min()), "the budget is shared across the batch, not per row"
    rows, _ = top_mask(pre, 8, (), row_wise=True)
    assert (np.asarray(jnp.sum(rows, axis=1)) == 8).all()
    ties = jnp.round(jnp.abs(pre) * 2) / 2  # many exact ties at the threshold
    assert int(jnp.sum(top_mask(ties, 300, (), row_wise=False)[0])) == 300
    for values in (pre, pre.at[0].add(100.0)):  # the second: row 0 alone exceeds its 16 candidates
        fast, tau = top_mask(values, 8 * 64, (), row_wise=False, row_candidates=16)
        assert int(jnp.sum(fast)) == 8 * 64 and float(tau) == float(jnp.sort(values.reshape(-1))[-8 * 64])


def _loss_fn(cfg, dead_tokens=10**6, batch=128):
    from jax_sae.forward import LossSettings, sharded_loss
    from jax_sae.sharding import make_mesh

    return jax.jit(sharded_loss(LossSettings(cfg, 0.0, 1, 1 / 32, dead_tokens), make_mesh(1, 1), batch))


def _tiny_state(cfg, key=0):
    from jax_sae.step import init_state, make_optimizer

    params = M.init_params(jax.random.PRNGKey(key), cfg, np.zeros(cfg.d_model, np.float32))
    optimizer = make_optimizer(1e-2, 100, 0.0)
    return init_state(params, optimizer, 1.0), optimizer


def test_training_codes_keep_exactly_k_per_batch_and_per_row():
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 16)) * 3 + 1
    for sae_type, expected in (("batch_topk", 4 * 128), ("topk", 4 * 128)):
        cfg = SAEConfig(sae_type=sae_type, d_model=16, hidden_dim=64, top_k=4)
        state, _ = _tiny_state(cfg)
        _, (metrics, _) = _loss_fn(cfg)(state.params, state.tokens_since_fired_H, state.step, x)
        assert float(metrics["l0"]) * 128 == expected


def test_decoder_rows_stay_unit_norm_and_gradient_is_projected():
    from jax_sae.forward import LossSettings
    from jax_sae.sharding import make_mesh
    from jax_sae.step import compile_train_step

    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=4)
    state, optimizer = _tiny_state(cfg)
    step = compile_train_step(optimizer, LossSettings(cfg, 0.0, 1, 1 / 32, 10**6), make_mesh(1, 1), state, 128)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 16)) * 3 + 1
    for _ in range(3):
        state, _ = step(state, x)
    norms = np.linalg.norm(np.asarray(state.params.W_dec_HD), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    W = state.params.W_dec_HD
    g = M.project_decoder_grad(W, jax.random.normal(jax.random.PRNGKey(2), W.shape))
    np.testing.assert_allclose(np.asarray(jnp.sum(g * W, axis=1)), 0.0, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "pre"])
def test_aux_k_reaches_a_latent_below_zero_everywhere_only_through_its_pre_activations(activation):
    """Latents 0-7 are dead and negative on every row (encoder bias -100). ReLU'd, AuxK gives them no
    gradient and they stay dead; entered as pre-activations (SAELens's AuxK) they learn."""
    from jax_sae.forward import LossSettings, sharded_loss
    from jax_sae.sharding import make_mesh

    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=4)
    state, _ = _tiny_state(cfg)
    params = state.params.replace(b_enc_H=state.params.b_enc_H.at[:8].set(-100.0))
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 16))
    loss = sharded_loss(LossSettings(cfg, 0.0, 1, 1 / 32, 100, aux_k=4, aux_activation=activation),
                        make_mesh(1, 1), 128)
    counters = jnp.where(jnp.arange(64) < 8, 1000, 0).astype(jnp.int32)  # 0-7 dead (1000 >= 100 tokens)
    grads, (metrics, _) = jax.jit(jax.grad(loss, has_aux=True))(params, counters, state.step, x)
    reached = np.linalg.norm(np.asarray(grads.W_dec_HD[:8]), axis=1)
    if activation == "relu":
        assert np.all(reached == 0.0)
    else:
        assert np.all(reached > 0.0)


def test_aux_k_is_zero_without_dead_latents_and_positive_with():
    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=4)
    state, _ = _tiny_state(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 16))
    loss = _loss_fn(cfg, dead_tokens=100)
    _, (none_dead, _) = loss(state.params, jnp.zeros(64, jnp.int32), state.step, x)
    _, (some_dead, _) = loss(state.params, jnp.where(jnp.arange(64) < 20, 1000, 0), state.step, x)
    assert float(none_dead["aux_loss"]) == 0.0 and float(some_dead["aux_loss"]) > 0.0


def test_b_enc_is_used_by_every_type():
    for sae_type in ("vanilla", "topk", "batch_topk", "matryoshka"):
        cfg = SAEConfig(sae_type=sae_type, d_model=8, hidden_dim=32, top_k=4,
                        group_sizes=(16, 16) if sae_type == "matryoshka" else ())
        params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(8, np.float32))
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
        shifted = params.replace(b_enc_H=params.b_enc_H + 0.5)
        a = M.encode_infer(cfg, params, jnp.float32(0.1), x)
        b = M.encode_infer(cfg, shifted, jnp.float32(0.1), x)
        assert not np.allclose(a, b), sae_type


def test_validation_holds_out_whole_seeded_samples(planted):
    root, _ = planted
    store = open_store(root / "store")
    split = split_samples(store, val_fraction=0.1, seed=3)
    assert len(split.val_samples) == round(0.1 * store.n_samples)
    assert not set(split.val_samples) & set(split.train_samples)
    assert split.val_samples.max() < store.n_samples - 1 or split.val_samples.min() > 0, "not just the last ones"
    again = split_samples(store, val_fraction=0.1, seed=3)
    np.testing.assert_array_equal(split.val_samples, again.val_samples)
    small = split_samples(store, val_fraction=0.1, seed=3, max_tokens=5000)
    assert small.train_rows <= 5000 and "subsampled training data" in small.notes[0]


def test_validation_by_chunks_reads_a_few_whole_chunks_instead_of_all(planted):
    """--val_split chunks: as many held-out samples, seeded, disjoint from training, but from a few
    chunks, so each validation reads a tenth of the store where scattered samples touch every chunk."""
    store = open_store(planted[0] / "store")
    chunk = 400

    def chunks_read(samples, chunk=chunk):
        return {int(c) for s in samples for c in range(store.offsets[s] // chunk, (store.offsets[s + 1] - 1) // chunk + 1)}

    scattered = split_samples(store, val_fraction=0.1, seed=3)
    grouped = split_samples(store, val_fraction=0.1, seed=3, by_chunks_of=chunk)
    assert len(grouped.val_samples) == len(scattered.val_samples)
    assert not set(grouped.val_samples) & set(grouped.train_samples)
    assert len(grouped.val_samples) + len(grouped.train_samples) == store.n_samples
    n_chunks = -(-store.n_rows // chunk)
    assert len(chunks_read(scattered.val_samples)) > 0.5 * n_chunks
    assert len(chunks_read(grouped.val_samples)) <= grouped.val_rows / chunk + 1, "a few whole chunks"
    np.testing.assert_array_equal(grouped.val_samples,
                                  split_samples(store, val_fraction=0.1, seed=3, by_chunks_of=chunk).val_samples)
    assert not np.array_equal(grouped.val_samples, split_samples(store, val_fraction=0.1, seed=4,
                                                                 by_chunks_of=chunk).val_samples)
    half = int(np.diff(store.offsets).min()) // 2  # every sample spans two or three chunks
    small = split_samples(store, val_fraction=0.1, seed=3, by_chunks_of=half)
    assert len(chunks_read(small.val_samples, half)) <= small.val_rows / half + 2, "samples over several chunks"
    capped = split_samples(store, val_fraction=0.1, seed=3, by_chunks_of=chunk, val_max_tokens=chunk)
    assert capped.val_rows <= chunk and len(chunks_read(capped.val_samples)) == 1


def test_api_encodes_any_leading_shape_and_evaluates(planted):
    root, directions = planted
    cfg = _cfg(root, "topk", epochs=2, out=str(root / "api"))
    train(cfg)
    sae = jax_sae.load(root / "api" / "topk" / "layer0" / "dim128" / "best")
    x = sparse_data(directions, 60, active=4, noise=0.05, seed=4).reshape(3, 20, D_MODEL)
    f = sae.encode(x)
    assert f.shape == (3, 20, 128) and (np.asarray(jnp.sum(f > 0, axis=-1)) <= 6).all()
    assert sae.decode(f).shape == x.shape
    batches = list(sae.encode_batches([x[0], x[1]]))
    # 20 rows against the same rows inside a 60-row matmul: float32 rounding of O(1-10) activations
    np.testing.assert_allclose(batches[1], np.asarray(f[1]), rtol=1e-5, atol=1e-6)
    store = open_store(root / "store")
    assert sae.cfg == cfg.sae_config(D_MODEL, store.meta.model), "the checkpoint rebuilds the trained config"
    metrics = jax_sae.evaluate(sae, store, 0, samples=np.arange(10))
    rows = np.concatenate(list(store.iter_rows(0, 10_000, samples=np.arange(10))))
    x_hat = np.asarray(sae(rows))
    fvu = ((rows - x_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["explained_variance"] == pytest.approx(1 - fvu, rel=1e-3)
    assert set(metrics) >= {"mse", "l0", "dead_fraction", "dense_fraction_1pct", "dense_fraction_10pct", "cosine",
                            "l2_ratio"}


def _train_args(root, out, *extra):
    return ["jax_sae.train", "--sae_type", "batch_topk", "--layer_idx", "0", "--hidden_dim", "64", "--top_k", "4",
            "--batch_size", "128", "--epochs", "4", "--lr", "2e-3", "--store", str(root / "store"),
            "--out", str(out), "--checkpoint_every", "20", "--eval_every", "50", "--max_tokens", "12000",
            "--no-progress", *extra]


@pytest.mark.slow  # kills at random moments: bench.faults (20/20) and tests/test_faults.py; resume is default-tested in test_damage
def test_sigkill_then_rerun_ends_with_the_same_parameters(planted):
    root, _ = planted
    subprocess.run(cli(*_train_args(root, root / "ref")), check=True, capture_output=True)
    out = root / "killed"
    proc = subprocess.Popen(cli(*_train_args(root, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "batch_topk" / "layer0" / "dim64" / "ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.isdigit() and int(p.name) >= 40 for p in ckpt.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "batch_topk" / "layer0" / "dim64" / "final").exists(), "the kill should land mid-run"
    rerun = subprocess.run(cli(*_train_args(root, out)), check=True, capture_output=True, text=True)
    assert "resuming" in rerun.stdout
    a = jax_sae.load(root / "ref" / "batch_topk" / "layer0" / "dim64" / "final")
    b = jax_sae.load(out / "batch_topk" / "layer0" / "dim64" / "final")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_array_equal(np.asarray(getattr(a.params, name)), np.asarray(getattr(b.params, name)))
    assert float(a.threshold) == float(b.threshold)


def _error(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    text = str(exc.value)
    assert text.startswith("error: ") and "\n" not in text
    return text


def test_bad_input_gets_one_line_before_any_compute(planted, tmp_path):
    root, _ = planted
    base = _train_args(root, tmp_path / "m")[1:]
    assert "has no layer 5; it holds layers [0]" in _error(base + ["--layer_idx", "5"])
    assert "--top_k must be in 1..hidden_dim (64), got 65" in _error(base + ["--top_k", "65"])
    assert "--top_k must be in 1..hidden_dim" in _error(base + ["--top_k", "0"])
    text = _error(base + ["--sae_type", "matryoshka", "--group_sizes", "16,16"])
    assert "sum to 32, not hidden_dim 64" in text
    assert "no activation store" in _error(base + ["--store", str(tmp_path / "none")])
    assert "has 2 values but there are 4 Matryoshka groups" in _error(
        base + ["--sae_type", "matryoshka", "--group_weights", "1,2"])
    assert "only --sae_type matryoshka takes them" in _error(base + ["--group_weights", "1"])
    assert "--enc_init_scale must be positive" in _error(base + ["--enc_init_scale", "0"])
    assert "--grad_clip must be 0 (no clipping) or positive, got -1.0" in _error(base + ["--grad_clip", "-1"])
    assert not (tmp_path / "m").exists()


def test_grad_clip_zero_leaves_the_gradient_whole_and_keeps_the_state_shape():
    """A gradient of norm 4, then one of norm 1 in the same direction (10 steps: the first at the
    warm-up's lr 0, the second at the peak). Clipped at 1, both reach Adam as the same unit vector,
    so the second step moves each weight by the full lr; unclipped, the first one's larger moments
    make it 0.84 lr. The optimizer state has the same structure either way, so a checkpoint of one
    resumes under the other."""
    from jax_sae.step import make_optimizer

    lr, params = 1e-2, {"w": jnp.ones(4)}
    second = {}
    for clip in (1.0, 0.0):
        opt = make_optimizer(lr, 10, 0.0, clip=clip)
        _, state = opt.update({"w": jnp.full(4, 2.0)}, opt.init(params), params)
        second[clip] = np.asarray(opt.update({"w": jnp.full(4, 0.5)}, state, params)[0]["w"])
    np.testing.assert_allclose(second[1.0], -lr, rtol=1e-3)
    np.testing.assert_allclose(second[0.0], -0.84 * lr, rtol=0.01)
    assert jax.tree.structure(make_optimizer(lr, 10, 0.0, clip=0.0).init(params)) == jax.tree.structure(
        make_optimizer(lr, 10, 0.0).init(params))


def _free_params(cfg, key=0):
    """Raw parameters of a free-norm decoder: rows of norms 0.1 to 2, biases nonzero."""
    k = jax.random.split(jax.random.PRNGKey(key), 5)
    norms = jax.random.uniform(k[0], (cfg.hidden_dim, 1), minval=0.1, maxval=2.0)
    V = jax.random.normal(k[1], (cfg.hidden_dim, cfg.d_model))
    return M.SAEParams(W_enc_DH=jax.random.normal(k[2], (cfg.d_model, cfg.hidden_dim)) * 0.3,
                       b_enc_H=jax.random.normal(k[3], (cfg.hidden_dim,)) * 0.1,
                       W_dec_HD=V / jnp.linalg.norm(V, axis=1, keepdims=True) * norms,
                       b_dec_D=jax.random.normal(k[4], (cfg.d_model,)) * 0.1)


def _saelens_recon(cfg, raw, x):
    """SAELens's TopK with rescale_acts_by_decoder_norm, written out: the top k of pre x n, then
    acts / n through the free rows."""
    n = jnp.linalg.norm(raw.W_dec_HD, axis=1)
    scaled = ((x - raw.b_dec_D) @ raw.W_enc_DH + raw.b_enc_H) * n
    acts = M.topk_rows(scaled, cfg.top_k)
    return (acts / n) @ raw.W_dec_HD + raw.b_dec_D


def test_a_free_decoder_is_saelens_rescaled_model_and_learns_through_it():
    from jax_sae.forward import LossSettings, sharded_loss_and_grads
    from jax_sae.sharding import make_mesh

    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=4)
    raw = _free_params(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 16)) * 3 + 1
    unit = M.effective(raw)
    np.testing.assert_allclose(np.linalg.norm(unit.W_dec_HD, axis=1), 1.0, rtol=1e-5)
    ours = M.decode(unit, M.topk_rows(M.pre_activations(unit, x), cfg.top_k))
    np.testing.assert_allclose(ours, _saelens_recon(cfg, raw, x), rtol=1e-4, atol=1e-4)
    # the gradient the train step takes: the loss's at the unit rows, pulled back through the map
    grads_fn = jax.jit(sharded_loss_and_grads(LossSettings(cfg, 0.0, 1, 1 / 32, 10**6), make_mesh(1, 1), 128))
    _, pull_back = jax.vjp(M.effective, raw)
    loss, g_unit, _, _ = grads_fn(unit, jnp.zeros(64, jnp.int32), jnp.int32(0), x)
    (ours,) = pull_back(g_unit)
    direct_loss = lambda p: jnp.mean(jnp.sum((_saelens_recon(cfg, p, x) - x) ** 2, axis=1))  # noqa: E731
    ratio = float(loss) / float(direct_loss(raw))  # our loss may be the same error, normalised otherwise
    direct = jax.grad(direct_loss)(raw)
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        a, b = np.asarray(getattr(ours, name)), ratio * np.asarray(getattr(direct, name))
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("backward", ["dense", "sparse"])
@pytest.mark.parametrize("n_dead", [20, 4])
def test_aux_loss_sum_is_saelens_auxk(backward, n_dead):
    """--aux_loss sum with --aux_activation pre is SAELens's AuxK written out: the top d/2 dead
    pre-activations reconstruct the detached residual, squared error summed per row, averaged, times
    min(dead / (d/2), 1); its gradient is --aux_penalty times that loss's."""
    from jax_sae.forward import LossSettings, sharded_loss_and_grads
    from jax_sae.sharding import make_mesh

    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=4)
    params = M.effective(_free_params(cfg))
    x = jax.random.normal(jax.random.PRNGKey(2), (128, 16)) * 3 + 1
    dead = np.zeros(64, bool)
    dead[np.random.default_rng(0).choice(64, n_dead, replace=False)] = True
    counters = jnp.where(jnp.asarray(dead), 100, 0).astype(jnp.int32)

    def saelens_aux(p):
        pre = M.pre_activations(p, x)
        residual = jax.lax.stop_gradient(x - M.decode(p, M.topk_rows(pre, cfg.top_k)))
        k_aux = min(8, n_dead)
        masked = jnp.where(jnp.asarray(dead), pre, -jnp.inf)
        top = jax.lax.top_k(masked, k_aux)[1]
        acts = jnp.zeros_like(pre).at[jnp.arange(128)[:, None], top].set(jnp.take_along_axis(pre, top, axis=1))
        return min(n_dead / 8, 1.0) * jnp.mean(jnp.sum((acts @ p.W_dec_HD - residual) ** 2, axis=1))

    def ours(penalty):
        settings = LossSettings(cfg, 0.0, 1, penalty, 10, backward, aux_activation="pre", aux_loss="sum")
        return jax.jit(sharded_loss_and_grads(settings, make_mesh(1, 1), 128))(params, counters, jnp.int32(0), x)

    _, with_aux, metrics, _ = ours(1.0)
    _, without, _, _ = ours(0.0)
    np.testing.assert_allclose(float(metrics["aux_loss"]), float(saelens_aux(params)), rtol=1e-4)
    direct = jax.grad(saelens_aux)(params)
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        a = np.asarray(getattr(with_aux, name)) - np.asarray(getattr(without, name))
        b = np.asarray(getattr(direct, name))
        np.testing.assert_allclose(a, b, atol=1e-4 * max(np.abs(b).max(), 1e-3), err_msg=name)


def test_a_free_decoder_run_recovers_the_dictionary_and_saves_unit_rows(planted):
    root, directions = planted
    cfg = _cfg(root, "batch_topk", decoder_norm="free", epochs=4, out=str(root / "models-free"))
    stats = train(cfg)
    sae = jax_sae.load(cfg.run_dir() / "final")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.params.W_dec_HD), axis=1), 1.0, rtol=1e-5)
    cosine = mean_max_cosine(directions, np.asarray(sae.params.W_dec_HD))
    assert cosine >= 0.9 and stats["final_val"]["fvu"] <= 0.1, (cosine, stats["final_val"])
    assert abs(stats["final_val"]["l0"] - 6) <= 0.2 * 6, stats["final_val"]
    with pytest.raises(ConfigError, match="--decoder_norm free is for topk"):
        _cfg(root, "jumprelu", decoder_norm="free")


def test_encoder_initialisation_options():
    from jax_sae import model as M
    from jax_sae.config import SAEConfig

    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=32, top_k=2)
    key = jax.random.PRNGKey(0)
    plain = M.init_params(key, cfg, np.zeros(16))
    np.testing.assert_allclose(np.linalg.norm(plain.W_dec_HD, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(plain.W_enc_DH, plain.W_dec_HD.T)
    scaled = M.init_params(key, cfg, np.zeros(16), enc_scale=0.1)
    np.testing.assert_allclose(scaled.W_enc_DH, 0.1 * plain.W_enc_DH, rtol=1e-6)
    np.testing.assert_array_equal(scaled.W_dec_HD, plain.W_dec_HD)
    own = M.init_params(key, cfg, np.zeros(16), enc_init="independent")
    np.testing.assert_array_equal(own.W_dec_HD, plain.W_dec_HD)
    np.testing.assert_allclose(np.linalg.norm(own.W_enc_DH, axis=0), 1.0, rtol=1e-5)
    assert np.abs(np.sum(own.W_enc_DH * plain.W_enc_DH, axis=0)).max() < 0.9  # not the transpose


def test_nonfinite_rows_are_reported_and_skipped_on_request(tmp_path):
    x = sparse_data(planted_dictionary(D_MODEL, N_FEATURES, 0), 4000, active=4, noise=0.05, seed=1)
    x[[10, 500, 2001]] = np.nan
    x[7, 3] = np.inf
    write_store(tmp_path / "store", x)
    argv = _train_args(tmp_path, tmp_path / "m")[1:] + ["--max_tokens", "4000", "--val_fraction", "0.1"]
    text = _error(argv)
    assert "4 non-finite (NaN/Inf) rows" in text and "--skip_nonfinite" in text
    stats = train(TrainConfig.of(**{**vars(_ns(argv)), "skip_nonfinite": True}))
    assert np.isfinite(stats["final_val"]["fvu"]) and "skipping 4 non-finite rows" in stats["notes"]


def _ns(argv):
    from sae_core.cli import build_parser

    return build_parser(TrainConfig, "t", "").parse_args(argv)


def test_divergence_stops_and_keeps_only_finite_checkpoints(planted, tmp_path):
    root, _ = planted
    argv = _train_args(root, tmp_path / "m")[1:] + ["--lr", "1e30", "--checkpoint_every", "1", "--eval_every", "1"]
    text = _error(argv)
    diverged = int(re.search(r"training diverged at step (\d+)", text).group(1))
    assert "lower --lr" in text
    run = tmp_path / "m" / "batch_topk" / "layer0" / "dim64"
    assert not (run / "final").exists() and not (run / "training_stats.json").exists()
    # --checkpoint_every 1: the resumable checkpoints are the last steps before the divergence, all finite
    steps = sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == diverged - 1, (steps, diverged)
    for step in steps:
        state = ocp.StandardCheckpointer().restore((run / "ckpt" / str(step) / "state").absolute())
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"])), step


def test_width_mismatch_is_refused(planted, tmp_path):
    root, _ = planted
    with pytest.raises(ConfigError):
        SAEConfig(sae_type="topk", d_model=8, hidden_dim=16, top_k=17)
    write_store(tmp_path / "store", np.ones((400, 48), np.float32))
    train(_cfg(tmp_path, "topk", epochs=1, hidden_dim=32, top_k=4, out=str(tmp_path / "r")))
    sae = jax_sae.load(tmp_path / "r" / "topk" / "layer0" / "dim32" / "final")
    with pytest.raises(ValueError, match=f"store width {D_MODEL} does not match the SAE's d_model 48"):
        jax_sae.evaluate(sae, root / "store", 0)
    with pytest.raises(ValueError, match="input width 32"):
        sae.encode(np.ones((2, 32), np.float32))
    import shutil

    shutil.rmtree(tmp_path / "store")
    write_store(tmp_path / "store", sparse_data(planted_dictionary(D_MODEL, 8, 0), 400, 2, 0.0, 0))
    text = _error(["--sae_type", "topk", "--layer_idx", "0", "--hidden_dim", "32", "--top_k", "4", "--batch_size",
                   "256", "--epochs", "1", "--lr", "4e-3", "--store", str(tmp_path / "store"), "--out",
                   str(tmp_path / "r"), "--no-progress", "--patience", "0", "--sparsity_coef", "0.5"])
    assert "has width 48 but the store has 32" in text


def test_only_improvements_larger_than_min_delta_count():
    from jax_sae.loop import improves

    assert improves(0.5, float("inf"), 1e-3)  # the first evaluation after warm-up is always the best so far
    assert improves(0.4989, 0.5, 1e-3) and not improves(0.4996, 0.5, 1e-3)  # 0.22% counts, 0.08% does not
    assert not improves(0.5 - 1e-9, 0.5, 1e-3) and improves(0.5 - 1e-9, 0.5, 0.0)  # float noise, unless min_delta 0
    assert not improves(float("nan"), 0.5, 1e-3) and not improves(0.6, 0.5, 0.0)


def _patience_replay(records: list[dict], warmup: int, patience: int, min_delta: float) -> tuple[int, int | None]:
    """(best step, step at which the run should stop or None) by the patience rule, from the
    validation FVUs a run recorded."""
    best, best_step, waited = float("inf"), 0, 0
    for record in records:
        if record["step"] < warmup:
            continue
        if record["val"]["fvu"] < best * (1 - min_delta):
            best, best_step, waited = record["val"]["fvu"], record["step"], 0
        else:
            waited += 1
            if waited >= patience:
                return best_step, record["step"]
    return best_step, None


def test_patience_stops_a_run_that_no_longer_improves_by_min_delta_and_keeps_its_best(planted, tmp_path, capsys):
    """A run whose validation FVU stops improving by more than --min_delta (5% here: on the planted
    data the FVU falls by more than that per evaluation at first, by less after about half the
    budget) stops --patience evaluations after its last real improvement, and best/ holds the model
    of that evaluation. The decision is replayed from the FVUs the run itself recorded, so the test
    holds whatever the last float bits are on this CPU."""
    root, _ = planted
    cfg = _cfg(root, "topk", epochs=6, eval_every=20, patience=2, min_delta=0.05, out=str(tmp_path))
    stats = train(cfg)
    assert "early stop at step" in capsys.readouterr().out
    assert stats["steps"] < stats["total_steps"], stats
    records = [r for r in RunDir(cfg.run_dir()).read_metrics() if "val" in r]
    assert [r["step"] for r in records] == list(range(20, stats["steps"] + 1, 20))
    warmup = max(stats["total_steps"] // 10, stats["total_steps"] // 20, 1)
    best_step, stop_step = _patience_replay(records, warmup, cfg.train.patience, cfg.train.min_delta)
    assert (stats["best_step"], stats["steps"]) == (best_step, stop_step)
    assert stop_step == best_step + cfg.train.eval_every * cfg.train.patience
    best_fvu = next(r["val"]["fvu"] for r in records if r["step"] == best_step)
    assert stats["best_val"]["fvu"] == pytest.approx(best_fvu, rel=1e-6)
    again = train(cfg)  # rerun: the run stays stopped, it does not train on
    assert again["steps"] == stats["steps"] and again["resumed_from"] == stats["steps"]


def test_a_calibrated_threshold_gives_exactly_k_latents_per_row_on_its_rows():
    cfg = SAEConfig(sae_type="batch_topk", d_model=16, hidden_dim=64, top_k=5)
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(16, np.float32))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (300, 16)))
    threshold = M.calibrated_threshold(cfg, params, x)
    l0 = float(jnp.mean(jnp.sum(M.encode_infer(cfg, params, jnp.float32(threshold), x) > 0, axis=1)))
    assert threshold > 0 and l0 == 5.0
    # capped: only the first max_values // h rows take part, and they still get exactly k each
    few = M.calibrated_threshold(cfg, params, x, max_values=64 * 10)
    assert np.sum(M.encode_infer(cfg, params, jnp.float32(few), x[:10]) > 0) == 50


def test_wsd_holds_the_rate_then_decays_over_the_last_fifth():
    from jax_sae.step import lr_schedule

    wsd, cosine = lr_schedule(1.0, 1000, "wsd"), lr_schedule(1.0, 1000, "cosine")
    assert float(wsd(50)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(1.0)
    assert float(wsd(799)) == pytest.approx(1.0) and float(wsd(900)) == pytest.approx(0.505, abs=1e-6)
    assert float(wsd(1000)) == pytest.approx(0.01) and float(cosine(1000)) == pytest.approx(0.01)
    assert float(cosine(500)) < 0.75 < float(wsd(500))
    constant = lr_schedule(1.0, 1000, "constant")
    assert float(constant(50)) == pytest.approx(0.5) and float(constant(1000)) == pytest.approx(1.0)


@pytest.mark.slow  # two runs; the quality benchmark measures the same (L0 at k with calibration)
def test_the_calibrated_threshold_reaches_k_where_the_running_average_lags(planted):
    """A short run: the running average of each batch's smallest kept activation trails the
    threshold as it falls, so inference keeps fewer than k latents; calibrated keeps k."""
    root, _ = planted
    l0 = {}
    for kind in ("running", "calibrated"):
        cfg = _cfg(root, "batch_topk", epochs=1, threshold=kind, out=str(root / f"models-{kind}"), val_fraction=0.2)
        l0[kind] = train(cfg)["final_val"]["l0"]
    assert abs(l0["calibrated"] - 6) < 0.6 and l0["running"] < l0["calibrated"], l0


def test_a_run_saved_before_a_setting_existed_resumes_only_with_what_it_did_then(planted):
    from jax_sae.loop import _same_settings

    old = _cfg(planted[0], "topk", lr_schedule="cosine", adam_betas=(0.9, 0.999), threshold="running")
    saved = json.loads(json.dumps(old.resume_key()))
    for added in ("lr_schedule", "adam_betas", "aux_k", "threshold", "b_dec_init"):
        del saved[added]
    assert _same_settings(saved, old)
    assert not _same_settings(saved, _cfg(planted[0], "topk"))  # today's defaults: wsd, 0.9,0.99, calibrated
    assert not _same_settings(saved | {"lr": 1.0}, old) and not _same_settings(saved | {"gone": 1}, old)
    del saved["seed"]
    assert not _same_settings(saved, old)  # only the settings added since count as their old behaviour


def test_a_matryoshka_run_saved_with_the_old_default_groups_names_them_to_resume():
    from jax_sae.loop import _other_settings

    today = TrainConfig.of(sae_type="matryoshka", hidden_dim=64, top_k=4)
    saved = json.loads(json.dumps(today.resume_key())) | {"group_sizes": []}  # how runs recorded the default
    assert _other_settings(saved, today) == ["--group_sizes 4,4,8,16,32"]
    assert _other_settings(saved, TrainConfig.of(sae_type="matryoshka", hidden_dim=64, top_k=4,
                                                 group_sizes=(4, 4, 8, 16, 32))) == []


def test_lr_auto_scales_with_one_over_sqrt_of_the_latents_and_sqrt_of_the_batch():
    assert TrainConfig.of(hidden_dim=2048, batch_size=4096).peak_lr == pytest.approx(3e-3)
    assert TrainConfig.of(hidden_dim=8192, batch_size=4096).peak_lr == pytest.approx(1.5e-3)
    assert TrainConfig.of(hidden_dim=2048).peak_lr == pytest.approx(1.5e-3)  # the default batch, 1024
    assert TrainConfig.of(hidden_dim=1024, batch_size=1024).peak_lr == pytest.approx(3e-3 * 2 ** 0.5 / 2)
    assert TrainConfig.of(hidden_dim=8192, lr=1e-4).peak_lr == 1e-4
    with pytest.raises(ConfigError, match="--lr must be positive or auto"):
        TrainConfig.of(lr=-1.0)


def test_a_run_with_other_settings_is_refused_naming_what_it_had(planted, tmp_path):
    from jax_sae.loop import _other_settings

    old = _cfg(planted[0], "topk", lr_schedule="cosine", adam_betas=(0.9, 0.999), threshold="running")
    saved = json.loads(json.dumps(old.resume_key()))
    del saved["lr_schedule"], saved["adam_betas"]  # saved before these settings existed
    assert _other_settings(saved, _cfg(planted[0], "topk", threshold="running")) == [
        "--lr_schedule cosine", "--adam_betas 0.9,0.999"]
    assert _other_settings(saved, old) == []


def test_rising_adam_is_adam_once_risen_and_follows_its_memory_before():
    """``scale_by_rising_adam``: with a tiny rise its memory is beta2's from the first step, and it
    equals optax's Adam; otherwise beta2_t = 1 - 1 / clip(t / rise, 2 / (1 - beta1), 1 / (1 - beta2)),
    the second moment bias-corrected by the sum of its coefficients. Float32, rtol 1e-5."""
    import optax

    from jax_sae.step import scale_by_rising_adam

    grads = [{"w": jax.random.normal(jax.random.PRNGKey(i), (5,)) * (10.0 / (i + 1))} for i in range(40)]
    params = {"w": jnp.zeros(5)}

    def run(tx):
        state, outs = tx.init(params), []
        for g in grads:
            out, state = tx.update(g, state, params)
            outs.append(np.asarray(out["w"]))
        return outs, state

    ours, _ = run(scale_by_rising_adam(0.9, 0.99, 1e-6))
    theirs, _ = run(optax.scale_by_adam(0.9, 0.99))
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), rtol=1e-5, atol=1e-7)

    b1, b2, rise = 0.5, 0.9, 2.0  # memory 4 steps until t = 8, t / 2 up to t = 20, then 10
    outs, state = run(scale_by_rising_adam(b1, b2, rise))
    mu, nu, weight = np.zeros(5), np.zeros(5), 0.0
    for t, g in enumerate((np.asarray(g["w"], np.float64) for g in grads), start=1):
        beta2 = 1 - 1 / min(max(t / rise, 2 / (1 - b1)), 1 / (1 - b2))
        mu, nu, weight = b1 * mu + (1 - b1) * g, beta2 * nu + (1 - beta2) * g * g, beta2 * weight + (1 - beta2)
        np.testing.assert_allclose(outs[t - 1], (mu / (1 - b1**t)) / (np.sqrt(nu / weight) + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.nu["w"]), nu, rtol=1e-5)
    assert float(state.nu_weight) == pytest.approx(weight, rel=1e-5)


def test_rising_adam_trains_and_refuses_a_negative_rise(planted):
    """A run with the rising second moment recovers the planted dictionary as plain Adam does
    (mean max cosine >= 0.9, as the type test asks); a negative rise is refused before any work."""
    root, directions = planted
    cfg = _cfg(root, "batch_topk", adam_betas=(0.9, 0.999), adam_b2_rise=10.0, out=str(root / "rise"))
    train(cfg)
    sae = jax_sae.load(cfg.run_dir() / "final")
    assert mean_max_cosine(directions, np.asarray(sae.params.W_dec_HD)) >= 0.9
    with pytest.raises(ConfigError, match="--adam_b2_rise must be 0 .off. or positive"):
        _cfg(root, "batch_topk", adam_b2_rise=-1.0)

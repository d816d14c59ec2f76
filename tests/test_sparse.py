"""The sparse reconstruction and backward give autodiff's gradients of the dense loss, on every
mesh, with dead latents and without; the batch-wide selection stays exact when heavy tokens
overflow their candidates; the step picks the path by shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae import model as M
from jax_sae.config import SAEConfig
from jax_sae.forward import LossSettings, sharded_loss, sharded_loss_and_grads, use_sparse
from jax_sae.select import batch_candidates, top_mask, with_overflow_rows
from jax_sae.sharding import make_mesh
from jax_sae.sparse import tuning_for

FIELDS = ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D")


def _setup(sae_type, d=16, h=128, k=4, batch=64, heavy_rows=0):
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=k,
                    group_sizes=(32, 32, 64) if sae_type == "matryoshka" else ())
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(d, np.float32))
    params = params.replace(b_enc_H=jax.random.normal(jax.random.PRNGKey(3), (h,)) * 0.1,
                            b_dec_D=jnp.full((d,), 0.3))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, d)) * 2 + 0.5
    x = x.at[:heavy_rows].multiply(30.0)  # heavy tokens take far more than k latents
    return cfg, params, x


def _compare(cfg, params, x, mesh, dead_tokens, dead_every=3, prefix_weights=(), aux_activation="relu"):
    counters = jnp.where(jnp.arange(cfg.hidden_dim) % dead_every == 0, 5, 0).astype(jnp.int32)
    settings = LossSettings(cfg, 0.0, 1, 1 / 32, dead_tokens, backward="sparse", prefix_weights=prefix_weights,
                            aux_activation=aux_activation)
    batch = x.shape[0]
    (loss, (metrics, fired)), grads = jax.jit(jax.value_and_grad(sharded_loss(settings, mesh, batch), has_aux=True))(
        params, counters, jnp.int32(0), x)
    loss2, grads2, metrics2, fired2 = jax.jit(sharded_loss_and_grads(settings, mesh, batch))(
        params, counters, jnp.int32(0), x)
    for name in FIELDS:
        ref, got = np.asarray(getattr(grads, name)), np.asarray(getattr(grads2, name))
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-5)
    metrics2["loss"] = loss2
    assert np.array_equal(np.asarray(fired), np.asarray(fired2))
    for key in ("l0", "fvu", "aux_loss", "smallest"):
        np.testing.assert_allclose(float(metrics2[key]), float(metrics[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    return metrics2


_MESHES = [((1, 1), 10**9), ((2, 2), 1), ((1, 4), 10**9)]
_TYPES = ["topk", "batch_topk", "matryoshka"]


@pytest.mark.parametrize("sae_type, mesh_shape, dead_tokens", [
    # every type and every mesh once by default (the diagonal); the whole cross product in the slow suite
    pytest.param(t, *mesh, marks=() if i == j else pytest.mark.slow)
    for i, t in enumerate(_TYPES) for j, mesh in enumerate(_MESHES)])
def test_sparse_gradients_equal_autodiff_of_the_dense_loss(sae_type, mesh_shape, dead_tokens):
    # One heavy token: on one device its row overflows its candidates and is done densely.
    cfg, params, x = _setup(sae_type, heavy_rows=1)
    metrics = _compare(cfg, params, x, make_mesh(*mesh_shape), dead_tokens)
    assert float(metrics["dense_fallback"]) == 0.0
    # AuxK (added inside a cond) is on only while latents are dead.
    assert float(metrics["aux_loss"]) > 0 if dead_tokens == 1 else float(metrics["aux_loss"]) == 0


@pytest.mark.slow  # the unequal-weights gradients; equal weights are checked by default in the test above
@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 4)])
def test_matryoshka_prefix_weights_weight_each_prefix_loss_in_both_paths(mesh_shape):
    cfg, params, x = _setup("matryoshka", heavy_rows=1)
    mesh = make_mesh(*mesh_shape)
    _compare(cfg, params, x, mesh, 10**9, prefix_weights=(0.6, 0.1, 0.3))
    # All weight on the last prefix: the loss is BatchTopK's (the same batch-wide selection).
    last = _dense_loss(cfg, params, x, mesh, prefix_weights=(0.0, 0.0, 1.0))
    plain = _dense_loss(dataclasses.replace(cfg, sae_type="batch_topk", group_sizes=()), params, x, mesh)
    np.testing.assert_allclose(last, plain, rtol=1e-5)


def _dense_loss(cfg, params, x, mesh, prefix_weights=()):
    settings = LossSettings(cfg, 0.0, 1, 1 / 32, 10**9, backward="sparse", prefix_weights=prefix_weights)
    counters = jnp.zeros(cfg.hidden_dim, jnp.int32)
    loss, _ = jax.jit(sharded_loss(settings, mesh, x.shape[0]))(params, counters, jnp.int32(0), x)
    return float(loss)


@pytest.mark.parametrize("mesh_shape, dead_every, aux_activation", [
    ((1, 1), 16, "relu"), ((1, 4), 16, "relu"), ((1, 4), 3, "relu"), ((1, 1), 1, "relu"), ((1, 4), 3, "pre")])
def test_aux_k_through_the_dead_latents_alone_equals_the_dense_aux_k(mesh_shape, dead_every, aux_activation):
    # 1 in 16 dead: at most h/8 per shard; 1 in 3: at most h/2 (AuxK's matmuls use only the
    # dead latents' columns); all dead: through all h.
    cfg, params, x = _setup("topk")
    metrics = _compare(cfg, params, x, make_mesh(*mesh_shape), 1, dead_every=dead_every, aux_activation=aux_activation)
    assert float(metrics["aux_loss"]) > 0


def test_heavy_tokens_overflow_their_candidates_and_the_selection_stays_exact():
    _, params, x = _setup("batch_topk", h=512, k=4, batch=128)
    x = x.at[:3].multiply(3.0)  # rows 0-2 keep 90-140 latents; the others at most 19
    pre = M.pre_activations(params, x)
    first = batch_candidates(pre, 4 * 128, (), row_candidates=24)
    overflow = np.flatnonzero(np.asarray(first.overflow_B))
    assert {0, 1, 2} <= set(overflow.tolist()) and len(overflow) <= 8
    sel = with_overflow_rows(pre, first, 4 * 128, (), rows=8)
    dense, tau = top_mask(pre, 4 * 128, (), row_wise=False)
    sparse = jnp.zeros_like(dense).at[jnp.arange(128)[:, None], sel.main.idx_BC].max(sel.main.keep_BC)
    sparse = sparse.at[sel.rows_R].max(sel.keep_RH, mode="drop")
    assert np.array_equal(np.asarray(sparse), np.asarray(dense)) and float(sel.kth) == float(tau)
    assert int(jnp.sum(sparse)) == 4 * 128


def test_too_many_heavy_tokens_fall_back_to_the_dense_step():
    cfg, params, x = _setup("batch_topk", batch=64, heavy_rows=40)  # more than batch/4 rows overflow
    metrics = _compare(cfg, params, x, make_mesh(1, 1), 10**9)
    assert float(metrics["dense_fallback"]) == 1.0


def test_the_path_is_chosen_by_shape():
    cpu = tuning_for("cpu")
    settings = LossSettings(SAEConfig(sae_type="topk", d_model=16, hidden_dim=64, top_k=8), 0.0, 1, 1 / 32, 10)
    assert not use_sparse(settings, 64, cpu)  # narrow: three dense GEMMs are cheaper than the gathers
    assert use_sparse(settings, 8192, cpu)
    assert use_sparse(dataclasses.replace(settings, backward="sparse"), 64, cpu)
    assert not use_sparse(dataclasses.replace(settings, backward="dense"), 8192, cpu)
    vanilla = dataclasses.replace(settings, sae=SAEConfig(sae_type="vanilla", d_model=16, hidden_dim=8192))
    assert not use_sparse(vanilla, 8192, cpu)


@pytest.mark.parametrize("sae_type", ["topk", "batch_topk"])
def test_the_compiled_step_never_sorts_a_row_of_latents(sae_type):
    """XLA turns a top_k whose outputs are sliced in some ways into a full sort (40x slower on a
    CPU); the step must keep its top_k kernels."""
    from jax_sae.sharding import shardings
    from jax_sae.step import compile_train_step, init_state, make_optimizer

    batch, d, h = 256, 64, 2048
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=16)
    mesh, optimizer = make_mesh(1, 1), make_optimizer(1e-4, 100, 0.0)
    state = init_state(M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(d, np.float32)), optimizer, 1.0)
    state = jax.device_put(state, shardings(state, mesh))
    step = compile_train_step(optimizer, LossSettings(cfg, 1.0, 50, 1 / 32, 10**7, "sparse"), mesh, state, batch)
    text = step.lower(state, jnp.zeros((batch, d))).compile().as_text()
    sorted_shapes = [line.split(" sort(")[0].split("=")[-1].strip() for line in text.splitlines() if " sort(" in line]
    assert not [shape for shape in sorted_shapes if f",{h}]" in shape], sorted_shapes


def bf16_vs_f32(sae_type="batch_topk"):
    """Loss after 5 steps of the same run with float32 and with bfloat16 matmul inputs."""
    from jax_sae.sharding import shardings
    from jax_sae.step import compile_train_step, init_state, make_optimizer

    cfg, params, x = _setup(sae_type, h=512, k=8, batch=128)
    losses = []
    for dtype in ("float32", "bfloat16"):
        mesh, optimizer = make_mesh(1, 1), make_optimizer(1e-3, 100, 0.0)
        state = init_state(jax.tree.map(jnp.copy, params), optimizer, 1.0)  # the step donates it
        state = jax.device_put(state, shardings(state, mesh))
        settings = LossSettings(cfg, 0.0, 1, 1 / 32, 10**9, "sparse", dtype)
        step = compile_train_step(optimizer, settings, mesh, state, x.shape[0])
        for _ in range(5):
            state, metrics = step(state, x)
        losses.append(float(metrics["loss"]))
    return tuple(losses)


@pytest.mark.slow  # bfloat16 matmuls are emulated and slow on a CPU; bench/gpu_check.sh runs it where it matters
def test_bfloat16_compute_stays_close_to_float32():
    loss32, loss16 = bf16_vs_f32()
    assert np.isfinite(loss16) and abs(loss16 - loss32) <= 0.02 * abs(loss32), (loss32, loss16)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """bench/gpu_check.sh's benchmark, on this CPU at a toy width: it must not need a GPU to run."""
    import json
    import sys

    from bench import common, gpu_bench

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", ["gpu_bench", "--d", "32", "--h", "1024", "--k", "8", "--batch", "64",
                                      "--types", "topk", "--dtypes", "float32", "--steps", "1", "--matmul_n", "128"])
    gpu_bench.main()
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(results["figures"]) >= {"bfloat16 matmul rate", "topk float32 auto", "topk float32 dense"}
    assert 0 < results["derived"]["topk float32 auto: encoder FLOP rate / bf16 matmul rate"]

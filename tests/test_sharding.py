"""One SPMD program: 1 device, a 4x1 and a 2x2 mesh train the same SAE, for every type."""

import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae import model as M
from jax_sae.config import SAEConfig
from jax_sae.forward import LossSettings
from jax_sae.select import top_mask
from jax_sae.sharding import DATA, MODEL, make_mesh, shardings
from jax_sae.step import compile_train_step, init_state, make_optimizer

from .synthetic import planted_dictionary, sparse_data

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (conftest sets XLA_FLAGS)")
TYPES = ["vanilla", "topk", "batch_topk", "matryoshka", "jumprelu"]


def _run(sae_type, data, model, steps=20, batch=64):
    cfg = SAEConfig(sae_type=sae_type, d_model=16, hidden_dim=64, top_k=4,
                    group_sizes=(16, 16, 32) if sae_type == "matryoshka" else ())
    x = sparse_data(planted_dictionary(16, 32, 0), steps * batch, active=3, noise=0.05, seed=0)
    x = (x - x.mean(0)) / x.std()
    optimizer = make_optimizer(3e-3, steps, 0.0)
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(16, np.float32))
    if cfg.learned_threshold:  # started at L0 = k, as the trainer starts it
        params = params.replace(threshold_H=jnp.full(64, M.calibrated_threshold(cfg, params, x[:512]), jnp.float32))
    mesh = make_mesh(data, model)
    state = init_state(params, optimizer, 1.0)
    state = jax.device_put(state, shardings(state, mesh))
    # dead_tokens small so AuxK is active within 20 steps
    step = compile_train_step(optimizer, LossSettings(cfg, 0.3, 5, 1 / 32, 3 * batch), mesh, state, batch)
    losses = []
    for i in range(steps):
        state, metrics = step(state, x[i * batch:(i + 1) * batch])
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


@pytest.mark.parametrize("sae_type", [  # BatchTopK by default (the threshold and the batch-wide selection);
    pytest.param(t, marks=pytest.mark.slow if t != "batch_topk" else ()) for t in TYPES])  # the rest: slow suite
def test_meshes_agree_on_losses_and_parameters(sae_type):
    ref_losses, ref = _run(sae_type, 1, 1)
    assert np.all(np.isfinite(ref_losses)) and ref_losses[-1] < ref_losses[0]
    for data, model in ((4, 1), (2, 2)):
        losses, state = _run(sae_type, data, model)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5, err_msg=f"{data}x{model} loss curve")
        for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D") + (("threshold_H",) if sae_type == "jumprelu" else ()):
            np.testing.assert_allclose(getattr(state.params, name), getattr(ref.params, name), atol=1e-5,
                                       err_msg=f"{data}x{model} {name}")
        np.testing.assert_array_equal(state.tokens_since_fired_H, ref.tokens_since_fired_H)
        assert float(state.threshold) == pytest.approx(float(ref.threshold), abs=1e-5)


def test_sharded_selection_is_exact_and_moves_only_counts_and_candidates():
    mesh = make_mesh(2, 2)
    x = jax.random.normal(jax.random.PRNGKey(3), (64, 128))
    from jax.sharding import PartitionSpec as P

    def local(v):
        batch_mask, tau = top_mask(v, 4 * 64, (DATA, MODEL), row_wise=False, row_candidates=8)
        row_mask, _ = top_mask(v, 4, (MODEL,), row_wise=True)
        return batch_mask, row_mask, tau

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(DATA, MODEL),
                               out_specs=(P(DATA, MODEL), P(DATA, MODEL), P())))
    batch_mask, row_mask, tau = fn(x)
    want_batch, want_tau = top_mask(x, 4 * 64, (), row_wise=False)
    np.testing.assert_array_equal(batch_mask, want_batch)
    np.testing.assert_array_equal(row_mask, top_mask(x, 4, (), row_wise=True)[0])
    assert float(tau) == float(want_tau)
    collectives = [line for line in fn.lower(x).compile().as_text().splitlines()
                   if re.search(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute)\(", line)]
    assert collectives, "the selection must communicate"
    local_rows, k = 32, 4
    for line in collectives:
        dtype, dims = re.search(r"= (\w+)\[([\d,]*)\]", line).groups()
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        if dtype == "s32":  # counts for the bisection and tie ranks
            assert size <= local_rows * 2, line.strip()[:120]
        else:  # per-row top-k merge: k candidates per row from each model shard, never [B, h]
            assert dtype == "f32" and size <= local_rows * k * 2, line.strip()[:120]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # 22 s of two JAX processes; the default suite keeps multi-process discovery (test_discovery)
def test_two_processes_train_the_same_sae_as_one(tmp_path, monkeypatch):
    """2 processes x 2 CPU devices (gloo collectives on localhost) == 1 process x 4 devices, with
    each process reading only its share of the store (2 lanes: half the chunks each)."""
    import json
    import os
    import subprocess

    import jax_sae
    from sae_core.store import layout as store_module
    from jax_sae.train import main as train_main

    from .conftest import cli
    from .synthetic import write_store

    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 500 * 16 * 4)  # 500-row chunks: 12 of them
    write_store(tmp_path / "store", sparse_data(planted_dictionary(16, 32, 0), 6000, active=3, noise=0.05, seed=0))
    args = ["jax_sae.train", "--sae_type", "batch_topk", "--layer_idx", "0", "--hidden_dim", "64", "--top_k", "4",
            "--batch_size", "128", "--epochs", "2", "--lr", "3e-3", "--store", str(tmp_path / "store"),
            "--mesh_data", "4", "--checkpoint_every", "10", "--data_lanes", "2", "--no-progress"]

    def env(devices):
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}

    assert jax.device_count() == 4  # the reference: this process, 4 devices (conftest)
    train_main(args[1:] + ["--out", str(tmp_path / "one")])
    port = _free_port()
    procs = [subprocess.Popen(cli(*args, "--out", str(tmp_path / "two"), "--coordinator_address",
                                  f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)),
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    one = jax_sae.load(tmp_path / "one" / "batch_topk" / "layer0" / "dim64" / "final")
    two = jax_sae.load(tmp_path / "two" / "batch_topk" / "layer0" / "dim64" / "final")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_allclose(np.asarray(getattr(two.params, name)), np.asarray(getattr(one.params, name)),
                                   atol=1e-5)
    assert float(two.threshold) == pytest.approx(float(one.threshold), abs=1e-5)
    stats = [json.loads((tmp_path / run / "batch_topk" / "layer0" / "dim64" / "training_stats.json").read_text())
             for run in ("one", "two")]
    (alone,), shares = stats[0]["bytes_read_per_process"], stats[1]["bytes_read_per_process"]
    # Together they read what one process reads (to a few rows of read-ahead), each well under all of it.
    assert sum(shares) == pytest.approx(alone, rel=1e-3) and all(n <= 0.65 * alone for n in shares), (alone, shares)

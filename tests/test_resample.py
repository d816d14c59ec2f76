"""Resampling the rarely firing latents (``--resamples``): on a planted case the rare latents take
the residual directions of the badly reconstructed rows and fresh moments while everything else
stays bit for bit; in a run, it happens at the planned steps and resumes exactly."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_sae import model as M
from jax_sae.config import SAEConfig
from jax_sae.resample import Resampler, resample, resample_points
from jax_sae.step import init_state

from .test_synthetic import _train_args

D, H = 8, 6
RARE = np.array([False, True, False, False, True, False])


def _planted(free_decoder: bool):
    """Live latents 0, 2, 3, 5 read and write e0..e3 (rows of norm 2 with a free decoder); the rare
    latents 1 and 4 never fire. Pool: 32 rows of e0 (reconstructed exactly) and 32 rows along e6 or e7,
    which no latent reads (their residual is the row itself)."""
    eye = np.eye(D, dtype=np.float32)
    W_dec = np.zeros((H, D), np.float32)
    W_dec[[0, 2, 3, 5]] = eye[:4]
    W_dec[[1, 4]] = eye[4]  # rare: its own direction, never reached (b_enc far below zero)
    b_enc = np.where(RARE, -100.0, 0.0).astype(np.float32)
    norm = 2.0 if free_decoder else 1.0
    params = M.SAEParams(W_enc_DH=jnp.asarray(W_dec.T / norm), b_enc_H=jnp.asarray(b_enc / norm),
                         W_dec_HD=jnp.asarray(W_dec * norm), b_dec_D=jnp.zeros(D))
    optimizer = optax.adam(1e-3)
    state = init_state(params, optimizer, 1.0, count_fires=True)
    ones = jax.tree.map(jnp.ones_like, params)
    mu_nu = state.opt_state[0]._replace(mu=ones, nu=ones)
    state = state.replace(opt_state=(mu_nu, *state.opt_state[1:]), fires_H=jnp.asarray(np.where(RARE, 2, 50), jnp.int32))
    rng = np.random.default_rng(0)
    far = np.where(rng.random(32)[:, None] < 0.5, eye[6], eye[7]) * rng.uniform(1, 3, (32, 1))
    pool = np.concatenate([np.tile(eye[0], (32, 1)), far]).astype(np.float32)
    return state, pool


@pytest.mark.parametrize("free_decoder", [False, True])
def test_rare_latents_take_the_residuals_of_badly_reconstructed_rows_and_nothing_else_moves(free_decoder):
    sae = SAEConfig(sae_type="topk", d_model=D, hidden_dim=H, top_k=2)
    state, pool = _planted(free_decoder)
    before = jax.tree.map(np.asarray, state)
    out, count = resample(state, jnp.asarray(pool), jax.random.PRNGKey(1), jnp.int32(10), sae=sae,
                          free_decoder=free_decoder)
    assert int(count) == 2
    unit = M.effective(out.params) if free_decoder else out.params
    rare = np.flatnonzero(RARE)
    dec = np.asarray(unit.W_dec_HD)[rare]
    # each rare row is e6 or e7 (a far row's residual), never e0 (zero loss: never drawn)
    assert np.allclose(np.abs(dec[:, 6]) + np.abs(dec[:, 7]), 1.0, atol=1e-6) and np.allclose(dec[:, :6], 0, atol=1e-6)
    # the encoder reads the same direction at the live latents' mean norm (1 for the unit model)
    np.testing.assert_allclose(np.asarray(unit.W_enc_DH)[:, rare].T, dec, atol=1e-6)
    assert np.all(np.asarray(out.params.b_enc_H)[rare] == 0.0)
    if free_decoder:  # the stored row keeps the live rows' norm
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out.params.W_dec_HD)[rare], axis=1), 2.0, rtol=1e-6)
    live = np.flatnonzero(~RARE)
    for name in ("W_dec_HD", "b_enc_H"):
        np.testing.assert_array_equal(np.asarray(getattr(out.params, name))[live], getattr(before.params, name)[live])
    np.testing.assert_array_equal(np.asarray(out.params.W_enc_DH)[:, live], before.params.W_enc_DH[:, live])
    np.testing.assert_array_equal(np.asarray(out.params.b_dec_D), before.params.b_dec_D)
    for moment in (out.opt_state[0].mu, out.opt_state[0].nu):
        assert np.all(np.asarray(moment.W_dec_HD)[rare] == 0) and np.all(np.asarray(moment.W_dec_HD)[live] == 1)
        assert np.all(np.asarray(moment.W_enc_DH)[:, rare] == 0) and np.all(np.asarray(moment.b_enc_H)[live] == 1)
        assert np.all(np.asarray(moment.b_dec_D) == 1)
    assert np.all(np.asarray(out.fires_H) == 0)


def test_rows_are_drawn_without_replacement_and_by_loss():
    """Two rare latents and exactly two rows with a residual: each takes a different one."""
    sae = SAEConfig(sae_type="topk", d_model=D, hidden_dim=H, top_k=2)
    state, _ = _planted(False)
    eye = np.eye(D, dtype=np.float32)
    pool = np.concatenate([np.tile(eye[0], (62, 1)), eye[6:8] * 3]).astype(np.float32)
    for seed in range(5):
        out, _ = resample(state, jnp.asarray(pool), jax.random.PRNGKey(seed), jnp.int32(10), sae=sae,
                          free_decoder=False)
        dec = np.asarray(out.params.W_dec_HD)[RARE]
        assert sorted(np.argmax(dec, axis=1).tolist()) == [6, 7]


def test_resample_points_spread_evenly_up_to_the_given_fraction():
    assert resample_points(80, 2) == (20, 40)
    assert resample_points(976, 4) == (122, 244, 366, 488)
    assert resample_points(3, 4) == (1, 2)  # a run too short for them all: the distinct steps
    assert resample_points(976, 6, until=0.75) == (122, 244, 366, 488, 610, 732)
    # the pool: 16,384 rows of batches, or the batches since the previous resample when fewer
    short = Resampler(points=(20, 40), pool_batches=64, below_fraction=0.1, seed=0, fn=None)
    assert short.pool_size(20) == 20 and short.pool_size(40) == 20
    assert Resampler(points=(122, 244), pool_batches=16, below_fraction=0.1, seed=0, fn=None).pool_size(244) == 16


def _log(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["resampled"]) for r in lines if "resampled" in r]


def test_a_run_resamples_at_the_planned_steps_and_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    import jax_sae
    from jax_sae import checkpoint
    from jax_sae.train import TrainConfig, train

    keep_all = checkpoint.RunCheckpoints.__init__
    monkeypatch.setattr(checkpoint.RunCheckpoints, "__init__", lambda self, directory, keep=2: keep_all(self, directory, 10))
    # 80 steps: resamples after steps 20 and 40; checkpoints at 30, 60 and 80. The resumed run starts
    # at 30, before the second resample, whose pool it must read again from the data
    cfg = TrainConfig.of(store="synthetic:synthsaebench-tiny", sae_type="batch_topk", hidden_dim=128, top_k=4,
                         batch_size=256, epochs=2, max_tokens=10240, lr=3e-3, checkpoint_every=30, val_max_tokens=4096,
                         mesh_data=1, out=str(tmp_path / "run"), progress=False, resamples=2, resample_until=0.5,
                         resample_below=1.0)
    train(cfg)
    run = cfg.run_dir()
    events = _log(run)
    assert [step for step, _ in events] == [20, 40] and all(n > 0 for _, n in events), events
    first = jax_sae.load(run / "final")
    for name in ("final", "best"):
        shutil.rmtree(run / name)
    for step in (60, 80):
        shutil.rmtree(run / "ckpt" / str(step))
    stats = train(cfg)
    assert stats["resumed_from"] == 30
    assert [e for e in _log(run) if e[0] > 30] == [events[1]]
    second = jax_sae.load(run / "final")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_array_equal(np.asarray(getattr(first.params, name)), np.asarray(getattr(second.params, name)))


def test_auto_resamples_the_top_k_family_of_saes_only():
    from jax_sae.config import AUTO_RESAMPLES
    from jax_sae.train import TrainConfig

    def count(**kw):
        return TrainConfig.of(store="synthetic:synthsaebench-tiny", hidden_dim=128, top_k=4, **kw).resample_count

    assert count(sae_type="topk") == count(sae_type="batch_topk") == count(sae_type="matryoshka") == AUTO_RESAMPLES == 6
    assert count(sae_type="jumprelu") == count(sae_type="vanilla") == 0
    assert count(sae_type="batch_topk", transcoder="plain") == 0
    assert count(sae_type="jumprelu", resamples=3) == 3 and count(sae_type="batch_topk", resamples=0) == 0


def test_bad_resample_settings_are_refused_in_one_line(tmp_path):
    from jax_sae.train import main

    for flags, expected in ((["--resamples", "-1"], "--resamples must be auto, 0"),
                            (["--resample_below", "2"], "--resample_below must be in (0, 1]"),
                            (["--resample_until", "0"], "--resample_until must be in (0, 1]")):
        with pytest.raises(SystemExit) as exc:
            main(_train_args(tmp_path / "bad", *flags)[1:])
        text = str(exc.value)
        assert exc.value.code == 2 and text.startswith("error: ") and "\n" not in text and expected in text, text
    assert not (tmp_path / "bad").exists(), "refused before anything is written"

"""The synthetic model (SynthSAEBench's generative process), its metrics, and training on it.

Statistical checks state their tolerance: a count of Bernoulli events is compared with its
expectation within 5 standard deviations (a false failure about once in 3 million runs)."""

from __future__ import annotations

import dataclasses
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.synthetic import SynthConfig, load, preset
from jax_sae.synthetic import build as B
from jax_sae.synthetic.metrics import generator_stats, score, score_batches
from jax_sae.synthetic.sample import key, samples
from sae_core.errors import UsageError

from .conftest import cli

TINY = preset("synthsaebench-tiny")


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def test_overlap_gradient_in_closed_form_equals_autodiff():
    E = jax.random.normal(jax.random.PRNGKey(0), (40, 8))
    np.testing.assert_allclose(B.overlap_grad(E), jax.grad(B.overlap_loss)(E), rtol=1e-4, atol=1e-3)
    gram = E @ E.T
    pairs = jnp.sum(gram**2) - jnp.sum(jnp.diag(gram) ** 2)
    np.testing.assert_allclose(B.overlap_loss(E), pairs + 40 * jnp.sum((jnp.diag(gram) - 1) ** 2), rtol=1e-5)


def test_orthogonalising_lowers_the_overlap_and_keeps_unit_rows():
    E = B._unit_rows(np.random.default_rng(0).standard_normal((256, 16)))
    after = B.orthogonalise(E, steps=50, lr=3e-3)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, rtol=1e-6)
    assert float(B.overlap_loss(jnp.asarray(after))) < float(B.overlap_loss(jnp.asarray(E)))


def test_zipf_probabilities_and_the_tree_layout():
    cfg = SynthConfig(n_features=30, d_model=4, roots=2, branching=3, depth=2, corr_rank=2, ortho_steps=0)
    p = B.zipf_probabilities(cfg)
    assert p[0] == pytest.approx(cfg.p_max) and p[-1] == pytest.approx(cfg.p_min) and np.all(np.diff(p) < 0)
    assert cfg.level_starts() == [0, 2, 8, 26]
    parent = B.parents(cfg)
    assert list(parent[:8]) == [-1, -1, 0, 0, 0, 1, 1, 1]
    assert list(parent[8:11]) == [2, 2, 2] and parent[25] == 7 and list(parent[26:]) == [-1] * 4
    compensated = B.compensated(cfg, p)
    siblings = p[2] + p[3] + p[4]
    assert compensated[3] == pytest.approx(min(1.0, p[3] / p[0] * (1 + (siblings - p[3]) / p[0])))
    assert compensated[0] == p[0] and compensated[29] == p[29]


def test_bad_configurations_are_refused_with_one_line():
    with pytest.raises(UsageError, match="the hierarchy needs 340 features but there are 100"):
        dataclasses.replace(TINY, n_features=100)
    with pytest.raises(UsageError, match="unknown synthetic model 'nope'"):
        preset("nope")
    assert preset("synthsaebench-tiny@7").seed == 7


def test_the_model_is_cached_and_read_back_equal(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_MUSIC_CACHE", str(tmp_path))
    built = load(TINY)
    assert list((tmp_path / "synthetic").glob("*.npz")) == [B.cache_path(TINY)]  # named to SAELens's side
    again = load(TINY)
    for name in B.ARRAYS:
        np.testing.assert_array_equal(getattr(built, name), getattr(again, name))
        np.testing.assert_array_equal(getattr(built, name), getattr(tiny, name))  # seeded: the same anywhere


def test_samples_obey_the_hierarchy_and_the_firing_rates(tiny):
    stats = generator_stats(tiny, n_samples=40_960)
    assert stats["children_without_parent"] == 0 and stats["families_with_two_children"] == 0
    _, a, over = jax.jit(samples, static_argnums=2)(tiny, key(1), 40_960)
    assert int(over) == 0
    fires = np.asarray(a > 0)
    free = np.arange(TINY.tree_features, TINY.n_features)  # outside the trees: exactly their Zipf rate
    p = B.zipf_probabilities(TINY)[free]
    expected, sd = 40_960 * p.sum(), np.sqrt(40_960 * np.sum(p * (1 - p)))
    assert abs(fires[:, free].sum() - expected) < 5 * sd
    roots = np.arange(TINY.roots)  # roots are gated by nothing: their Zipf rate too
    p = B.zipf_probabilities(TINY)[roots]
    assert abs(fires[:, roots].sum() - 40_960 * p.sum()) < 5 * np.sqrt(40_960 * np.sum(p * (1 - p)))
    # a child's magnitude is its own draw times its parent's value over the parent's mean
    child, parent = TINY.level_starts()[1], 0
    both = fires[:, child] & fires[:, parent]
    ratio = np.asarray(a[both, child]) / (np.asarray(a[both, parent]) / float(tiny.mean[parent]))
    assert abs(ratio.mean() - float(tiny.mean[child])) < 5 * float(tiny.std[child]) / np.sqrt(both.sum()) + 0.05


def test_a_key_gives_the_same_batch_and_another_key_another(tiny):
    draw = jax.jit(samples, static_argnums=2)
    x1, x2, x3 = draw(tiny, key(3), 256)[0], draw(tiny, key(3), 256)[0], draw(tiny, key(4), 256)[0]
    np.testing.assert_array_equal(x1, x2)
    assert not np.allclose(x1, x3)


def test_compacting_a_row_finds_its_firing_columns_in_order():
    """The packed-word compaction against numpy, at densities from empty to full and with rows that
    fire more often than there are slots (those keep their first columns and report the count)."""
    from jax_sae.synthetic.sample import _compact

    rng = np.random.default_rng(0)
    for width, density, slots in ((5504, 0.002, 40), (70, 0.5, 24), (64, 1.0, 8), (33, 0.0, 4), (100, 0.3, 100)):
        fire = rng.random((16, width)) < density
        columns, count = jax.jit(_compact, static_argnums=1)(jnp.asarray(fire), slots)
        for row, (got, n) in enumerate(zip(np.asarray(columns), np.asarray(count))):
            want = np.flatnonzero(fire[row])
            assert n == len(want)
            np.testing.assert_array_equal(got[: min(n, slots)], want[:slots])
            assert np.all(got[min(n, slots):] == width)


def test_coarse_then_fine_uniforms_fire_at_exactly_the_given_rate():
    """Features outside the trees fire when a byte falls below 256 q, or equals it and a fine uniform
    falls below the remainder: rate q exactly. Without correlation q is the Zipf rate; each of the 48
    features' counts (rates 5e-4 to 0.4, across the bytes' steps) lies within 5 standard deviations."""
    cfg = SynthConfig(n_features=48, d_model=16, roots=0, corr_rank=1, corr_scale=0.0, ortho_steps=0)
    model = B.build(cfg)
    n = 65_536
    _, a, over = jax.jit(samples, static_argnums=2)(model, key(5), n)
    assert int(over) == 0
    p = B.zipf_probabilities(cfg)
    counts = np.asarray((a > 0).sum(axis=0))
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)) + 1), np.abs(counts - n * p) / np.sqrt(n * p)


def test_x_alone_equals_the_samples_x(tiny):
    """Training draws x without the [B, N] magnitudes; it equals the x of ``samples`` (float32 sums in
    another order: within 1e-5 of |x|)."""
    from jax_sae.synthetic.sample import batch_x

    x, _, _ = jax.jit(samples, static_argnums=2)(tiny, key(7), 256)
    np.testing.assert_allclose(np.asarray(batch_x(tiny, key(7), 256)), np.asarray(x), atol=1e-5 * float(jnp.abs(x).max()))


def test_metrics_on_batches_whose_answer_is_known():
    directions = jnp.eye(4)  # 4 true features along the axes
    W_dec = jnp.asarray([[1.0, 0, 0, 0], [0, 0.6, 0.8, 0]])  # latent 0 = feature 0; latent 1 nearest feature 2
    a = jnp.asarray([[1.0, 0, 0, 0], [0, 0, 2, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    f = jnp.asarray([[1.0, 0], [0, 1], [0, 1], [1, 0]])  # latent 0: TP, -, FN, FP; latent 1: -, TP, TP, -
    x = a @ directions
    x_hat = f @ W_dec
    s = score_batches(W_dec, directions, [(x, a, f, x_hat)])
    assert s["mcc"] == pytest.approx((1.0 + 0.8) / 2) and s["uniqueness"] == 1.0
    assert s["precision"] == pytest.approx((0.5 + 1.0) / 2) and s["recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["f1"] == pytest.approx((0.5 + 1.0) / 2)
    xs, xh = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    variance = np.mean(np.sum(xs**2, 1)) - np.sum(xs.mean(0) ** 2)
    assert s["explained_variance"] == pytest.approx(1 - np.mean(np.sum((xs - xh) ** 2, 1)) / variance)
    norms = np.linalg.norm(xs, axis=1)
    assert s["shrinkage"] == pytest.approx(np.mean(np.linalg.norm(xh, axis=1)[norms > 0] / norms[norms > 0]))
    assert s["l0"] == 1.0 and s["true_l0"] == 1.0 and s["dead"] == 0
    assert s["uniqueness_live"] == 1.0 and np.isnan(s["dead_max_cos"])


def test_uniqueness_live_leaves_out_dead_latents():
    """Latents 0 and 1 fire and best match features 0 and 1; latents 2 and 3 never fire and both best
    match feature 3: uniqueness counts the dead ones' shared match, uniqueness_live does not."""
    directions = jnp.eye(4)
    W_dec = jnp.asarray([[1.0, 0, 0, 0], [0, 0.8, 0.6, 0], [0.6, 0, 0, 0.8], [0, 0, 0, 1.0]])
    a = jnp.asarray([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    f = jnp.asarray([[1.0, 0, 0, 0], [0, 1, 0, 0]])  # latents 2 and 3 never fire
    s = score_batches(W_dec, directions, [(a @ directions, a, f, f @ W_dec)])
    assert s["dead"] == 2 and s["uniqueness"] == pytest.approx(3 / 4)  # best matches 0, 1, 3, 3
    assert s["uniqueness_live"] == 1.0 and s["dead_max_cos"] == pytest.approx((0.8 + 1.0) / 2)


def test_surplus_names_the_live_duplicates_and_what_they_learned():
    """Latents 0 and 1 learned features 0 and 1; latent 2 is a weak copy of feature 0 (|cos| 0.6)
    firing once; latent 3 never fires. Only latent 2 is surplus, with its own |cos| and rate."""
    directions = jnp.eye(4)
    W_dec = jnp.asarray([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0, 0.8, 0], [0.6, 0, 0, 0.8]])
    a = jnp.asarray([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    f = jnp.asarray([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0.5, 0], [1, 0, 0, 0]])
    s = score_batches(W_dec, directions, [(a @ directions, a, f, f @ W_dec)])
    assert s["uniqueness"] == 1.0 and s["dead"] == 1  # best matches 0, 1, 2 (0.8), 3 (0.8)
    assert s["surplus"] == 0  # latent 2's best match is feature 2 (0.8 > 0.6): distinct, not a copy
    W_dec = W_dec.at[2].set(jnp.asarray([0.8, 0, 0.6, 0]))  # now its best match is feature 0
    s = score_batches(W_dec, directions, [(a @ directions, a, f, f @ W_dec)])
    assert s["surplus"] == 1 and s["surplus_cos"] == pytest.approx(0.8) and s["surplus_rate"] == pytest.approx(1 / 4)
    assert s["kept_cos"] == pytest.approx(1.0) and s["kept_rate"] == pytest.approx(2.5 / 4)  # rates 3/4 and 2/4


def test_an_sae_made_of_the_true_directions_scores_as_such(tiny):
    from jax_sae import model as M
    from jax_sae.api import SAE
    from jax_sae.config import SAEConfig

    h = 128  # the most frequent features, read by their own directions
    cfg = SAEConfig(sae_type="topk", d_model=TINY.d_model, hidden_dim=h, top_k=4)
    E = tiny.directions[:h]
    sae = SAE(cfg, M.SAEParams(W_enc_DH=E.T, b_enc_H=jnp.zeros(h), W_dec_HD=E, b_dec_D=tiny.bias), 0.0, 1.0)
    s = score(sae, tiny, n_samples=8192)
    assert s["mcc"] == pytest.approx(1.0, abs=1e-6) and s["uniqueness"] == 1.0
    assert s["l0"] <= 4 and s["dead"] == 0 and s["events_over_cap"] == 0


def _train_args(out, *extra):
    return ["jax_sae.train", "--store", "synthetic:synthsaebench-tiny", "--sae_type", "batch_topk", "--hidden_dim",
            "128", "--top_k", "4", "--batch_size", "256", "--epochs", "2", "--max_tokens", "10240", "--lr", "3e-3",
            "--checkpoint_every", "20", "--val_max_tokens", "4096", "--mesh_data", "1", "--out", str(out),
            "--no-progress", *extra]


def _one_device_env(cache) -> dict:
    """This environment without the tests' four forced CPU devices, and with a compilation cache of
    the test's own: the rerun loads the first run's programs instead of compiling them again."""
    import os
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    return os.environ | {"XLA_FLAGS": flags, "SAE_MUSIC_JAX_CACHE": str(cache)}


def test_training_on_synthetic_batches_resumes_to_the_same_parameters(tmp_path):
    import shutil

    import jax_sae

    env = _one_device_env(tmp_path / "jax-cache")
    done = subprocess.run(cli(*_train_args(tmp_path / "run")), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run" / "batch_topk" / "layer12" / "dim128"
    first = jax_sae.load(run / "final")
    s = score(first, load(TINY), n_samples=4096)
    assert s["explained_variance"] > 0.3 and s["l0"] <= 4.5
    for name in ("final", "best"):
        shutil.rmtree(run / name)
    steps = sorted(int(p.name) for p in (run / "ckpt").iterdir() if p.name.isdigit())
    shutil.rmtree(run / "ckpt" / str(steps[-1]))  # the finished run's last checkpoint: it resumes from the one before
    again = subprocess.run(cli(*_train_args(tmp_path / "run")), capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "resuming" in again.stdout and f"from step {steps[-2]}" in again.stdout, again.stdout
    second = jax_sae.load(run / "final")
    for name in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D"):
        np.testing.assert_array_equal(np.asarray(getattr(first.params, name)), np.asarray(getattr(second.params, name)))


def test_the_saelens_side_refuses_missing_inputs_in_one_line(tmp_path, capsys):
    """bench/saelens_synth.py runs where SAELens is; its input checks come before any SAELens import."""
    from bench import saelens_synth

    with pytest.raises(SystemExit) as exit_:
        saelens_synth.main(["--ours", str(tmp_path / "nope.json")])
    assert exit_.value.code == 2 and "bench.synthbench --generator" in capsys.readouterr().err
    ours = tmp_path / "ours.json"
    ours.write_text('{"synthetic": {}, "config": {"model": "synthsaebench-tiny"}, "dictionary": "/gone.npz"}')
    with pytest.raises(SystemExit) as exit_:
        saelens_synth.main(["--ours", str(ours), "--our_dictionary", "--train", "batch_topk"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "/gone.npz" in err


@pytest.mark.slow  # 50 s: three trainings' compilations; the sweep's equality with lone runs is test_sweep's
def test_synthbench_sweep_scores_what_the_lone_runs_score(tiny, tmp_path):
    """``bench.synthbench --sweep`` trains the types as one sweep on shared batches; each SAE's row
    equals its lone run's (same batches, same steps): scores within 1e-6, as float noise allows."""
    from bench.synthbench import SynthBenchConfig, sweep_and_score, train_and_score

    cfg = SynthBenchConfig(model="synthsaebench-tiny", hidden_dim=32, top_k=4, samples=2560, batch_size=256,
                           evaluations=2, eval_samples=1024, out=str(tmp_path / "runs"))
    swept = sweep_and_score(cfg, 0, tiny)
    assert [r["sae_type"] for r in swept] == ["batch_topk", "matryoshka"]
    for row in swept:
        lone = train_and_score(cfg, row["sae_type"], 0, tiny)
        for name in ("f1", "mcc", "uniqueness", "explained_variance", "l0", "dead"):
            assert row[name] == pytest.approx(lone[name], abs=1e-6), (row["sae_type"], name)
        assert 0 < row["f1"] <= 1 and row["lr"] == lone["lr"]


def test_synthbench_rescore_scores_a_finished_run_again_and_refuses_a_wrong_directory(tiny, tmp_path, capsys):
    """``--rescore RUN_DIR`` gives the row the run got when it finished (same samples, same code);
    a directory that is not a finished run is refused in one line before anything is scored."""
    from bench import synthbench
    from bench.synthbench import SynthBenchConfig, rescored, train_and_score

    cfg = SynthBenchConfig(model="synthsaebench-tiny", hidden_dim=32, top_k=4, samples=2560, batch_size=256,
                           evaluations=2, eval_samples=1024, out=str(tmp_path / "runs"))
    trained = train_and_score(cfg, "batch_topk", 0, tiny)
    run_dir = next((tmp_path / "runs").rglob("training_stats.json")).parent
    again, = rescored(SynthBenchConfig(model="synthsaebench-tiny", eval_samples=1024, rescore=(str(run_dir),)), tiny)
    for name in ("f1", "mcc", "uniqueness", "explained_variance", "dead", "surplus", "train_seconds"):
        assert again[name] == pytest.approx(trained[name], abs=1e-6, nan_ok=True), name
    capsys.readouterr()  # the training's progress bars
    with pytest.raises(SystemExit) as exit_:
        synthbench.main(["--model", "synthsaebench-tiny", "--rescore", str(run_dir), str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"--rescore {tmp_path}:" in err

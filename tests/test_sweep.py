"""Sweeps: every member equals the same SAE trained alone (on a 4-device mesh, mixing types, widths,
k and layers); the store is read once per epoch for all members of a layer; a sweep interrupted
between two members' checkpoints resumes to the same parameters; bad grids are refused in one line
before any work; the comparison page marks the frontier."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jax_sae
from jax_sae.sweep import SweepConfig, main, sweep
from jax_sae.sweep.config import members
from jax_sae.sweep.page import frontier
from jax_sae.train import TrainConfig, train
from sae_core.cli import from_flags

from .conftest import cli
from .synthetic import planted_dictionary, sparse_data, write_store

D_MODEL = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    layers = {layer: sparse_data(planted_dictionary(D_MODEL, 64, seed=layer), 6000, active=4, noise=0.05, seed=layer)
              for layer in (0, 1)}
    write_store(root / "store", layers)
    return root


def _base(root, out, **kw):
    base = dict(store=str(root / "store"), out=str(out), batch_size=256, epochs=2, lr=4e-3, patience=0,
                progress=False, max_tokens=4000, eval_every=5, checkpoint_every=4)
    return base | kw


def _sweep_cfg(root, out, **kw) -> SweepConfig:
    return from_flags(SweepConfig, _base(root, out, **kw))


def _params(run_dir):
    sae = jax_sae.load(run_dir / "final")
    return [np.asarray(leaf) for leaf in jax.tree.leaves(sae.params)] + [np.asarray(sae.threshold)]


def _assert_same(a, b, what):
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=what)  # float tolerance: other fusions


def test_each_member_equals_the_same_sae_trained_alone_on_a_4_device_mesh(store, tmp_path):
    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps({"members": [
        {"sae_type": "topk", "hidden_dim": 64, "top_k": 4, "layer_idx": 0},
        {"sae_type": "batch_topk", "hidden_dim": 128, "top_k": 8, "layer_idx": 0, "resamples": 2, "resample_below": 1.0},
        {"sae_type": "matryoshka", "hidden_dim": 128, "top_k": 6, "layer_idx": 1, "resamples": 2, "resample_below": 1.0},
        {"sae_type": "jumprelu", "hidden_dim": 64, "top_k": 4, "layer_idx": 1}]}))
    cfg = _sweep_cfg(store, tmp_path / "sweep", sweep_file=str(spec), mesh_data=2, mesh_model=2)
    summary = sweep(cfg)
    assert jax.device_count() == 4 and summary["runtime"]["mesh"] == {"data": 2, "model": 2}
    for member in members(cfg, D_MODEL):
        alone = member.cfg.replace(out=str(tmp_path / "alone" / member.name))
        train(alone)
        _assert_same(alone.run_dir(), member.cfg.run_dir(), member.name)
        for name in ("best", "final", "metrics.jsonl", "training_stats.json", "training_curves.png"):
            assert (member.cfg.run_dir() / name).exists(), (member.name, name)
        ours = [r for r in (member.cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
        theirs = (alone.run_dir() / "metrics.jsonl").read_text().splitlines()
        assert len(ours) == len(theirs), member.name
        resampled = sum('"resampled"' in line for line in ours)  # each layer's pool read once, as alone
        assert resampled == sum('"resampled"' in line for line in theirs) == member.cfg.resample_count, member.name
    page = (tmp_path / "sweep" / "sweep.html").read_text()
    assert all(m["name"] in page for m in summary["members"])
    assert (tmp_path / "sweep" / "sweep-layer0.png").exists() and (tmp_path / "sweep" / "sweep-layer1.png").exists()
    for layer in ("layer0", "layer1"):
        assert any(m["frontier"] for m in summary["members"] if m["name"].endswith(layer)), "every layer has a frontier"


def test_members_of_a_layer_share_one_read_and_seeds_share_the_data_order(store, tmp_path):
    """Four members on one layer read the store as much as one run does; --seeds changes only the
    initialisation: a seed's member equals the run alone with --seed s --data_seed 0."""
    cfg = _sweep_cfg(store, tmp_path / "sweep", sae_type="topk", hidden_dim=64, top_k=4, layer_idx=1,
                     top_ks=(4, 8), seeds=(0, 1), mesh_data=1, threads=2)  # auto gives this tiny grid one program
    summary = sweep(cfg)
    assert summary["threads"] == 2, "a one-device CPU shares the members between two threads"
    stats = []
    for k, seed in ((8, 1), (4, 0)):  # one member of each thread's share
        alone = TrainConfig.of(**_base(store, tmp_path / f"alone{k}", sae_type="topk", hidden_dim=64, top_k=k,
                                       layer_idx=1, seed=seed, data_seed=0, mesh_data=1))
        stats.append(train(alone))
        _assert_same(alone.run_dir(), tmp_path / "sweep" / f"k{k}-seed{seed}" / "topk" / "layer1" / "dim64",
                     f"k{k}-seed{seed}")
    assert summary["bytes_read"] == stats[0]["bytes_read_per_process"][0]
    names = sorted(m["name"] for m in summary["members"])
    assert names == ["k4-seed0", "k4-seed1", "k8-seed0", "k8-seed1"]


def test_members_are_shared_between_threads_by_cost_each_share_in_grid_order():
    from types import SimpleNamespace

    from jax_sae.config import SAEConfig
    from jax_sae.sweep.run import shares, step_cost, thread_count

    def member(hidden_dim, top_k, sae_type="topk"):
        return SimpleNamespace(plan=SimpleNamespace(sae=SAEConfig(d_model=32, hidden_dim=hidden_dim, top_k=top_k,
                                                                  sae_type=sae_type)))

    runs = [member(64, 4), member(64, 8), member(128, 4), member(128, 8), member(64, 4, "vanilla")]
    groups = shares(runs, 2)
    assert sorted(i for g in groups for i in g) == list(range(5)) and all(list(g) == sorted(g) for g in groups)
    totals = [sum(step_cost(runs[i]) for i in g) for g in groups]
    assert max(totals) - min(totals) <= max(step_cost(r) for r in runs), "no share is heavier by more than a member"
    assert shares(runs, 1) == [tuple(range(5))] and len(shares(runs[:1], 2)) == 1
    cpu = SimpleNamespace(size=1)
    assert thread_count(0, cpu, runs) == 1, "a tiny grid runs one program"
    assert thread_count(0, cpu, [member(8192, 16)] * 2) == 2 and thread_count(3, cpu, runs[:2]) == 2


class _Killed(BaseException):
    pass


def test_a_sweep_killed_between_two_members_saves_resumes_to_the_same_parameters(store, tmp_path, monkeypatch):
    from jax_sae.loop import TrainingRun

    kw = dict(layers=(0, 1), sae_type="batch_topk", hidden_dim=64, top_k=4, mesh_data=1)
    reference = sweep(_sweep_cfg(store, tmp_path / "ref", **kw))
    saves = {"n": 0}
    original = TrainingRun.save_checkpoint

    def save_then_die(self, step, meta, progress):
        original(self, step, meta, progress)
        saves["n"] += 1
        if step == 8 and saves["n"] % 2 == 1:  # the first member has saved step 8, the second has not
            raise _Killed()

    monkeypatch.setattr(TrainingRun, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        sweep(_sweep_cfg(store, tmp_path / "killed", **kw))
    monkeypatch.setattr(TrainingRun, "save_checkpoint", original)
    assert not (tmp_path / "killed" / "sweep.json").exists()
    resumed = sweep(_sweep_cfg(store, tmp_path / "killed", **kw))
    for a, b in zip(reference["members"], resumed["members"]):
        _assert_same(Path(a["run_dir"]), Path(b["run_dir"]), a["name"])
        assert b["stats"]["resumed_from"] == 4, "both members go back to the newest step they both saved"


def _error(argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    text = str(exc.value)
    assert text.startswith("error: ") and "\n" not in text
    return text


def test_bad_grids_are_refused_in_one_line_before_any_work(store, tmp_path):
    base = ["--store", str(store / "store"), "--out", str(tmp_path / "out"), "--no-progress", "--batch_size", "256"]
    assert "member h16-k32: --top_k must be in 1..hidden_dim (16), got 32" in _error(
        base + ["--hidden_dims", "16,64", "--top_ks", "4,32"])
    text = _error(base + ["--expansions", "1000000", "--hidden_dim", "64"])
    assert "the sweep needs about" in text and "shrink --hidden_dims (or --expansions)" in text
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"batch_size": [128, 256]}))
    assert "batch_size cannot vary within a sweep" in _error(base + ["--sweep_file", str(spec)])
    spec.write_text("{not json")
    assert "is not valid JSON" in _error(base + ["--sweep_file", str(spec)])
    assert "layer_idx varies both in" in _error(base + ["--sweep_file", str(_write(tmp_path, {"layer_idx": [0]})),
                                                        "--layers", "1"])
    assert "has no layer 7" in _error(base + ["--layers", "0,7"])
    assert "give --hidden_dims or --expansions, not both" in _error(base + ["--hidden_dims", "64", "--expansions", "2"])
    assert "--threads must be 0 (auto) or positive" in _error(base + ["--threads", "-1"])
    assert "which a mesh of several devices cannot do" in _error(base + ["--threads", "2", "--mesh_data", "2"])
    assert not (tmp_path / "out").exists(), "nothing is written before the checks pass"


def _write(tmp_path, data) -> str:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(data))
    return path


def test_the_frontier_is_the_points_no_other_point_beats_on_both():
    points = [{"l0": 4, "fvu": 0.5}, {"l0": 8, "fvu": 0.3}, {"l0": 8, "fvu": 0.4}, {"l0": 16, "fvu": 0.35},
              {"l0": 2, "fvu": None}]
    assert frontier(points, "fvu", higher_better=False) == [True, True, False, False, False]
    scores = [{"l0": 4, "f1": 0.3}, {"l0": 8, "f1": 0.5}, {"l0": 8, "f1": 0.4}, {"l0": 16, "f1": 0.45}]
    assert frontier(scores, "f1", higher_better=True) == [True, True, False, False]


@pytest.mark.slow  # kills at a random moment; the deterministic interruption above is default-tested
def test_sigkill_at_a_random_moment_then_rerun_ends_with_the_same_parameters(store, tmp_path):
    args = ["jax_sae.sweep", "--store", str(store / "store"), "--layers", "0,1", "--top_ks", "4,8", "--hidden_dim",
            "64", "--batch_size", "128", "--epochs", "3", "--checkpoint_every", "3", "--no-progress", "--mesh_data", "1"]
    subprocess.run(cli(*args, "--out", str(tmp_path / "ref")), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.isdigit() and int(p.name) >= 9 for p in out.glob("*/*/*/*/ckpt/*")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cli(*args, "--out", str(out)), check=True, capture_output=True)
    for ref in (tmp_path / "ref").glob("*/*/*/*/final"):
        _assert_same(ref.parent, out / ref.parent.relative_to(tmp_path / "ref"), str(ref))


def test_the_pipeline_sweeps_then_discovers_the_member_its_rule_picks(store, tmp_path):
    """--sweep trains the grid and discovers the member with the lowest validation FVU within --max_l0."""
    import shutil

    from launch.pipeline import PipelineConfig, PipelineError, run_pipeline
    from jax_sae.sweep.page import read_summary

    shutil.copytree(store / "store", tmp_path / "demo" / "activations")
    spec = tmp_path / "grid.json"
    spec.write_text(json.dumps({"top_k": [4, 12]}))
    cfg = PipelineConfig(out=str(tmp_path / "demo"), layer=0, sae_type="topk", hidden_dim=64, epochs=1,
                         train_batch_size=256, lr=4e-3, stages=("train", "discover"), sweep=str(spec), max_l0=6,
                         max_features=5)
    run_pipeline(cfg)
    records = {r["name"]: r for r in read_summary(tmp_path / "demo" / "models" / "sweep")["members"]}
    assert records["k12"]["stats"]["final_val"]["fvu"] < records["k4"]["stats"]["final_val"]["fvu"]
    assert (tmp_path / "demo" / "results" / "features_layer0_k4.json").exists(), "k = 12 is over --max_l0 6"
    with pytest.raises(PipelineError, match="no finished member of the sweep on layer 0 has inference L0 within 2"):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "max_l0": 2.0}))


def test_probe_gives_every_member_the_real_activation_evaluation_on_the_page(tmp_path):
    """--probe writes best.real_eval.json beside each member and the page plots its probe F1."""
    directions = planted_dictionary(D_MODEL, 64, seed=0)
    x = sparse_data(directions, 6000, active=4, noise=0.05, seed=0)
    tags = [["drums"] if i % 2 else ["piano"] for i in range(120)]
    write_store(tmp_path / "store", x, tags=tags)
    summary = sweep(from_flags(SweepConfig, _base(tmp_path, tmp_path / "sweep", sae_type="topk", hidden_dim=64,
                                                  layer_idx=0, top_ks=(4, 8), probe=True, mesh_data=1)))
    for record in summary["members"]:
        assert Path(record["run_dir"], "best.real_eval.json").exists()
        assert record["point"]["probe_f1"] is not None, record["name"]
    assert "probe F1" in (tmp_path / "sweep" / "sweep.html").read_text()


def test_probe_without_tags_is_refused_before_training(store, tmp_path):
    text = _error(["--store", str(store / "store"), "--out", str(tmp_path / "out"), "--probe", "--top_ks", "4,8"])
    assert "--probe needs tagged samples" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # extraction and one torch process per member (about a minute)
def test_evaluate_model_splices_every_member_into_musicgen(tmp_path):
    from extractor.extract import ExtractConfig, extract

    (tmp_path / "p.txt").write_text("a slow sad jazz piano\nfast energetic rock drums\ncalm folk guitar\nhip hop\n")
    extract(ExtractConfig(model="tiny-random", layers="2", prompt_file=str(tmp_path / "p.txt"), batch_size=4,
                          duration=1.0, out=str(tmp_path / "store"), device="cpu", dtype="float32", top_k=50))
    summary = sweep(from_flags(SweepConfig, dict(
        store=str(tmp_path / "store"), out=str(tmp_path / "sweep"), layer_idx=2, sae_type="topk", hidden_dim=128,
        top_ks=(4, 16), batch_size=32, epochs=3, progress=False, mesh_data=1, val_fraction=0.25, patience=0,
        evaluate_model="tiny-random", evaluate_device="cpu", evaluate_samples=4)))
    recovered = {r["name"]: r["point"]["loss_recovered"] for r in summary["members"]}
    assert all(v is not None for v in recovered.values()), recovered
    assert "loss recovered" in (tmp_path / "sweep" / "sweep.html").read_text()

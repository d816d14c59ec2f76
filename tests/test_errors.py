"""Bad input stops every stage with one line and exit status 2 before it computes or writes anything,
so that a failed start leaves nothing behind that the corrected command would refuse."""

import json
import os
import shutil
from contextlib import contextmanager

import jax
import numpy as np
import pytest

from discovery.discover import main as discover_main
from discovery.report import main as report_main
from extractor.extract import main as extract_main
from extractor.steer import main as steer_main
from sae_core.store import StoreMeta, create_store, open_store
from extractor.torch_sae import save_torch_export
from jax_sae import model as M
from jax_sae.checkpoint import model_tree, save_model
from jax_sae.config import SAEConfig
from jax_sae.export import main as export_main
from jax_sae.train import main as train_main

from .synthetic import write_store

D_TINY = 64  # tiny-random's decoder width


def _run(main, argv):
    return main([str(a) for a in argv])


def _error(main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(main, argv)
    text = str(exc.value)
    assert exc.value.code == 2 and text.startswith("error: ") and "\n" not in text, text
    return text


@contextmanager
def _read_only(path):
    """A read-only directory; skips where this user may write into one anyway (root, unless its
    CAP_DAC_OVERRIDE is dropped, e.g. with setpriv --bounding-set=-dac_override)."""
    path.mkdir()
    path.chmod(0o555)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("this user (root) may write into read-only directories")
        yield path
    finally:
        path.chmod(0o755)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def synthetic_store(root):
    write_store(root / "synthetic", np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32))
    return root / "synthetic"


@pytest.fixture(scope="module")
def tiny_store(root):
    """A complete tiny-random store: the good --codes_from of the corrected extract commands."""
    (root / "prompts.txt").write_text("a slow sad jazz piano\nfast energetic rock\n")
    _run(extract_main, _extract_args(root / "gen"))
    return root / "gen"


@pytest.fixture(scope="module")
def checkpoint(root):
    cfg = SAEConfig(sae_type="topk", d_model=16, hidden_dim=32, top_k=4, layer=0, model="synthetic")
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(16, np.float32))
    save_model(root / "run" / "best", cfg, model_tree(params, 0.0, 1.0), {"step": 1})
    return root / "run" / "best"


# train ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--hidden_dim", "30", "--mesh_model", "4"], "--hidden_dim 30 must be divisible by the model axis (4)"),
    (["--batch_size", "30", "--mesh_data", "4"], "--batch_size 30 must be divisible by the data axis (4)"),
    (["--mesh_data", "{twice_the_devices}"], "{devices} are visible"),  # filled in the test (no JAX at collection)
    (["--num_processes", "2"], "multi-process runs need --coordinator_address, --num_processes and --process_id"),
    (["--coordinator_address", "localhost:1"], "multi-process runs need --coordinator_address"),
    (["--process_id", "3"], "multi-process runs need --coordinator_address"),
    (["--coordinator_address", "localhost:1", "--num_processes", "2", "--process_id", "2"],
     "--process_id 2 must be in 0..1"),
    (["--mesh_model", "{twice_the_devices}"], "--mesh_model {twice} needs at least {twice} devices; {devices} are"),
    (["--mesh_model", "0"], "--mesh_data and --mesh_model must be positive"),
])
def test_train_refuses_a_mesh_or_process_setup_before_reading_rows_or_making_the_run(
        synthetic_store, tmp_path, monkeypatch, extra, message):
    def no_scan(*_args, **_kw):
        raise AssertionError("the store's rows were read before the cheap checks")

    monkeypatch.setattr("jax_sae.sources.scan_rows", no_scan)
    n = jax.device_count()
    extra = [a.format(twice_the_devices=2 * n) for a in extra]
    message = message.format(devices=n, twice=2 * n)
    out = tmp_path / "models"
    argv = ["--sae_type", "topk", "--layer_idx", "0", "--hidden_dim", "32", "--top_k", "4", "--batch_size", "64",
            "--epochs", "1", "--store", synthetic_store, "--out", out, "--no-progress", *extra]
    assert message in _error(train_main, argv)
    assert not out.exists(), "no run directory for a run that cannot start"


# extract -------------------------------------------------------------------------------------------------------

def _extract_args(out, *extra, prompts=None):
    prompts = prompts or out.parent / "prompts.txt"
    return ["--model", "tiny-random", "--layers", "1", "--prompt_file", prompts, "--batch_size", "2",
            "--duration", "0.2", "--out", out, "--device", "cpu", "--dtype", "float32", "--top_k", "50", *extra]


def test_keep_uncond_without_guidance_leaves_no_store_and_the_corrected_command_runs(tiny_store, tmp_path):
    out = tmp_path / "s"
    prompts = tiny_store.parent / "prompts.txt"
    text = _error(extract_main, _extract_args(out, "--keep_uncond", "--guidance_scale", "1", prompts=prompts))
    assert "--keep_uncond" in text and "--guidance_scale > 1" in text
    assert not out.exists()
    store = _run(extract_main, _extract_args(out, "--keep_uncond", prompts=prompts))
    assert store.complete and store.meta.streams == ("cond", "uncond")


def _source_store(path, n_codebooks=4, frame_rate=50.0, codes_max=7, melody=False):
    """A complete two-sample store, as if made by another model, to re-run by teacher forcing."""
    meta = StoreMeta(model="another-model", layers=(1,), d_model=D_TINY, n_codebooks=n_codebooks,
                     frame_rate=frame_rate, sampling_rate=32000, dtype="float32", mode="generate", n_samples=2,
                     n_rows=20, n_units=1)
    samples = [{"index": i, "prompt": f"sample {i}", "source_id": f"s{i}", "tags": [], "n_frames": 10,
                **({"melody_chroma": [0] * 10} if melody else {})} for i in range(2)]
    codes = np.linspace(0, codes_max, 20 * n_codebooks).round().astype(np.int32).reshape(20, n_codebooks)
    create_store(path, meta, samples, [10, 10], codes).commit_unit(0, "shard-0-of-1")
    return path


@pytest.mark.parametrize("source, message", [
    ({"n_codebooks": 8}, "holds 8 codebooks but tiny-random has 4"),
    ({"codes_max": 500}, "holds codes in 0..500 but tiny-random has 64 codes per codebook"),
    ({"frame_rate": 25.0}, "holds codes at 25 frames/s but tiny-random runs at 50"),
    ({"melody": True}, "was made with melody conditions"),
])
def test_codes_from_another_model_leaves_no_store_and_the_corrected_command_runs(tiny_store, tmp_path, source,
                                                                                 message):
    out = tmp_path / "tf"
    bad = _source_store(tmp_path / "source", **source)
    teacher_forced = ["--mode", "teacher_forced", "--codes_from"]
    text = _error(extract_main, _extract_args(out, *teacher_forced, bad, prompts=tiny_store.parent / "prompts.txt"))
    assert message in text and "another-model" in text, text
    assert not out.exists()
    store = _run(extract_main, _extract_args(out, *teacher_forced, tiny_store, prompts=tiny_store.parent / "prompts.txt"))
    assert store.complete and store.n_rows == open_store(tiny_store).n_rows


def test_an_out_that_cannot_hold_a_store_is_refused_before_writing(tiny_store, tmp_path):
    prompts = tiny_store.parent / "prompts.txt"
    (tmp_path / "file").write_text("mine")
    assert "exists and is not an activation store" in _error(extract_main, _extract_args(tmp_path / "file",
                                                                                         prompts=prompts))
    assert (tmp_path / "file").read_text() == "mine"
    with _read_only(tmp_path / "ro") as ro:
        assert "is not a writable directory" in _error(extract_main, _extract_args(ro / "new" / "s", prompts=prompts))
        assert not any(ro.iterdir())


# export --------------------------------------------------------------------------------------------------------

def _export(checkpoint, fmt, out):
    return ["--checkpoint", checkpoint, "--format", fmt, "--out", out]


def test_export_refuses_an_out_of_the_wrong_kind_and_writes_nothing(checkpoint, tmp_path):
    (tmp_path / "dir").mkdir()
    assert "is a directory, but the torch format writes one file" in _error(
        export_main, _export(checkpoint, "torch", tmp_path / "dir"))
    assert not any((tmp_path / "dir").iterdir())
    (tmp_path / "file").write_text("mine")
    assert "is a file, but the SAELens format writes a directory" in _error(
        export_main, _export(checkpoint, "saelens", tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"
    assert "is a file, not a directory" in _error(export_main, _export(checkpoint, "torch", tmp_path / "file" / "a.pt"))
    _run(export_main, _export(checkpoint, "torch", tmp_path / "dir" / "sae.pt"))
    _run(export_main, _export(checkpoint, "saelens", tmp_path / "dir" / "lens"))
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["lens", "sae.pt"]


def test_export_refuses_an_out_it_cannot_write_and_writes_nothing(checkpoint, tmp_path):
    with _read_only(tmp_path / "ro") as ro:
        for fmt, out in [("torch", ro / "sae.pt"), ("saelens", ro / "lens"), ("saelens", ro / "a" / "lens")]:
            assert f"{ro} is not writable" in _error(export_main, _export(checkpoint, fmt, out))
        assert not any(ro.iterdir()), "nothing half-written"


# steer ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--start", "2"], "--start 2.0 s is outside the 1.0 s clip"),
    (["--start", "-0.5"], "--start -0.5 s is outside the 1.0 s clip"),
    (["--end", "1.5"], "--end 1.5 s must be after --start (0.0 s) and within the 1.0 s clip"),
    (["--start", "0.99"], "holds no frame of the 50-frame clip at 50 frames/s"),  # rounds to frame 50
])
def test_steer_refuses_a_window_outside_the_clip_before_loading_the_model(tmp_path, monkeypatch, extra, message):
    def not_now(*_args, **_kw):
        raise AssertionError("the model was loaded or run before the window was checked")

    monkeypatch.setattr("extractor.steer.load_model", not_now)
    monkeypatch.setattr("extractor.steer.generate_batch", not_now)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(8, D_TINY)).astype(np.float32)
    sae = tmp_path / "sae.pt"
    save_torch_export(sae, {"sae_type": "topk", "d_model": D_TINY, "hidden_dim": 8, "top_k": 2, "layer": 1,
                            "model": "tiny-random", "threshold": 0.0, "input_scale": 1.0, "group_sizes": []},
                      {"W_enc": W.T, "b_enc": np.zeros(8), "W_dec": W, "b_dec": np.zeros(D_TINY)})
    argv = ["--model", "tiny-random", "--sae", sae, "--feature", "3", "--duration", "1", "--out", tmp_path / "steer",
            "--device", "cpu", *extra]
    assert message in _error(steer_main, argv)
    assert not (tmp_path / "steer").exists()


# discover and report -------------------------------------------------------------------------------------------

def _damage(ckpt, damage):
    if damage == "garbage config.json":
        (ckpt / "config.json").write_text("{not json")
        return ckpt / "config.json"
    if damage == "config.json without the SAE":
        (ckpt / "config.json").write_text('{"step": 1}')
        return ckpt / "config.json"
    if damage == "empty state/":
        shutil.rmtree(ckpt / "state")
        (ckpt / "state").mkdir()
    else:  # truncated state files
        for f in (ckpt / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ckpt / "state"


@pytest.mark.parametrize("damage", ["garbage config.json", "config.json without the SAE", "empty state/",
                                    "truncated state/"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(checkpoint, synthetic_store, tmp_path, damage):
    ckpt = tmp_path / "best"
    shutil.copytree(checkpoint, ckpt)
    broken = _damage(ckpt, damage)
    text = _error(discover_main, ["--sae_path", ckpt, "--store", synthetic_store, "--output", tmp_path / "f.json",
                                  "--no-progress"])
    assert f"cannot read {broken.absolute() if broken.name == 'state' else broken}" in text and "best/ or final/" in text
    assert "retrain" in text and not (tmp_path / "f.json").exists()
    (tmp_path / "features.json").write_text('{"0": {"label": "x", "top_examples": []}}')
    text = _error(report_main, ["--features", tmp_path / "features.json", "--store", synthetic_store, "--sae", ckpt,
                                "--out", tmp_path / "report", "--no-audio", "--no-progress"])
    assert "cannot read" in text and broken.name in text and not (tmp_path / "report").exists()


def test_report_with_a_missing_eval_file_is_one_line(checkpoint, synthetic_store, tmp_path):
    (tmp_path / "features.json").write_text('{"0": {"label": "x", "top_examples": []}}')
    text = _error(report_main, ["--features", tmp_path / "features.json", "--store", synthetic_store, "--sae",
                                checkpoint, "--eval", tmp_path / "eval.json", "--out", tmp_path / "report",
                                "--no-audio", "--no-progress"])
    assert f"no evaluation file at {tmp_path / 'eval.json'}" in text and "extractor.evaluate" in text
    assert not (tmp_path / "report").exists()


def test_a_damaged_training_summary_is_one_line_naming_it(checkpoint, synthetic_store, tmp_path):
    """The report reads the run's final metrics through RunDir; a torn training_stats.json is named."""
    from jax_sae.run_dir import RunDir

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "best")
    RunDir(run).stats.write_text('{"final_val": {"fvu": 0.1')
    features = tmp_path / "features.json"
    _run(discover_main, ["--sae_path", run / "best", "--store", synthetic_store, "--output", features, "--no_filter",
                         "--max_features", "2", "--no-progress"])
    text = _error(report_main, ["--features", features, "--no-audio", "--no-progress", "--out", tmp_path / "r"])
    assert "training_stats.json is damaged" in text and "rerun the same train command" in text


@contextmanager
def _file_size_limit(limit: int):
    """Files may grow to ``limit`` bytes (RLIMIT_FSIZE, as a full disk would stop them), with
    SIGXFSZ ignored so a write past it fails with EFBIG instead of killing the process."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_checkpoint_without_room_is_one_line_naming_it_and_leaves_no_partial_step(tmp_path, capfd, monkeypatch,
                                                                                       when):
    """Without room the save is refused before anything is written (the size is known from the
    state); a disk that fills during the write (the check passed) ends with the same line and the
    half-written step removed."""
    from typing import NamedTuple

    import jax.numpy as jnp

    from jax_sae import checkpoint
    from jax_sae.checkpoint import CheckpointError, RunCheckpoints

    class State(NamedTuple):
        params: dict

    small = State({"W": jnp.ones((8, 8))})
    large = State({"W": jax.random.normal(jax.random.PRNGKey(0), (256, 256))})  # 256 KiB, past the limit
    checkpoints = RunCheckpoints(tmp_path / "ckpt")
    assert checkpoints.save(1, small, {"step": 1})
    capfd.readouterr()
    if when == "during":
        monkeypatch.setattr(checkpoint, "_room_needed", lambda nbytes, directory: None)
    with _file_size_limit(64 * 1024), pytest.raises(CheckpointError) as err:
        checkpoints.save(2, large, {"step": 2})
    line = str(err.value)
    assert line.startswith(f"out of disk space saving checkpoint step 2 in {tmp_path / 'ckpt'}: ") and \
        "it resumes from step 1" in line, line
    if when == "before":
        assert capfd.readouterr().err == ""  # nothing was written, so nothing failed
    assert not [*(tmp_path / "ckpt").glob("2.*")] and checkpoints.latest_step() == 1
    monkeypatch.undo()
    assert checkpoints.save(2, large, {"step": 2}) and checkpoints.latest_step() == 2  # with room again
    checkpoints.close()


def test_non_finite_parameters_are_refused_by_every_save(tmp_path):
    from typing import NamedTuple

    import jax.numpy as jnp

    from jax_sae.checkpoint import NonFiniteError, RunCheckpoints

    class State(NamedTuple):
        params: dict

    checkpoints = RunCheckpoints(tmp_path / "ckpt")
    with pytest.raises(NonFiniteError):
        checkpoints.save(1, State({"W": jnp.full((4, 4), jnp.nan)}), {"step": 1})
    checkpoints.close()
    cfg = SAEConfig(sae_type="topk", d_model=8, hidden_dim=16, top_k=4)
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(8, np.float32))
    with pytest.raises(NonFiniteError):
        save_model(tmp_path / "best", cfg, model_tree(params.replace(b_enc_H=params.b_enc_H * np.inf), 0.0, 1.0), {})
    assert not list(tmp_path.glob("*best*")) and not list((tmp_path / "ckpt").glob("1*"))


def test_a_full_disk_while_saving_a_model_names_it_and_keeps_the_old_one(tmp_path):
    from jax_sae.checkpoint import CheckpointError

    cfg = SAEConfig(sae_type="topk", d_model=256, hidden_dim=256, top_k=4, layer=0, model="synthetic")
    tree = model_tree(M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(256, np.float32)), 0.0, 1.0)
    save_model(tmp_path / "best", cfg, tree, {"step": 1})
    with _file_size_limit(64 * 1024), pytest.raises(CheckpointError) as err:
        save_model(tmp_path / "best", cfg, tree, {"step": 2})
    assert str(err.value).startswith(f"out of disk space saving best/ in {tmp_path}: "), err.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert json.loads((tmp_path / "best" / "config.json").read_text())["step"] == 1

"""Launchers say where the work runs and refuse the wrong place: gpu.sh and tpu.sh stop with one
line naming the fix, and gpu.sh extract runs and waits for one process per GPU. (That train and
discover print and record their platform, devices and mesh is checked where they already run:
tests/test_train.py, tests/test_discovery.py.)"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jax_sae import runtime
from launch.__main__ import STAGES, main

REPO = Path(__file__).resolve().parents[1]


def _launch(script: str, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("bash"), str(REPO / "launch" / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"} | (env or {}), **kw)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _bin_without_gpus(tmp_path: Path) -> Path:
    """A PATH directory holding what the launchers need but no nvidia-smi, even on a GPU machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sleep", "touch"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return bin_dir


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_launch_help_lists_every_stage_on_one_line(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main([flag])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: python -m launch")
    for name, stage in STAGES.items():
        assert [line.split(None, 1)[1] for line in out.splitlines() if line.split()[:1] == [name]] == [stage.summary]


@pytest.mark.parametrize("argv, message", [([], "name a stage"), (["dance"], "unknown stage 'dance'"),
                                           (["--platform", "xpu", "train"], "--platform must be one of")])
def test_launch_without_a_known_stage_shows_the_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: python -m launch") and message in err


def test_gpu_and_tpu_launchers_refuse_a_jax_stage_without_their_platform():
    """Here JAX sees only the CPU: each refusal is one line, exit status 2, naming the fix."""
    fixes = {"tpu.sh": "SAE_MUSIC_ACCEL=tpu scripts/install.sh", "gpu.sh": "SAE_MUSIC_ACCEL=cuda12 scripts/install.sh"}
    if jax.default_backend() != "cpu":
        pytest.skip(f"JAX sees a {jax.default_backend()} here")
    running = {script: _launch(script, "train", "--store", "nowhere") for script in fixes}  # at once: each imports jax
    for script, proc in running.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "" and len(err.splitlines()) == 1, (script, err[-2000:])
        assert err.startswith(f"error: train was launched for {script[:3]} but JAX sees only cpu devices")
        assert fixes[script] in err, err


def test_gpu_launcher_refuses_a_torch_stage_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    with pytest.raises(SystemExit) as exc:
        main(["--platform", "gpu", "evaluate", "--sae", "nowhere"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: evaluate was launched for gpu but torch sees no CUDA GPU") and "nvidia-smi" in err


@pytest.mark.parametrize("nvidia_smi", [None, "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9"])
def test_gpu_extract_without_a_visible_gpu_is_one_line(tmp_path, nvidia_smi):
    bin_dir = _bin_without_gpus(tmp_path)
    if nvidia_smi:
        _executable(bin_dir / "nvidia-smi", f"#!/bin/sh\n{nvidia_smi}\n")
    proc = _launch("gpu.sh", "extract", "--model", "tiny-random", env={"PATH": str(bin_dir)})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == "" and len(err.splitlines()) == 1, err
    assert ("nvidia-smi not found" if nvidia_smi is None else "NVIDIA-SMI has failed: no driver") in err


FAKE_PYTHON = """#!/bin/sh
# Stands in for the interpreter: shards log how they were started; anything else is the real one.
case " $* " in
  *" --shard "*)
    echo "$CUDA_VISIBLE_DEVICES $*" >> "$SHARD_LOG"
    case " $* " in *" --shard $FAIL_SHARD "*) exit 3;; esac
    sleep 0.5; touch "$SHARD_LOG.$CUDA_VISIBLE_DEVICES.done"; exit 0;;
esac
exec {python} "$@"
"""


@pytest.mark.parametrize("visible, fail", [(None, "1/2"), ("5,7", "none")])
def test_gpu_extract_runs_one_shard_per_gpu_and_names_the_failures(tmp_path, visible, fail):
    bin_dir = _bin_without_gpus(tmp_path)
    _executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-a)'\necho 'GPU 1: Fake'\n")
    python = _executable(tmp_path / "python", FAKE_PYTHON.format(python=sys.executable))
    log = tmp_path / "shards.log"
    env = {"PATH": str(bin_dir), "PYTHON": str(python), "SHARD_LOG": str(log), "FAIL_SHARD": fail}
    proc = _launch("gpu.sh", "extract", "--model", "tiny-random", "--out", "store",
                   env=env | ({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    out, err = proc.communicate(timeout=60)
    gpus = visible.split(",") if visible else ["0", "1"]
    started = sorted(log.read_text().splitlines())
    assert started == [f"{gpu} -m launch --platform gpu extract --model tiny-random --out store --device cuda "
                       f"--shard {i}/2" for i, gpu in enumerate(gpus)]
    assert (tmp_path / f"shards.log.{gpus[0]}.done").exists()  # the slow shard was waited for
    if fail == "none":
        assert proc.returncode == 0 and "every shard finished" in out, err
    else:
        assert proc.returncode == 1 and err.splitlines()[-1] == (
            "error: extract on 2 GPUs: shard 1/2 (GPU 1) failed with status 3; rerun the same command to resume it")


def test_the_line_names_the_processes_of_a_multi_process_run(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    mesh = jax.make_mesh((2, 1), ("data", "model"), devices=jax.devices()[:2])
    line = runtime.describe(mesh).line
    assert line == f"jax: cpu, {jax.device_count()} devices (cpu) in 2 processes, mesh data=2 model=1"



@pytest.mark.slow
def test_gpu_check_runs_every_part_at_toy_size_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --quick --allow_cpu: every part ok, and the pipeline says where train and discover ran."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--quick", "--allow_cpu", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:]
    check = json.loads(out.read_text())
    for part in ("gpu_tests", "train_step", "extract", "pipeline", "sweep", "study", "synthbench"):
        assert check[part]["status"] == "ok", part
    assert check["study"]["plan"]["status"] == "ok" and "time here" in check["study"]["plan"]["output_tail"]
    runs = check["synthbench"]["results"]["runs"]
    assert [r["sae_type"] for r in runs] == ["batch_topk", "matryoshka"] and all(0 <= r["f1"] <= 1 for r in runs)
    assert check["pipeline"]["where"]["train"]["platform"] == "cpu"
    assert check["pipeline"]["where"]["discover"]["platform"] == "cpu"
    assert check["extract"]["results"] is not None
    assert [m["top_k"] for m in check["study"]["results"]["members"]] == [4]

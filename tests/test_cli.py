"""Every entry point answers --help, through python -m launch and every launcher, without an accelerator."""

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.__main__ import MODULES
from sae_core.cli import flag_fields

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", sorted(MODULES))
def test_help_names_the_module_and_has_a_flag_for_every_config_field(stage, capsys):
    module = importlib.import_module(MODULES[stage])
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"usage: python -m {MODULES[stage]} ")
    exported = getattr(module, "__all__", ())
    (config,) = [v for name, v in vars(module).items() if isinstance(v, type) and name.endswith("Config")
                 and dataclasses.is_dataclass(v) and (v.__module__ == module.__name__ or name in exported)]
    flags = set(re.findall(r"--[\w-]+", out))
    missing = [path[-1] for path, _, _ in flag_fields(config) if f"--{path[-1]}" not in flags]
    assert not missing, f"{MODULES[stage]} --help lacks {missing}"


def test_cpu_launcher_compiles_a_sharded_step_and_reports_memory():
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "cpu.sh"), "train", "--compile_only", "--d_model", "256", "--hidden_dim",
         "4096", "--top_k", "32", "--batch_size", "512", "--mesh_data", "2", "--mesh_model", "2"],
        capture_output=True, text=True, env={"CPU_DEVICES": "4", "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("jax: cpu, 4 devices (cpu), mesh data=2 model=2\n")
    assert "2x2 mesh" in result.stdout and "peak estimate" in result.stdout and "temp size" in result.stdout


def test_launcher_rejects_unknown_stage():
    result = subprocess.run([sys.executable, "-m", "launch", "dance"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "usage: python -m launch" in result.stderr
    assert "unknown stage 'dance'; choose from pipeline, prompts, extract" in result.stderr


@pytest.mark.parametrize("script", ["cpu.sh", "gpu.sh", "tpu.sh"])
def test_launchers_show_stage_help_without_an_accelerator(script):
    result = subprocess.run(["bash", str(REPO / "launch" / script), "train", "--help"], capture_output=True,
                            text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "--mesh_model" in result.stdout, result.stderr[-1000:]

"""scripts/install.sh picks the stack for the machine it finds: dry runs on faked GPUs (nvidia-smi
scripts), TPU VMs and plain CPUs; its stamp notices when the machine or the choice changed."""

import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Commands install.sh and the fake nvidia-smi scripts use; linked into a bin/ of their own so that a
# real nvidia-smi on this machine stays out of sight.
TOOLS = ["bash", "sh", "cat", "cut", "dirname", "grep", "head", "sed", "sha256sum", "timeout", "tr"]
UNREACHABLE = "http://127.0.0.1:9/whl"  # the discard port: refused at once

SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""
SMI_DRIVER_ONLY = "| NVIDIA-SMI {driver}              Driver Version: {driver}   |\n"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory):
    """A local stand-in for PyTorch's wheel indexes (cpu, cu126, cu130), as the base URL."""
    root = tmp_path_factory.mktemp("pytorch-index")
    for flavour in ("cpu", "cu126", "cu130"):
        (root / "whl" / flavour).mkdir(parents=True)
        (root / "whl" / flavour / "index.html").write_text("<a href='torch/'>torch</a>\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl"
    server.shutdown()


@pytest.fixture
def machine(tmp_path):
    """A checkout (install.sh and pyproject.toml), a bin/ without nvidia-smi and an empty probe root."""
    checkout = tmp_path / "repo"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", checkout / "scripts")
    shutil.copy(REPO / "pyproject.toml", checkout)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (tmp_path / "probe").mkdir()
    return tmp_path


def fake_nvidia_smi(machine: Path, text: str, status: int = 0) -> None:
    script = machine / "bin" / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\nexit {status}\n")
    script.chmod(0o755)


def install(machine: Path, index: str = UNREACHABLE, **env: str):
    """A dry run of install.sh in a fresh process on the faked machine."""
    base = {"PATH": str(machine / "bin"), "PYTHON": sys.executable, "HOME": str(machine),
            "SAE_MUSIC_TORCH_INDEX": index, "SAE_MUSIC_PROBE_ROOT": str(machine / "probe"),
            "SAE_MUSIC_INSTALL_DRY_RUN": "1"}
    return subprocess.run([str(machine / "bin" / "bash"), str(machine / "repo" / "scripts" / "install.sh")],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


def planned(result) -> tuple[str, list[str]]:
    """(the accelerator line, the pip commands) of a successful dry run."""
    assert result.returncode == 0, result.stderr
    chosen = next(line for line in result.stdout.splitlines() if line.startswith("install: accelerator "))
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    return chosen, [c for c in commands if " -m pip " in c]


def torch_command(commands: list[str]) -> str | None:
    found = [c for c in commands if " install -q torch==" in c]
    return found[0] if found else None


def project_command(commands: list[str]) -> str:
    return next(c for c in commands if " install -q -e " in c)


def test_plain_cpu_machine_without_pytorch_index_pins_torch_from_pypi_and_says_what_that_brings(machine):
    result = install(machine)
    chosen, commands = planned(result)
    assert "accelerator cpu (no nvidia-smi, no TPU devices)" in chosen
    assert torch_command(commands).endswith("install -q torch==2.13.0")
    assert "bundles CUDA 13.0 libraries" in result.stdout and UNREACHABLE + "/cpu/ did not answer" in result.stdout
    assert project_command(commands).endswith("-e .[extract,dev]")
    assert "python -m venv .venv" in result.stdout
    assert not (machine / "repo" / ".venv").exists(), "a dry run must create nothing"


def test_cpu_machine_with_pytorch_index_takes_the_cpu_build(machine, torch_index):
    _, commands = planned(install(machine, torch_index))
    assert torch_command(commands).endswith(f"torch==2.13.0 --index-url {torch_index}/cpu")


@pytest.mark.parametrize("smi, accel, flavour", [
    (SMI_HEADER.format(driver="580.65.06", cuda="13.0"), "cuda13", "cu130"),
    (SMI_HEADER.format(driver="550.54.15", cuda="12.4"), "cuda12", "cu126"),
    (SMI_HEADER.format(driver="525.60.13", cuda="12.0"), "cuda12", "cu126"),
    (SMI_DRIVER_ONLY.format(driver="590.44.01"), "cuda13", "cu130"),
    (SMI_DRIVER_ONLY.format(driver="535.104.05"), "cuda12", "cu126"),
])
def test_nvidia_driver_picks_jax_extra_and_torch_index(machine, torch_index, smi, accel, flavour):
    fake_nvidia_smi(machine, smi)
    chosen, commands = planned(install(machine, torch_index))
    assert f"accelerator {accel} (nvidia-smi: driver" in chosen
    assert torch_command(commands).endswith(f"--index-url {torch_index}/{flavour}")
    assert project_command(commands).endswith(f"-e .[extract,dev,{accel}]")


def test_cuda12_driver_without_pytorch_index_warns_that_pypi_torch_wants_cuda13(machine):
    fake_nvidia_smi(machine, SMI_HEADER.format(driver="550.54.15", cuda="12.4"))
    result = install(machine)
    _, commands = planned(result)
    assert torch_command(commands).endswith("install -q torch==2.13.0")
    assert "which this driver cannot run" in result.stdout and "SAE_MUSIC_TORCH_INDEX" in result.stdout


@pytest.mark.parametrize("smi, status, why", [
    (SMI_HEADER.format(driver="470.82.01", cuda="11.4"), 0, "too old for JAX (CUDA 12 needs driver >= 525)"),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9, "nvidia-smi failed: "
     "NVIDIA-SMI has failed"),
])
def test_unusable_nvidia_driver_falls_back_to_cpu_and_says_why(machine, smi, status, why):
    fake_nvidia_smi(machine, smi, status)
    chosen, commands = planned(install(machine))
    assert chosen.startswith("install: accelerator cpu (") and why in chosen
    assert project_command(commands).endswith("-e .[extract,dev]")


@pytest.mark.parametrize("fake, why", [
    ({"dev/accel0": ""}, "TPU device /dev/accel0"),
    ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n", "sys/bus/pci/devices/0000:00:05.0/device": "0x0063\n"},
     "a TPU chip on the PCI bus (0000:00:05.0)"),
    ({}, "TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES set"),
])
def test_tpu_vm_gets_jax_tpu_and_cpu_torch(machine, torch_index, fake, why):
    for name, text in fake.items():
        (machine / "probe" / name).parent.mkdir(parents=True, exist_ok=True)
        (machine / "probe" / name).write_text(text)
    env = {} if fake else {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    chosen, commands = planned(install(machine, torch_index, **env))
    assert chosen == f"install: accelerator tpu ({why})"
    assert torch_command(commands).endswith(f"--index-url {torch_index}/cpu")
    assert project_command(commands).endswith("-e .[extract,dev,tpu]")


def test_other_google_pci_devices_are_not_a_tpu(machine):
    gvnic = machine / "probe" / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    gvnic.mkdir(parents=True)
    (gvnic / "vendor").write_text("0x1ae0\n")
    (gvnic / "device").write_text("0x0042\n")
    chosen, _ = planned(install(machine))
    assert chosen.startswith("install: accelerator cpu")


def test_jax_only_leaves_out_torch_and_the_extract_extra(machine):
    fake_nvidia_smi(machine, SMI_HEADER.format(driver="580.65.06", cuda="13.0"))
    result = install(machine, SAE_MUSIC_JAX_ONLY="1")
    _, commands = planned(result)
    assert torch_command(commands) is None
    assert project_command(commands).endswith("-e .[dev,cuda13]")
    assert "torch left out (SAE_MUSIC_JAX_ONLY=1)" in result.stdout


def test_override_wins_and_a_bad_value_is_one_line_and_status_2(machine, torch_index):
    fake_nvidia_smi(machine, SMI_HEADER.format(driver="580.65.06", cuda="13.0"))
    chosen, commands = planned(install(machine, torch_index, SAE_MUSIC_ACCEL="cpu"))
    assert chosen == "install: accelerator cpu (SAE_MUSIC_ACCEL=cpu)"
    assert torch_command(commands).endswith(f"--index-url {torch_index}/cpu")
    bad = install(machine, SAE_MUSIC_ACCEL="gpu")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: SAE_MUSIC_ACCEL=gpu is not one of cpu, cuda12, cuda13, tpu\n"


def _installed_as(machine: Path, result) -> None:
    """Leave the checkout as a real install would after ``result``: a .venv and its stamp."""
    stamp = next(line for line in result.stdout.splitlines() if line.startswith("install: would record "))
    venv_bin = machine / "repo" / ".venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    (venv_bin / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv_bin / "python").chmod(0o755)
    (machine / "repo" / ".venv" / ".sae-music-install").write_text(stamp.partition(".sae-music-install: ")[2] + "\n")


def test_same_machine_again_is_nothing_to_do(machine):
    _installed_as(machine, install(machine))
    again = install(machine)
    assert again.returncode == 0 and "nothing to do: .venv is installed for cpu" in again.stdout
    assert "+ " not in again.stdout


def test_same_checkout_on_a_gpu_box_reinstalls_for_cuda(machine, torch_index):
    _installed_as(machine, install(machine))
    fake_nvidia_smi(machine, SMI_HEADER.format(driver="550.54.15", cuda="12.4"))
    result = install(machine, torch_index)
    _, commands = planned(result)
    assert "reinstalling: .venv was installed for cpu" in result.stdout
    assert "python -m venv" not in result.stdout
    uninstall = next(c for c in commands if " uninstall " in c)
    assert " torch " in uninstall and "jax-cuda13-plugin" in uninstall
    assert commands.index(uninstall) < commands.index(torch_command(commands))
    assert torch_command(commands).endswith(f"--index-url {torch_index}/cu126")
    assert project_command(commands).endswith("-e .[extract,dev,cuda12]")


def test_changing_the_choice_or_pyproject_reinstalls(machine):
    _installed_as(machine, install(machine))
    _, commands = planned(install(machine, SAE_MUSIC_ACCEL="tpu"))
    assert project_command(commands).endswith("-e .[extract,dev,tpu]")
    jax_only = install(machine, SAE_MUSIC_JAX_ONLY="1")
    _, commands = planned(jax_only)
    assert "reinstalling" in jax_only.stdout and torch_command(commands) is None
    assert any(c.endswith("uninstall -qq -y torch transformers tokenizers") for c in commands)
    with open(machine / "repo" / "pyproject.toml", "a") as f:
        f.write("\n# edited\n")
    edited = install(machine)
    _, commands = planned(edited)
    assert "reinstalling: pyproject.toml or the JAX-only choice changed" in edited.stdout
    assert not any(" uninstall " in c for c in commands) and project_command(commands).endswith(".[extract,dev]")


def test_a_silent_pytorch_index_costs_seconds_not_minutes(machine):
    start = time.monotonic()
    _, commands = planned(install(machine, "http://10.255.255.1/whl"))  # unroutable: no answer at all
    assert time.monotonic() - start < 20  # the probes time out after 2-3 s; a wait for the network takes minutes
    assert torch_command(commands).endswith("install -q torch==2.13.0")


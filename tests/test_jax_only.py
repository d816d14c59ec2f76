"""A JAX-only host (SAE_MUSIC_JAX_ONLY=1: no torch, no transformers) trains, discovers, exports to
SAELens and loads that export; what needs torch says which extra to install, in one line, status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_SIDE = ("torch", "transformers", "tokenizers")
# Makes every finder on sys.meta_path blind to the torch side, so that importing it fails (and
# importlib.util.find_spec answers None) exactly as on a host where it was never installed.
SITECUSTOMIZE = f'''
import sys

HIDDEN = {TORCH_SIDE!r}


class WithoutTorchSide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [WithoutTorchSide(finder) for finder in sys.meta_path]
'''
WRITE_STORE = """
import sys
from tests.synthetic import planted_dictionary, sparse_data, write_store
write_store(sys.argv[1], sparse_data(planted_dictionary(16, 24, seed=0), 3000, active=3, noise=0.05, seed=0))
"""
LOAD_EXPORT = """
import sys
import numpy as np
import jax_sae
lens, ckpt = jax_sae.load(sys.argv[1]), jax_sae.load(sys.argv[2])
x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32) * 3 + 1
np.testing.assert_allclose(np.asarray(lens(x)), np.asarray(ckpt(x)), atol=1e-4, rtol=1e-4)
print("loaded", lens.cfg.sae_type, lens.cfg.d_model, lens.cfg.hidden_dim)
"""


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory) -> dict:
    """Environment of a subprocess on which the torch side is not installed."""
    site = tmp_path_factory.mktemp("jax-only-site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device is enough here
    return env


def start(env: dict, *args: str) -> subprocess.Popen:
    """A fresh interpreter running ``args``; independent steps run side by side to save time."""
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ok(proc: subprocess.Popen) -> str:
    result = finish(proc)
    assert result.returncode == 0, f"{result.args[1:]}:\n{result.stderr[-3000:]}"
    return result.stdout


def one_line_status_2(proc: subprocess.Popen, *needles: str) -> None:
    result = finish(proc)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "pip install -e '.[extract]'" in line and "SAE_MUSIC_JAX_ONLY" in line
    for needle in needles:
        assert needle in line


def test_the_torch_side_is_really_missing(without_torch):
    probe = "import importlib.util as u, sys; print([u.find_spec(n) for n in sys.argv[1:]]); import torch"
    result = finish(start(without_torch, "-c", probe, *TORCH_SIDE))
    assert result.stdout.strip() == "[None, None, None]"
    assert "ModuleNotFoundError: No module named 'torch'" in result.stderr


def test_train_discover_export_load_and_compile_without_torch(without_torch, tmp_path):
    env = without_torch
    store, models = tmp_path / "store", tmp_path / "models"
    compiling = start(env, "-m", "jax_sae.train", "--compile_only", "--d_model", "16", "--hidden_dim", "32",
                      "--top_k", "3", "--batch_size", "64")
    ok(start(env, "-c", WRITE_STORE, str(store)))
    ok(start(env, "-m", "jax_sae.train", "--store", str(store), "--layer_idx", "0", "--sae_type", "batch_topk",
             "--hidden_dim", "32", "--top_k", "3", "--batch_size", "256", "--epochs", "1", "--lr", "3e-3",
             "--eval_every", "1000", "--checkpoint_every", "1000", "--out", str(models), "--no-progress"))
    checkpoint = models / "batch_topk" / "layer0" / "dim32" / "final"
    assert checkpoint.is_dir()
    assert "peak estimate" in ok(compiling)

    features, lens, pt = tmp_path / "features_layer0.json", tmp_path / "lens", tmp_path / "sae.pt"
    discovering = start(env, "-m", "discovery.discover", "--sae_path", str(checkpoint), "--store", str(store),
                        "--output", str(features), "--no_filter", "--max_features", "3", "--examples", "2",
                        "--no-progress")
    torch_export = start(env, "-m", "jax_sae.export", "--checkpoint", str(checkpoint), "--format", "torch",
                         "--out", str(pt))
    ok(start(env, "-m", "jax_sae.export", "--checkpoint", str(checkpoint), "--format", "saelens", "--out", str(lens)))
    assert "loaded batch_topk 16 32" in ok(start(env, "-c", LOAD_EXPORT, str(lens), str(checkpoint)))
    one_line_status_2(torch_export, "the torch export format needs PyTorch", "--format saelens")
    assert not pt.exists()
    ok(discovering)
    assert features.exists()

    report = start(env, "-m", "discovery.report", "--features", str(features), "--out", str(tmp_path / "report"))
    one_line_status_2(report, "the report's audio needs PyTorch", "--no-audio")
    assert not (tmp_path / "report").exists()

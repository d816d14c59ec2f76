"""``python -m bench.saelens_load``: our SAELens exports of every SAE type, loaded by SAELens itself.

For each type, and for transcoders (plain and skip) of every type SAELens has a transcoder class
for, a checkpoint with perturbed weights (a JumpReLU with one threshold per latent, a skip
transcoder with a random W_skip) is exported with ``jax_sae.export --format saelens``; SAELens, in
its own environment (it pins its own torch), loads each directory with ``SAE.load_from_disk`` and
encodes and runs the same rows (``sae(x)``: a skip transcoder's skip term included). The table is
the largest difference from our own ``encode`` and output, and the class SAELens built. The SAELens environment, once::

    python -m venv /tmp/saelens && /tmp/saelens/bin/pip install torch==2.13.0 sae-lens==6.54.0
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError

from .common import report, run_bench, target

TYPES = ("vanilla", "topk", "batch_topk", "matryoshka", "jumprelu", "vanilla-transcoder", "vanilla-skip_transcoder",
         "batch_topk-transcoder", "matryoshka-skip_transcoder", "jumprelu-transcoder", "jumprelu-skip_transcoder")
"""Our kinds (``SAEConfig.kind``); SAELens 6.54 has no TopK transcoder."""
ON_SAELENS_SIDE = """
import json, sys
import numpy as np, torch
from sae_lens import SAE
out = {}
for name in sys.argv[2:]:
    sae = SAE.load_from_disk(f"{sys.argv[1]}/{name}", device="cpu")
    x = torch.from_numpy(np.load(f"{sys.argv[1]}/x.npy"))
    with torch.no_grad():
        f = sae.encode(x)
        out[name] = {"class": type(sae).__name__, "f": f.numpy().tolist(), "x_hat": sae(x).numpy().tolist()}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class SAELensLoadConfig:
    """Options of ``python -m bench.saelens_load``."""

    saelens_python: str = "/tmp/saelens/bin/python"
    """Python of an environment with SAELens (see the module's docstring)."""
    d: int = 24
    hidden_dim: int = 96


def _checkpoint(root: Path, kind: str, d: int, h: int) -> Path:
    import jax

    from jax_sae import model as M
    from jax_sae.checkpoint import model_tree, save_model
    from jax_sae.config import SAEConfig

    sae_type, _, transcoder = kind.partition("-")
    cfg = SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=8, layer=2, model="tiny-random",
                    group_sizes=(h // 3, h - h // 3) if sae_type == "matryoshka" else (),
                    transcoder={"": "none", "transcoder": "plain", "skip_transcoder": "skip"}[transcoder])
    rng = np.random.default_rng(0)
    params = M.init_params(jax.random.PRNGKey(1), cfg, rng.normal(size=d).astype(np.float32))
    params = params.replace(W_enc_DH=params.W_enc_DH + 0.05 * rng.normal(size=(d, h)).astype(np.float32),
                            b_enc_H=0.1 * rng.normal(size=h).astype(np.float32), threshold_H=None)
    if cfg.skip:
        params = params.replace(W_skip_DD=0.2 * rng.normal(size=(d, d)).astype(np.float32))
    threshold = rng.uniform(0.1, 0.6, size=h).astype(np.float32) if cfg.learned_threshold else 0.3
    path = root / f"{kind}-ckpt"
    save_model(path, cfg, model_tree(params, threshold, 0.37), {"step": 1})
    return path


def run(cfg: SAELensLoadConfig) -> dict:
    import jax_sae
    from jax_sae.export import main as export

    if not Path(cfg.saelens_python).exists():
        raise UsageError(f"no Python at {cfg.saelens_python}; create the SAELens environment (python -m "
                         "bench.saelens_load --help says how) or pass --saelens_python")
    root = Path(tempfile.mkdtemp(prefix="saelens-load-"))
    x = (np.random.default_rng(7).normal(size=(64, cfg.d)) * 3 + 0.5).astype(np.float32)
    np.save(root / "x.npy", x)
    ours = {}
    for sae_type in TYPES:
        ckpt = _checkpoint(root, sae_type, cfg.d, cfg.hidden_dim)
        export(["--checkpoint", str(ckpt), "--format", "saelens", "--out", str(root / sae_type)])
        sae = jax_sae.load(ckpt)
        ours[sae_type] = (np.asarray(sae.encode(x)), np.asarray(sae(x)))
    done = subprocess.run([cfg.saelens_python, "-c", ON_SAELENS_SIDE, str(root), *TYPES], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise UsageError(f"SAELens failed to load the exports: {done.stderr.strip().splitlines()[-1]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    version = subprocess.run([cfg.saelens_python, "-c", "import sae_lens; print(sae_lens.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    rows = {}
    for sae_type in TYPES:
        f, x_hat = ours[sae_type]
        rows[sae_type] = {"saelens_class": theirs[sae_type]["class"],
                          "max_abs_diff_codes": float(np.abs(np.asarray(theirs[sae_type]["f"]) - f).max()),
                          "max_abs_diff_reconstruction": float(np.abs(np.asarray(theirs[sae_type]["x_hat"]) - x_hat).max()),
                          "mean_l0": float((f > 0).sum(1).mean())}
        print(f"{sae_type:>26}: SAELens {version} built {rows[sae_type]['saelens_class']}; codes within "
              f"{rows[sae_type]['max_abs_diff_codes']:.1e}, reconstructions within "
              f"{rows[sae_type]['max_abs_diff_reconstruction']:.1e} (L0 {rows[sae_type]['mean_l0']:.1f})")
    worst = max(max(r["max_abs_diff_codes"], r["max_abs_diff_reconstruction"]) for r in rows.values())
    return report("saelens_load", {}, params={"saelens": version, "d": cfg.d, "hidden_dim": cfg.hidden_dim},
                  derived={"types": rows},
                  targets=[target("every type and transcoder loads in SAELens and matches ours", worst, "within 1e-4",
                                  worst <= 1e-4)])


def main(argv: list[str] | None = None):
    return run_bench(SAELensLoadConfig, run, argv, "saelens_load",
                     "Load our SAELens exports of every type in SAELens itself and compare.")


if __name__ == "__main__":
    main()

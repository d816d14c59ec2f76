"""``python -m bench.synthbench``: SynthSAEBench (Chanin & Garriga-Alonso 2026) with our generator,
our trainer and the benchmark's metrics (``jax_sae.synthetic``).

Each SAE type is trained through the real trainer on ``--store synthetic:MODEL`` (fresh samples
drawn on the device, one epoch of ``--samples``), its ``best/`` model scored on
``--eval_samples`` fresh samples, and the table printed beside the published rows (SAE width
4,096, 200M samples, at L0 = 25). ``--generator`` prints what the generator draws instead (true
L0, hierarchy, firing rates, overlap), the figures ``bench/saelens_synth.py`` measures on
SAELens's own generator in its environment. Writes ``bench/results/synthbench.json``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from sae_core.files import write_json

from .common import RESULTS_DIR, machine, run_bench

PUBLISHED = {  # SAELens docs/synth_sae_bench.md, L0 = 25, means over runs
    "batch_topk": {"f1": 0.7316, "mcc": 0.7574, "uniqueness": 0.9837, "explained_variance": 0.7923},
    "matryoshka": {"f1": 0.8793, "mcc": 0.7927, "uniqueness": 0.9987, "explained_variance": 0.7792},
    "jumprelu": {"f1": 0.7317, "mcc": 0.7527, "uniqueness": 0.9885, "explained_variance": 0.7951},
    "vanilla (L1)": {"f1": 0.5562, "mcc": 0.6039, "uniqueness": 0.8976, "explained_variance": 0.7654},
}
COLUMNS = ("f1", "mcc", "uniqueness", "explained_variance", "shrinkage", "l0", "dead")


@dataclass(frozen=True)
class SynthBenchConfig:
    """Options of ``python -m bench.synthbench``."""

    model: str = "synthsaebench-16k"
    """The synthetic model (jax_sae.synthetic.PRESETS; NAME@SEED for another dictionary seed)."""
    types: tuple[str, ...] = ("batch_topk", "matryoshka")
    """SAE types to train."""
    samples: int = 1_000_000
    """Training samples per SAE (one epoch of fresh samples)."""
    hidden_dim: int = 4096
    top_k: int = 25
    batch_size: int = 1024
    """The trainer's default."""
    lr: float | Literal["auto"] = "auto"
    """Peak learning rate, or the trainer's auto rule."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds (each draws its own samples and initialisation)."""
    evaluations: int = 5
    """Validations during each run (each on 16,384 fresh samples)."""
    eval_samples: int = 100_000
    """Fresh samples each trained SAE is scored on (SAELens: 100,000 by default, 500,000 in its runner)."""
    train_flags: str = ""
    """More trainer flags for every run, as on the command line ("--aux_k 512 --group_weights 1,1")."""
    out: str = "bench/results/synthbench_runs"
    sweep: bool = False
    """Train each seed's types as one sweep (jax_sae.sweep): every batch is drawn once for all of them,
    and each SAE equals its lone run. Drawing the 16k model's samples is most of a run on a CPU."""
    generator: bool = False
    """Print the generator's statistics instead of training."""
    saelens_runs: tuple[str, ...] = ()
    """Results files of bench/saelens_synth.py --train: score those SAELens SAEs with our metric code, beside ours."""
    rescore: tuple[str, ...] = ()
    """Run directories of earlier runs of ours (each holding best/ and training_stats.json): score them
    again with the current metric code instead of training."""
    compare: str = ""
    """A results file of bench/saelens_synth.py: set SAELens's generator and metrics beside ours instead of training."""


def train_config(cfg: SynthBenchConfig, sae_type: str, seed: int):
    """The trainer's config of one SAE of the benchmark: its defaults, the benchmark's settings, then
    ``--train_flags``."""
    import shlex

    from jax_sae.config import TrainConfig

    from sae_core.cli import build_parser

    steps = cfg.samples // cfg.batch_size
    parser = build_parser(TrainConfig, "--train_flags", "")
    given, defaults = vars(parser.parse_args(shlex.split(cfg.train_flags))), vars(parser.parse_args([]))
    extra = {name: value for name, value in given.items() if value != defaults[name]}
    return TrainConfig.of(**({
        "store": f"synthetic:{cfg.model}", "sae_type": sae_type, "hidden_dim": cfg.hidden_dim, "top_k": cfg.top_k,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "epochs": 1, "max_tokens": cfg.samples, "seed": seed,
        "eval_every": max(1, steps // max(1, cfg.evaluations)), "out": f"{cfg.out}/{sae_type}-seed{seed}",
    } | extra))


def train_and_score(cfg: SynthBenchConfig, sae_type: str, seed: int, model) -> dict:
    from jax_sae.train import train

    train_cfg = train_config(cfg, sae_type, seed)
    stats = train(train_cfg)
    return scored(cfg, train_cfg.run_dir(), stats, model)


def sweep_and_score(cfg: SynthBenchConfig, seed: int, model) -> list[dict]:
    """Every type of ``seed`` trained as one sweep (``jax_sae.sweep``): each batch is drawn once and
    feeds them all, and each member's run equals the run ``train_and_score`` makes."""
    from jax_sae.sweep import SweepConfig, sweep

    from sae_core.cli import from_flags

    base = train_config(cfg, cfg.types[0], seed)
    flags = base.settings() | {"sae_types": tuple(cfg.types), "out": f"{cfg.out}/sweep-seed{seed}"}
    summary = sweep(from_flags(SweepConfig, flags))
    rows = []
    for record in summary["members"]:
        run_dir = Path(record["run_dir"])
        stats = json.loads((run_dir / "training_stats.json").read_text())
        row = scored(cfg, run_dir, stats, model)
        row["sweep_seconds"] = summary["seconds"]  # the whole sweep's, shared by its members
        rows.append(row)
    return rows


def scored(cfg: SynthBenchConfig, run_dir: Path, stats: dict, model) -> dict:
    """One trained SAE's row: its ``best/`` model scored on ``--eval_samples`` fresh samples."""
    from jax_sae.api import SAE
    from jax_sae.config import TrainConfig
    from jax_sae.synthetic.metrics import score

    started = time.perf_counter()
    scores = score(SAE.load(run_dir / "best"), model, n_samples=cfg.eval_samples, progress=True)
    settings = stats.get("config", {})
    return {"sae_type": settings.get("sae_type"), "seed": settings.get("seed"), "train_seconds": stats["seconds"],
            "samples_per_second": stats["steps"] * settings.get("batch_size", cfg.batch_size) / stats["seconds"],
            "score_seconds": time.perf_counter() - started, "lr": TrainConfig.of(**settings).peak_lr,
            "train_flags": cfg.train_flags, **scores}


def rescored(cfg: SynthBenchConfig, model) -> list[dict]:
    """``--rescore``: earlier runs' rows again, every run directory checked before the first is scored."""
    from sae_core.errors import UsageError

    for path in cfg.rescore:
        if not (Path(path) / "training_stats.json").is_file() or not (Path(path) / "best").is_dir():
            raise UsageError(f"--rescore {path}: not a finished run directory (needs best/ and training_stats.json); "
                             "point at the directory that holds them")
    rows = []
    for path in cfg.rescore:
        row = scored(cfg, Path(path), json.loads((Path(path) / "training_stats.json").read_text()), model)
        rows.append(row | {"train_flags": None, "run_dir": path, "label": f"rescored {row['sae_type']} seed {row['seed']}"})
    return rows


def fixed_sae(model, hidden: int, k: int):
    """The SAE bench/saelens_synth.py builds on SAELens's side: the ``hidden`` most frequent features
    read by their own directions (decoder the directions, encoder their transpose, top-k)."""
    import jax.numpy as jnp

    from jax_sae import model as M
    from jax_sae.api import SAE
    from jax_sae.config import SAEConfig

    E = model.directions[:hidden]
    cfg = SAEConfig(sae_type="topk", d_model=model.cfg.d_model, hidden_dim=hidden, top_k=k)
    return SAE(cfg, M.SAEParams(W_enc_DH=E.T, b_enc_H=jnp.zeros(hidden), W_dec_HD=E, b_dec_D=model.bias), 0.0, 1.0)


SAELENS_NAMES = {"f1": "f1_score", "l0": "sae_l0", "dead": "dead_latents"}


def compare(cfg: SynthBenchConfig, model, saelens: dict) -> dict:
    """Our generator and metrics beside SAELens's (bench/saelens_synth.py's results)."""
    import numpy as np

    from jax_sae.synthetic.metrics import generator_stats, score, score_batches

    theirs = saelens["generator"]
    ours = generator_stats(model, n_samples=theirs["samples"])
    n = theirs["samples"]
    rate = np.asarray(ours["rate_by_decile"])
    se_l0 = ours["true_l0_standard_error"] * np.sqrt(2)  # of the difference of two such estimates
    fixed = saelens["fixed_sae"]
    mine = score(fixed_sae(model, fixed["hidden_dim"], fixed["top_k"]), model, n_samples=n)
    with np.load(Path(cfg.compare).with_suffix(".npz")) as arrays:
        batches = [tuple(arrays[k][i:i + 1024] for k in ("x", "a", "f", "x_hat"))
                   for i in range(0, len(arrays["x"]), 1024)]
        same = score_batches(arrays["W_dec"], arrays["directions"], batches)
    keys = ("f1", "precision", "recall", "mcc", "uniqueness", "explained_variance", "shrinkage", "l0", "true_l0", "dead")
    out = {
        "generator": {"ours": ours, "saelens": theirs, "true_l0_standard_error": se_l0,
                      "true_l0_difference_in_standard_errors": abs(ours["true_l0"] - theirs["true_l0"]) / se_l0,
                      "largest_decile_rate_ratio": float(np.max(np.abs(rate / np.asarray(theirs["rate_by_decile"]) - 1)))},
        "fixed_sae": {k: (mine[k], fixed["scores"][SAELENS_NAMES.get(k, k)]) for k in keys},
        "same_arrays": {k: (same[k], saelens["arrays"]["scores"][SAELENS_NAMES.get(k, k)]) for k in keys},
    }
    out["same_arrays_largest_difference"] = max(abs(a - b) for a, b in out["same_arrays"].values())
    for section in ("fixed_sae", "same_arrays"):
        print(f"{section}: " + ", ".join(f"{k} {a:.4f} (SAELens {b:.4f})" for k, (a, b) in out[section].items()))
    print(f"generator: true L0 {ours['true_l0']:.3f} (SAELens {theirs['true_l0']:.3f}, "
          f"{out['generator']['true_l0_difference_in_standard_errors']:.1f} standard errors apart); by level "
          + ", ".join(f"{k} {v:.3f} ({theirs['realised_over_zipf'][k]:.3f})" for k, v in ours["realised_over_zipf"].items())
          + f"; mean max |cos| {ours['mean_max_cos']:.4f} ({theirs['mean_max_cos']:.4f}); SAELens built its model in "
          f"{saelens['build_seconds']:.0f} s")
    print(f"metrics on the same arrays: largest difference {out['same_arrays_largest_difference']:.2e}")
    return out


def score_saelens_run(path: str) -> dict:
    """A SAELens-trained SAE (bench/saelens_synth.py --train) scored by our metric code on the
    evaluation arrays it saved (SAELens's own scores of the same arrays kept beside)."""
    import numpy as np

    from jax_sae.synthetic.metrics import score_batches

    run = json.loads(Path(path).read_text())
    with np.load(Path(path).parent / run["arrays"]) as saved:
        arrays = {k: saved[k] for k in saved.files}
    n, features, hidden = (int(v) for v in arrays["shape"])

    def dense(index, value, width, lo, hi):
        rows = (index[0] >= lo) & (index[0] < hi)
        out = np.zeros((hi - lo, width), np.float32)
        out[index[0][rows] - lo, index[1][rows]] = value[rows]
        return out

    batches = ((arrays["x"][lo:lo + 1024], dense(arrays["a_index"], arrays["a_value"], features, lo, min(n, lo + 1024)),
                dense(arrays["f_index"], arrays["f_value"], hidden, lo, min(n, lo + 1024)), arrays["x_hat"][lo:lo + 1024])
               for lo in range(0, n, 1024))
    scores = score_batches(arrays["W_dec"], arrays["directions"], batches)
    label = f"SAELens {run['type']} lr {run['lr']:g} window {run['dead_window']} ({run['samples'] / 1e6:g}M)"
    return {"label": label, "sae_type": run["type"], "saelens": run, "train_seconds": run["train_seconds"],
            "samples_per_second": run["samples"] / run["train_seconds"], **scores}


def table(rows: list[dict]) -> str:
    head = f"{'run':<34}" + "".join(f"{c[:10]:>11}" for c in COLUMNS) + f"{'train s':>10}{'samples/s':>11}"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[c]:>11.4g}" if c in r else f"{'-':>11}" for c in COLUMNS)
        timing = f"{r['train_seconds']:>10.0f}{r['samples_per_second']:>11.0f}" if "train_seconds" in r else ""
        lines.append(f"{r['label']:<34}{cells}{timing}")
    return "\n".join(lines)


def run(cfg: SynthBenchConfig) -> dict:
    from jax_sae.synthetic import load, preset
    from jax_sae.synthetic.build import cache_path
    from jax_sae.synthetic.metrics import generator_stats

    synth = preset(cfg.model)
    started = time.perf_counter()
    model = load(synth)
    built = time.perf_counter() - started
    results = {"config": asdict(cfg), "synthetic": synth.to_json(), "machine": machine(),
               "model_seconds": built, "dictionary": str(cache_path(synth))}
    if cfg.compare:
        results["compare"] = compare(cfg, model, json.loads(Path(cfg.compare).read_text()))
    elif cfg.saelens_runs and not cfg.types:
        rows = [score_saelens_run(p) for p in cfg.saelens_runs]
        print(table(rows))
        results["runs"] = rows
    elif cfg.rescore:
        rows = rescored(cfg, model)
        print(table(rows))
        results["runs"] = rows
    elif cfg.generator:
        results["generator"] = generator_stats(model, n_samples=cfg.eval_samples)
        print(json.dumps(results["generator"], indent=1))
    else:
        if cfg.sweep:
            rows = [row for s in cfg.seeds for row in sweep_and_score(cfg, s, model)]
        else:
            rows = [train_and_score(cfg, t, s, model) for t in cfg.types for s in cfg.seeds]
        for r in rows:
            r["label"] = f"ours {r['sae_type']} seed {r['seed']} ({cfg.samples / 1e6:g}M)"
        rows += [score_saelens_run(p) for p in cfg.saelens_runs]
        published = [{"label": f"published {t} (200M, GPU)", **v} for t, v in PUBLISHED.items()]
        print(table(rows + published))
        results["runs"] = rows
    name = "synthbench_compare" if cfg.compare else "synthbench_generator" if cfg.generator else "synthbench"
    write_json(RESULTS_DIR / f"{name}-{cfg.model}.json", results)
    print(f"wrote {Path(RESULTS_DIR / f'{name}-{cfg.model}.json')}")
    return results


def main(argv: list[str] | None = None):
    return run_bench(SynthBenchConfig, run, argv, "synthbench", "SynthSAEBench with our generator, trainer and metrics.")


if __name__ == "__main__":
    main()

"""``python -m bench.quality_bench``: how good a dictionary the trainer learns from a fixed number
of tokens, on synthetic activations whose true features are known.

Data (the issue-15 setting by default): ``--n_true`` unit-norm directions in ``--d`` dimensions;
feature i fires with probability proportional to 1/(i+1), scaled to ``--active`` features per row
on average (each capped at ``--cap``), with an Exp(1) magnitude, plus Gaussian noise of std
``--noise``. The rows go into an activation store through the project's own writer, and every
SAE type is trained on it by the real trainer (``python -m jax_sae.train`` in its own process)
at each token budget and seed. The trained ``final/`` model is then scored on held-out rows of
the same distribution:

- held-out FVU: sum ||x - x_hat||^2 / sum ||x - mean x||^2, with inference codes (the JumpReLU
  threshold for BatchTopK and Matryoshka);
- inference L0 and the dead fraction (latents that never fire on the held-out rows);
- MMCS: the mean over true directions of the best cosine with any decoder row, plain and
  weighted by the features' firing frequencies, and the fraction of true directions recovered
  above cosine 0.9;
- tokens/s of the whole training command (start-up and compilation included).

With ``--concepts N`` the samples also carry tags: each of N tag directions is added to every
row of the samples that carry its tag (with an Exp(1) magnitude per row), and the benchmark
reports the best cosine between each tag's direction and the decoder.

Extra trainer flags for an experiment go in ``--train_args`` (e.g. ``--train_args "--lr 1e-3"``);
``--label`` names the results file, ``bench/results/quality_bench[-label].json``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .common import RESULTS_DIR, report, run_bench, summarize

TYPES = ("vanilla", "topk", "batch_topk", "matryoshka", "jumprelu")
DEFAULT_TYPES = TYPES[:4]  # the issue-15 table's
ROWS_PER_SAMPLE = 256
CHUNK_ROWS = 16_384
RECOVERED_COS = 0.9


@dataclass(frozen=True)
class QualityConfig:
    """Options of ``python -m bench.quality_bench``."""

    types: tuple[str, ...] = DEFAULT_TYPES
    """SAE types trained."""
    budgets: tuple[int, ...] = (500_000,)
    """Training-token budgets (each run sees this many tokens; the store holds the largest). The
    issue-15 table takes 500000,2000000 (about 45 minutes for all four types on 2 cores)."""
    seeds: tuple[int, ...] = (0, 1)
    """Trainer seeds (initialisation and data order); the data is the same for every seed."""
    d: int = 256
    """Activation width."""
    n_true: int = 2000
    """True feature directions."""
    active: float = 16.0
    """Mean true features active per row."""
    cap: float = 0.5
    """Largest firing probability of one feature."""
    noise: float = 0.01
    """Standard deviation of the Gaussian noise added to every coordinate."""
    hidden_dim: int = 2048
    """Latents of every SAE."""
    top_k: int = 16
    """k of the TopK family."""
    batch_size: int = 1024
    """Rows per optimizer step."""
    epochs: int = 1
    """Passes over each budget's rows (2 doubles the tokens seen, not the data)."""
    held_out: int = 65_536
    """Held-out rows scored."""
    concepts: int = 0
    """Tag directions planted per sample (0: none); each sample carries each tag with probability 0.1."""
    data_seed: int = 0
    """Seed of the true directions, the rows and the tags."""
    train_args: str = ""
    """Extra flags for every ``python -m jax_sae.train`` command of this run, e.g. "--lr 1e-3"."""
    label: str = ""
    """Suffix of the results file and its figures' names."""
    work_dir: str = "bench/results/quality_data"
    """Where the synthetic stores (reused across runs with the same data settings) and runs go."""
    quick: bool = False
    """BatchTopK only, the smallest budget, one seed: about two minutes (plus one for the data)."""

    def __post_init__(self) -> None:
        from sae_core.errors import UsageError

        unknown = [t for t in self.types if t not in TYPES]
        if unknown:
            raise UsageError(f"unknown --types {', '.join(unknown)}; choose from {', '.join(TYPES)}")
        if min(self.budgets, default=0) < self.batch_size:
            raise UsageError(f"every --budgets value must be at least --batch_size ({self.batch_size})")
        if self.active <= 0 or not 0 < self.cap <= 1 or self.active > self.cap * self.n_true:
            raise UsageError(f"--active {self.active} cannot be reached by {self.n_true} features capped at "
                             f"--cap {self.cap}; lower --active or raise --n_true")

    def plan(self) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
        if self.quick:
            return ("batch_topk",), (min(self.budgets),), (self.seeds[0],)
        return self.types, self.budgets, self.seeds


# ----------------------------------------------------------------------------------------- data
def firing_probabilities(n_true: int, active: float, cap: float) -> np.ndarray:
    """p_i = c / (i + 1), capped at ``cap``, with c chosen so that the p_i sum to ``active``."""
    base = 1.0 / np.arange(1, n_true + 1)
    lo, hi = 0.0, active / base[-1]
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(mid * base, cap).sum() < active else (lo, mid)
    return np.minimum(hi * base, cap)


@dataclass(frozen=True)
class Truth:
    """What the rows are made of: the true directions, their frequencies, and the tags."""

    directions_FD: np.ndarray
    probabilities_F: np.ndarray
    tag_directions_TD: np.ndarray


def make_truth(cfg: QualityConfig) -> Truth:
    rng = np.random.default_rng(cfg.data_seed)
    directions = rng.normal(size=(cfg.n_true, cfg.d))
    tags = rng.normal(size=(cfg.concepts, cfg.d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    return Truth(unit(directions), firing_probabilities(cfg.n_true, cfg.active, cfg.cap), unit(tags))


def make_rows(truth: Truth, n_rows: int, noise: float, rng: np.random.Generator,
              tags_SN: np.ndarray | None = None) -> np.ndarray:
    """``n_rows`` rows of the distribution (with each sample's tag directions added when
    ``tags_SN`` gives the tags of the n_rows / ROWS_PER_SAMPLE samples)."""
    n_true, d = truth.directions_FD.shape
    out = np.empty((n_rows, d), np.float32)
    for start in range(0, n_rows, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n_rows - start)
        on = rng.random((rows, n_true), dtype=np.float32) < truth.probabilities_F.astype(np.float32)
        magnitude = np.where(on, rng.standard_exponential((rows, n_true), dtype=np.float32), 0.0)
        x = magnitude @ truth.directions_FD + rng.normal(scale=noise, size=(rows, d)).astype(np.float32)
        if tags_SN is not None and len(truth.tag_directions_TD):
            sample = (start + np.arange(rows)) // ROWS_PER_SAMPLE
            strength = tags_SN[sample] * rng.standard_exponential((rows, tags_SN.shape[1]), dtype=np.float32)
            x += strength @ truth.tag_directions_TD
        out[start:start + rows] = x
    return out


def _data_key(cfg: QualityConfig, n_rows: int) -> str:
    fields = (cfg.d, cfg.n_true, cfg.active, cfg.cap, cfg.noise, cfg.concepts, cfg.data_seed, n_rows, 2)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


def build_store(cfg: QualityConfig, truth: Truth, n_rows: int) -> Path:
    """The training store (reused when one with the same data settings is complete)."""
    from tqdm import tqdm

    from sae_core.files import staged_dir
    from sae_core.store import StoreMeta, acts_name, create_store, open_store

    path = Path(cfg.work_dir).absolute() / f"store-{_data_key(cfg, n_rows)}"
    if path.exists():
        store = open_store(path)
        if store.complete:
            return path
    n_samples = n_rows // ROWS_PER_SAMPLE
    rng = np.random.default_rng([cfg.data_seed, 1])
    tags_SN = (rng.random((n_samples, cfg.concepts)) < 0.1).astype(np.float32)
    meta = StoreMeta(model="synthetic", layers=(0,), d_model=cfg.d, n_codebooks=4, frame_rate=50.0,
                     sampling_rate=32000, dtype="float32", mode="generate", n_samples=n_samples,
                     n_rows=n_samples * ROWS_PER_SAMPLE, n_units=1)
    samples = [{"index": i, "prompt": f"synthetic sample {i}", "source_id": f"quality-{i}",
                "tags": [f"tag{t}" for t in np.flatnonzero(tags_SN[i])], "n_frames": ROWS_PER_SAMPLE}
               for i in range(n_samples)]
    with staged_dir(path) as tmp:
        store = create_store(tmp, meta, samples, [ROWS_PER_SAMPLE] * n_samples)
        step = CHUNK_ROWS * 16
        for start in tqdm(range(0, meta.n_rows, step), desc=f"synthetic store ({meta.n_rows:,} rows)", unit="chunk"):
            rows = min(step, meta.n_rows - start)
            first = start // ROWS_PER_SAMPLE
            x = make_rows(truth, rows, cfg.noise, rng, tags_SN[first:first + rows // ROWS_PER_SAMPLE])
            store.write_rows(acts_name(0), start, x)
        store.commit_unit(0, "shard-0-of-1")
    return path


def held_out_rows(cfg: QualityConfig, truth: Truth) -> np.ndarray:
    """Rows of the same distribution that no run trains on (tagged like the training samples)."""
    rng = np.random.default_rng([cfg.data_seed, 2])
    n_samples = -(-cfg.held_out // ROWS_PER_SAMPLE)
    tags_SN = (rng.random((n_samples, cfg.concepts)) < 0.1).astype(np.float32)
    return make_rows(truth, n_samples * ROWS_PER_SAMPLE, cfg.noise, rng, tags_SN)[: cfg.held_out]


# ------------------------------------------------------------------------------------- scoring
def best_cosines(true_FD: np.ndarray, decoder_HD: np.ndarray) -> np.ndarray:
    learned = decoder_HD / np.maximum(np.linalg.norm(decoder_HD, axis=1, keepdims=True), 1e-12)
    return np.max(true_FD @ learned.T, axis=1)


def score(run_dir: Path, truth: Truth, x_ND: np.ndarray) -> dict:
    """The held-out and ground-truth figures of one trained model (``final/``)."""
    import jax

    import jax_sae

    sae = jax_sae.load(run_dir / "final")
    encode = jax.jit(sae.encode)
    decode = jax.jit(sae.decode)
    # Matryoshka: also the reconstruction from its first group alone (the smallest nested dictionary).
    first = sae.cfg.group_sizes[0] if sae.cfg.sae_type == "matryoshka" else 0
    sq_err = sq_err_first = l0 = 0.0
    fired_H = np.zeros(sae.cfg.hidden_dim, bool)
    for start in range(0, len(x_ND), 8192):
        x = x_ND[start:start + 8192]
        f = encode(x)
        sq_err += float(np.sum((np.asarray(decode(f)) - x) ** 2, dtype=np.float64))
        if first:
            sq_err_first += float(np.sum((np.asarray(decode(f.at[:, first:].set(0.0))) - x) ** 2, dtype=np.float64))
        active = np.asarray(f) > 0
        l0 += float(active.sum())
        fired_H |= active.any(axis=0)
    total_var = float(np.sum((x_ND - x_ND.mean(axis=0)) ** 2, dtype=np.float64))
    cos_F = best_cosines(truth.directions_FD, np.asarray(sae.params.W_dec_HD))
    weights = truth.probabilities_F / truth.probabilities_F.sum()
    out = {
        "fvu": sq_err / total_var,
        "l0": l0 / len(x_ND),
        "dead": float(1.0 - fired_H.mean()),
        "mmcs": float(cos_F.mean()),
        "mmcs_weighted": float(weights @ cos_F),
        "recovered": float(np.mean(cos_F > RECOVERED_COS)),
    }
    if first:
        out["fvu_first_group"] = sq_err_first / total_var
    if len(truth.tag_directions_TD):
        out["tag_cos"] = [float(c) for c in best_cosines(truth.tag_directions_TD, np.asarray(sae.params.W_dec_HD))]
    return out


# --------------------------------------------------------------------------------------- runs
def train_command(cfg: QualityConfig, store: Path, out: Path, sae_type: str, budget: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "jax_sae.train", "--store", str(store), "--layer_idx", "0", "--sae_type", sae_type,
            "--hidden_dim", str(cfg.hidden_dim), "--top_k", str(cfg.top_k), "--batch_size", str(cfg.batch_size),
            "--epochs", str(cfg.epochs), "--max_tokens", str(budget), "--val_fraction", "0", "--patience", "0",
            "--seed", str(seed), "--out", str(out), "--overwrite", "--no-progress", *shlex.split(cfg.train_args)]


def run_one(cfg: QualityConfig, store: Path, truth: Truth, x_ND: np.ndarray, sae_type: str, budget: int,
            seed: int) -> dict:
    from jax_sae.run_dir import run_path

    out = Path(cfg.work_dir).absolute() / f"runs{'-' + cfg.label if cfg.label else ''}" / f"{budget}-seed{seed}"
    command = train_command(cfg, store, out, sae_type, budget, seed)
    started = time.perf_counter()
    ran = subprocess.run(command, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if ran.returncode:
        raise SystemExit(f"training failed ({shlex.join(command[1:])}):\n{ran.stderr[-2000:]}")
    run = run_path(out, sae_type, 0, cfg.hidden_dim)
    stats = json.loads((run / "training_stats.json").read_text())
    tokens = stats["steps"] * cfg.batch_size
    return {"type": sae_type, "budget": budget, "seed": seed, "tokens": tokens, "steps": stats["steps"],
            "tokens_per_s": tokens / seconds, "seconds": seconds, **score(run, truth, x_ND)}


COLUMNS = (("fvu", "held-out FVU"), ("l0", "inference L0"), ("dead", "dead"), ("mmcs", "MMCS"),
           ("mmcs_weighted", "MMCS weighted"), ("recovered", f"recovered > {RECOVERED_COS}"),
           ("tokens_per_s", "tokens/s"))


def table(rows: list[dict], concepts: int) -> str:
    """One markdown row per type and budget: the mean over seeds (and the seeds' spread)."""
    columns = COLUMNS + ((("fvu_first_group", "FVU, first group alone"),) if any("fvu_first_group" in r for r in rows)
                         else ())
    head = ["type", "tokens", "seeds"] + [name for _, name in columns] + (["tag cos (mean, min)"] if concepts else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sae_type in dict.fromkeys(r["type"] for r in rows):
        for budget in dict.fromkeys(r["budget"] for r in rows):
            group = [r for r in rows if r["type"] == sae_type and r["budget"] == budget]
            if not group:
                continue
            cells = [sae_type, f"{group[0]['tokens'] / 1e6:.2f}M", str(len(group))]
            for key, _ in columns:
                if key not in group[0]:
                    cells.append("")
                    continue
                values = np.array([r[key] for r in group])
                fmt = "{:.0f}" if key == "tokens_per_s" else ("{:.1%}" if key in ("dead", "recovered") else "{:.3f}")
                spread = f" ±{(values.max() - values.min()) / 2:.3f}" if len(group) > 1 and key in ("fvu", "mmcs") else ""
                cells.append(fmt.format(values.mean()) + spread)
            if concepts:
                tag = np.array([r["tag_cos"] for r in group])
                cells.append(f"{tag.mean():.3f}, {tag.min():.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for sae_type in dict.fromkeys(r["type"] for r in rows):
        mine = [r for r in rows if r["type"] == sae_type]
        budgets = sorted({r["budget"] for r in mine})
        for ax, key in zip(axes, ("fvu", "mmcs", "recovered")):
            ax.plot([b / 1e6 for b in budgets], [np.mean([r[key] for r in mine if r["budget"] == b]) for b in budgets],
                    marker="o", label=sae_type)
    for ax, title in zip(axes, ("held-out FVU (lower is better)", "MMCS", f"true directions recovered (cos > {RECOVERED_COS})")):
        ax.set_title(title)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: QualityConfig) -> dict:
    types, budgets, seeds = cfg.plan()
    truth = make_truth(cfg)
    store = build_store(cfg, truth, max(budgets))
    x_ND = held_out_rows(cfg, truth)
    rows = []
    for sae_type in types:
        for budget in budgets:
            for seed in seeds:
                row = run_one(cfg, store, truth, x_ND, sae_type, budget, seed)
                rows.append(row)
                print(f"{sae_type:>10} {budget / 1e6:.2f}M seed {seed}: FVU {row['fvu']:.4f}, L0 {row['l0']:.1f}, "
                      f"dead {row['dead']:.1%}, MMCS {row['mmcs']:.3f} (weighted {row['mmcs_weighted']:.3f}), "
                      f"recovered {row['recovered']:.1%}, {row['tokens_per_s']:.0f} tokens/s"
                      + (f", first group alone FVU {row['fvu_first_group']:.4f}" if "fvu_first_group" in row else ""),
                      flush=True)
    name = "quality_bench" + (f"-{cfg.label}" if cfg.label else "")
    print("\n" + table(rows, cfg.concepts))
    RESULTS_DIR.mkdir(exist_ok=True)
    plot(rows, RESULTS_DIR / f"{name}.png")
    figures = {}
    for sae_type in types:
        for budget in budgets:
            group = [r for r in rows if r["type"] == sae_type and r["budget"] == budget]
            for key, label in (("fvu", "held-out FVU"), ("mmcs", "MMCS"), ("recovered", "recovered")):
                figures[f"{sae_type} {budget / 1e6:.2f}M: {label}"] = summarize([r[key] for r in group], "")
    return report("quality_bench", figures, params=asdict(cfg) | {"runs": rows, "table": table(rows, cfg.concepts)},
                  file_name=name)


def main(argv: list[str] | None = None):
    return run_bench(QualityConfig, run, argv, "quality_bench", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()

"""``python -m bench.discovery_bench``: streaming feature discovery against the original's method.

Ours is ``discovery.stats.feature_pass`` (one streaming pass, state O(features x examples))
followed by ``discovery.features.select_features``. The baseline re-implements the original's
``FeatureDiscovery.discover_and_label`` in numpy, step for step:

1. all activation rows in memory as one float32 array (the original took a tensor);
2. ``get_feature_activations``: encode in batches of 512 into a preallocated dense float32
   ``[rows, features]`` matrix;
3. ``filter_important_features``: activation counts over 10,000-row chunks, kept if within
   [min, max];
4. ranking: per kept feature, a Python loop over 10,000-row chunks of its column taking the max;
5. per reported feature (the first ``max_features`` by max), ``get_top_activating_examples``:
   a Python loop over samples taking each sample's max, then the top ``examples`` samples with a
   positive score. (The original also calls it with k=10 for its heuristic label; that call is
   left out, which only makes the baseline faster.)

Both encode with the same SAE through the same jitted JAX encoder (``SAE.encode`` per 512-row
batch for the baseline), so the comparison is of the method, not of the matmul library, and
results can agree exactly. Stores are musicgen-small wide (float16, d_model 1024, 500-frame
samples) with planted per-sample concepts; the SAE is an untrained 8192-latent TopK (k=64).

Every timed run is a fresh process (spawn) so its peak RSS is its own; each first warms its
compiled shapes (ours on a 20-sample store, the baseline on its two batch shapes) and then runs
once, timed. Results of ours and the baseline are compared on every store; after the timed
run the baseline also computes (untimed) the top samples of every kept feature, so agreement is
checked on all of them, not only the reported ones. At the largest store, ours' time per block
is split into the store read, the encoder matmul, the rest of encoding (top-k), and statistics
+ merges, and the statistics are re-timed one by one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError

from .common import (
    device_seconds,
    in_fresh_process,
    peak_rss_mib,
    report,
    run_bench,
    summarize,
    synthetic_store,
    target,
)

NAME = "discovery_bench"
LAYER = 0
SPEEDUP_TARGET = 10.0
ENCODE_BATCH = 512  # the original's get_feature_activations batch size
CHUNK_ROWS = 10_000  # the original's chunk size for counts and maxima
N_CONCEPTS = 64  # planted directions; each sample carries a few


@dataclass(frozen=True)
class DiscoveryBenchConfig:
    """Options of ``python -m bench.discovery_bench``."""

    rows: str = "20000,40000,80000"
    """Comma-separated store sizes in rows (each a whole number of samples)."""
    frames: int = 500
    """Rows per sample (10 s at 50 frames/s)."""
    d_model: int = 1024
    """Activation width (musicgen-small)."""
    hidden_dim: int = 8192
    """SAE latents."""
    top_k: int = 64
    """Active latents per row (TopK; the threshold's target for BatchTopK)."""
    sae_type: Literal["topk", "batch_topk"] = "topk"
    """SAE type (an untrained checkpoint: discovery's cost does not depend on training)."""
    examples: int = 20
    """Top samples per feature."""
    max_features: int = 10
    """Features reported (the original's default); ours computes examples for all anyway."""
    min_activation_count: int = 10
    """Filter: fewest activations a kept feature has."""
    max_activation_count: int = 10_000
    """Filter: most activations a kept feature has."""
    repeats: int = 3
    """Timed runs per method and store size, each in a fresh process."""
    block_rows: int = 4096
    """Rows per block of ours (feature_pass's default)."""
    split: bool = True
    """Also split ours' time per block (read, matmul, top-k, statistics, merges) at the largest store."""
    split_blocks: int = 4
    """Blocks the split is timed on (the split costs the same at every store size)."""
    tmp_dir: str = "/tmp"
    """Where the temporary stores and SAE go (removed afterwards)."""
    quick: bool = False
    """Stores of 4,000 and 8,000 rows and 1 repeat, to check the script runs."""

    def __post_init__(self) -> None:
        if min(self.frames, self.d_model, self.hidden_dim, self.top_k, self.examples, self.max_features,
               self.repeats, self.block_rows) <= 0:
            raise UsageError("sizes, counts and repeats must be positive")
        if any(n % self.frames or n <= 0 for n in self.sizes):
            raise UsageError(f"--rows {self.rows} must be positive multiples of --frames {self.frames}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.rows.split(","))


# -- setup (parent process) ------------------------------------------------------------------

def _write_store(path: Path, n_samples: int, cfg: DiscoveryBenchConfig, concepts_CD: np.ndarray, seed: int):
    """A float16 store whose samples each carry 1-3 planted concepts on about half their frames."""
    from sae_core.store import acts_name

    rng = np.random.default_rng(seed)
    unit_samples = max(1, 4000 // cfg.frames)
    store = synthetic_store(path, n_samples=n_samples, frames=cfg.frames, d_model=cfg.d_model, dtype="float16",
                            unit_samples=unit_samples, layer=LAYER)
    for unit in range(store.meta.n_units):
        rows = []
        for _ in range(min(unit_samples, n_samples - unit * unit_samples)):
            chosen = rng.choice(N_CONCEPTS, size=rng.integers(1, 4), replace=False)
            magnitude = rng.uniform(1.0, 3.0, (cfg.frames, len(chosen))) * (rng.random((cfg.frames, len(chosen))) < 0.5)
            rows.append(magnitude @ concepts_CD[chosen]
                        + 0.5 * rng.standard_normal((cfg.frames, cfg.d_model), dtype=np.float32))
        store.write_rows(acts_name(LAYER), unit * unit_samples * cfg.frames, np.concatenate(rows).astype(np.float16))
        store.commit_unit(unit, "shard-0-of-1")
    return store


def _write_sae(path: Path, cfg: DiscoveryBenchConfig, concepts_CD: np.ndarray, x_ND: np.ndarray) -> None:
    """An untrained checkpoint: random unit decoder rows (some along the planted concepts), tied
    encoder; for BatchTopK a threshold leaving about top_k latents active per row."""
    import jax

    from jax_sae import model as M
    from jax_sae.checkpoint import model_tree, save_model
    from jax_sae.config import SAEConfig

    sae_cfg = SAEConfig(sae_type=cfg.sae_type, d_model=cfg.d_model, hidden_dim=cfg.hidden_dim, top_k=cfg.top_k,
                        layer=LAYER, model="bench")
    params = M.init_params(jax.random.PRNGKey(0), sae_cfg, x_ND.mean(0))
    W_dec = np.array(params.W_dec_HD)
    W_dec[: len(concepts_CD)] = concepts_CD
    b_enc = 0.1 * np.random.default_rng(1).standard_normal(cfg.hidden_dim).astype(np.float32)
    params = params.replace(W_enc_DH=W_dec.T.copy(), W_dec_HD=W_dec, b_enc_H=b_enc)
    pre = (x_ND - x_ND.mean(0)) @ W_dec.T + b_enc
    threshold = float(np.quantile(pre, 1 - cfg.top_k / cfg.hidden_dim))
    save_model(path, sae_cfg, model_tree(params, threshold, 1.0), {"step": 0})


# -- timed runs (each in a fresh process) -----------------------------------------------------

def _ours(sae_path: str, store_path: str, warm_path: str, cfg: DiscoveryBenchConfig, split: bool) -> dict:
    import jax_sae
    from discovery.features import select_features
    from discovery.stats import feature_pass
    from sae_core.store import open_store

    sae = jax_sae.load(sae_path)
    store, warm = open_store(store_path), open_store(warm_path)
    start = time.perf_counter()
    feature_pass(sae, warm, LAYER, examples=cfg.examples, block_rows=cfg.block_rows, devices=1, progress=False,
                 token_examples=False)
    warm_s = time.perf_counter() - start
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    stats = feature_pass(sae, store, LAYER, examples=cfg.examples, block_rows=cfg.block_rows, devices=1,
                         progress=False, token_examples=False)  # as discover does for --aggregation max
    selected = select_features(stats, filter_features=True, min_count=cfg.min_activation_count,
                               max_count=cfg.max_activation_count, max_features=cfg.max_features)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "warmup_s": warm_s, "rss_before_mib": rss_before, "rss_peak_mib": peak_rss_mib(),
           "counts": stats.token_count, "max": stats.max, "selected": selected,
           "top_values": stats.top["max"][0], "top_samples": stats.top["max"][1]}
    if split:
        out["split"] = _split(sae, store, cfg)
    return out


def _split(sae, store, cfg: DiscoveryBenchConfig) -> dict:
    """Ours' pass in parts, in ms per block, on the store's first ``split_blocks`` padded blocks:
    reading and padding them; the encoder matmul alone; the whole encoder (matmul, top-k,
    scatter); the whole update (encoder, statistics, merges, host copies of the sample scores).
    The update's statistics are then re-timed one by one on one encoded block. Compute is timed
    on blocks already in memory, each part once after compiling it."""
    max_samples = min(store.n_samples, max(1, cfg.block_rows // cfg.frames))
    blocks, read_s = _padded_blocks(store, cfg, max_samples)
    matmul, encode = _encoders()
    out = {"read + pad": 1e3 * read_s / len(blocks)}
    out.update({part: ms / len(blocks) for part, ms in
                _encoder_and_update_ms(sae, blocks, matmul, encode, max_samples, cfg.examples).items()})
    out.update(_statistics_ms(sae, blocks[0], encode, max_samples, cfg.examples))
    return out


def _timed_ms(fn, *args) -> float:
    """Milliseconds of one call after a compiling one."""
    return 1e3 * device_seconds(fn, *args, repeats=1)[0]


def _padded_blocks(store, cfg: DiscoveryBenchConfig, max_samples: int) -> tuple[list, float]:
    """The first ``split_blocks`` blocks as feature_pass pads them (on the device), and the seconds
    reading and padding them took."""
    import jax.numpy as jnp

    from discovery.stats import _block_layout

    blocks, start = [], time.perf_counter()
    for samples, x in store.iter_sample_blocks(LAYER, cfg.block_rows):
        x_pad = np.zeros((cfg.block_rows, x.shape[1]), np.float32)
        x_pad[: len(x)] = x
        blocks.append((x_pad, *_block_layout(samples, store.offsets, cfg.block_rows, max_samples)))
        if len(blocks) == cfg.split_blocks:
            break
    seconds = time.perf_counter() - start
    return [tuple(map(jnp.asarray, b)) for b in blocks], seconds


def _encoders():
    """Jitted (the encoder matmul alone, the whole inference encoder), both on scaled input."""
    import functools

    import jax

    from jax_sae import model as M

    @functools.partial(jax.jit, static_argnums=0)
    def matmul(sae_cfg, params, scale, x_RD):
        return M.pre_activations(params, x_RD * scale)

    @functools.partial(jax.jit, static_argnums=0)
    def encode(sae_cfg, params, threshold, scale, x_RD):
        return M.encode_infer(sae_cfg, params, threshold, x_RD * scale)

    return matmul, encode


def _encoder_and_update_ms(sae, blocks: list, matmul, encode, max_samples: int, examples: int) -> dict:
    """Milliseconds over all ``blocks``: the encoder matmul, the whole encoder, the whole update."""
    import jax

    from discovery.stats import PassShape, init_state, update
    from jax_sae.sharding import make_mesh

    shape = PassShape(sae.cfg, examples, max_samples, make_mesh(1, 1), False)
    params, threshold, scale = sae.params, sae.threshold, sae.input_scale

    def run_update():
        state = init_state(sae.cfg.hidden_dim, examples)
        for b in blocks:
            state, smax, smean, _, _ = update(shape, state, params, threshold, scale, *b)
            np.asarray(smax), np.asarray(smean)  # feature_pass copies these to the host every block
        jax.block_until_ready(state)

    return {
        "encoder matmul": _timed_ms(lambda: [matmul(sae.cfg, params, scale, b[0]) for b in blocks]),
        "encoder (matmul + top-k + scatter)": _timed_ms(
            lambda: [encode(sae.cfg, params, threshold, scale, b[0]) for b in blocks]),
        "update (whole)": _timed_ms(run_update),
    }


def _statistics_ms(sae, block: tuple, encode, max_samples: int, examples: int) -> dict:
    """Milliseconds of each statistic of the update, one by one, on one encoded block."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from discovery.stats import init_state

    x_RD, segment_R, row_R = block[:3]
    f_RH = encode(sae.cfg, sae.params, sae.threshold, sae.input_scale, x_RD)
    state = init_state(sae.cfg.hidden_dim, examples)
    parts = {
        "stats: token top-k (moments)": (
            lambda f, r: lax.top_k(jnp.where((r >= 0)[None, :], f.T, -jnp.inf), examples), f_RH, row_R),
        "stats: column count, sum, max": (
            lambda f: (jnp.sum(f > 0, axis=0), jnp.sum(f, axis=0), jnp.max(f, axis=0)), f_RH),
        "stats: sample max + sum (segments)": (
            lambda f, s: (jax.ops.segment_max(f, s, num_segments=max_samples + 1),
                          jax.ops.segment_sum(f, s, num_segments=max_samples + 1)), f_RH, segment_R),
        "stats: padding mask": (lambda f, r: jnp.where((r >= 0)[:, None], f, 0.0), f_RH, row_R),
        "stats: merges (3 x top-k of carried + new)": (
            lambda a: [lax.top_k(jnp.concatenate([a, a[:, :n]], axis=1), examples) for n in
                       (max_samples, max_samples, examples)], state.top_max_HE),
    }
    return {name: _timed_ms(jax.jit(fn), *args) for name, (fn, *args) in parts.items()}


def _baseline_pass(sae, store, cfg: DiscoveryBenchConfig) -> dict:
    """The original's discover_and_label (no labels), in numpy; returns results and phase times."""
    phases, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    n, d = store.n_rows, store.d_model
    activations = np.empty((n, d), np.float32)
    row = 0
    for batch in store.iter_rows(LAYER, 65536):
        activations[row : row + len(batch)] = batch
        row += len(batch)
    lap("read_s")

    feature_acts = np.zeros((n, sae.cfg.hidden_dim), np.float32)
    for i in range(0, n, ENCODE_BATCH):
        feature_acts[i : i + ENCODE_BATCH] = np.asarray(sae.encode(activations[i : i + ENCODE_BATCH]))
    lap("encode_s")

    counts = np.zeros(feature_acts.shape[1], np.int64)
    for i in range(0, n, CHUNK_ROWS):
        counts += (feature_acts[i : i + CHUNK_ROWS] > 0).sum(axis=0)
    important = np.where((counts >= cfg.min_activation_count) & (counts <= cfg.max_activation_count))[0].tolist()
    lap("counts_s")

    max_activations = {}
    for feature in important:
        max_val = 0.0
        for i in range(0, n, CHUNK_ROWS):
            max_val = max(max_val, float(feature_acts[i : i + CHUNK_ROWS, feature].max()))
        max_activations[feature] = max_val
    ranked = sorted(important, key=lambda f: max_activations[f], reverse=True)
    lap("rank_s")

    starts, lengths = store.offsets[:-1].tolist(), np.diff(store.offsets).tolist()
    top = {f: _top_samples(feature_acts[:, f], starts, lengths, cfg.examples) for f in ranked[: cfg.max_features]}
    lap("examples_s")
    return {"phases": phases, "feature_acts": feature_acts, "counts": counts, "important": important,
            "max_activations": max_activations, "ranked": ranked, "top": top, "starts": starts, "lengths": lengths}


def _top_samples(column: np.ndarray, starts: list, lengths: list, k: int) -> np.ndarray:
    """The original's get_top_activating_examples, aggregation 'max': sample ids, best first."""
    sample_acts = [float(column[s : s + n].max()) for s, n in zip(starts, lengths)]
    scores = np.array(sample_acts)
    k = min(k, int((scores > 0).sum()))
    return np.argsort(-scores, kind="stable")[:k]


def _baseline(sae_path: str, store_path: str, cfg: DiscoveryBenchConfig, check: bool) -> dict:
    import jax_sae
    from sae_core.store import open_store

    sae = jax_sae.load(sae_path)
    store = open_store(store_path)
    for rows in {ENCODE_BATCH, store.n_rows % ENCODE_BATCH} - {0}:  # compile both batch shapes first
        np.asarray(sae.encode(np.zeros((rows, store.d_model), np.float32)))
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    result = _baseline_pass(sae, store, cfg)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "phases": result["phases"], "rss_before_mib": rss_before,
           "rss_peak_mib": peak_rss_mib(), "counts": result["counts"], "important": np.array(result["important"]),
           "max": np.array([result["max_activations"][f] for f in result["important"]], np.float32),
           "selected": np.array(result["ranked"][: cfg.max_features]), "top": result["top"]}
    if check:  # untimed: the same top samples for every kept feature, to compare beyond the reported ones
        acts = result["feature_acts"]
        out["top_all"] = {f: _top_samples(acts[:, f], result["starts"], result["lengths"], cfg.examples)
                          for f in result["important"]}
    return out


# -- comparison and report --------------------------------------------------------------------

def _positive_top(values: np.ndarray, samples: np.ndarray, k: int) -> set[int]:
    """Ours' top samples as discovery reports them: positive scores only."""
    return {int(s) for v, s in zip(values[:k], samples[:k]) if v > 0 and s >= 0}


def _compare(ours: dict, base: dict, k: int) -> dict:
    important = base["important"]
    max_diff = np.abs(ours["max"][important] - base["max"])
    top_all = base.get("top_all", base["top"])

    def agreement(features) -> float:
        same = [_positive_top(ours["top_values"][f], ours["top_samples"][f], k) == set(top_all[f].tolist())
                for f in features]
        return float(np.mean(same)) if same else float("nan")

    return {
        "count_mismatches": int(np.sum(ours["counts"] != base["counts"])),
        "kept_features": len(important),
        "max_max_abs_diff": float(max_diff.max()) if len(max_diff) else 0.0,
        "max_allclose": bool(np.allclose(ours["max"][important], base["max"], rtol=1e-6, atol=1e-6)),
        "selected_equal": bool(np.array_equal(ours["selected"], base["selected"])),
        "top_agreement_selected": agreement(base["selected"].tolist()),
        "top_agreement_all_kept": agreement(list(top_all)),
        "top_features_checked": len(top_all),
    }


UNITS = (("rows/s", "rows/s"), ("RSS", "MiB"), ("share", "frac"), ("speed-up", "x"), ("ours per ", "ms"),
         ("load", "procs"))


def _unit(label: str) -> str:
    return next((unit for part, unit in UNITS if part in label), "s")


def _record(samples: dict, label: str, value: float) -> None:
    samples.setdefault(label, []).append(value)


def _record_pair(samples: dict, n: int, cfg: DiscoveryBenchConfig, ours: dict, base: dict) -> None:
    _record(samples, f"{n} rows: ours rows/s", n / ours["seconds"])
    _record(samples, f"{n} rows: baseline rows/s", n / base["seconds"])
    _record(samples, f"{n} rows: speed-up (per pair)", base["seconds"] / ours["seconds"])
    for method, result in (("ours", ours), ("baseline", base)):
        _record(samples, f"{n} rows: {method} peak RSS", result["rss_peak_mib"])
        _record(samples, f"{n} rows: {method} RSS before the pass", result["rss_before_mib"])
    _record(samples, "ours warm-up (compile + 20-sample pass)", ours["warmup_s"])
    for phase, seconds in base["phases"].items():
        _record(samples, f"{n} rows: baseline {phase[:-2]} share", seconds / base["seconds"])
    for part, ms in ours.get("split", {}).items():
        _record(samples, f"ours per {cfg.block_rows}-row block: {part}", ms)


def _setup(root: Path, cfg: DiscoveryBenchConfig):
    """The stores, a warm-up store and the SAE checkpoint under ``root``."""
    rng = np.random.default_rng(0)
    concepts = rng.standard_normal((N_CONCEPTS, cfg.d_model)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    stores = {n: _write_store(root / f"store-{n}", n // cfg.frames, cfg, concepts, seed=n) for n in cfg.sizes}
    warm = _write_store(root / "warm", max(cfg.examples, cfg.block_rows // cfg.frames), cfg, concepts, seed=1)
    _write_sae(root / "sae", cfg, concepts, np.asarray(warm.acts(LAYER)[:4096].read().result(), np.float32))
    return stores, warm


def _measure(root: Path, cfg: DiscoveryBenchConfig) -> tuple[dict, dict]:
    """Every repeat of every store size: a fresh process per method, alternating which goes first."""
    stores, warm = _setup(root, cfg)
    print(f"discovery bench: stores of {', '.join(map(str, cfg.sizes))} rows x {cfg.d_model} float16, "
          f"SAE {cfg.sae_type} {cfg.hidden_dim} latents, k={cfg.top_k}, in {root}", flush=True)
    samples: dict[str, list] = {}
    checks: dict[int, dict] = {}
    sae = str(root / "sae")
    for repeat in range(cfg.repeats):
        for n in cfg.sizes:
            runs = {}
            for method in ["ours", "baseline"] if repeat % 2 == 0 else ["baseline", "ours"]:
                _record(samples, "1-min load average before a run", os.getloadavg()[0])
                if method == "ours":
                    split = cfg.split and n == max(cfg.sizes)
                    runs[method] = in_fresh_process(_ours, sae, str(stores[n].path), str(warm.path), cfg, split)
                else:
                    runs[method] = in_fresh_process(_baseline, sae, str(stores[n].path), cfg, repeat == 0)
            _record_pair(samples, n, cfg, runs["ours"], runs["baseline"])
            comparison = _compare(runs["ours"], runs["baseline"], cfg.examples)
            if repeat == 0:
                checks[n] = comparison
            else:  # later repeats check the reported features' top samples only
                checks[n].setdefault("later_repeats", []).append(comparison)
            print(f"  repeat {repeat + 1}/{cfg.repeats}, {n} rows: ours {runs['ours']['seconds']:.1f} s, "
                  f"baseline {runs['baseline']['seconds']:.1f} s; {comparison}", flush=True)
    return samples, checks


def _equal(check: dict) -> bool:
    return (check["count_mismatches"] == 0 and check["max_allclose"] and check["selected_equal"]
            and check["top_agreement_all_kept"] == 1.0)


def _summary(figures: dict, checks: dict, cfg: DiscoveryBenchConfig) -> tuple[dict, list]:
    derived, ratios = {}, {}
    for n in cfg.sizes:
        ratios[n] = figures[f"{n} rows: ours rows/s"]["median"] / figures[f"{n} rows: baseline rows/s"]["median"]
        derived[f"{n} rows: speed-up (ratio of median throughputs)"] = ratios[n]
        derived[f"{n} rows: results"] = checks[n]
    big = max(cfg.sizes)
    if cfg.split:
        part = {k.split(": ", 1)[1]: v["median"] for k, v in figures.items() if k.startswith("ours per ")}
        encoder, whole = part["encoder (matmul + top-k + scatter)"], part["update (whole)"]
        derived["ours per block (medians, ms)"] = {
            "read + pad": part["read + pad"], "encoder matmul": part["encoder matmul"],
            "encoder top-k + scatter": encoder - part["encoder matmul"], "statistics + merges": whole - encoder}
        derived["ours: encoder share of the update"] = encoder / whole
        # A block holds whole samples: its real rows, not its padded length, are what it processes.
        rows_per_block = (cfg.block_rows // cfg.frames) * cfg.frames
        matmul_rows_s = rows_per_block / (part["encoder matmul"] / 1e3)
        derived[f"{big} rows: speed-up ceiling if ours cost only its encoder matmul"] = (
            matmul_rows_s / figures[f"{big} rows: baseline rows/s"]["median"])
    for method in ("ours", "baseline"):
        rss = [figures[f"{n} rows: {method} peak RSS"]["median"] for n in cfg.sizes]
        derived[f"{method} peak RSS, largest / smallest store"] = rss[-1] / rss[0]
    goals = [target(f"speed-up at {n} rows", ratios[n], f">= {SPEEDUP_TARGET:.0f}x", ratios[n] >= SPEEDUP_TARGET)
             for n in cfg.sizes]
    equal = all(_equal(c) and all(_equal(later) for later in c.get("later_repeats", [])) for c in checks.values())
    goals.append(target("equal results", float(equal), "counts, maxima, selection and top samples equal", equal))
    return derived, goals


def run(cfg: DiscoveryBenchConfig) -> dict:
    if cfg.quick:
        cfg = replace(cfg, rows=f"{8 * cfg.frames},{16 * cfg.frames}", repeats=1, quick=False)
    removed_flags = os.environ.pop("XLA_FLAGS", None)  # one default CPU device for every child
    root = Path(tempfile.mkdtemp(prefix="sae-discovery-bench-", dir=cfg.tmp_dir))
    try:
        samples, checks = _measure(root, cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if removed_flags is not None:
            os.environ["XLA_FLAGS"] = removed_flags
    figures = {k: summarize(v, _unit(k)) for k, v in samples.items()}
    derived, goals = _summary(figures, checks, cfg)
    derived["XLA_FLAGS removed for the children"] = removed_flags
    params = {**asdict(cfg), "encode_batch": ENCODE_BATCH, "chunk_rows": CHUNK_ROWS, "planted_concepts": N_CONCEPTS}
    return report(NAME, figures, params=params, derived=derived, targets=goals)


def main(argv: list[str] | None = None):
    return run_bench(DiscoveryBenchConfig, run, argv, NAME,
                     "Streaming discovery vs the original's dense method (measured, never asserted).")


if __name__ == "__main__":
    main()

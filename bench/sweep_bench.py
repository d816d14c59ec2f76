"""``python -m bench.sweep_bench``: K = 8 SAEs (2 types x 2 widths x 2 k) trained as one sweep
against the same 8 trained one after another, in the same run: wall-clock, bytes read from the
store, peak RSS.

Both sides run in a fresh (spawned) process each, so peak RSS and compile caches are their own:
the sweep is ``jax_sae.sweep.sweep`` on the grid; the sequence is ``jax_sae.train.train`` on each
of the same members' configs, one after another (``jax_sae.sweep.members``: the very settings the
sweep gives them). Sizes: ``small`` (d = 256, 1,024 and 2,048 latents), where per-run overheads
(setup, the scan, compilation, validation passes, final files) weigh; ``large`` (d = 1,024, 4,096
and 8,192 latents), where the step's arithmetic does. The store is random float32 rows (the speed
of a step does not depend on what the rows hold). Repeats alternate sweep and sequence.

Compiled programs: each side's process gets its own persistent compilation cache, empty at first
("cold": a grid trained for the first time, every program compiled, as the issue's user who runs
``jax_sae.train`` once per SAE compiles each time); with ``--caches cold,warm`` each side then runs
again on the cache its cold run filled ("warm": the same grid again, nothing compiled on either
side). The user's own cache is never read or written.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError

from .common import in_fresh_process, peak_rss_mib, report, run_bench, summarize, synthetic_store, target

NAME = "sweep_bench"
SIZES = {"small": (256, (1024, 2048), 200_000), "large": (1024, (4096, 8192), 40_000),
         "gpu": (1024, (8192,), 400_000), "tiny": (32, (64, 128), 6_000)}
"""d_model, the widths, and the store's rows of each size. ``gpu`` (the GPU check): 8 SAEs of 8,192
latents (2 types x 2 k x 2 learning rates); ``tiny``: the check of this script on a CPU."""
GOALS = {"small": 1.3, "large": 1.0, "gpu": 3.0, "tiny": 0.0}
"""The speed-up each size should reach (issue 27): overheads shared on a CPU, no slower where the
arithmetic dominates, and a GPU that one small SAE leaves mostly idle."""


@dataclass(frozen=True)
class SweepBenchConfig:
    """Options of ``python -m bench.sweep_bench``."""

    sizes: tuple[Literal["small", "large", "gpu", "tiny"], ...] = ("small", "large")
    """Which sizes to measure."""
    top_ks: tuple[int, ...] = (16, 32)
    """The two k of the grid."""
    sae_types: tuple[Literal["topk", "batch_topk", "matryoshka", "vanilla"], ...] = ("topk", "batch_topk")
    """The two types of the grid."""
    batch_size: int = 1024
    """Rows per step."""
    epochs: int = 1
    """Passes over the store."""
    repeats: int = 2
    """Runs of each side for the small and tiny sizes; the others run one fewer (at least one), 0 none (only --steps)."""
    rows: int = 0
    """Store rows (0: the size's default)."""
    steps: int = 20
    """Also time this many steps of the sweep's compiled step against each member's own step, summed
    (the arithmetic alone, without validation or files), and a tenth as many validations of every
    member: the sweep's against each member's own in turn (0 leaves both out)."""
    caches: tuple[Literal["cold", "warm"], ...] = ("cold",)
    """Compilation caches to measure: ``cold`` (each run on an empty cache of its own), ``warm`` (each
    side again on the cache its cold run of the same repeat filled; needs ``cold``). Goals are judged
    on cold runs."""
    tmp_dir: str = "/tmp"
    """Where the stores and runs go (removed afterwards)."""


def _store(path: Path, rows: int, d_model: int) -> None:
    from sae_core.store import acts_name

    frames, unit_samples = 500, 40
    n_samples = rows // frames
    store = synthetic_store(path, n_samples=n_samples, frames=frames, d_model=d_model, dtype="float32",
                            unit_samples=unit_samples)
    rng = np.random.default_rng(0)
    for unit in range(store.meta.n_units):
        count = min(unit_samples, n_samples - unit * unit_samples) * frames
        store.write_rows(acts_name(0), unit * unit_samples * frames,
                         rng.standard_normal((count, d_model), dtype=np.float32))
        store.commit_unit(unit, "shard-0-of-1")


def _sweep_flags(cfg: SweepBenchConfig, store: Path, out: Path, widths: tuple[int, ...]) -> dict:
    lrs = {"lrs": (1e-3, 3e-3)} if len(widths) == 1 else {}  # one width: two learning rates make the 8
    return dict(store=str(store), out=str(out), layer_idx=0, sae_types=cfg.sae_types, hidden_dims=widths,
                top_ks=cfg.top_ks, batch_size=cfg.batch_size, epochs=cfg.epochs, patience=0, progress=False,
                mesh_data=1, **lrs)


def run_side(side: str, flags: dict, cache: str) -> dict:
    """One side in this (fresh) process, compiling into (and reading) the persistent cache ``cache``:
    the sweep, or its members one after another."""
    import os

    os.environ["SAE_MUSIC_JAX_CACHE"] = cache
    from jax_sae.sweep import SweepConfig, members, sweep
    from jax_sae.train import train
    from sae_core.cli import from_flags

    cfg = from_flags(SweepConfig, flags)
    started = time.perf_counter()
    if side == "sweep":
        summary = sweep(cfg)
        read = summary["bytes_read"]
    else:
        read = 0
        for member in members(cfg, _width(flags["store"])):
            read += train(member.cfg)["bytes_read_per_process"][0]
    return {"seconds": time.perf_counter() - started, "bytes_read": read, "peak_rss_mib": peak_rss_mib()}


def run_steps(flags: dict, steps: int, cache: str) -> dict:
    """Seconds of one compiled sweep step for every member, and of each member's own step, in this
    (fresh) process, on one batch, after a warm-up call each (compilation)."""
    import os

    os.environ["SAE_MUSIC_JAX_CACHE"] = cache
    import jax

    from jax_sae.sweep import SweepConfig
    from jax_sae.sweep.run import SweepRun
    from sae_core.cli import from_flags

    run = SweepRun.setup(from_flags(SweepConfig, flags))
    members = run.active()
    compiled = run._compile(members)
    x = next(iter(run.sources[compiled.keys[0]].batches(0, 0, 1)))

    def timed(step, times: int = steps) -> float:
        jax.block_until_ready(step())
        started = time.perf_counter()
        for _ in range(times):
            out = step()
        jax.block_until_ready(out)
        return (time.perf_counter() - started) / times

    def sweep_step():
        states, metrics = compiled.fn(tuple(r.state for r in members), (x,))
        for r, state in zip(members, states):
            r.state = state
        return metrics

    together = timed(sweep_step)
    alone = {}
    for r in members:
        def own(r=r):
            r.state, metrics = r.step_fn(r.state, x)
            return metrics

        alone[run.names[id(r)]] = timed(own)
    # One validation of every member over the held-out rows: the sweep's (rows read once, each member's
    # own program handed to the threads) against each member's own validation in turn (its own read).
    # A warm-up each first: compilation and the threshold calibration of these states.
    validations = max(1, steps // 10)
    sweep_validation = timed(lambda: run.validate(members), validations)
    own_validations = timed(lambda: [r.validation() for r in members], validations)
    run.close()
    return {"sweep_step": together, "alone_steps": alone, "threads": run.threads,
            "sweep_validation": sweep_validation, "own_validations": own_validations}


def _width(store: str) -> int:
    from sae_core.store import open_store

    return open_store(store).d_model


def _compare(size: str, cache: str, results: dict, figures: dict, derived: dict, targets: list) -> None:
    """The wall-clock, bytes and memory of both sides with one kind of cache, their ratios and (cold)
    the goals."""
    label = f"{size}, {cache} cache"
    for side, runs in results.items():
        figures[f"{label}, {side}: wall-clock"] = summarize([r["seconds"] for r in runs])
        figures[f"{label}, {side}: MiB read"] = summarize([r["bytes_read"] / 2**20 for r in runs], "MiB")
        figures[f"{label}, {side}: peak RSS"] = summarize([r["peak_rss_mib"] for r in runs], "MiB")
    speedup = figures[f"{label}, sequence: wall-clock"]["median"] / figures[f"{label}, sweep: wall-clock"]["median"]
    read_ratio = (figures[f"{label}, sweep: MiB read"]["median"]
                  / max(figures[f"{label}, sequence: MiB read"]["median"], 1e-9))
    derived[f"{label}: sweep speed-up (sequence / sweep wall-clock)"] = round(speedup, 2)
    derived[f"{label}: bytes read, sweep / sequence"] = round(read_ratio, 3)
    if cache != "cold":
        return
    targets.append(target(f"{size}: sweep speed-up", round(speedup, 2), f"at least {GOALS[size]}x",
                          speedup >= GOALS[size]))
    targets.append(target(f"{size}: bytes read", round(read_ratio, 3), "1/8 of the sequence's (0.125)",
                          read_ratio <= 0.125 * 1.05))


def run(cfg: SweepBenchConfig) -> dict:
    if "warm" in cfg.caches and "cold" not in cfg.caches:
        raise UsageError("--caches warm runs each side again on the cache its cold run filled; "
                         "pass --caches cold,warm")
    caches = sorted(set(cfg.caches), key=("cold", "warm").index)  # cold first: warm reads what it compiled
    figures, derived, targets = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-", dir=cfg.tmp_dir) as tmp:
        root = Path(tmp)
        for size in cfg.sizes:
            d_model, widths, rows = SIZES[size]
            rows = cfg.rows or rows
            _store(root / size / "store", rows, d_model)
            results = {cache: {"sweep": [], "sequence": []} for cache in caches}
            repeats = cfg.repeats if size in ("small", "tiny") or not cfg.repeats else max(1, cfg.repeats - 1)
            for i in range(repeats):
                for side in ("sweep", "sequence"):
                    for cache in caches:
                        out = root / size / f"{side}{i}-{cache}"
                        got = in_fresh_process(run_side, side, _sweep_flags(cfg, root / size / "store", out, widths),
                                               str(root / size / f"cache-{side}{i}"))
                        results[cache][side].append(got)
                        print(f"{size} {side} #{i}, {cache} cache: {got['seconds']:.1f} s, "
                              f"{got['bytes_read'] / 2**20:.0f} MiB read, peak RSS {got['peak_rss_mib']:.0f} MiB",
                              flush=True)
            if cfg.steps:
                timing = in_fresh_process(run_steps, _sweep_flags(cfg, root / size / "store", root / size / "steps",
                                                                  widths), cfg.steps,
                                          str(root / size / "cache-steps"))
                figures[f"{size}: one sweep step"] = summarize([timing["sweep_step"] * 1e3], "ms")
                figures[f"{size}: the members' own steps, summed"] = summarize(
                    [sum(timing["alone_steps"].values()) * 1e3], "ms")
                derived[f"{size}: step speed-up (own steps summed / sweep step)"] = round(
                    sum(timing["alone_steps"].values()) / timing["sweep_step"], 2)
                derived[f"{size}: each member's own step (ms)"] = {k: round(v * 1e3, 1)
                                                                  for k, v in timing["alone_steps"].items()}
                figures[f"{size}: one validation of all members, sweep"] = summarize(
                    [timing["sweep_validation"] * 1e3], "ms")
                figures[f"{size}: the members' own validations, in turn"] = summarize(
                    [timing["own_validations"] * 1e3], "ms")
                derived[f"{size}: validation speed-up (own in turn / sweep)"] = round(
                    timing["own_validations"] / timing["sweep_validation"], 2)
            for cache, sides in results.items():
                if sides["sweep"]:
                    _compare(size, cache, sides, figures, derived, targets)
    params = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
              "sizes_detail": {s: {"d_model": SIZES[s][0], "hidden_dims": list(SIZES[s][1]),
                                   "rows": cfg.rows or SIZES[s][2]} for s in cfg.sizes}}
    return report(NAME, figures, params=params, derived=derived, targets=targets)


def main(argv: list[str] | None = None):
    return run_bench(SweepBenchConfig, run, argv, NAME,
                     "K = 8 SAEs as one sweep against the same 8 trained one after another.")


if __name__ == "__main__":
    main()

"""Timing and reporting shared by the benchmarks: medians over repeats, timed device calls, fresh
processes, peak RSS, synthetic stores, results JSON.

Figures are measured, never asserted: a benchmark prints what it saw and writes it to
``bench/results/<name>.json``; nothing here fails because a machine is slow.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from sae_core.files import write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VERSIONED = ("torch", "transformers", "tensorstore", "numpy", "jax")


def summarize(values: Sequence[float], unit: str = "s") -> dict:
    """Median, min and max of repeated measurements (all values kept for the record)."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "unit": unit,
        "values": values,
    }


def run_bench(config_cls: type, run: Callable, argv: list[str] | None, name: str, description: str):
    """The entry point of a benchmark configured by a dataclass: flags -> config -> ``run(config)``,
    a bad flag as one line."""
    from sae_core.cli import run_main

    return run_main(config_cls, argv, prog=f"python -m bench.{name}", description=description, run=run)


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """Call ``fn`` once; return its result and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def device_seconds(fn: Callable, *args, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn(*args)``, each waited for with
    ``jax.block_until_ready``, after ``warmup`` untimed calls (compilation)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new (spawned) process, so its peak RSS and compile caches are its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def synthetic_store(path: Path, *, n_samples: int, frames: int, d_model: int, dtype: str, unit_samples: int,
                    layer: int = 0, n_codebooks: int = 4):
    """An empty store of ``n_samples`` samples of ``frames`` rows each, one layer, planned as
    extraction plans one: work units of ``unit_samples`` samples, chunks aligned to them."""
    from sae_core.store import StoreMeta, create_store

    meta = StoreMeta(model="bench", layers=(layer,), d_model=d_model, n_codebooks=n_codebooks, frame_rate=50.0,
                     sampling_rate=32000, dtype=dtype, mode="generate", n_samples=n_samples,
                     n_rows=n_samples * frames, n_units=-(-n_samples // unit_samples))
    samples = [{"index": i, "prompt": f"sample {i}", "source_id": f"bench-{i}", "tags": [], "n_frames": frames}
               for i in range(n_samples)]
    return create_store(path, meta, samples, [frames] * n_samples, unit_rows=unit_samples * frames)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return None


def machine() -> dict:
    """Where and with what a figure was measured (no heavy imports: versions from metadata)."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    ram = _ram_gib()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(ram, 1) if ram else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def format_table(figures: dict[str, dict]) -> str:
    """A plain-text table of figures (each a ``summarize`` dict): median, min, max, unit, n."""
    width = max([len("figure")] + [len(k) for k in figures])
    lines = [f"{'figure':<{width}}  {'median':>10}  {'min':>10}  {'max':>10}  unit   n"]
    for label, fig in figures.items():
        lines.append(
            f"{label:<{width}}  {_cell(fig['median']):>10}  {_cell(fig['min']):>10}  {_cell(fig['max']):>10}"
            f"  {fig['unit']:<5}  {fig['n']}"
        )
    return "\n".join(lines)


def target(name: str, measured: float, goal: str, met: bool) -> dict:
    """A target with the measured value it was compared against (reported, never asserted)."""
    return {"name": name, "measured": measured, "goal": goal, "met": bool(met)}


def report(
    name: str,
    figures: dict[str, dict],
    *,
    params: dict | None = None,
    derived: dict | None = None,
    targets: Sequence[dict] = (),
    file_name: str | None = None,
) -> dict:
    """Print a results table and write ``bench/results/<file_name or name>.json``; return the results dict."""
    results = {
        "name": name,
        "command": "python -m bench." + name + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": machine(),
        "params": params or {},
        "figures": figures,
        "derived": derived or {},
        "targets": list(targets),
    }
    print(f"\n== {name} ({results['machine']['date']}) ==")
    print(format_table(figures))
    for key, value in (derived or {}).items():
        print(f"{key}: {_cell(value)}")
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        print(f"target {t['name']}: {t['goal']}, measured {_cell(t['measured'])} -> {verdict}")
    out = RESULTS_DIR / f"{file_name or name}.json"
    write_json(out, results)
    print(f"wrote {out}")
    return results

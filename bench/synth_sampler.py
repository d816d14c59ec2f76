"""``python -m bench.synth_sampler``: how long the synthetic source takes to draw a batch.

Times, per synthetic model, the two draws the project makes: ``batch_x`` (x alone, what training
on ``--store synthetic:NAME`` draws every step) and ``samples`` (x and the true magnitudes, what
the benchmark's scoring draws), as medians over ``--repeats`` fresh keys after one compilation.

``--against FILE`` loads another version of ``jax_sae/synthetic/sample.py`` beside ours and times
both in turn, repeat by repeat, so that their ratio comes from one process on one machine:

    git show 18ad60f:jax_sae/synthetic/sample.py > /tmp/sample_before.py
    python -m bench.synth_sampler --against /tmp/sample_before.py

Writes ``bench/results/synth_sampler.json``."""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sae_core.errors import UsageError
from sae_core.files import write_json

from .common import RESULTS_DIR, machine, run_bench


@dataclass(frozen=True)
class SamplerBenchConfig:
    """Options of ``python -m bench.synth_sampler``."""

    models: tuple[str, ...] = ("synthsaebench-4k", "synthsaebench-16k")
    """Synthetic models (jax_sae.synthetic.PRESETS)."""
    batch_size: int = 1024
    repeats: int = 8
    """Timed draws per function and version (each with a fresh key)."""
    against: str = ""
    """Another version's sample.py to time beside ours (e.g. from git show REV:jax_sae/synthetic/sample.py)."""


def load_version(path: str):
    """``path`` as a module of the ``jax_sae.synthetic`` package (its relative imports resolve there)."""
    if not Path(path).is_file():
        raise UsageError(f"--against {path} does not exist; write it with git show REV:jax_sae/synthetic/sample.py > {path}")
    spec = importlib.util.spec_from_file_location("jax_sae.synthetic._sample_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not all(hasattr(module, name) for name in ("key", "samples", "batch_x")):
        raise UsageError(f"--against {path} is not a sample.py: it lacks key, samples or batch_x")
    return module


def run(cfg: SamplerBenchConfig) -> dict:
    import jax

    from jax_sae.synthetic import load, preset
    from jax_sae.synthetic import sample as ours

    if cfg.repeats < 1 or cfg.batch_size < 1:
        raise UsageError("--repeats and --batch_size must be positive")
    versions = {"ours": ours} | ({"against": load_version(cfg.against)} if cfg.against else {})
    results = {"config": asdict(cfg), "machine": machine(), "models": {}}
    for name in cfg.models:
        model, batch = load(preset(name)), cfg.batch_size
        fns = {}
        for label, module in versions.items():
            fns[f"{label} batch_x"] = lambda k, m=module: m.batch_x(model, k, batch)
            draw = jax.jit(lambda mdl, k, m=module: m.samples(mdl, k, batch))
            fns[f"{label} samples"] = lambda k, d=draw: d(model, k)
        for fn in fns.values():  # compile
            jax.block_until_ready(fn(ours.key(0)))
        seconds = {label: [] for label in fns}
        for r in range(1, cfg.repeats + 1):  # interleaved: a drift of the machine's speed hits every version alike
            for label, fn in fns.items():
                started = time.perf_counter()
                jax.block_until_ready(fn(ours.key(r)))
                seconds[label].append(time.perf_counter() - started)
        row = {label: 1000 * statistics.median(s) for label, s in seconds.items()}
        if cfg.against:
            for what in ("batch_x", "samples"):
                row[f"{what} speed-up"] = row[f"against {what}"] / row[f"ours {what}"]
        results["models"][name] = row
        print(name + ": " + ", ".join(f"{k} {v:.1f}" + ("x" if "speed-up" in k else " ms") for k, v in row.items()))
    path = RESULTS_DIR / "synth_sampler.json"
    write_json(path, results)
    print(f"wrote {path}")
    return results


def main(argv: list[str] | None = None):
    return run_bench(SamplerBenchConfig, run, argv, "synth_sampler", "Time the synthetic source's draws.")


if __name__ == "__main__":
    main()

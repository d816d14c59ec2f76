"""``python -m jax_sae.sweep``: many SAEs trained in one pass over the store, compared on one page.

The flags are ``python -m jax_sae.train``'s (the base every member starts from) and the lists that
vary (``--layers``, ``--sae_types``, ``--hidden_dims`` or ``--expansions``, ``--top_ks``, ``--lrs``,
``--seeds``, or a ``--sweep_file``). Every member writes the run directory ``jax_sae.train``
writes with its settings and ``--out {out}/{member}``, and equals that run; the sweep writes
``{out}/sweep.json`` and ``{out}/sweep.html``.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import Member, SweepConfig, SweepError, members

__all__ = ["Member", "SweepConfig", "SweepError", "main", "members", "sweep"]


def sweep(cfg: SweepConfig) -> dict:
    """Train (or resume) every member of the sweep; returns the summary written to sweep.json."""
    from ..distributed import initialize, is_primary
    from ..runtime import check_platform
    from .evaluate import probing, spliced
    from .page import write_page
    from .run import SweepRun

    started = time.time()
    runtime = cfg.runtime
    initialize(runtime.coordinator_address, runtime.num_processes, runtime.process_id)
    check_platform("sweep")
    _check_evaluations(cfg)
    run = SweepRun.setup(cfg)
    try:
        run.run()
        records = run.finish(time.time() - started)
    finally:
        run.close()
    finished = [Path(r["run_dir"]) for r in records if r["status"] != "diverged"]
    if is_primary() and cfg.sweep.probe:
        probing(finished, str(cfg.train.store), runtime.progress)
    if is_primary() and cfg.sweep.evaluate_model:
        spliced(finished, cfg.sweep.evaluate_model, str(cfg.train.store), cfg.sweep.evaluate_samples,
                cfg.sweep.evaluate_device, runtime.progress)
    first = run.runs[0]
    summary = {"out": str(cfg.out), "members": records, "steps": int(first.state.step), "batch_size":
               first.cfg.train.batch_size, "seconds": time.time() - started, "loop_seconds": run.loop_seconds,
               "threads": run.threads,
               "bytes_read": run.bytes_read(), "memory_estimate_bytes": run.estimate, "runtime": run.runtime,
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in _flags(cfg).items()}}
    if is_primary():
        page = write_page(cfg.out, summary)
        print(f"sweep of {len(records)} members: {page}")
    if run.failed:
        names = ", ".join(run.failed)
        raise SweepError(f"{len(run.failed)} of {len(records)} members diverged ({names}); the others finished "
                         f"(see {cfg.out / 'sweep.html'}); sweep them again with a lower --lrs")
    return summary


def _check_evaluations(cfg: SweepConfig) -> None:
    """What the evaluations asked for need, checked before any training."""
    if cfg.sweep.evaluate_model:
        from ..torch_side import require

        require("evaluate", "--evaluate_model runs the spliced-in evaluation with torch",
                "drop --evaluate_model, or evaluate the members on a machine with the torch side")
    if cfg.sweep.probe:
        from discovery.align import tag_matrix
        from sae_core.store import open_store

        tags, _ = tag_matrix(open_store(cfg.train.store).samples, 8)
        if not tags:
            raise SweepError(f"--probe needs tagged samples, and no tag of {cfg.train.store} has 8 samples with it "
                             "and without it: extract from MusicCaps prompts (--csv), or drop --probe")


def _flags(cfg: SweepConfig) -> dict:
    from sae_core.cli import to_flags

    return to_flags(cfg)


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(SweepConfig, argv, prog="python -m jax_sae.sweep",
                    description="Train a grid of sparse autoencoders in one pass over the store.", run=sweep)

"""``python -m jax_sae.sweep``: many SAEs trained in one pass over the store, compared on one page.

The flags are ``python -m jax_sae.train``'s (the base every member starts from) and the lists that
vary (``--layers``, ``--sae_types``, ``--hidden_dims`` or ``--expansions``, ``--top_ks``, ``--lrs``,
``--seeds``, or a ``--sweep_file``). Every member writes the run directory ``jax_sae.train``
writes with its settings and ``--out {out}/{member}``, and equals that run; the sweep writes
``{out}/sweep.json`` and ``{out}/sweep.html``.
"""

from __future__ import annotations

import time

from .config import Member, SweepConfig, SweepError, members

__all__ = ["Member", "SweepConfig", "SweepError", "main", "members", "sweep"]


def sweep(cfg: SweepConfig) -> dict:
    """Train (or resume) every member of the sweep; returns the summary written to sweep.json."""
    from ..distributed import initialize, is_primary
    from ..runtime import check_platform
    from .page import write_page
    from .run import SweepRun

    started = time.time()
    runtime = cfg.runtime
    initialize(runtime.coordinator_address, runtime.num_processes, runtime.process_id)
    check_platform("sweep")
    run = SweepRun.setup(cfg)
    run.run()
    records = run.finish(time.time() - started)
    first = run.runs[0]
    summary = {"out": str(cfg.out), "members": records, "steps": int(first.state.step), "batch_size":
               first.cfg.train.batch_size, "seconds": time.time() - started, "loop_seconds": run.loop_seconds,
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


def _flags(cfg: SweepConfig) -> dict:
    from sae_core.cli import to_flags

    return to_flags(cfg)


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(SweepConfig, argv, prog="python -m jax_sae.sweep",
                    description="Train a grid of sparse autoencoders in one pass over the store.", run=sweep)

"""``python -m jax_sae.train``: train an SAE on one layer of an activation store.

The flags are ``config.TrainConfig``'s; the run itself is ``loop.TrainingRun`` and its files (``best/``,
``final/``, ``ckpt/``, ``metrics.jsonl``, ``training_stats.json``, plots) are laid out by
``run_dir.RunDir`` in ``{out}/{sae_type}/layer{N}/dim{h}/``.
"""

from __future__ import annotations

import time

from .config import TrainConfig, auto_lr
from .distributed import initialize
from .loop import TrainingRun
from .progress import TrainError
from .runtime import check_platform

__all__ = ["TrainConfig", "TrainError", "auto_lr", "main", "train"]


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one SAE; returns the training stats written to training_stats.json."""
    started = time.time()
    runtime = cfg.runtime
    initialize(runtime.coordinator_address, runtime.num_processes, runtime.process_id)
    check_platform("train")
    if runtime.compile_only:
        from .compile_report import compile_report

        return compile_report(cfg)
    run = TrainingRun.setup(cfg)
    run.run()
    return run.finish(time.time() - started)


def main(argv: list[str] | None = None):
    from sae_core.cli import run_main

    return run_main(TrainConfig, argv, prog="python -m jax_sae.train", description="Train a sparse autoencoder.",
                    run=train)


if __name__ == "__main__":
    main()

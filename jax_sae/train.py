"""``python -m jax_sae.train``: train an SAE on one layer of an activation store.

The flags are ``TrainConfig``; the run itself is ``loop.TrainingRun`` and its files (``best/``,
``final/``, ``ckpt/``, ``metrics.jsonl``, ``training_stats.json``, plots) are laid out by
``run_dir.RunDir`` in ``{out}/{sae_type}/layer{N}/dim{h}/``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


from .config import ConfigError, SAEConfig, default_group_sizes
from .distributed import initialize
from .loop import TrainingRun
from .progress import TrainError
from .run_dir import run_path
from .runtime import check_platform

__all__ = ["TrainConfig", "TrainError", "auto_lr", "main", "train"]


def auto_lr(hidden_dim: int) -> float:
    """``--lr auto``: 3e-3 at 2048 latents (the best of 1e-3, 3e-3 and 6e-3 there), times sqrt(2048 / hidden_dim)."""
    return 3e-3 * (2048 / hidden_dim) ** 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``python -m jax_sae.train``."""

    sae_type: Literal["vanilla", "topk", "batch_topk", "matryoshka"] = "batch_topk"
    """SAE architecture."""
    layer_idx: int = 12
    """Decoder layer of the store to train on."""
    hidden_dim: int = 6144
    """Number of latents."""
    top_k: int = 64
    """Active latents per token (TopK family)."""
    epochs: int = 5
    """Passes over the training rows."""
    batch_size: int = 4096
    """Rows per optimizer step."""
    lr: float | Literal["auto"] = "auto"
    """Peak learning rate (after a linear warm-up over min(1000 steps, 10%)); auto: 3e-3 * sqrt(2048 / hidden_dim)."""
    lr_schedule: Literal["cosine", "wsd"] = "wsd"
    """After the warm-up: cosine decay to 1% of --lr, or wsd (held, then a linear decay to 1% over the last 20%)."""
    adam_betas: tuple[float, ...] = (0.9, 0.95)
    """Adam's beta1,beta2."""
    aux_penalty: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK family)."""
    aux_k: int = 0
    """Dead latents AuxK reconstructs the residual from, per token (0: d_model/2)."""
    threshold: Literal["running", "calibrated"] = "calibrated"
    """BatchTopK/Matryoshka inference threshold: the running average of each batch's smallest kept
    activation, or calibrated on a sample of training rows when a model is saved (inference L0 = k there)."""
    b_dec_init: Literal["median", "mean"] = "median"
    """Decoder bias at the start: the geometric median or the mean of a sample of rows."""
    enc_init: Literal["transpose", "independent"] = "transpose"
    """Encoder at the start: the (unit-row) decoder's transpose, or independent random unit columns."""
    enc_init_scale: float = 1.0
    """Norm of each encoder column at the start."""
    sparsity_coef: float = 1.0
    """L1 coefficient (vanilla; inputs are scaled to E||x|| = sqrt(d)), warmed up over the first 5% of steps."""
    num_samples: int | None = None
    """Use only this many samples (prompts) of the store, chosen at random with --seed."""
    max_tokens: int | None = 100_000_000
    """Token budget: larger stores are subsampled (whole samples) to fit."""
    seed: int = 0
    """Seed of initialisation, split and data order."""
    store: str = "data/activations"
    """Activation store directory."""
    out: str = "models"
    """Root of run directories."""
    group_sizes: tuple[int, ...] = ()
    """Matryoshka group sizes summing to hidden_dim, e.g. 256,256,512,1024,2048 (default: h/16,h/16,h/8,h/4,h/2)."""
    group_weights: tuple[float, ...] = ()
    """Matryoshka: weight of each nested prefix's reconstruction loss, one per group, normalised to sum 1 (default: equal)."""
    data_lanes: int = 0
    """Each global batch is this many equal slices, each drawn from its own share of the store's chunks,
    so a process reads only the slices on its devices (0: the number of processes)."""
    val_fraction: float = 0.1
    """Fraction of samples held out (whole samples, seeded) for validation."""
    val_max_tokens: int = 1_000_000
    """Cap on validation rows."""
    val_split: Literal["chunks", "samples"] = "chunks"
    """How validation samples are drawn: chunks: the samples of a few random whole store chunks, so each
    validation reads only those chunks (a store in a bucket, many evaluations); samples: one by one at random."""
    patience: int = 5
    """Stop after this many evaluations without a better validation FVU (0 disables)."""
    min_delta: float = 1e-3
    """Smallest improvement that counts for --patience and best/, relative to the best validation FVU
    (1e-3: a new FVU must be below 0.999 x the best); 0 counts any decrease, however small."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing (capped at a tenth of the run)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eval_every: int = 0
    """Steps between validations (0: about 20 per run)."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (0: about 10 per run)."""
    skip_nonfinite: bool = False
    """Skip NaN/Inf rows of the store instead of stopping."""
    overwrite: bool = False
    """Discard an existing run with other settings in the run directory."""
    mesh_data: int = 0
    """Devices on the data axis (0: all devices not on the model axis)."""
    mesh_model: int = 1
    """Devices on the model axis (latents are split across them)."""
    coordinator_address: str | None = None
    """host:port of process 0 for a multi-process run (SLURM and TPU pods are detected without it)."""
    num_processes: int | None = None
    """Processes in a multi-process run."""
    process_id: int | None = None
    """This process's index in a multi-process run."""
    compile_only: bool = False
    """Compile the train step for this config and mesh, print its memory analysis, and exit."""
    d_model: int | None = None
    """Input width for --compile_only without a store."""
    backward: Literal["auto", "sparse", "dense"] = "auto"
    """TopK family: sparse reconstruction and backward (k decoder rows per token), dense
    matmuls, or auto (sparse when the latents per device are wide enough for it to pay)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Input dtype of the encoder/decoder matmuls (accumulation and parameters stay float32); bfloat16 is for GPUs and TPUs."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        checks = [
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.batch_size > 0, f"--batch_size must be positive, got {self.batch_size}"),
            (self.lr == "auto" or self.lr > 0, f"--lr must be positive or auto, got {self.lr}"),
            (0 <= self.val_fraction < 1, f"--val_fraction must be in [0, 1), got {self.val_fraction}"),
            (0 <= self.min_delta < 1, f"--min_delta must be in [0, 1) (relative to the best FVU), got {self.min_delta}"),
            (self.max_tokens is None or self.max_tokens > 0, "--max_tokens must be positive"),
            (self.num_samples is None or self.num_samples > 0, "--num_samples must be positive"),
            (self.dead_tokens > 0, "--dead_tokens must be positive"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"--adam_betas takes two values in [0, 1), got {','.join(map(str, self.adam_betas))}"),
            (self.aux_k >= 0, "--aux_k must be 0 (d_model/2) or positive"),
            (self.data_lanes >= 0, f"--data_lanes must be 0 (the number of processes) or positive, got {self.data_lanes}"),
            (self.enc_init_scale > 0, f"--enc_init_scale must be positive, got {self.enc_init_scale}"),
            (not self.group_weights or (all(w >= 0 for w in self.group_weights) and sum(self.group_weights) > 0),
             f"--group_weights must be non-negative with a positive sum, got {','.join(map(str, self.group_weights))}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        sae = self.sae_config(d_model=1)  # validates top_k, group sizes against hidden_dim
        if self.group_weights and len(self.group_weights) != len(sae.group_sizes):
            raise ConfigError(
                f"--group_weights has {len(self.group_weights)} values but "
                + (f"there are {len(sae.group_sizes)} Matryoshka groups; give one weight per group"
                   if sae.sae_type == "matryoshka" else "only --sae_type matryoshka takes them; drop it"))

    def sae_config(self, d_model: int, model: str | None = None) -> SAEConfig:
        groups = (self.group_sizes or default_group_sizes(self.hidden_dim)) if self.sae_type == "matryoshka" else ()
        return SAEConfig(sae_type=self.sae_type, d_model=d_model, hidden_dim=self.hidden_dim, top_k=self.top_k,
                         group_sizes=groups, layer=self.layer_idx, model=model, store=str(self.store))

    def prefix_weights(self) -> tuple[float, ...]:
        """Matryoshka's prefix-loss weights, summing to 1 (empty for the other types)."""
        groups = len(self.sae_config(d_model=1).group_sizes)
        weights = self.group_weights or (1.0,) * groups
        return tuple(w / sum(weights) for w in weights)

    @property
    def peak_lr(self) -> float:
        """--lr, or the auto rule: 3e-3 at 2048 latents, scaled by 1/sqrt(hidden_dim) (bench.quality_bench)."""
        return auto_lr(self.hidden_dim) if self.lr == "auto" else float(self.lr)

    def run_dir(self) -> Path:
        return run_path(self.out, self.sae_type, self.layer_idx, self.hidden_dim)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("progress", "overwrite", "mesh_data", "mesh_model", "coordinator_address",
                             "num_processes", "process_id", "compile_only", "d_model", "backward",
                             "compute_dtype")}


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one SAE; returns the training stats written to training_stats.json."""
    started = time.time()
    initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    check_platform("train")
    if cfg.compile_only:
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

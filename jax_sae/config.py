"""The configs: ``SAEConfig``, the SAE's architecture, which round-trips through JSON and is saved
inside every checkpoint, so a model is rebuilt from its checkpoint alone; and ``TrainConfig``, a
training run's settings in three groups (what the SAE is, how it is trained, where it runs), whose
resume key is everything but where it runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sae_core.cli import from_flags, to_flags
from sae_core.errors import UsageError

from .run_dir import run_path

SAEType = Literal["vanilla", "topk", "batch_topk", "matryoshka", "jumprelu"]
SAE_TYPES: tuple[str, ...] = ("vanilla", "topk", "batch_topk", "matryoshka", "jumprelu")
JUMPRELU_SPARSITY = ("quadratic", "step", "tanh")
TRANSCODERS = ("none", "plain", "skip")


@dataclass(frozen=True)
class Behaviour:
    """What an SAE type does, in the terms the training and inference code ask about."""

    selection: Literal["relu", "row_topk", "batch_topk", "jumprelu"]
    """How latents are chosen: all positive ones (sparsity from an L1 penalty), the k largest per
    row, the k x batch largest over the batch (with a JumpReLU threshold at inference), or those
    above a learned per-latent threshold (JumpReLU, sparsity from an L0 loss)."""
    nested: bool
    """Reconstructions of nested prefixes of the dictionary, each with its own loss (Matryoshka)."""


BEHAVIOURS = {
    "vanilla": Behaviour("relu", nested=False),
    "topk": Behaviour("row_topk", nested=False),
    "batch_topk": Behaviour("batch_topk", nested=False),
    "matryoshka": Behaviour("batch_topk", nested=True),
    "jumprelu": Behaviour("jumprelu", nested=False),
}
"""Every SAE type's behaviour: the one place the types are told apart."""


AUTO_RESAMPLES = 6
"""``--resamples auto`` for TopK, BatchTopK and Matryoshka SAEs (docs/synthbench.md, "Resampling")."""


class ConfigError(UsageError):
    """A configuration that cannot describe a working SAE or run."""


def default_group_sizes(hidden_dim: int) -> tuple[int, ...]:
    """Nested prefixes of h/32, h/8, h/2 and h latents (SynthSAEBench's levels): groups h/32, 3h/32,
    3h/8 and h/2 (the last group absorbs rounding)."""
    ends = sorted({max(1, hidden_dim // f) for f in (32, 8, 2)} - {hidden_dim}) + [hidden_dim]
    return tuple(b - a for a, b in zip([0] + ends[:-1], ends))


@dataclass(frozen=True)
class SAEConfig:
    """Everything needed to rebuild an SAE's computation (weights live in the checkpoint)."""

    sae_type: SAEType
    d_model: int
    hidden_dim: int
    top_k: int = 64
    group_sizes: tuple[int, ...] = ()
    layer: int | None = None
    model: str | None = None
    store: str | None = None
    transcoder: Literal["none", "plain", "skip"] = "none"
    """none: an SAE of the residual stream after block ``layer``; plain: a transcoder from that block's
    MLP input (after its layer norm) to its MLP output; skip: a transcoder with a linear skip term."""

    def __post_init__(self) -> None:
        if self.sae_type not in SAE_TYPES:
            raise ConfigError(f"unknown sae_type {self.sae_type!r}; choose one of {', '.join(SAE_TYPES)}")
        if self.transcoder not in TRANSCODERS:
            raise ConfigError(f"unknown transcoder {self.transcoder!r}; choose one of {', '.join(TRANSCODERS)}")
        if self.d_model <= 0 or self.hidden_dim <= 0:
            raise ConfigError(f"d_model and hidden_dim must be positive, got {self.d_model} and {self.hidden_dim}")
        if (self.uses_k or self.learned_threshold) and not 0 < self.top_k <= self.hidden_dim:
            raise ConfigError(f"--top_k must be in 1..hidden_dim ({self.hidden_dim}), got {self.top_k}")
        if self.nested:
            if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
                raise ConfigError("matryoshka needs positive --group_sizes")
            if sum(self.group_sizes) != self.hidden_dim:
                raise ConfigError(
                    f"--group_sizes {','.join(map(str, self.group_sizes))} sum to {sum(self.group_sizes)}, "
                    f"not hidden_dim {self.hidden_dim}"
                )

    @property
    def behaviour(self) -> Behaviour:
        return BEHAVIOURS[self.sae_type]

    @property
    def l1(self) -> bool:
        """Codes are the ReLU'd pre-activations, kept sparse by an L1 penalty (Vanilla)."""
        return self.behaviour.selection == "relu"

    @property
    def row_topk(self) -> bool:
        """The k largest latents of each row are kept (TopK)."""
        return self.behaviour.selection == "row_topk"

    @property
    def uses_threshold(self) -> bool:
        """The k x batch largest latents over the batch are kept in training, and a learned
        JumpReLU threshold stands in for that selection at inference (BatchTopK, Matryoshka)."""
        return self.behaviour.selection == "batch_topk"

    @property
    def learned_threshold(self) -> bool:
        """Each latent passes above its own threshold, a parameter learned through a
        straight-through estimator; ``top_k`` is the L0 it starts at (JumpReLU)."""
        return self.behaviour.selection == "jumprelu"

    @property
    def uses_k(self) -> bool:
        """A top-k selection (TopK, BatchTopK, Matryoshka): ``top_k`` is the selection's k, dead
        latents get AuxK's loss, and the sparse backward applies."""
        return self.behaviour.selection in ("row_topk", "batch_topk")

    @property
    def aux_k(self) -> bool:
        """Dead latents get AuxK's loss (the top-k family and JumpReLU; not Vanilla, whose L1 keeps latents alive)."""
        return not self.l1

    @property
    def nested(self) -> bool:
        """Nested prefixes of the dictionary, each with its own reconstruction loss (Matryoshka)."""
        return self.behaviour.nested

    @property
    def is_transcoder(self) -> bool:
        """Reads the MLP's input and predicts its output (plain or skip), instead of reconstructing its input."""
        return self.transcoder != "none"

    @property
    def skip(self) -> bool:
        """A linear skip term x W_skip is added to the output (skip transcoder)."""
        return self.transcoder == "skip"

    @property
    def stream(self) -> str:
        """The store stream a batch of its training rows comes from: the residual stream, or [MLP in | MLP out]."""
        return "mlp" if self.is_transcoder else "cond"

    @property
    def input_stream(self) -> str:
        """The store stream its encoder reads (what discovery, reports and probes encode): the
        residual stream, or a transcoder's MLP input."""
        return "mlp_in" if self.is_transcoder else "cond"

    @property
    def batch_width(self) -> int:
        """Values per training row: d_model, or the MLP's input and output side by side."""
        return 2 * self.d_model if self.is_transcoder else self.d_model

    @property
    def kind(self) -> str:
        """The type in words for paths and titles: ``batch_topk``, ``batch_topk-transcoder``, ``batch_topk-skip_transcoder``."""
        return {"none": self.sae_type, "plain": f"{self.sae_type}-transcoder",
                "skip": f"{self.sae_type}-skip_transcoder"}[self.transcoder]

    @property
    def prefix_ends(self) -> tuple[int, ...]:
        """Matryoshka's nested dictionary sizes (cumulative group sizes)."""
        ends, total = [], 0
        for g in self.group_sizes:
            total += g
            ends.append(total)
        return tuple(ends)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"group_sizes": list(self.group_sizes)}

    @classmethod
    def from_json(cls, data: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "group_sizes" else v) for k, v in data.items() if k in names})


def auto_lr(hidden_dim: int, batch_size: int = 4096) -> float:
    """``--lr auto``: 3e-3 at 2048 latents and batch 4096 (the best of 1e-3, 3e-3 and 6e-3 there), times
    sqrt(2048 / hidden_dim) and sqrt(batch_size / 4096): 1.5e-3 at 2048 latents and batch 1024, where
    bench.quality_bench and SynthSAEBench agree (docs/quality.md)."""
    return 3e-3 * (2048 / hidden_dim) ** 0.5 * (batch_size / 4096) ** 0.5


@dataclass(frozen=True)
class SAESettings:
    """What the SAE is."""

    sae_type: Literal["vanilla", "topk", "batch_topk", "matryoshka", "jumprelu"] = "batch_topk"
    """SAE architecture."""
    hidden_dim: int = 6144
    """Number of latents."""
    top_k: int = 64
    """Active latents per token (TopK family); JumpReLU: the L0 its thresholds start at, and its target."""
    group_sizes: tuple[int, ...] = ()
    """Matryoshka group sizes summing to hidden_dim, e.g. 128,384,1536,2048 (default: prefixes of h/32, h/8, h/2 and h)."""
    threshold: Literal["running", "calibrated"] = "calibrated"
    """BatchTopK/Matryoshka inference threshold: the running average of each batch's smallest kept
    activation, or calibrated on a sample of training rows when a model is saved (inference L0 = k there)."""
    transcoder: Literal["none", "plain", "skip"] = "none"
    """none: an SAE of the residual stream; plain: a transcoder from the layer's MLP input to its MLP output
    (a store extracted with --mlp); skip: a transcoder with a linear skip term x W_skip."""

    def __post_init__(self) -> None:
        self.config(d_model=1)  # validates top_k and the group sizes against hidden_dim

    def config(self, d_model: int, layer: int | None = None, model: str | None = None,
               store: str | None = None) -> SAEConfig:
        """The architecture to build, on inputs of width ``d_model`` (Matryoshka's default groups filled in)."""
        groups = (self.group_sizes or default_group_sizes(self.hidden_dim)) if BEHAVIOURS[self.sae_type].nested else ()
        return SAEConfig(sae_type=self.sae_type, d_model=d_model, hidden_dim=self.hidden_dim, top_k=self.top_k,
                         group_sizes=groups, layer=layer, model=model, store=store, transcoder=self.transcoder)


@dataclass(frozen=True)
class TrainingSettings:
    """How it is trained: the data, the optimisation, the losses, the checks along the way."""

    store: str = "data/activations"
    """Activation store directory."""
    layer_idx: int = 12
    """Decoder layer of the store to train on."""
    out: str = "models"
    """Root of run directories."""
    seed: int = 0
    """Seed of initialisation (and of the split and data order unless --data_seed is given)."""
    data_seed: int | None = None
    """Seed of the split and data order (default: --seed); a sweep's members share one."""
    num_samples: int | None = None
    """Use only this many samples (prompts) of the store, chosen at random with --seed."""
    max_tokens: int | None = 100_000_000
    """Token budget: larger stores are subsampled (whole samples) to fit."""
    val_fraction: float = 0.1
    """Fraction of samples held out (whole samples, seeded) for validation."""
    val_max_tokens: int = 1_000_000
    """Cap on validation rows."""
    val_split: Literal["chunks", "samples"] = "chunks"
    """How validation samples are drawn: chunks: the samples of a few random whole store chunks, so each
    validation reads only those chunks (a store in a bucket, many evaluations); samples: one by one at random."""
    data_lanes: int = 0
    """Each global batch is this many equal slices, each drawn from its own share of the store's chunks,
    so a process reads only the slices on its devices (0: the number of processes)."""
    skip_nonfinite: bool = False
    """Skip NaN/Inf rows of the store instead of stopping."""
    epochs: int = 5
    """Passes over the training rows."""
    batch_size: int = 1024
    """Rows per optimizer step."""
    lr: float | Literal["auto"] = "auto"
    """Peak learning rate (after a linear warm-up over min(1000 steps, 10%)); auto: 3e-3 * sqrt(2048 / hidden_dim) * sqrt(batch_size / 4096)."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "wsd"
    """After the warm-up: cosine decay to 1% of --lr, wsd (held, then a linear decay to 1% over the last 20%),
    or constant (held to the end)."""
    adam_betas: tuple[float, ...] = (0.9, 0.95)
    """Adam's beta1,beta2."""
    adam_b2_rise: float = 0.0
    """0: beta2 constant. R > 0: the second moment's memory grows with the step t, about the last t / R
    steps (at least twice beta1's memory), until it reaches beta2's 1 / (1 - beta2) (docs/training.md)."""
    grad_clip: float = 1.0
    """Clip the gradients' global norm at this value before AdamW (0: no clipping, as SAELens trains)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    sparsity_coef: float = 1.0
    """L1 coefficient (vanilla; inputs are scaled to E||x|| = sqrt(d)), or JumpReLU's L0-loss coefficient,
    warmed up over the first 5% of steps."""
    jumprelu_sparsity: Literal["quadratic", "step", "tanh"] = "quadratic"
    """JumpReLU's sparsity loss: quadratic pull of each row's L0 toward --target_l0, 2/T (L0 - T)^2 (Gemma
    Scope 2); step: the L0 itself (Rajamanoharan et al. 2024); tanh: sum of tanh(c f |W_dec|) (Anthropic)."""
    target_l0: int = 0
    """JumpReLU's target L0 for the quadratic loss (0: --top_k)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of JumpReLU's straight-through threshold gradient (pre-activation units)."""
    jumprelu_tanh_scale: float = 4.0
    """c of the tanh sparsity loss."""
    jumprelu_threshold_lr: float = 10.0
    """JumpReLU's thresholds' learning rate, as a multiple of --lr: Adam moves a parameter by about the rate
    per step, and thresholds of order 1 at the plain rate lag the encoder for thousands of steps."""
    jumprelu_ste_to_input: bool = False
    """JumpReLU's straight-through gradient also reaches the pre-activations, and so the encoder (Anthropic's
    setting), not the thresholds alone (DeepMind's)."""
    aux_penalty: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK family and JumpReLU)."""
    aux_k: int = 0
    """Dead latents AuxK reconstructs the residual from, per token (0: d_model/2)."""
    aux_activation: Literal["relu", "pre"] = "relu"
    """How AuxK's dead latents enter: ReLU'd, or as their pre-activations (SAELens's AuxK: a latent whose
    every pre-activation is negative still learns)."""
    aux_loss: Literal["normalised", "sum"] = "normalised"
    """AuxK's loss: normalised: its squared error over the residual's variance (Gao et al.); sum: its
    squared error summed over dimensions and averaged over rows, like the reconstruction, times
    min(dead / aux_k, 1) (SAELens's AuxK: --aux_penalty 1 is SAELens's coefficient). On the trainer's
    inputs (E||x|| = sqrt(d)) a normalised weight equals a sum weight times the residual's energy per row."""
    group_weights: tuple[float, ...] = ()
    """Matryoshka: weight of each nested prefix's reconstruction loss, one per group, normalised to sum 1 (default: equal)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing (capped at a tenth of the run)."""
    resamples: int | Literal["auto"] = "auto"
    """Resample the rarely firing latents this many times, evenly over the first --resample_until of the run (0: never):
    each takes the unit residual of a poorly reconstructed recent training row (drawn without replacement,
    with probability proportional to its squared loss: Anthropic 2023), the encoder its transpose at the live
    latents' mean norm, a zero bias and fresh Adam moments (docs/training.md). auto: 6 for TopK, BatchTopK and
    Matryoshka SAEs (measured on SynthSAEBench: docs/synthbench.md), 0 for JumpReLU, vanilla and transcoders."""
    resample_until: float = 0.75
    """The fraction of the run the resamples spread over: the last comes after this fraction of the steps."""
    resample_below: float = 0.1
    """A latent is resampled when it fired in fewer than this fraction of the batches since the last resample
    (0.1 at batch 1,024: about one firing in 10,000 tokens)."""
    decoder_norm: Literal["unit", "free"] = "unit"
    """unit: decoder rows held at norm 1 (the gradient's radial part removed, rows renormalised after each
    step); free: rows of any norm, each latent's activation its pre-activation x its row's norm, so the
    reconstruction reads unit rows (SAELens's rescale_acts_by_decoder_norm). Saved models hold unit rows
    either way. TopK, BatchTopK and Matryoshka."""
    decoder_init_norm: float = 0.1
    """With --decoder_norm free: every decoder row's norm at the start, and the encoder their transpose
    (SAELens: 0.1, Anthropic's 2024 heuristic)."""
    b_dec_init: Literal["median", "mean"] = "median"
    """Decoder bias at the start: the geometric median or the mean of a sample of rows."""
    enc_init: Literal["transpose", "independent"] = "transpose"
    """Encoder at the start: the (unit-row) decoder's transpose, or independent random unit columns."""
    enc_init_scale: float = 1.0
    """Norm of each encoder column at the start."""
    eval_every: int = 0
    """Steps between validations (0: about 20 per run)."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (0: about 10 per run)."""
    patience: int = 5
    """Stop after this many evaluations without a better validation FVU (0 disables)."""
    min_delta: float = 1e-3
    """Smallest improvement that counts for --patience and best/, relative to the best validation FVU
    (1e-3: a new FVU must be below 0.999 x the best); 0 counts any decrease, however small."""

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
            (self.adam_b2_rise >= 0, f"--adam_b2_rise must be 0 (off) or positive, got {self.adam_b2_rise}"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"--adam_betas takes two values in [0, 1), got {','.join(map(str, self.adam_betas))}"),
            (self.aux_k >= 0, "--aux_k must be 0 (d_model/2) or positive"),
            (self.resamples == "auto" or self.resamples >= 0,
             f"--resamples must be auto, 0 (never) or positive, got {self.resamples}"),
            (0 < self.resample_until <= 1, f"--resample_until must be in (0, 1] (a fraction of the run), got {self.resample_until}"),
            (0 < self.resample_below <= 1, f"--resample_below must be in (0, 1] (a fraction of batches), got {self.resample_below}"),
            (self.grad_clip >= 0, f"--grad_clip must be 0 (no clipping) or positive, got {self.grad_clip}"),
            (self.data_lanes >= 0, f"--data_lanes must be 0 (the number of processes) or positive, got {self.data_lanes}"),
            (self.enc_init_scale > 0, f"--enc_init_scale must be positive, got {self.enc_init_scale}"),
            (self.decoder_init_norm > 0, f"--decoder_init_norm must be positive, got {self.decoder_init_norm}"),
            (self.target_l0 >= 0, f"--target_l0 must be 0 (--top_k) or positive, got {self.target_l0}"),
            (self.jumprelu_bandwidth > 0 and self.jumprelu_tanh_scale > 0 and self.jumprelu_threshold_lr > 0,
             "--jumprelu_bandwidth, --jumprelu_tanh_scale and --jumprelu_threshold_lr must be positive"),
            (not self.group_weights or (all(w >= 0 for w in self.group_weights) and sum(self.group_weights) > 0),
             f"--group_weights must be non-negative with a positive sum, got {','.join(map(str, self.group_weights))}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how it runs: devices, processes, numerics of the step, the terminal. None of it
    changes what is learned, so a run may resume with other values."""

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
    backward: Literal["auto", "sparse", "dense"] = "auto"
    """TopK family: sparse reconstruction and backward (k decoder rows per token), dense
    matmuls, or auto (sparse when the latents per device are wide enough for it to pay)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Input dtype of the encoder/decoder matmuls (accumulation and parameters stay float32); bfloat16 is for GPUs and TPUs."""
    compile_only: bool = False
    """Compile the train step for this config and mesh, print its memory analysis, and exit."""
    d_model: int | None = None
    """Input width for --compile_only without a store."""
    progress: bool = True
    """Show progress bars."""
    overwrite: bool = False
    """Discard an existing run with other settings in the run directory."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``python -m jax_sae.train``: what the SAE is, how it is trained, where it runs.
    The flags are the groups' fields, flat (``--hidden_dim``, ``--epochs``, ``--mesh_model``);
    ``TrainConfig.of(hidden_dim=..., epochs=...)`` builds one the same way in Python."""

    sae: SAESettings = field(default_factory=SAESettings)
    train: TrainingSettings = field(default_factory=TrainingSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        if self.sae.sae_type == "jumprelu" and not 0 < self.target_l0 <= self.sae.hidden_dim:
            raise ConfigError(f"--target_l0 {self.target_l0} must be at most --hidden_dim {self.sae.hidden_dim}")
        if self.train.decoder_norm == "free" and BEHAVIOURS[self.sae.sae_type].selection not in ("row_topk", "batch_topk"):
            raise ConfigError(f"--decoder_norm free is for topk, batch_topk and matryoshka, not {self.sae.sae_type}: "
                              "drop it (its penalty and thresholds read unit decoder rows)")
        weights, groups = self.train.group_weights, self.sae.config(d_model=1).group_sizes
        if weights and len(weights) != len(groups):
            raise ConfigError(
                f"--group_weights has {len(weights)} values but "
                + (f"there are {len(groups)} Matryoshka groups; give one weight per group"
                   if BEHAVIOURS[self.sae.sae_type].nested else "only --sae_type matryoshka takes them; drop it"))

    @classmethod
    def of(cls, **settings) -> TrainConfig:
        """A config from flat settings, as the flags name them; the rest keep their defaults."""
        return from_flags(cls, settings)

    def replace(self, **settings) -> TrainConfig:
        """This config with some settings changed, named as the flags name them."""
        return from_flags(type(self), to_flags(self) | settings)

    def settings(self) -> dict:
        """Every setting, flat, as the flags name them (what ``training_stats.json`` records)."""
        return to_flags(self)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run it continues: all but the runtime's, with
        Matryoshka's group sizes and the resamples as resolved (a change of their default must not pass unseen)."""
        key = to_flags(self.sae) | to_flags(self.train) | {"resamples": self.resample_count}
        if BEHAVIOURS[self.sae.sae_type].nested:
            key["group_sizes"] = list(self.sae_config(d_model=1).group_sizes)
        return key

    def sae_config(self, d_model: int, model: str | None = None) -> SAEConfig:
        return self.sae.config(d_model, self.train.layer_idx, model, str(self.train.store))

    def prefix_weights(self) -> tuple[float, ...]:
        """Matryoshka's prefix-loss weights, summing to 1 (empty for the other types)."""
        groups = len(self.sae.config(d_model=1).group_sizes)
        weights = self.train.group_weights or (1.0,) * groups
        return tuple(w / sum(weights) for w in weights)

    @property
    def target_l0(self) -> int:
        """JumpReLU's target L0: --target_l0, else --top_k."""
        return self.train.target_l0 or self.sae.top_k

    @property
    def data_seed(self) -> int:
        """The seed of the split and the data order: --data_seed, else --seed."""
        return self.train.seed if self.train.data_seed is None else self.train.data_seed

    @property
    def resample_count(self) -> int:
        """--resamples, or the auto rule: 6 for TopK, BatchTopK and Matryoshka SAEs, 0 otherwise."""
        if self.train.resamples != "auto":
            return int(self.train.resamples)
        measured = BEHAVIOURS[self.sae.sae_type].selection in ("row_topk", "batch_topk") and self.sae.transcoder == "none"
        return AUTO_RESAMPLES if measured else 0

    @property
    def peak_lr(self) -> float:
        """--lr, or the auto rule (``auto_lr``)."""
        return auto_lr(self.sae.hidden_dim, self.train.batch_size) if self.train.lr == "auto" else float(self.train.lr)

    def run_dir(self) -> Path:
        return run_path(self.train.out, self.sae_config(d_model=1).kind, self.train.layer_idx, self.sae.hidden_dim)

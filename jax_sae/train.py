"""``python -m jax_sae.train``: train an SAE on one layer of an activation store.

The run directory is ``{out}/{sae_type}/layer{N}/dim{h}/`` with ``best/``, ``final/``,
``ckpt/`` (periodic whole-state checkpoints for resumption), ``metrics.jsonl``,
``training_stats.json``, ``training_curves.png`` and ``density.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from extractor.store import StoreError, open_store

from . import model as M
from .checkpoint import CheckpointError, RunCheckpoints, model_tree, save_model
from .config import ConfigError, SAEConfig, parse_group_sizes
from .data import DataError, epoch_batches, geometric_median, input_scale, prefetch, scan_rows, split_samples
from .distributed import barrier, global_batch, initialize, is_primary, to_host
from .forward import LossSettings
from .metrics import evaluate_batches
from .runtime import announce, check_platform
from .sharding import BATCH, check_divisible, make_mesh, shardings
from .step import (TrainState, compile_train_step, init_state, lr_schedule, lr_warmup_steps, make_optimizer,
                   sparsity_warmup_steps)


class TrainError(RuntimeError):
    """Training that had to stop (divergence); the message says what was kept."""


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
    lr: float = 3e-4
    """Peak learning rate (warm-up, then cosine decay to 1%)."""
    aux_penalty: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK family)."""
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
    group_sizes: str | None = None
    """Matryoshka group sizes, comma-separated, summing to hidden_dim (default h/16,h/16,h/8,h/4,h/2)."""
    val_fraction: float = 0.1
    """Fraction of samples held out (whole samples, seeded) for validation."""
    val_max_tokens: int = 1_000_000
    """Cap on validation rows."""
    patience: int = 5
    """Stop after this many evaluations without a better validation FVU (0 disables)."""
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
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.val_fraction < 1, f"--val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.max_tokens is None or self.max_tokens > 0, "--max_tokens must be positive"),
            (self.num_samples is None or self.num_samples > 0, "--num_samples must be positive"),
            (self.dead_tokens > 0, "--dead_tokens must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.sae_config(d_model=1)  # validates top_k, group sizes against hidden_dim

    def sae_config(self, d_model: int, model: str | None = None) -> SAEConfig:
        groups = parse_group_sizes(self.group_sizes, self.hidden_dim) if self.sae_type == "matryoshka" else ()
        return SAEConfig(sae_type=self.sae_type, d_model=d_model, hidden_dim=self.hidden_dim, top_k=self.top_k,
                         group_sizes=groups, layer=self.layer_idx, model=model, store=str(self.store))

    def run_dir(self) -> Path:
        return Path(self.out) / self.sae_type / f"layer{self.layer_idx}" / f"dim{self.hidden_dim}"

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("progress", "overwrite", "mesh_data", "mesh_model", "coordinator_address",
                             "num_processes", "process_id", "compile_only", "d_model", "backward",
                             "compute_dtype")}


@dataclass
class RunPlan:
    """Derived, fixed quantities of one run."""

    sae: SAEConfig
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    dead_tokens: int
    warmup_steps: int
    notes: list[str]


def _plan(cfg: TrainConfig, store, train_rows: int) -> RunPlan:
    sae = cfg.sae_config(store.d_model, store.meta.model)
    steps_per_epoch = train_rows // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"--batch_size {cfg.batch_size} exceeds the {train_rows} training rows; lower it")
    total = steps_per_epoch * cfg.epochs
    dead = min(cfg.dead_tokens, max(cfg.batch_size, total * cfg.batch_size // 10))
    notes = [] if dead == cfg.dead_tokens else [f"dead-latent window scaled to {dead} tokens for this short run"]
    warmup = max(lr_warmup_steps(total), sparsity_warmup_steps(total))
    return RunPlan(sae, steps_per_epoch, total, cfg.eval_every or max(1, total // 20),
                   cfg.checkpoint_every or max(1, total // 10), dead, warmup, notes)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _log(path: Path, record: dict) -> None:
    if not is_primary():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one SAE; returns the training stats written to training_stats.json."""
    from tqdm import tqdm

    started = time.time()
    initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    check_platform("train")
    if cfg.compile_only:
        from .compile_report import compile_report

        return compile_report(cfg)
    primary = is_primary()
    mesh = make_mesh(cfg.mesh_data or None, cfg.mesh_model)
    check_divisible(mesh, cfg.batch_size, cfg.hidden_dim)
    runtime = announce(mesh, "train")
    store = open_store(cfg.store)
    store.check_layer(cfg.layer_idx)
    split = split_samples(store, val_fraction=cfg.val_fraction, seed=cfg.seed, num_samples=cfg.num_samples,
                          max_tokens=cfg.max_tokens, val_max_tokens=cfg.val_max_tokens)
    scan = scan_rows(store, cfg.layer_idx, split.train_samples, seed=cfg.seed, progress=cfg.progress)
    val_bad = scan_rows(store, cfg.layer_idx, split.val_samples, seed=cfg.seed, progress=False).nonfinite_rows \
        if len(split.val_samples) else np.zeros(0, np.int64)
    bad = np.concatenate([scan.nonfinite_rows, val_bad])
    if len(bad) and not cfg.skip_nonfinite:
        raise DataError(
            f"layer {cfg.layer_idx} of {cfg.store} has {len(bad)} non-finite (NaN/Inf) rows (first: row {bad[0]}); "
            "pass --skip_nonfinite to train without them, or re-extract"
        )
    plan = _plan(cfg, store, split.train_rows - len(scan.nonfinite_rows))
    notes = list(split.notes) + plan.notes + ([f"skipping {len(bad)} non-finite rows"] if len(bad) else [])
    for note in notes if primary else ():
        print(note)

    scale = input_scale(scan.mean_norm, store.d_model)
    optimizer = make_optimizer(cfg.lr, plan.total_steps, cfg.weight_decay)
    params = M.init_params(jax.random.PRNGKey(cfg.seed), plan.sae, geometric_median(scan.sample_BD * scale))
    state = init_state(params, optimizer, scale)
    state_shardings = shardings(state, mesh)
    state = jax.device_put(state, state_shardings)

    run_dir = cfg.run_dir()
    checkpoints = _open_run(cfg, run_dir, store.d_model)
    metrics_path = run_dir / "metrics.jsonl"
    latest = checkpoints.latest_step()
    if latest is not None:
        state, meta = checkpoints.restore(latest, state)
        if primary:
            _truncate_metrics(metrics_path, latest)
            print(f"resuming {run_dir} from step {latest}")
    elif primary:
        metrics_path.write_text("")
    settings = LossSettings(plan.sae, cfg.sparsity_coef, sparsity_warmup_steps(plan.total_steps), cfg.aux_penalty,
                            plan.dead_tokens, cfg.backward, cfg.compute_dtype)
    step_fn = compile_train_step(optimizer, settings, mesh, state, cfg.batch_size)
    batch_sharding = NamedSharding(mesh, BATCH)

    def put_batch(x):
        return global_batch(x, batch_sharding)

    def validate(st: TrainState):
        if not len(split.val_samples):
            return None
        batches = store.iter_rows(cfg.layer_idx, cfg.batch_size, samples=split.val_samples) if not len(val_bad) else \
            (x for x, _ in store.iter_rows_indexed(cfg.layer_idx, cfg.batch_size, samples=split.val_samples,
                                                   exclude_rows=val_bad))
        host = to_host((st.params, st.threshold, st.input_scale))
        return evaluate_batches(plan.sae, *jax.tree.map(jnp.asarray, host), batches)

    meta = {"resume_key": cfg.resume_key(), "d_model": store.d_model}
    stopped_early = False
    step = int(state.step)
    with tqdm(total=plan.total_steps, initial=step, desc=f"train {cfg.sae_type}", unit="step",
              disable=not (cfg.progress and primary)) as bar:
        tick, tick_step = time.time(), step
        bar.postfix_values = {}
        pending = None
        for epoch in range(int(state.epoch), cfg.epochs):
            if stopped_early:
                break
            batches = prefetch(epoch_batches(store, cfg.layer_idx, split.train_samples, cfg.batch_size, seed=cfg.seed,
                                             epoch=epoch, skip=int(state.batch_in_epoch),
                                             exclude_rows=scan.nonfinite_rows), transform=put_batch)
            for x in batches:
                state, metrics = step_fn(state, x)
                step += 1
                if pending is not None:  # fetch the previous step's metrics: no sync on this one
                    _report(pending, cfg, plan, metrics_path, bar, run_dir)
                pending = (step, metrics)
                if step % plan.eval_every == 0 or step == plan.total_steps:
                    _report(pending, cfg, plan, metrics_path, bar, run_dir)
                    pending = None
                    state, stopped_early = _evaluate(state, validate, cfg, plan, run_dir, metrics_path, step)
                    state = jax.device_put(state, state_shardings)  # host-made scalars back onto the mesh
                if step % plan.checkpoint_every == 0:
                    checkpoints.save(step, state, meta)
                if time.time() - tick > 1.0:
                    bar.postfix_values["tokens/s"] = f"{(step - tick_step) * cfg.batch_size / (time.time() - tick):.0f}"
                    bar.set_postfix(bar.postfix_values, refresh=False)
                    bar.update(step - bar.n)
                    tick, tick_step = time.time(), step
                if stopped_early:
                    if primary:
                        print(f"early stop at step {step}: no better validation FVU in {cfg.patience} evaluations")
                    break
            else:
                state = jax.device_put(state.replace(epoch=state.epoch + 1, batch_in_epoch=jnp.int32(0)),
                                       state_shardings)
        if pending is not None:
            _report(pending, cfg, plan, metrics_path, bar, run_dir)
        bar.update(step - bar.n)
    checkpoints.save(step, state, meta | {"finished": True})
    checkpoints.close()
    return _finish(cfg, plan, store, state, validate, run_dir, split, notes, runtime, time.time() - started)


def _open_run(cfg: TrainConfig, run_dir: Path, d_model: int) -> RunCheckpoints:
    """Open the run's checkpoints; a run with other settings is refused unless --overwrite."""
    ckpt = run_dir / "ckpt"
    if ckpt.exists():
        checkpoints = RunCheckpoints(ckpt)
        latest = checkpoints.latest_step()
        if latest is not None:
            import orbax.checkpoint as ocp

            meta = checkpoints.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if meta.get("resume_key") == json.loads(json.dumps(cfg.resume_key())):
                if meta.get("d_model") != d_model and not cfg.overwrite:
                    raise CheckpointError(
                        f"the checkpoint in {run_dir} has width {meta.get('d_model')} but the store has {d_model}; "
                        "pass --overwrite to start over"
                    )
                if meta.get("d_model") == d_model:
                    return checkpoints
            if not cfg.overwrite:
                raise CheckpointError(
                    f"{run_dir} holds a run with other settings; pass --overwrite to replace it or choose another --out"
                )
        checkpoints.close()
    if is_primary():
        if run_dir.exists() and cfg.overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier("open-run")
    return RunCheckpoints(ckpt)


def _report(pending, cfg: TrainConfig, plan: RunPlan, metrics_path: Path, bar, run_dir: Path) -> None:
    step, metrics = pending
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(host["loss"]):
        raise TrainError(
            f"training diverged at step {step} (loss {host['loss']}); the last good checkpoints are kept in "
            f"{run_dir} (best/, ckpt/); lower --lr and rerun with --overwrite"
        )
    host["lr"] = float(lr_schedule(cfg.lr, plan.total_steps)(step - 1))
    _log(metrics_path, {"step": step, **host})
    bar.postfix_values.update(loss=f"{host['loss']:.4g}", fvu=f"{host['fvu']:.3f}", l0=f"{host['l0']:.1f}",
                              dead=f"{host['dead_fraction']:.2f}")


def _evaluate(state: TrainState, validate, cfg: TrainConfig, plan: RunPlan, run_dir: Path, metrics_path: Path,
              step: int) -> tuple[TrainState, bool]:
    acc = validate(state)
    if acc is None:
        return state, False
    result = acc.result()
    _log(metrics_path, {"step": step, "val": result})
    if step < plan.warmup_steps:
        return state, False  # sparsity and lr still warming up: neither a best model nor a reason to stop
    if result["fvu"] < float(state.best_val_fvu):
        save_model(run_dir / "best", plan.sae, model_tree(*to_host((state.params, state.threshold, state.input_scale))),
                   {"step": step, "val": result})
        state = state.replace(best_val_fvu=jnp.float32(result["fvu"]), evals_since_best=jnp.int32(0))
    else:
        state = state.replace(evals_since_best=state.evals_since_best + 1)
    return state, cfg.patience > 0 and int(state.evals_since_best) >= cfg.patience


def _finish(cfg, plan, store, state, validate, run_dir, split, notes, runtime, seconds) -> dict:
    from .plots import plot_density, plot_training_curves

    tree = model_tree(*to_host((state.params, state.threshold, state.input_scale)))
    acc = validate(state)
    final_val = acc.result() if acc is not None else None
    save_model(run_dir / "final", plan.sae, tree, {"step": int(state.step), "val": final_val})
    if not (run_dir / "best").exists():
        save_model(run_dir / "best", plan.sae, tree, {"step": int(state.step), "val": final_val})
    best = json.loads((run_dir / "best" / "config.json").read_text())
    if not is_primary():
        return {"final_val": final_val, "best_val": best.get("val")}
    stats = {
        "config": dataclasses.asdict(cfg),
        "sae": plan.sae.to_json(),
        "steps": int(state.step),
        "total_steps": plan.total_steps,
        "train_rows": split.train_rows,
        "val_rows": split.val_rows,
        "train_samples": len(split.train_samples),
        "val_samples": len(split.val_samples),
        "input_scale": float(state.input_scale),
        "threshold": float(state.threshold),
        "dead_tokens": plan.dead_tokens,
        "final_val": final_val,
        "best_val": best.get("val"),
        "best_step": best.get("step"),
        "notes": notes,
        "runtime": runtime,
        "seconds": seconds,
    }
    (run_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    plot_training_curves(records, run_dir / "training_curves.png", title=f"{cfg.sae_type} layer {cfg.layer_idx}")
    if acc is not None:
        plot_density(acc.density_H, run_dir / "density.png")
    if final_val:
        print(f"{run_dir}: val FVU {final_val['fvu']:.4f}, L0 {final_val['l0']:.1f}, "
              f"dead {final_val['dead_fraction']:.3f} after {int(state.step)} steps in {seconds:.1f} s")
    return stats


def main(argv: list[str] | None = None):
    from extractor.cli import run_main

    return run_main(TrainConfig, argv, prog="python -m jax_sae.train", description="Train a sparse autoencoder.",
                    run=train, errors=(ConfigError, DataError, StoreError, CheckpointError, TrainError))


if __name__ == "__main__":
    main()

"""One training run, in three parts: ``TrainingRun.setup`` (cheap checks, the pass over the store's
rows, state and compiled step), ``run`` (the loop around the pure, jitted step) and ``finish``
(final model, stats, plots). The run's files go through ``RunDir``; its bar and metrics log
through ``Progress``."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from sae_core.store import Store, open_store

from . import model as M
from .checkpoint import (
    CheckpointError,
    NonFiniteError,
    RunCheckpoints,
    model_tree,
    read_config,
    save_model,
)
from .config import SAEConfig, TrainConfig
from .data import (
    DataError,
    DataSplit,
    ScanResult,
    geometric_median,
    input_scale,
    merge_scans,
    prefetch,
    scan_rows,
    split_samples,
)
from .distributed import barrier, gather_host, global_batch, is_primary, to_host
from .metrics import MetricAccumulator, evaluate_batches
from .order import epoch_batches, epoch_lengths
from .progress import Progress
from .run_dir import RunDir
from .runtime import announce
from .sharding import BATCH, check_divisible, make_mesh
from .step import Step, TrainState, build_step, fresh_state, lr_schedule, lr_warmup_steps, sparsity_warmup_steps


@dataclass(frozen=True)
class RunPlan:
    """Derived, fixed quantities of one run."""

    sae: SAEConfig
    epoch_steps: tuple[int, ...]
    total_steps: int
    eval_every: int
    checkpoint_every: int
    dead_tokens: int
    warmup_steps: int
    notes: tuple[str, ...]


def check_batch(cfg: TrainConfig, train_rows: int) -> None:
    """Refuse a batch larger than the training rows (before they are read)."""
    if train_rows // cfg.train.batch_size == 0:
        raise DataError(f"--batch_size {cfg.train.batch_size} exceeds the {train_rows} training rows; lower it")


def make_plan(cfg: TrainConfig, sae: SAEConfig, epoch_steps: list[int]) -> RunPlan:
    """The run's fixed quantities, from each epoch's batches (``epoch_lengths``)."""
    train = cfg.train
    if min(epoch_steps) == 0:
        raise DataError(f"--data_lanes {train.data_lanes} splits the store's chunks too thinly: some lane cannot fill "
                        f"its {train.batch_size // train.data_lanes} rows of a batch; lower --data_lanes")
    total = sum(epoch_steps)
    dead = min(train.dead_tokens, max(train.batch_size, total * train.batch_size // 10))
    notes = () if dead == train.dead_tokens else (f"dead-latent window scaled to {dead} tokens for this short run",)
    warmup = max(lr_warmup_steps(total), sparsity_warmup_steps(total))
    return RunPlan(sae, tuple(epoch_steps), total, train.eval_every or max(1, total // 20),
                   train.checkpoint_every or max(1, total // 10), dead, warmup, notes)


def improves(fvu: float, best: float, min_delta: float) -> bool:
    """Whether a validation FVU counts as better than the best so far: lower by more than
    ``min_delta`` of it. Smaller gains (float noise, a stalled run) neither save best/ nor reset
    patience; NaN never improves."""
    return fvu < best * (1.0 - min_delta)


# What a run saved before a setting existed did instead (its checkpoint has no such key).
BEFORE_SETTING = {"lr_schedule": "cosine", "adam_betas": [0.9, 0.999], "aux_k": 0, "threshold": "running",
                  "b_dec_init": "median", "enc_init": "transpose", "enc_init_scale": 1.0, "group_weights": [], "data_lanes": 1,
                  "val_split": "samples", "min_delta": 0.0}


def _other_settings(saved, cfg: TrainConfig) -> list[str]:
    """The settings in which a checkpoint's saved ones differ from ``cfg``'s, as ``--flag saved``
    (what to pass to continue it); a setting added since it was saved counts as what runs did
    before it existed (``BEFORE_SETTING``). Empty when they agree."""
    if not isinstance(saved, dict):
        return ["(no saved settings)"]
    current = json.loads(json.dumps(cfg.resume_key()))
    gone = sorted(set(saved) - set(current))
    missing = object()
    differ = [key for key, value in current.items() if saved.get(key, BEFORE_SETTING.get(key, missing)) != value]

    def shown(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return [f"--{key} {shown(saved.get(key, BEFORE_SETTING.get(key, '(unset)')))}" for key in differ] + gone


def _same_settings(saved, cfg: TrainConfig) -> bool:
    return not _other_settings(saved, cfg)


def open_run(cfg: TrainConfig, files: RunDir, d_model: int) -> RunCheckpoints:
    """The run's checkpoints; a run with other settings or width, or whose checkpoints are all damaged,
    is refused unless --overwrite."""
    if files.ckpt.exists():
        checkpoints = RunCheckpoints(files.ckpt)
        try:
            meta = checkpoints.latest_meta()
        except CheckpointError:
            if not cfg.runtime.overwrite:
                checkpoints.close()
                raise
            meta = None
        if meta is not None:
            same = _same_settings(meta.get("resume_key"), cfg)
            if same and meta.get("d_model") == d_model:
                return checkpoints
            if not cfg.runtime.overwrite:
                checkpoints.close()
                raise CheckpointError(
                    f"the checkpoint in {files.path} has width {meta.get('d_model')} but the store has {d_model}; "
                    "pass --overwrite to start over" if same else
                    f"{files.path} holds a run with other settings (it had "
                    f"{' '.join(_other_settings(meta.get('resume_key'), cfg))}); pass those to continue it, "
                    "--overwrite to replace it, or another --out")
        checkpoints.close()
    if is_primary():
        if files.path.exists() and cfg.runtime.overwrite:
            shutil.rmtree(files.path)
        files.path.mkdir(parents=True, exist_ok=True)
    barrier("open-run")
    return RunCheckpoints(files.ckpt)


@dataclass
class TrainingRun:
    """Everything one run holds between setup and finish; ``state`` is the one pytree that changes."""

    cfg: TrainConfig
    plan: RunPlan
    store: Store
    split: DataSplit
    scan: ScanResult
    val_bad: np.ndarray
    files: RunDir
    checkpoints: RunCheckpoints
    state: TrainState
    state_shardings: TrainState
    step_fn: object
    put_batch: object
    notes: list[str]
    runtime: dict
    read_lanes: tuple[int, ...]  # the lanes of each batch that land on this process's devices
    resumed_from: int | None = None  # the checkpoint step this process started from (None: a new run)
    evaluations: int = 0  # validations run so far (by this process, since it started)
    val_chunks: np.ndarray | None = None  # the chunks holding validation rows, in order

    @classmethod
    def setup(cls, cfg: TrainConfig) -> TrainingRun:
        """Cheap checks first (mesh, layer, batch vs rows, resume compatibility), then the pass over
        the rows (scale, non-finite rows), then the step and the state (restored when resuming)."""
        mesh = make_mesh(cfg.runtime.mesh_data or None, cfg.runtime.mesh_model)
        check_divisible(mesh, cfg.train.batch_size, cfg.sae.hidden_dim)
        cfg = _with_lanes(cfg)
        train = cfg.train
        runtime = announce(mesh, "train")
        store = open_store(train.store)
        store.check_layer(train.layer_idx)
        split = split_samples(store, val_fraction=train.val_fraction, seed=train.seed, num_samples=train.num_samples,
                              max_tokens=train.max_tokens, val_max_tokens=train.val_max_tokens,
                              by_chunks_of=store.chunk_rows(train.layer_idx) if train.val_split == "chunks" else None)
        check_batch(cfg, split.train_rows)
        files = RunDir(cfg.run_dir())
        checkpoints = open_run(cfg, files, store.d_model)
        scan, val_bad = _scan_for_bad_rows(cfg, store, split)
        lengths = epoch_lengths(store, train.layer_idx, split.train_samples, train.batch_size, seed=train.seed,
                                epochs=train.epochs, lanes=train.data_lanes, exclude_rows=scan.nonfinite_rows)
        plan = make_plan(cfg, cfg.sae_config(store.d_model, store.meta.model), lengths)
        notes = _notes(cfg, split, scan, val_bad, plan, lengths)
        step = build_step(cfg, plan.sae, mesh, plan.total_steps, plan.dead_tokens)
        state = _resume(checkpoints, files, _initial_state(cfg, step, scan, store.d_model), cfg.runtime.overwrite)
        batch_sharding = NamedSharding(mesh, BATCH)
        return cls(cfg, plan, store, split, scan, val_bad, files, checkpoints, state, step.shardings, step.fn,
                   lambda x: global_batch(x, batch_sharding), notes, runtime,
                   local_lanes(batch_sharding, train.batch_size, store.d_model, train.data_lanes),
                   resumed_from=int(state.step) or None)

    # the loop
    def run(self) -> None:
        cfg, step = self.cfg, int(self.state.step)
        meta = {"resume_key": cfg.resume_key(), "d_model": self.store.d_model}
        with Progress(self.files, lr_schedule(cfg.peak_lr, self.plan.total_steps, cfg.train.lr_schedule), self.plan.total_steps, step,
                      cfg.train.batch_size, f"train {cfg.sae.sae_type}", cfg.runtime.progress) as progress:
            for epoch in range(int(self.state.epoch), cfg.train.epochs):
                step, stopped = self._run_epoch(epoch, step, meta, progress)
                if stopped:
                    if is_primary():
                        print(f"early stop at step {step}: the validation FVU has not improved by more than "
                              f"{cfg.train.min_delta:g} of its best in {cfg.train.patience} evaluations")
                    break
                self._set(epoch=int(self.state.epoch) + 1, batch_in_epoch=0)
            progress.finish(step)
        self.checkpoints.save(step, self.state, meta | {"finished": True})
        self.checkpoints.close()

    def _run_epoch(self, epoch: int, step: int, meta: dict, progress: Progress) -> tuple[int, bool]:
        """One epoch from the state's position in it; returns (step, stopped early)."""
        batches = epoch_batches(self.store, self.cfg.train.layer_idx, self.split.train_samples, self.cfg.train.batch_size,
                                seed=self.cfg.train.seed, epoch=epoch, skip=int(self.state.batch_in_epoch),
                                exclude_rows=self.scan.nonfinite_rows, lanes=self.cfg.train.data_lanes,
                                read_lanes=self.read_lanes, batches=self.plan.epoch_steps[epoch])
        for x in prefetch(batches, transform=self.put_batch):
            self.state, metrics = self.step_fn(self.state, x)
            step += 1
            progress.step(step, metrics)
            stopped = False
            if step % self.plan.eval_every == 0 or step == self.plan.total_steps:
                progress.flush()
                stopped = self._validate(step, progress)
            if step % self.plan.checkpoint_every == 0:
                try:
                    self.checkpoints.save(step, self.state, meta)
                except NonFiniteError:
                    progress.flush()  # a non-finite loss is the likelier first sign: its line comes first
                    raise progress.diverged(step, "its parameters are no longer finite") from None
            if stopped:
                return step, True
        return step, False

    def _validate(self, step: int, progress: Progress) -> bool:
        """Validate, keep the best model, and say whether patience has run out."""
        acc = self.validation()
        if acc is None:
            return False
        result = acc.result()
        progress.validation(step, result)
        if step < self.plan.warmup_steps:
            return False  # sparsity and lr still warming up: neither a best model nor a reason to stop
        if improves(result["fvu"], float(self.state.best_val_fvu), self.cfg.train.min_delta):
            save_model(self.files.best, self.plan.sae, self.model_tree(), {"step": step, "val": result})
            self._set(best_val_fvu=result["fvu"], evals_since_best=0)
        else:
            self._set(evals_since_best=int(self.state.evals_since_best) + 1)
        return self.cfg.train.patience > 0 and int(self.state.evals_since_best) >= self.cfg.train.patience

    def _set(self, **values) -> None:
        """Replace scalar fields of the state, placed where the step expects them."""
        placed = {name: jax.device_put(np.asarray(value, getattr(self.state, name).dtype),
                                       getattr(self.state_shardings, name)) for name, value in values.items()}
        self.state = self.state.replace(**placed)

    # reading the model back
    def model_tree(self) -> dict:
        return model_tree(*self.inference())

    def inference(self) -> tuple:
        """Host copies of what inference uses: parameters, threshold (calibrated on the scan's sample
        of training rows with --threshold calibrated) and input scale."""
        params, threshold, scale = to_host((self.state.params, self.state.threshold, self.state.input_scale))
        if self.cfg.sae.threshold == "calibrated" and self.plan.sae.uses_threshold:
            threshold = np.float32(M.calibrated_threshold(self.plan.sae, params, self.scan.sample_BD * scale))
        return params, threshold, scale

    def validation(self) -> MetricAccumulator | None:
        """Metrics of the current model over the validation rows (None without any)."""
        if not len(self.split.val_samples):
            return None
        cfg, samples = self.cfg, self.split.val_samples
        exclude = self.val_bad if len(self.val_bad) else None
        # Each process evaluates every P-th of the chunks holding validation rows, and the sums are
        # added up across processes. Who takes the odd chunk turns with each validation.
        if self.val_chunks is None:
            kept = self.store.kept_rows_per_chunk(cfg.train.layer_idx, samples=samples, exclude_rows=exclude)
            self.val_chunks = np.flatnonzero(kept)
        processes = jax.process_count()
        mine = self.val_chunks[(jax.process_index() + self.evaluations) % processes::processes]
        self.evaluations += 1
        batches = self.store.iter_rows(cfg.train.layer_idx, cfg.train.batch_size, samples=samples, exclude_rows=exclude,
                                       chunks=mine)
        acc = evaluate_batches(self.plan.sae, *jax.tree.map(jnp.asarray, self.inference()), batches)
        return _summed(acc)

    # the end
    def finish(self, seconds: float) -> dict:
        """Save final/ (and best/ if no validation made one), write the stats and plots."""
        tree = self.model_tree()
        acc = self.validation()
        final_val = acc.result() if acc is not None else None
        info = {"step": int(self.state.step), "val": final_val}
        save_model(self.files.final, self.plan.sae, tree, info)
        if not self.files.best.exists():
            save_model(self.files.best, self.plan.sae, tree, info)
        _, best = read_config(self.files.best)
        read = _per_process(self.store.bytes_read)
        if not is_primary():
            return {"final_val": final_val, "best_val": best.get("val")}
        stats = self._stats(final_val, best, seconds) | {"data_lanes": self.cfg.train.data_lanes,
                                                         "bytes_read_per_process": read}
        self.files.write_stats(stats)
        self._plots(acc)
        if final_val:
            print(f"{self.files.path}: val FVU {final_val['fvu']:.4f}, L0 {final_val['l0']:.1f}, "
                  f"dead {final_val['dead_fraction']:.3f} after {int(self.state.step)} steps in {seconds:.1f} s")
        return stats

    def _stats(self, final_val: dict | None, best: dict, seconds: float) -> dict:
        split, state = self.split, self.state
        return {
            "config": self.cfg.settings(),
            "sae": self.plan.sae.to_json(),
            "steps": int(state.step),
            "total_steps": self.plan.total_steps,
            "train_rows": split.train_rows,
            "val_rows": split.val_rows,
            "train_samples": len(split.train_samples),
            "val_samples": len(split.val_samples),
            "input_scale": float(state.input_scale),
            "threshold": float(state.threshold),
            "dead_tokens": self.plan.dead_tokens,
            "final_val": final_val,
            "best_val": best.get("val"),
            "best_step": best.get("step"),
            "notes": self.notes,
            "resumed_from": self.resumed_from,
            "runtime": self.runtime,
            "seconds": seconds,
        }

    def _plots(self, acc: MetricAccumulator | None) -> None:
        from .plots import plot_density, plot_training_curves

        plot_training_curves(self.files.read_metrics(), self.files.curves,
                             title=f"{self.cfg.sae.sae_type} layer {self.cfg.train.layer_idx}")
        if acc is not None:
            plot_density(acc.density_H, self.files.density)


def _summed(acc: MetricAccumulator) -> MetricAccumulator:
    """The accumulator of every process's rows (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return acc
    shapes = {"sum_x_D": (acc.cfg.d_model,), "fired_H": (acc.cfg.hidden_dim,)}  # the rest are scalars
    total = MetricAccumulator(acc.cfg)
    total.n = int(gather_host(np.array([acc.n], np.int64)).sum())
    total.sums = {k: gather_host(np.asarray(acc.sums.get(k, np.zeros(shapes.get(k, ()))), np.float64)).sum(axis=0)
                  for k in ("sq_err", "sum_x_D", "sum_sq_x", "l0", "fired_H", "cos", "l2_ratio")}
    return total


def _per_process(value: int) -> list[int]:
    """``value`` of every process, in process order (a collective: every process calls it)."""
    return [int(v) for v in gather_host(np.array([value], np.int64)).ravel()]


def _with_lanes(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with --data_lanes resolved (0: the number of processes), checked against the batch."""
    lanes = cfg.train.data_lanes or jax.process_count()
    if cfg.train.batch_size % lanes:
        raise DataError(f"--batch_size {cfg.train.batch_size} is not a multiple of --data_lanes {lanes}; make it one")
    return cfg.replace(data_lanes=lanes)


def local_lanes(sharding, batch_size: int, d_model: int, lanes: int) -> tuple[int, ...]:
    """The lanes (equal slices of a batch's rows) that overlap this process's devices' rows."""
    per_lane = batch_size // lanes
    mine = set()
    for index in sharding.addressable_devices_indices_map((batch_size, d_model)).values():
        rows = index[0]
        start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
        mine.update(range(start // per_lane, -(-stop // per_lane)))
    return tuple(sorted(mine))


def _scan_for_bad_rows(cfg: TrainConfig, store: Store, split: DataSplit) -> tuple[ScanResult, np.ndarray]:
    """The pass over the training rows (norms, a sample for b_dec, NaN/Inf rows) and the validation
    rows' NaN/Inf rows; non-finite rows stop the run unless --skip_nonfinite. Each process scans
    every P-th chunk (P processes) and the parts are merged: the same result as one process."""
    part = (jax.process_index(), jax.process_count())
    scan = _merged(scan_rows(store, cfg.train.layer_idx, split.train_samples, seed=cfg.train.seed, progress=cfg.runtime.progress,
                             part=part))
    val_bad = _merged(scan_rows(store, cfg.train.layer_idx, split.val_samples, seed=cfg.train.seed, progress=False,
                                part=part)).nonfinite_rows if len(split.val_samples) else np.zeros(0, np.int64)
    bad = np.concatenate([scan.nonfinite_rows, val_bad])
    if len(bad) and not cfg.train.skip_nonfinite:
        raise DataError(
            f"layer {cfg.train.layer_idx} of {cfg.train.store} has {len(bad)} non-finite (NaN/Inf) rows (first: row {bad[0]}); "
            "pass --skip_nonfinite to train without them, or re-extract"
        )
    return scan, val_bad


def _merged(scan: ScanResult) -> ScanResult:
    """Every process's part of a scan merged into the whole (the part itself in one process)."""
    if jax.process_count() == 1:
        return scan
    gathered = gather_host

    size = len(scan.keys)
    sizes = gathered(np.array([size, len(scan.nonfinite_rows)]))
    longest, width = max(1, int(sizes[:, 0].max())), max(1, int(sizes[:, 1].max()))
    keys = np.full(longest, np.inf)
    keys[:size] = scan.keys
    sample = np.zeros((longest, scan.sample_BD.shape[1]), np.float32)
    sample[:size] = scan.sample_BD
    bad = np.full(width, -1, np.int64)
    bad[: len(scan.nonfinite_rows)] = scan.nonfinite_rows
    all_keys, all_sample, all_bad = gathered(keys), gathered(sample), gathered(bad)
    parts = [ScanResult(nonfinite_rows=all_bad[i][all_bad[i] >= 0], mean_norm=float("nan"),
                        sample_BD=all_sample[i][np.isfinite(all_keys[i])], norm_C=norm, count_C=count,
                        keys=all_keys[i][np.isfinite(all_keys[i])])
             for i, (norm, count) in enumerate(zip(gathered(scan.norm_C), gathered(scan.count_C)))]
    return merge_scans(parts)


def _initial_state(cfg: TrainConfig, step: Step, scan: ScanResult, d_model: int) -> TrainState:
    """A fresh state, made sharded on the mesh: b_dec at the geometric median or mean of the scaled sample."""
    scale = input_scale(scan.mean_norm, d_model)
    sample = scan.sample_BD * scale
    b_dec = geometric_median(sample) if cfg.train.b_dec_init == "median" else sample.mean(axis=0)
    return fresh_state(step, jax.random.PRNGKey(cfg.train.seed), b_dec, scale, cfg.train.enc_init,
                       cfg.train.enc_init_scale)


def _notes(cfg: TrainConfig, split: DataSplit, scan: ScanResult, val_bad: np.ndarray, plan: RunPlan,
           lengths: list[int]) -> list[str]:
    """What the run changed or skipped, printed once before it starts (and kept in its stats)."""
    bad = len(scan.nonfinite_rows) + len(val_bad)
    notes = list(split.notes) + list(plan.notes) + ([f"skipping {bad} non-finite rows"] if bad else [])
    if cfg.train.data_lanes > 1:
        used = min(lengths) * cfg.train.batch_size
        notes.append(f"{cfg.train.data_lanes} data lanes: each epoch uses at least {used} of the "
                     f"{split.train_rows - len(scan.nonfinite_rows)} training rows")
    for note in notes if is_primary() else ():
        print(note)
    return notes


def _resume(checkpoints: RunCheckpoints, files: RunDir, state: TrainState, overwrite: bool) -> TrainState:
    """The newest checkpoint that restores, into ``state``'s structure and placement, or ``state``
    itself; one line says which step it resumes from and which newer ones were damaged. When every
    checkpoint is damaged, --overwrite starts the run over."""
    try:
        resumed = checkpoints.restore_latest(state)
    except CheckpointError:
        if not overwrite:
            raise
        checkpoints.delete_all()
        if is_primary():
            shutil.rmtree(files.best, ignore_errors=True)
            shutil.rmtree(files.final, ignore_errors=True)
            print(f"every checkpoint in {files.ckpt} is damaged; --overwrite: starting the run over")
        barrier("start-over")
        resumed = None
    step = resumed.step if resumed is not None else None
    if is_primary():
        files.restart_metrics(step)
        if resumed is not None and resumed.damaged:
            bad = ", ".join(f"step {s} ({why})" for s, why in resumed.damaged)
            print(f"damaged checkpoint removed from {files.ckpt}: {bad}; resuming {files.path} from step {step}")
        elif resumed is not None:
            print(f"resuming {files.path} from step {step}")
    return resumed.state if resumed is not None else state

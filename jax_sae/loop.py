"""One training run, in three parts: ``TrainingRun.setup`` (cheap checks, the pass over the store's
rows, state and compiled step), ``run`` (the loop around the pure, jitted step) and ``finish``
(final model, stats, plots). The run's files go through ``RunDir``; its bar and metrics log
through ``Progress``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

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
from .data import DataError, ScanResult, geometric_median, input_scale
from .distributed import barrier, gather_host, is_primary, to_host
from .metrics import MetricAccumulator, evaluate_batches
from .progress import Progress
from .run_dir import RunDir
from .resample import Resampler
from .runtime import announce
from .sharding import BATCH, check_divisible, make_mesh
from .sources import StoreData, SyntheticData, open_data
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
                  "val_split": "samples", "min_delta": 0.0, "data_seed": None, "jumprelu_sparsity": "quadratic",
                  "target_l0": 0, "jumprelu_bandwidth": 0.05, "jumprelu_tanh_scale": 4.0,
                  "jumprelu_ste_to_input": False, "jumprelu_threshold_lr": 10.0,
                  "transcoder": "none", "grad_clip": 1.0,
                  "aux_activation": "relu", "aux_loss": "normalised", "decoder_norm": "unit", "decoder_init_norm": 0.1,
                  "adam_b2_rise": 0.0, "resamples": 0, "resample_until": 0.5, "resample_below": 0.1}


def _groups_before_levels(hidden_dim: int) -> list[int]:
    """Matryoshka's default groups until 2026-12 (h/16, h/16, h/8, h/4, h/2), which runs saved then
    recorded as no groups at all."""
    head = [hidden_dim // 16, hidden_dim // 16, hidden_dim // 8, hidden_dim // 4]
    return head + [hidden_dim - sum(head)]


def _other_settings(saved, cfg: TrainConfig) -> list[str]:
    """The settings in which a checkpoint's saved ones differ from ``cfg``'s, as ``--flag saved``
    (what to pass to continue it); a setting added since it was saved counts as what runs did
    before it existed (``BEFORE_SETTING``). Empty when they agree."""
    if not isinstance(saved, dict):
        return ["(no saved settings)"]
    current = json.loads(json.dumps(cfg.resume_key()))
    if saved.get("group_sizes") == [] and current.get("group_sizes"):
        saved = saved | {"group_sizes": _groups_before_levels(saved.get("hidden_dim", 0))}
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
    data: StoreData | SyntheticData
    scan: ScanResult
    files: RunDir
    checkpoints: RunCheckpoints
    state: TrainState
    state_shardings: TrainState
    step_fn: object
    notes: list[str]
    runtime: dict
    step: Step
    resumed_from: int | None = None  # the checkpoint step this process started from (None: a new run)
    done: bool = False  # the newest checkpoint is a finished run's: nothing is left to train
    _inference: tuple | None = field(default=None, repr=False)  # (state, inference()) of the last state read
    resampler: Resampler | None = None  # with --resamples

    @classmethod
    def setup(cls, cfg: TrainConfig, mesh=None, data: StoreData | SyntheticData | None = None,
              quiet: bool = False) -> TrainingRun:
        """Cheap checks first (mesh, data, batch vs rows, resume compatibility), then the pass over
        the rows (scale, non-finite rows), then the step and the state (restored when resuming).
        A sweep passes its mesh and the data its members share (scanned once) and keeps the notes
        to itself (``quiet``)."""
        mesh = mesh or make_mesh(cfg.runtime.mesh_data or None, cfg.runtime.mesh_model)
        check_divisible(mesh, cfg.train.batch_size, cfg.sae.hidden_dim)
        cfg = _with_lanes(cfg)
        runtime = announce(mesh, "train", quiet=quiet)
        data = data or open_data(cfg, NamedSharding(mesh, BATCH))
        files = RunDir(cfg.run_dir())
        checkpoints = open_run(cfg, files, data.d_model)
        scan = data.scan()
        lengths = data.epoch_lengths()
        plan = make_plan(cfg, cfg.sae_config(data.d_model, data.model), lengths)
        notes = data.notes(lengths) + list(plan.notes)
        for note in notes if is_primary() and not quiet else ():
            print(note)
        step = build_step(cfg, plan.sae, mesh, plan.total_steps, plan.dead_tokens)
        state, meta = _resume(checkpoints, files, _initial_state(cfg, step, scan, data.d_model), cfg.runtime.overwrite)
        train = cfg.train
        resampler = (Resampler.build(step, plan.total_steps, cfg.resample_count, train.resample_until, train.resample_below,
                                     train.batch_size, train.seed, mesh) if cfg.resample_count else None)
        return cls(cfg, plan, data, scan, files, checkpoints, state, step.shardings, step.fn, notes, runtime, step,
                   resumed_from=int(state.step) or None, done=bool(meta.get("finished")), resampler=resampler)

    # the loop
    @property
    def meta(self) -> dict:
        """What every checkpoint of the run saves beside the state."""
        return {"resume_key": self.cfg.resume_key(), "d_model": self.data.d_model}

    def progress(self, show: bool) -> Progress:
        cfg = self.cfg
        return Progress(self.files, lr_schedule(cfg.peak_lr, self.plan.total_steps, cfg.train.lr_schedule),
                        self.plan.total_steps, int(self.state.step), cfg.train.batch_size, f"train {cfg.sae.sae_type}",
                        show)

    def run(self) -> None:
        cfg, step, meta = self.cfg, int(self.state.step), self.meta
        with self.progress(cfg.runtime.progress) as progress:
            for epoch in range(int(self.state.epoch), cfg.train.epochs):
                if self.done:
                    break  # an early-stopped run, rerun: it stays stopped
                step, stopped = self._run_epoch(epoch, step, meta, progress)
                if stopped:
                    if is_primary():
                        print(self.stop_line(step))
                    break
                self.next_epoch()
            progress.finish(step)
        self.save_finished(step)

    def stop_line(self, step: int) -> str:
        train = self.cfg.train
        return (f"early stop at step {step}: the validation FVU has not improved by more than "
                f"{train.min_delta:g} of its best in {train.patience} evaluations")

    def next_epoch(self) -> None:
        self._set(epoch=int(self.state.epoch) + 1, batch_in_epoch=0)

    def save_finished(self, step: int) -> None:
        """The last checkpoint, marked finished (a rerun trains no further), and the checkpoints closed."""
        self.checkpoints.save(step, self.state, self.meta | {"finished": True})
        self.checkpoints.close()
        self.done = True

    def _run_epoch(self, epoch: int, step: int, meta: dict, progress: Progress) -> tuple[int, bool]:
        """One epoch from the state's position in it; returns (step, stopped early)."""
        for x in self.data.batches(epoch, int(self.state.batch_in_epoch), self.plan.epoch_steps[epoch]):
            self.state, metrics = self.step_fn(self.state, x)
            step += 1
            progress.step(step, metrics)
            if self.resample_due(step):
                self.resample(step, self.recent_batches(epoch, step), progress)
            stopped = False
            if step % self.plan.eval_every == 0 or step == self.plan.total_steps:
                progress.flush()
                stopped = self._validate(step, progress)
            if step % self.plan.checkpoint_every == 0 and not stopped:  # a stopped run's last save is marked finished
                self.save_checkpoint(step, meta, progress)
            if stopped:
                return step, True
        return step, False

    def resample_due(self, step: int) -> bool:
        return self.resampler is not None and self.resampler.due(step)

    def recent_batches(self, epoch: int, step: int) -> list:
        """The pool of the resample at ``step``: the epoch's batches up to the state's position, as far
        back as the resampler asks, read again from the data (so a resumed run draws the same pool)."""
        done = int(self.state.batch_in_epoch)
        return list(self.data.batches(epoch, max(0, done - self.resampler.pool_size(step)), done))

    def resample(self, step: int, pool: list, progress: Progress) -> None:
        self.state, count = self.resampler.run(step, self.state, pool)
        progress.resampled(step, count)

    def rewind(self, step: int) -> None:
        """Go back to the checkpoint of ``step`` (0: a fresh state), as a sweep does with members that
        saved a step the others did not."""
        self.state = (_initial_state(self.cfg, self.step, self.scan, self.data.d_model) if step == 0 else
                      self.checkpoints.restore(step, self.state)[0])
        self.resumed_from, self.done = step or None, False
        if is_primary():
            self.files.restart_metrics(step or None)

    def save_checkpoint(self, step: int, meta: dict, progress: Progress) -> None:
        try:
            self.checkpoints.save(step, self.state, meta)
        except NonFiniteError:
            progress.flush()  # a non-finite loss is the likelier first sign: its line comes first
            raise progress.diverged(step, "its parameters are no longer finite") from None

    def _validate(self, step: int, progress: Progress) -> bool:
        """Validate, keep the best model, and say whether patience has run out."""
        return self.judge(step, self.validation(), progress)

    def judge(self, step: int, acc: MetricAccumulator | None, progress: Progress) -> bool:
        """Log a validation's result, keep the best model, and say whether patience has run out."""
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
        of training rows with --threshold calibrated) and input scale. Kept for the state it was read
        from: a validation, the best/ it saves and final/ calibrate once."""
        if self._inference is not None and self._inference[0] is self.state:
            return self._inference[1]
        params, threshold, scale = to_host((self.state.params, self.state.threshold, self.state.input_scale))
        if self.cfg.train.decoder_norm == "free":
            params = jax.tree.map(np.asarray, M.effective(params))
        if self.plan.sae.learned_threshold:
            params, threshold = params.replace(threshold_H=None), params.threshold_H  # JumpReLU's own thresholds
        elif self.cfg.sae.threshold == "calibrated" and self.plan.sae.uses_threshold:
            inputs = M.split_batch(self.plan.sae, self.scan.sample_BD)[0]
            threshold = np.float32(M.calibrated_threshold(self.plan.sae, params, inputs * scale))
        self._inference = (self.state, (params, threshold, scale))
        return params, threshold, scale

    def validation(self) -> MetricAccumulator | None:
        """Metrics of the current model over the validation rows, summed over processes (None without any)."""
        batches = self.data.validation_batches()
        if batches is None:
            return None
        acc = evaluate_batches(self.plan.sae, *jax.tree.map(jnp.asarray, self.inference()), batches)
        return summed(acc)

    # the end
    def finish(self, seconds: float, acc: MetricAccumulator | None | bool = True) -> dict:
        """Save final/ (and best/ if no validation made one), write the stats and plots; ``acc``: the
        final validation when the caller has run it (a sweep validates its members in one pass)."""
        tree = self.model_tree()
        acc = self.validation() if acc is True else acc
        final_val = acc.result() if acc is not None else None
        info = {"step": int(self.state.step), "val": final_val}
        save_model(self.files.final, self.plan.sae, tree, info)
        if not self.files.best.exists():
            save_model(self.files.best, self.plan.sae, tree, info)
        _, best = read_config(self.files.best)
        read = _per_process(self.data.bytes_read())
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
        state = self.state
        return {
            "config": self.cfg.settings(),
            "sae": self.plan.sae.to_json(),
            "steps": int(state.step),
            "total_steps": self.plan.total_steps,
            **self.data.counts(),
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
                             title=f"{self.plan.sae.kind} layer {self.cfg.train.layer_idx}")
        if acc is not None:
            plot_density(acc.density_H, self.files.density)


def summed(acc: MetricAccumulator) -> MetricAccumulator:
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


def _initial_state(cfg: TrainConfig, step: Step, scan: ScanResult, d_model: int) -> TrainState:
    """A fresh state, made sharded on the mesh: b_dec at the geometric median or mean of the scaled
    sample (of its targets: a transcoder's MLP outputs, whose mean norm on the sample sets its scale)."""
    sae = step.settings.sae
    inputs, targets = M.split_batch(sae, scan.sample_BD)
    mean_norm = float(np.linalg.norm(targets.astype(np.float64), axis=1).mean()) if sae.is_transcoder \
        else scan.mean_norm
    scale = input_scale(mean_norm, d_model)
    sample = targets * scale
    b_dec = geometric_median(sample) if cfg.train.b_dec_init == "median" else sample.mean(axis=0)
    state = fresh_state(step, jax.random.PRNGKey(cfg.train.seed), b_dec, scale, cfg.train.enc_init,
                        cfg.train.enc_init_scale, cfg.train.decoder_init_norm)
    if sae.learned_threshold:  # JumpReLU starts where the initial encoder fires --target_l0 latents per row
        start = M.calibrated_threshold(dataclasses.replace(sae, top_k=cfg.target_l0), state.params, inputs * scale)
        fill = jax.jit(lambda p: p.replace(threshold_H=jnp.full_like(p.threshold_H, start)),
                       out_shardings=step.shardings.params)
        state = state.replace(params=fill(state.params))
    return state


def _resume(checkpoints: RunCheckpoints, files: RunDir, state: TrainState, overwrite: bool) -> tuple[TrainState, dict]:
    """The newest checkpoint that restores, into ``state``'s structure and placement, and the JSON
    saved with it, or ``state`` itself and {}; one line says which step it resumes from and which
    newer ones were damaged. When every checkpoint is damaged, --overwrite starts the run over."""
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
    return (resumed.state, resumed.meta or {}) if resumed is not None else (state, {})

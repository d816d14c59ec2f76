"""One sweep: its members set up as ``TrainingRun``s on one mesh, the members of a layer sharing
one data source (scanned once, read once per epoch); one compiled step updates every active member
from one batch per layer; each validation reads a layer's validation rows once for all its members.

A member that stops early or diverges leaves the step (which is compiled again without it); the
others go on. Every member checkpoints at the same steps, so a killed sweep resumes all of them
from the newest step they all saved."""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_core.errors import UsageError

from ..distributed import is_primary
from ..loop import TrainingRun, summed
from ..metrics import MetricAccumulator, batch_sums
from ..progress import Progress, TrainError
from ..runtime import announce
from ..sharding import BATCH, DATA, MODEL, check_divisible, make_mesh
from ..sources import open_data
from .config import Member, SweepConfig, SweepError, members
from .memory import check_fits


def source_key(member: Member) -> tuple:
    """Members with the same key read the same rows: one layer (and stream: a transcoder reads the MLP's
    input and output) of one store, or one synthetic model."""
    from ..synthetic.config import is_synthetic

    train = member.cfg.train
    stream = member.cfg.sae_config(d_model=1).stream
    if is_synthetic(train.store):
        return (train.store,)
    return (train.store, train.layer_idx) + ((stream,) if stream != "cond" else ())


def store_width(cfg: SweepConfig) -> int:
    """The store's (or synthetic model's) input width, from its metadata alone."""
    from sae_core.store import open_store

    from ..synthetic.config import from_store_arg, is_synthetic

    store = cfg.train.store
    return from_store_arg(str(store))[1].d_model if is_synthetic(store) else open_store(store).d_model


class SweepRun:
    """The members (``runs``, in grid order), their shared sources, and the loop that trains them."""

    def __init__(self, cfg: SweepConfig, members: list[Member], runs: list[TrainingRun], sources: dict, mesh,
                 runtime: dict, estimate: int):
        self.cfg, self.members, self.runs, self.sources, self.mesh = cfg, members, runs, sources, mesh
        self.runtime, self.estimate = runtime, estimate
        self.keys = {id(r): source_key(m) for m, r in zip(members, runs)}
        self.names = {id(r): m.name for m, r in zip(members, runs)}
        self.finished_before = {id(r) for r in runs if r.done and r.files.finished()}
        self.failed: dict[str, str] = {}
        self.stopped: dict[str, int] = {}
        self.steps_run = 0
        self.loop_seconds = 0.0

    @classmethod
    def setup(cls, cfg: SweepConfig) -> SweepRun:
        """Cheap checks first (every member's settings, the mesh, the memory estimate), then one data
        source per layer, each member's run (restored when resuming) and the common resume step."""
        mesh = make_mesh(cfg.runtime.mesh_data or None, cfg.runtime.mesh_model)
        runtime = announce(mesh, "sweep")
        grid = members(cfg, store_width(cfg))
        for member in grid:
            try:
                check_divisible(mesh, member.cfg.train.batch_size, member.cfg.sae.hidden_dim)
            except UsageError as err:
                raise SweepError(f"member {member.name}: {err}") from None
        estimate = check_fits(grid, store_width(cfg), jax.default_backend(), mesh.shape[DATA], mesh.shape[MODEL])
        if is_primary():
            print(f"sweep of {len(grid)} members into {cfg.out} (about {estimate / 2**30:.2f} GiB planned)", flush=True)
        sources, runs = {}, []
        for member in grid:  # every source's cheap checks (layers, splits, batch) before any member's files
            key = source_key(member)
            try:
                if key not in sources:
                    lanes = member.cfg.train.data_lanes or jax.process_count()
                    sources[key] = open_data(member.cfg.replace(data_lanes=lanes), NamedSharding(mesh, BATCH))
            except UsageError as err:
                raise SweepError(f"member {member.name}: {err}") from None
        for member in grid:
            try:
                runs.append(TrainingRun.setup(member.cfg, mesh, sources[source_key(member)], quiet=True))
            except UsageError as err:
                raise SweepError(f"member {member.name}: {err}") from None
        shown = set()
        for member, r in zip(grid, runs):
            if source_key(member) not in shown and is_primary():
                shown.add(source_key(member))
                for note in r.notes:
                    print(f"{' layer '.join(map(str, source_key(member)))}: {note}")
        sweep = cls(cfg, grid, runs, sources, mesh, runtime, estimate)
        sweep._check_same_plan()
        sweep._line_up()
        return sweep

    def _check_same_plan(self) -> None:
        first = self.runs[0]
        for r in self.runs[1:]:
            if r.plan.epoch_steps != first.plan.epoch_steps:
                raise SweepError(f"members {self.names[id(first)]} and {self.names[id(r)]} have epochs of "
                                 f"{sum(first.plan.epoch_steps)} and {sum(r.plan.epoch_steps)} batches (their layers "
                                 "skip other non-finite rows); sweep those layers separately")

    def _line_up(self) -> None:
        """Bring every unfinished member to the newest step they all saved (a kill between two
        members' saves leaves some a checkpoint ahead); when that step does not restore for one of
        them, all start over."""
        active = self.active()
        steps = {int(r.state.step) for r in active}
        if len(steps) <= 1:
            return
        target = min(steps)
        try:
            for r in active:
                if int(r.state.step) != target:
                    r.rewind(target)
        except Exception as err:  # a damaged or pruned checkpoint: the sweep starts over
            if is_primary():
                print(f"the members' checkpoints do not line up at step {target} ({type(err).__name__}); "
                      "starting every unfinished member over")
            for r in active:
                r.rewind(0)
            return
        if is_primary():
            print(f"resuming every unfinished member from step {target}, the newest step they all saved")

    def active(self) -> list[TrainingRun]:
        return [r for r in self.runs if not r.done and self.names[id(r)] not in self.failed]

    # the loop
    def run(self) -> None:
        from tqdm import tqdm

        active = self.active()
        if not active:
            return
        first = active[0]
        plan, train = first.plan, first.cfg.train
        step = int(first.state.step)
        progress = {id(r): r.progress(False) for r in active}
        bar = tqdm(total=plan.total_steps, initial=step, desc=f"sweep of {len(active)}", unit="step",
                   disable=not (self.cfg.runtime.progress and is_primary()))
        compiled = self._compile(active)
        started, start_step = time.time(), step
        epoch = int(first.state.epoch)
        while epoch < train.epochs and active:
            skip, count = int(active[0].state.batch_in_epoch), plan.epoch_steps[epoch]
            streams = {key: self.sources[key].batches(epoch, skip, count) for key in compiled.keys}
            for _ in range(skip, count):
                xs = tuple(next(streams[key]) for key in compiled.keys)
                states, metrics = compiled.fn(tuple(r.state for r in active), xs)
                step += 1
                leaving = []
                for r, state, m in zip(active, states, metrics):
                    r.state = state
                    self._guard(r, leaving, lambda: progress[id(r)].step(step, m))
                if step % plan.eval_every == 0 or step == plan.total_steps:
                    for r in active:
                        self._guard(r, leaving, progress[id(r)].flush)
                    judged = [r for r in active if r not in leaving]
                    accs = self.validate(judged)
                    for r in judged:
                        if r.judge(step, accs[id(r)], progress[id(r)]):
                            self.stopped[self.names[id(r)]] = step
                            leaving.append(r)
                if step % plan.checkpoint_every == 0:
                    for r in active:
                        if self.names[id(r)] not in self.failed:
                            self._guard(r, leaving, lambda: r.save_checkpoint(step, r.meta, progress[id(r)]))
                bar.update(1)
                bar.set_postfix({"tokens/s": f"{(step - start_step) * train.batch_size / (time.time() - started):.0f}",
                                 "members": len(active) - len(leaving)}, refresh=False)
                if leaving:
                    for r in leaving:
                        self._leave(r, step, progress[id(r)])
                    active = [r for r in active if r not in leaving]
                    if not active:
                        break
                    compiled = self._compile(active)
                    streams = {key: streams[key] for key in compiled.keys}
            else:
                for r in active:
                    r.next_epoch()
            epoch += 1
        self.steps_run, self.loop_seconds = step - start_step, time.time() - started
        leaving = []
        for r in active:
            self._guard(r, leaving, lambda: progress[id(r)].finish(step))
            if r not in leaving:
                r.save_finished(step)
        bar.close()

    def _guard(self, r: TrainingRun, leaving: list, action: Callable[[], object]) -> None:
        """Run ``action`` for member ``r``; a divergence takes the member out of the sweep, not the sweep down."""
        if r in leaving:
            return
        try:
            action()
        except TrainError as err:
            self.failed[self.names[id(r)]] = str(err)
            leaving.append(r)
            if is_primary():
                print(f"member {self.names[id(r)]}: {err}; the other members go on")

    def _leave(self, r: TrainingRun, step: int, progress: Progress) -> None:
        name = self.names[id(r)]
        if name in self.failed:
            r.checkpoints.close()
            return
        progress.finish(step)
        if is_primary():
            print(f"member {name}: {r.stop_line(step)}")
        r.save_finished(step)

    def _compile(self, active: list[TrainingRun]) -> Compiled:
        return Compiled.build(active, [self.keys[id(r)] for r in active], self.mesh)

    def validate(self, runs: list[TrainingRun]) -> dict[int, MetricAccumulator | None]:
        """Every member's validation metrics, each layer's validation rows read once for all its members."""
        groups: dict[tuple, list[TrainingRun]] = {}
        for r in runs:
            groups.setdefault(self.keys[id(r)], []).append(r)
        out: dict[int, MetricAccumulator | None] = {}
        for key, group in groups.items():
            batches = self.sources[key].validation_batches()
            if batches is None:
                out.update({id(r): None for r in group})
                continue
            saes = tuple(r.plan.sae for r in group)
            models = tuple(jax.tree.map(jnp.asarray, r.inference()) for r in group)
            accs = [MetricAccumulator(sae) for sae in saes]
            for x in batches:
                for acc, sums in zip(accs, jax.device_get(_members_sums(saes, models, jnp.asarray(x)))):
                    acc.add(len(x), sums)
            out.update({id(r): summed(acc) for r, acc in zip(group, accs)})
        return out

    # the end
    def finish(self, seconds: float) -> list[dict]:
        """Each member's final/, stats and plots (members finished by an earlier invocation keep theirs),
        then one record per member for the comparison page."""
        todo = [r for r in self.runs if id(r) not in self.finished_before and self.names[id(r)] not in self.failed]
        accs = self.validate(todo)
        for r in todo:
            r.finish(seconds, accs[id(r)])
        tokens_per_s = self.steps_run * self.runs[0].cfg.train.batch_size / max(self.loop_seconds, 1e-9)
        records = []
        for member, r in zip(self.members, self.runs):
            status = ("diverged" if member.name in self.failed else
                      "stopped early" if member.name in self.stopped else "finished")
            records.append({"name": member.name, "settings": member.settings, "run_dir": str(r.files.path),
                            "status": status, "error": self.failed.get(member.name),
                            "tokens_per_second": tokens_per_s if self.steps_run else None,
                            "stats": r.files.read_stats() if status != "diverged" else None})
        return records

    def bytes_read(self) -> int:
        return sum(source.bytes_read() for source in self.sources.values())


@functools.partial(jax.jit, static_argnums=0)
def _members_sums(saes: tuple, models: tuple, x_BD: jax.Array) -> tuple:
    """``metrics.batch_sums`` of several members on one batch, as one program (one dispatch, one fetch)."""
    return tuple(batch_sums(sae, *model, x_BD) for sae, model in zip(saes, models))


class Compiled:
    """The sweep's step for a set of members: ``fn((state, ...), (batch per source, ...))`` ->
    ``((state, ...), (metrics, ...))``, jitted once, the states donated; ``keys``: the sources in
    the order ``fn`` takes their batches."""

    def __init__(self, fn: Callable, keys: list[tuple]):
        self.fn, self.keys = fn, keys

    @classmethod
    def build(cls, runs: list[TrainingRun], run_keys: list[tuple], mesh) -> Compiled:
        keys = list(dict.fromkeys(run_keys))
        slots = [keys.index(k) for k in run_keys]
        steps = [r.step.pure for r in runs]

        def step(states, xs):
            pairs = [one(state, xs[slot]) for one, state, slot in zip(steps, states, slots)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

        shardings = tuple(r.state_shardings for r in runs)
        batch = NamedSharding(mesh, BATCH)
        fn = jax.jit(step, in_shardings=(shardings, tuple(batch for _ in keys)),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
        return cls(fn, keys)

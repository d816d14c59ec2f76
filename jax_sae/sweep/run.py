"""One sweep: its members set up as ``TrainingRun``s on one mesh, the members of a layer sharing
one data source (scanned once, read once per epoch); one compiled step updates every active member
from one batch per layer; each validation reads a layer's validation rows once for all its members,
each member evaluated by its own program (the one it would use trained alone).

On a one-device CPU the members are shared between two threads, each with its own compiled step,
run side by side on the same batch: much of a step (top-k selection, scatters, element-wise work)
keeps one core busy, and one program for all members leaves the other idle. A validation hands the
members' batches to the threads heaviest first.

A member that stops early or diverges leaves the step (which is compiled again without it); the
others go on. Every member checkpoints at the same steps, so a killed sweep resumes all of them
from the newest step they all saved."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

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


SMALL_GRID = 1 << 22
"""Below this summed ``step_cost``, an automatic sweep runs one program: compiling a second one
costs more than it saves on steps that short (a grid of d = 32, h = 64 SAEs; the benchmark's
smallest member, d = 256, h = 1,024, k = 16, costs 12.6M alone)."""


def thread_count(setting: int, mesh, runs: Sequence[TrainingRun]) -> int:
    """How many programs run side by side (``--threads``; 0: 2 on a one-device CPU unless the grid
    is tiny, else 1)."""
    if setting:
        return max(1, min(setting, len(runs)))
    alone = jax.default_backend() == "cpu" and mesh.size == 1 and jax.process_count() == 1
    return min(2, len(runs)) if alone and sum(map(step_cost, runs)) >= SMALL_GRID else 1


def step_cost(run: TrainingRun) -> float:
    """A rough relative cost of one member's step, only to share the members evenly between threads:
    the matrix products grow with latents x width, a top-k selection also with k; a batch-wide one
    (BatchTopK, Matryoshka) selects among 2k candidates per row and costs about as much again
    (measured on this project's 2-core CPU: 1.3-1.7x a TopK step of the same size)."""
    sae = run.plan.sae
    selected = (sae.top_k if sae.row_topk else 2 * sae.top_k + 16) if sae.uses_k else 96
    return sae.hidden_dim * sae.batch_width * (selected + 32)


def validation_cost(run: TrainingRun) -> float:
    """A rough relative cost of one member's validation batch, only to hand the heaviest to a thread
    first: the two matrix products, and on a CPU a per-row top-k that costs about as much again."""
    sae = run.plan.sae
    return sae.hidden_dim * (2 * sae.d_model + (12 * (sae.top_k + 32) if sae.row_topk else 0))


def shares(runs: Sequence[TrainingRun], threads: int) -> list[tuple[int, ...]]:
    """``runs``' indices in ``threads`` groups of about equal cost (largest first to the cheapest
    group), each in grid order; empty groups left out."""
    groups: list[list[int]] = [[] for _ in range(max(1, threads))]
    totals = [0.0] * len(groups)
    for i in sorted(range(len(runs)), key=lambda i: -step_cost(runs[i])):
        cheapest = totals.index(min(totals))
        groups[cheapest].append(i)
        totals[cheapest] += step_cost(runs[i])
    return [tuple(sorted(g)) for g in groups if g]


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
        self.threads = thread_count(cfg.sweep.threads, mesh, runs)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sweep") if self.threads > 1 else None

    @classmethod
    def setup(cls, cfg: SweepConfig) -> SweepRun:
        """Cheap checks first (every member's settings, the mesh, the memory estimate), then one data
        source per layer, each member's run (restored when resuming) and the common resume step."""
        mesh = make_mesh(cfg.runtime.mesh_data or None, cfg.runtime.mesh_model)
        if cfg.sweep.threads > 1 and (mesh.size > 1 or jax.process_count() > 1):
            raise SweepError(f"--threads {cfg.sweep.threads} runs programs side by side, which a mesh of several "
                             "devices cannot do (their collectives would wait on each other); pass --threads 1 or 0")
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
                self._resample(active, step, epoch, progress)
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

    def _resample(self, active: list[TrainingRun], step: int, epoch: int, progress: dict) -> None:
        """Resample the members due to at this step, each layer's pool read once for all of them
        (members share the batch size, so their resamplers ask for the same batches)."""
        pools: dict[tuple, list] = {}
        for r in active:
            if r.resample_due(step):
                key = self.keys[id(r)]
                if key not in pools:
                    pools[key] = r.recent_batches(epoch, step)
                r.resample(step, pools[key], progress[id(r)])

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
        return Compiled.build(active, [self.keys[id(r)] for r in active], self.mesh, shares(active, self.threads),
                              self.pool)

    def _map(self, fn: Callable, items: Sequence) -> list:
        """``fn`` of each item, side by side in the sweep's threads when it has several."""
        return side_by_side(self.pool, [functools.partial(fn, item) for item in items])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

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
            # Each member's own program (as when trained alone), the heaviest first: a free thread takes the next.
            group = sorted(group, key=lambda r: -validation_cost(r))
            models = self._map(lambda r: jax.tree.map(jnp.asarray, r.inference()), group)
            accs = {id(r): MetricAccumulator(r.plan.sae) for r in group}

            def sums(i: int, x_BD: jax.Array):
                return batch_sums(group[i].plan.sae, *models[i], x_BD)

            for x in batches:
                x_BD = jnp.asarray(x)
                if self.pool is None:  # all dispatched, then all fetched: an accelerator is not idle between them
                    parts = jax.device_get([sums(i, x_BD) for i in range(len(group))])
                else:
                    parts = self._map(lambda i, x_BD=x_BD: jax.device_get(sums(i, x_BD)), range(len(group)))
                for r, partial in zip(group, parts):
                    accs[id(r)].add(len(x), partial)
            out.update({id(r): summed(accs[id(r)]) for r in group})
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


def side_by_side(pool: ThreadPoolExecutor | None, calls: list[Callable]) -> list:
    """Each call's result, the calls run in ``pool``'s threads (in this one without a pool, or for
    a single call). Every call ends before the first error is raised: none is left running on
    buffers the caller goes on to use or free."""
    if pool is None or len(calls) <= 1:
        return [call() for call in calls]
    futures = [pool.submit(call) for call in calls]
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]


def _finished(fn: Callable, *args):
    """``fn(*args)``, waited for in this thread: two threads' programs then run side by side."""
    return jax.block_until_ready(fn(*args))


class Compiled:
    """The sweep's step for a set of members: ``fn((state, ...), (batch per source, ...))`` ->
    ``((state, ...), (metrics, ...))``, the states donated; ``keys``: the sources in the order
    ``fn`` takes their batches. One jitted program per share of the members (``shares``), the
    shares run side by side in ``pool``'s threads."""

    def __init__(self, lanes: list[tuple[tuple[int, ...], Callable]], keys: list[tuple],
                 pool: ThreadPoolExecutor | None):
        self.lanes, self.keys, self.pool = lanes, keys, pool
        self.compiled = False

    @classmethod
    def build(cls, runs: list[TrainingRun], run_keys: list[tuple], mesh,
              lanes: list[tuple[int, ...]] | None = None, pool: ThreadPoolExecutor | None = None) -> Compiled:
        keys = list(dict.fromkeys(run_keys))
        lanes = lanes or [tuple(range(len(runs)))]
        return cls([(idx, _program([runs[i] for i in idx], [keys.index(run_keys[i]) for i in idx], mesh, len(keys)))
                    for idx in lanes], keys, pool)

    def fn(self, states: tuple, xs: tuple) -> tuple[tuple, tuple]:
        if len(self.lanes) == 1 and self.lanes[0][0] == tuple(range(len(states))):
            return self.lanes[0][1](states, xs)
        if not self.compiled:  # one after another: XLA compiling two programs at once takes longer than in turn
            self.lanes = [(idx, program.lower(tuple(states[i] for i in idx), xs).compile())
                          for idx, program in self.lanes]
            self.compiled = True
        outs = side_by_side(self.pool, [functools.partial(_finished, program, tuple(states[i] for i in idx), xs)
                                        for idx, program in self.lanes])
        new_states, metrics = [None] * len(states), [None] * len(states)
        for (idx, _), (lane_states, lane_metrics) in zip(self.lanes, outs):
            for j, i in enumerate(idx):
                new_states[i], metrics[i] = lane_states[j], lane_metrics[j]
        return tuple(new_states), tuple(metrics)


def _program(runs: list[TrainingRun], slots: list[int], mesh, n_keys: int) -> Callable:
    """One jitted step for ``runs``, the i-th reading batch ``slots[i]`` of the sources' batches."""
    steps = [r.step.pure for r in runs]

    def step(states, xs):
        pairs = [one(state, xs[slot]) for one, state, slot in zip(steps, states, slots)]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    shardings = tuple(r.state_shardings for r in runs)
    batch = NamedSharding(mesh, BATCH)
    return jax.jit(step, in_shardings=(shardings, tuple(batch for _ in range(n_keys))),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)

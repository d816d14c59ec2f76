"""The report's examples made in parallel: each example's clip written (when the torch side handed
over its audio), read back, its spectrogram computed and its plot drawn.

matplotlib draws in single-threaded Python and Opus encoding costs about as much as a plot, so a
report of many examples spreads them over processes (spawned, not forked: the parent holds JAX's
and torch's threads), started before the model loads so that their start-up overlaps it. Jobs go
out in chunks, at most a few per worker in flight, so decoded audio never piles up in memory.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .plotting import ExamplePlots, log_mels, mel_centres

PARALLEL_FROM = 48
"""Examples from which they are made on several processes: a spawned worker costs about a second
of start-up (numpy, matplotlib, the report's imports), some 12 examples' worth."""
CHUNK = 8
"""Examples per task sent to a worker."""


@dataclass(frozen=True)
class ExampleJob:
    """One example: the feature's activation per frame, drawn into ``plot``; ``clip`` is its audio
    file (None: the plot shows the curve alone), written from ``audio`` ([channels, samples] at
    ``rate`` Hz) first when that is given."""

    curve: np.ndarray
    frame_rate: float
    plot: Path
    offset_seconds: float
    clip: Path | None = None
    audio: np.ndarray | None = None
    rate: int = 0

    def with_audio(self, audio: np.ndarray, rate: int) -> ExampleJob:
        return ExampleJob(self.curve, self.frame_rate, self.plot, self.offset_seconds, self.clip, audio, rate)


def make_examples(jobs: Sequence[ExampleJob]) -> None:
    """Write the jobs' clips, read them back, compute their spectrograms in batches and draw their
    plots, in this process."""
    global _PLOTS
    from sae_core.audio import read_audio, write_audio

    for job in jobs:
        if job.audio is not None:
            job.clip.parent.mkdir(parents=True, exist_ok=True)
            write_audio(job.clip, job.audio, job.rate)
    read = [read_audio(job.clip) if job.clip is not None else None for job in jobs]
    dbs: list = [None] * len(jobs)
    for rate in {found[1] for found in read if found is not None}:
        mine = [i for i, found in enumerate(read) if found is not None and found[1] == rate]
        for i, db in zip(mine, log_mels([read[i][0] for i in mine], rate)):
            dbs[i] = db
    _PLOTS = _PLOTS or ExamplePlots()
    for job, found, db in zip(jobs, read, dbs):
        seconds, centres = (len(found[0]) / found[1], mel_centres(found[1])) if found is not None else (0.0, None)
        _PLOTS.draw(job.curve, job.frame_rate, job.plot, job.offset_seconds, db, seconds, centres)


_PLOTS: ExamplePlots | None = None  # this process's figures, kept from one chunk to the next


def _warm_up() -> None:
    """A worker's start: matplotlib imported and the figures built before the first job arrives."""
    global _PLOTS
    _PLOTS = ExamplePlots()
    _PLOTS.warm_up()


class ExampleWorkers:
    """Makes examples as they are added: on ``workers`` spawned processes for ``expected`` >=
    ``PARALLEL_FROM`` examples (default one per core), else in this process when ``finish`` is
    called. Use as a context manager; ``finish`` waits for every example and raises a worker's error."""

    def __init__(self, expected: int, workers: int = 0, progress: bool = True) -> None:
        workers = workers or os.cpu_count() or 1
        self.processes = workers if workers > 1 and expected >= PARALLEL_FROM else 0
        self._pool = None
        self._pending: deque = deque()
        self._chunk: list[ExampleJob] = []
        self._local: list[ExampleJob] = []
        self._bar = None
        if self.processes:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from tqdm import tqdm

            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_warm_up)
            # The pool starts a process per task submitted: one no-op each starts them all now.
            self._pending.extend((self._pool.submit(int), 0) for _ in range(self.processes))
            self._bar = tqdm(total=expected, desc="examples (clip and plot)", unit="example", disable=not progress)

    def __enter__(self) -> ExampleWorkers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        if self._bar is not None:
            self._bar.close()

    def add(self, job: ExampleJob) -> None:
        if self._pool is None:
            self._local.append(job)
            return
        self._chunk.append(job)
        if len(self._chunk) >= CHUNK:
            self._submit()

    def finish(self) -> None:
        if self._pool is None:
            make_examples(self._local)
            self._local = []
            return
        if self._chunk:
            self._submit()
        while self._pending:
            self._collect()

    def _submit(self) -> None:
        while len(self._pending) >= 4 * self.processes:
            self._collect()
        self._pending.append((self._pool.submit(make_examples, self._chunk), len(self._chunk)))
        self._chunk = []

    def _collect(self) -> None:
        future, count = self._pending.popleft()
        future.result()  # a worker's error raises here
        self._bar.update(count)

"""Per-sample feature scores (``[samples, features]``, float16) kept on disk, not in RAM.

Tag alignment, the clip-firing filter and the LLM's contrast examples need every sample's score
for every feature (its max or mean over the sample's frames). At a study's scale that matrix is
larger than memory (160,000 clips x 32,768 latents x 2 bytes = 10.5 GB per aggregation), so the
pass writes it to a file laid out in column blocks: block ``b`` holds features
``[b * cols, (b + 1) * cols)`` of every sample, contiguously, so reading one block is one
sequential read. ``cols`` is chosen from ``n_samples`` so that one block and the work done on it
(ranks for AUROC: ~50 bytes per entry) stay within a fixed memory budget: memory is flat as the
samples grow; only the file grows. Writes go through a bounded buffer of whole samples; reads use
plain file reads (not a memory map, whose resident pages would count as the process's memory).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

WORK_BUDGET = 256 << 20  # bytes of one column block and the alignment arrays computed from it
BYTES_PER_ENTRY = 50  # the float16 score, its float32 copy, sort order, ranks (float64), masks
BUFFER_BYTES = 64 << 20  # samples gathered before one write per column block
DTYPE = np.float16


def block_columns(n_samples: int, hidden: int, budget: int | None = None) -> int:
    """Features per column block: as many as ``budget`` (default ``WORK_BUDGET``) allows for
    ``n_samples`` rows, at least 16."""
    budget = WORK_BUDGET if budget is None else budget
    return int(min(hidden, max(16, budget // (BYTES_PER_ENTRY * max(n_samples, 1)))))


class SampleScores:
    """One aggregation's ``[n_samples, hidden]`` scores in a file of column blocks (see the module)."""

    def __init__(self, path: Path, n_samples: int, hidden: int, cols: int, owned: bool):
        self.path, self.n_samples, self.hidden, self.cols = Path(path), n_samples, hidden, cols
        self.blocks = -(-hidden // cols)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if owned and os.name == "posix":
            # Nameless from here on: the open descriptor keeps the data, and the file goes with the
            # process however it ends (a SIGKILL too), so no run leaves gigabytes behind.
            self.path.unlink()
        os.ftruncate(self._fd, self.blocks * n_samples * cols * DTYPE().itemsize)  # zeros, sparse
        self._buffer = np.zeros((max(1, min(n_samples, BUFFER_BYTES // (hidden * 2))), hidden), DTYPE)
        self._start, self._filled = 0, 0
        self._closer = weakref.finalize(self, _close, self._fd, self.path if owned else None)

    @classmethod
    def create(cls, directory: str | os.PathLike | None, name: str, n_samples: int, hidden: int,
               cols: int | None = None) -> SampleScores:
        """A fresh score file in ``directory`` (default: the system's temporary directory). On POSIX
        it has no name once open (its space is freed when the process ends, even by SIGKILL);
        elsewhere it is removed when the object is closed or collected."""
        directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".{name}-", suffix=".f16", dir=directory)
        os.close(fd)
        return cls(Path(path), n_samples, hidden, cols or block_columns(n_samples, hidden), owned=True)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_samples, self.hidden

    # writing
    def write(self, samples: np.ndarray, values_SH: np.ndarray) -> None:
        """Scores of ``samples`` (ascending, consecutive runs are the fast case)."""
        values_SH = np.asarray(values_SH, DTYPE)
        for i, sample in enumerate(np.asarray(samples, np.int64)):
            if self._filled and (sample != self._start + self._filled or self._filled == len(self._buffer)):
                self.flush()
            if not self._filled:
                self._start = int(sample)
            self._buffer[self._filled] = values_SH[i]
            self._filled += 1

    def flush(self) -> None:
        """Write the buffered samples: one write per column block."""
        if not self._filled:
            return
        rows = self._buffer[: self._filled]
        for b in range(self.blocks):
            lo, hi = b * self.cols, min((b + 1) * self.cols, self.hidden)
            part = np.zeros((self._filled, self.cols), DTYPE)
            part[:, : hi - lo] = rows[:, lo:hi]
            os.pwrite(self._fd, part.tobytes(), self._offset(b, self._start))
        self._filled = 0

    def seal(self) -> None:
        """Write what is buffered and let the buffer go: the scores are complete."""
        self.flush()
        self._buffer = np.zeros((0, self.hidden), DTYPE)

    # reading
    def block(self, b: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Features ``[b * cols, ...)`` of every sample (or of ``rows``): ``[samples, width]``."""
        self.flush()
        lo, hi = b * self.cols, min((b + 1) * self.cols, self.hidden)
        size = self.n_samples * self.cols * DTYPE().itemsize
        data = os.pread(self._fd, size, self._offset(b, 0))
        out = np.frombuffer(data, DTYPE).reshape(self.n_samples, self.cols)[:, : hi - lo]
        return out[rows] if rows is not None else out

    def iter_blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(first feature, last feature + 1, scores)`` for each column block in turn."""
        for b in range(self.blocks):
            yield b * self.cols, min((b + 1) * self.cols, self.hidden), self.block(b, rows)

    def columns(self, features) -> Iterator[tuple[int, np.ndarray]]:
        """``(feature, its scores over every sample)`` for ``features``, each block read once."""
        features = sorted({int(f) for f in features})
        b_last, block = -1, None
        for feature in features:
            b = feature // self.cols
            if b != b_last:
                b_last, block = b, self.block(b)
            yield feature, block[:, feature - b * self.cols]

    def column(self, feature: int) -> np.ndarray:
        return next(self.columns([feature]))[1]

    def dense(self) -> np.ndarray:
        """The whole matrix in memory (small stores and tests)."""
        return np.concatenate([block for _, _, block in self.iter_blocks()], axis=1) if self.blocks else \
            np.zeros((self.n_samples, 0), DTYPE)

    def close(self) -> None:
        self._closer()

    def _offset(self, b: int, sample: int) -> int:
        return (b * self.n_samples + sample) * self.cols * DTYPE().itemsize


def _close(fd: int, path: Path | None) -> None:
    os.close(fd)
    if path is not None:
        path.unlink(missing_ok=True)


def as_scores(scores) -> SampleScores | DenseScores:
    """``scores`` as something with ``iter_blocks``/``columns``: a dense array is wrapped as one block."""
    return scores if hasattr(scores, "iter_blocks") else DenseScores(np.asarray(scores))


class DenseScores:
    """An in-memory ``[samples, features]`` array with ``SampleScores``'s reading interface."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n_samples, self.hidden = array.shape
        self.shape = array.shape

    def iter_blocks(self, rows: np.ndarray | None = None):
        yield 0, self.hidden, self.array[rows] if rows is not None else self.array

    def columns(self, features):
        for feature in sorted({int(f) for f in features}):
            yield feature, self.array[:, feature]

    def column(self, feature: int) -> np.ndarray:
        return self.array[:, feature]

    def dense(self) -> np.ndarray:
        return self.array

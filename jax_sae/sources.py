"""Where a training run's rows come from: an activation store (``StoreData``) or a synthetic model
generated on the device (``SyntheticData``, ``--store synthetic:NAME``). The run asks either the
same questions: cheap checks when opened, then a scan (input scale, a sample for b_dec and the
threshold, non-finite rows), each epoch's batch count, an epoch's batches from any position, the
validation batches, and what it read."""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from sae_core.store import open_store

from .config import TrainConfig
from .data import DataError, ScanResult, merge_scans, prefetch, scan_rows, split_samples
from .distributed import gather_host, global_batch
from .order import epoch_batches, epoch_lengths


def check_batch(cfg: TrainConfig, train_rows: int) -> None:
    """Refuse a batch larger than the training rows (before they are read)."""
    if train_rows // cfg.train.batch_size == 0:
        raise DataError(f"--batch_size {cfg.train.batch_size} exceeds the {train_rows} training rows; lower it")


def open_data(cfg: TrainConfig, batch_sharding):
    """The run's data source, after its cheap checks (nothing read yet beyond metadata)."""
    from .synthetic.config import is_synthetic

    return SyntheticData(cfg, batch_sharding) if is_synthetic(cfg.train.store) else StoreData(cfg, batch_sharding)


class StoreData:
    """Rows of one layer of an activation store: whole samples split into training and validation,
    read in the shuffled, laned order of ``order``; each process reads only its devices' lanes."""

    def __init__(self, cfg: TrainConfig, batch_sharding):
        train = cfg.train
        self.cfg, self.sharding = cfg, batch_sharding
        self.store = open_store(train.store)
        self.stream = cfg.sae_config(d_model=1).stream  # a transcoder's: [MLP input | MLP output]
        self.store.check_layer(train.layer_idx, self.stream)
        self.d_model, self.model = self.store.d_model, self.store.meta.model
        self.split = split_samples(self.store, val_fraction=train.val_fraction, seed=cfg.data_seed,
                                   num_samples=train.num_samples, max_tokens=train.max_tokens,
                                   val_max_tokens=train.val_max_tokens,
                                   by_chunks_of=self.store.chunk_rows(train.layer_idx, self.stream)
                                   if train.val_split == "chunks" else None)
        check_batch(cfg, self.split.train_rows)
        self.read_lanes = local_lanes(batch_sharding, train.batch_size, self.store.width(self.stream), train.data_lanes)
        self.scanned: ScanResult | None = None
        self.val_bad = np.zeros(0, np.int64)
        self.val_chunks: np.ndarray | None = None  # the chunks holding validation rows, in order
        self.evaluations = 0  # validations run so far (by this process, since it started)

    def scan(self) -> ScanResult:
        """The pass over the training rows (norms, a sample for b_dec, NaN/Inf rows) and the validation
        rows' NaN/Inf rows; non-finite rows stop the run unless --skip_nonfinite. Each process scans
        every P-th chunk (P processes) and the parts are merged: the same result as one process."""
        if self.scanned is not None:
            return self.scanned  # a sweep's members share the source: one pass
        train, split = self.cfg.train, self.split
        part = (jax.process_index(), jax.process_count())
        self.scanned = _merged(scan_rows(self.store, train.layer_idx, split.train_samples, seed=self.cfg.data_seed,
                                         progress=self.cfg.runtime.progress, part=part, stream=self.stream))
        if len(split.val_samples):
            self.val_bad = _merged(scan_rows(self.store, train.layer_idx, split.val_samples, seed=self.cfg.data_seed,
                                             progress=False, part=part, stream=self.stream)).nonfinite_rows
        bad = np.concatenate([self.scanned.nonfinite_rows, self.val_bad])
        if len(bad) and not train.skip_nonfinite:
            raise DataError(
                f"layer {train.layer_idx} of {train.store} has {len(bad)} non-finite (NaN/Inf) rows (first: row "
                f"{bad[0]}); pass --skip_nonfinite to train without them, or re-extract")
        return self.scanned

    def epoch_lengths(self) -> list[int]:
        train = self.cfg.train
        return epoch_lengths(self.store, train.layer_idx, self.split.train_samples, train.batch_size, seed=self.cfg.data_seed,
                             epochs=train.epochs, lanes=train.data_lanes, exclude_rows=self.scanned.nonfinite_rows,
                             stream=self.stream)

    def notes(self, lengths: list[int]) -> list[str]:
        bad = len(self.scanned.nonfinite_rows) + len(self.val_bad)
        notes = list(self.split.notes) + ([f"skipping {bad} non-finite rows"] if bad else [])
        if self.cfg.train.data_lanes > 1:
            used = min(lengths) * self.cfg.train.batch_size
            notes.append(f"{self.cfg.train.data_lanes} data lanes: each epoch uses at least {used} of the "
                         f"{self.split.train_rows - len(self.scanned.nonfinite_rows)} training rows")
        return notes

    def batches(self, epoch: int, skip: int, count: int) -> Iterator[jax.Array]:
        """Epoch ``epoch``'s batches from the ``skip``-th on, placed on the mesh, read ahead in a thread."""
        train = self.cfg.train
        rows = epoch_batches(self.store, train.layer_idx, self.split.train_samples, train.batch_size, seed=self.cfg.data_seed,
                             epoch=epoch, skip=skip, exclude_rows=self.scanned.nonfinite_rows, lanes=train.data_lanes,
                             read_lanes=self.read_lanes, batches=count, stream=self.stream)
        return prefetch(rows, transform=lambda x: global_batch(x, self.sharding))

    def validation_batches(self) -> Iterator[np.ndarray] | None:
        """This process's share of the validation rows (None without any), read ahead in a thread. Each
        process evaluates every P-th of the chunks holding validation rows; who takes the odd chunk turns
        with each validation."""
        train, samples = self.cfg.train, self.split.val_samples
        if not len(samples):
            return None
        exclude = self.val_bad if len(self.val_bad) else None
        if self.val_chunks is None:
            kept = self.store.kept_rows_per_chunk(train.layer_idx, samples=samples, exclude_rows=exclude,
                                                  stream=self.stream)
            self.val_chunks = np.flatnonzero(kept)
        processes = jax.process_count()
        mine = self.val_chunks[(jax.process_index() + self.evaluations) % processes::processes]
        self.evaluations += 1
        # Read ahead in a thread, as training's batches are: a validation from a bucket waits on its
        # first chunk only, not on every chunk's round trip in turn.
        return prefetch(self.store.iter_rows(train.layer_idx, train.batch_size, samples=samples, exclude_rows=exclude,
                                             chunks=mine, stream=self.stream))

    def counts(self) -> dict:
        split = self.split
        return {"train_rows": split.train_rows, "val_rows": split.val_rows, "train_samples": len(split.train_samples),
                "val_samples": len(split.val_samples)}

    def bytes_read(self) -> int:
        return self.store.bytes_read


class SyntheticData:
    """Batches drawn on the device from a synthetic model (``jax_sae.synthetic``; one row is one
    sample): batch i of epoch e comes from the key (--data_seed, stream 0, e, i) alone, so a resumed run
    draws the same batches, and a 200M-sample run needs no disk. Validation uses the same ``val_rows``
    samples every time, from their own stream, drawn once and kept on the device (16,384 x 768 float32
    is 48 MiB; drawing them again at each of a run's 20 validations cost a third as much as its
    training batches); the scan draws from a third stream."""

    SAMPLE_ROWS = 8192  # the scan's rows (input scale, b_dec, calibrated threshold)
    MAX_VAL_ROWS = 16_384  # fresh samples: a fixed 16k set measures the FVU to about 1%

    def __init__(self, cfg: TrainConfig, batch_sharding):
        from .synthetic import config as synthetic_config

        train = cfg.train
        self.cfg, self.sharding = cfg, batch_sharding
        if cfg.sae.transcoder != "none":
            raise DataError("a synthetic model has no MLP to transcode: --transcoder needs a store extracted with --mlp")
        self.name, synth = synthetic_config.from_store_arg(str(train.store))
        self.train_rows = train.max_tokens or 100_000_000
        check_batch(cfg, self.train_rows)
        self.val_rows = 0 if train.val_fraction == 0 else min(train.val_max_tokens, self.MAX_VAL_ROWS)
        self.val_rows -= self.val_rows % train.batch_size
        self.synth = synth
        self.d_model, self.model = synth.d_model, f"synthetic:{self.name}"
        self._model = self._generate = None
        self._scanned: ScanResult | None = None
        self._validation: list[jax.Array] | None = None

    def _draw(self, stream: int, *path: int) -> jax.Array:
        """The batch of key (--data_seed, stream, *path), made already placed on the mesh."""
        from .synthetic import load
        from .synthetic.sample import key, x_only

        if self._generate is None:  # built on first use: the scan, after the run's cheap checks
            self._model, size = load(self.synth), self.cfg.train.batch_size
            self._generate = jax.jit(lambda model, k: x_only(model, k, size), out_shardings=self.sharding)
        k = jax.random.fold_in(key(self.cfg.data_seed), stream)
        for index in path:
            k = jax.random.fold_in(k, index)
        return self._generate(self._model, k)

    def scan(self) -> ScanResult:
        if self._scanned is not None:
            return self._scanned
        batches = -(-self.SAMPLE_ROWS // self.cfg.train.batch_size)
        rows = np.concatenate([np.asarray(self._draw(3, i)) for i in range(batches)])[: self.SAMPLE_ROWS]
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        self._scanned = ScanResult(nonfinite_rows=np.zeros(0, np.int64), mean_norm=float(norms.mean()), sample_BD=rows,
                          norm_C=norms.sum()[None], count_C=np.array([len(rows)]), keys=np.arange(len(rows)))
        return self._scanned

    def epoch_lengths(self) -> list[int]:
        return [self.train_rows // self.cfg.train.batch_size] * self.cfg.train.epochs

    def notes(self, lengths: list[int]) -> list[str]:
        return [f"synthetic data {self.name}: {self.train_rows} fresh samples per epoch, {self.val_rows} for validation"]

    def batches(self, epoch: int, skip: int, count: int) -> Iterator[jax.Array]:
        return (self._draw(0, epoch, i) for i in range(skip, count))

    def validation_batches(self) -> Iterator[jax.Array] | None:
        if not self.val_rows:
            return None
        if self._validation is None:
            self._validation = [self._draw(1, i) for i in range(jax.process_index(),
                                                                 self.val_rows // self.cfg.train.batch_size,
                                                                 jax.process_count())]
        return iter(self._validation)

    def counts(self) -> dict:
        return {"train_rows": self.train_rows, "val_rows": self.val_rows, "train_samples": self.train_rows,
                "val_samples": self.val_rows}

    def bytes_read(self) -> int:
        return 0


def local_lanes(sharding, batch_size: int, d_model: int, lanes: int) -> tuple[int, ...]:
    """The lanes (equal slices of a batch's rows) that overlap this process's devices' rows."""
    per_lane = batch_size // lanes
    mine = set()
    for index in sharding.addressable_devices_indices_map((batch_size, d_model)).values():
        rows = index[0]
        start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
        mine.update(range(start // per_lane, -(-stop // per_lane)))
    return tuple(sorted(mine))


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

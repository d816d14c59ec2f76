"""``python -m bench.read_share_bench``: bytes each training process reads from the store, for
P = 1 and P = 2 processes on this machine (gloo collectives on localhost), and tokens/s per process.

One synthetic store (``--rows`` x ``--d`` float32, the store's usual ~8 MB chunks); the same training
command with ``--data_lanes 2`` and a 2-device data mesh: one process with 2 CPU devices, or two
processes with 1 device each. Each run's ``training_stats.json`` records ``bytes_read_per_process``
(rows read through the store: the scan, the training lanes, validation); a third run, P = 1 with
``--val_split samples``, shows what validation costs when its samples are scattered over the store. Tokens/s per process is
the tokens of the batches a process holds (its share of each global batch) over the run's wall
time. The two processes share this machine's cores, so their speed is a floor, not what two
hosts would reach.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import report, run_bench, summarize, target


@dataclass(frozen=True)
class ReadShareConfig:
    """Options of ``python -m bench.read_share_bench``."""

    rows: int = 400_000
    """Store rows."""
    d: int = 256
    """Row width."""
    hidden_dim: int = 2048
    """Latents."""
    batch_size: int = 4096
    """Global batch."""
    epochs: int = 1
    """Passes over the rows."""
    repeats: int = 2
    """Runs of each process count."""
    compare_samples: bool = True
    """Also run P = 1 with ``--val_split samples`` (validation samples scattered over the store, the
    split before issue 16), to show what holding out whole chunks saves."""


def _store(cfg: ReadShareConfig, path: Path) -> None:
    from sae_core import store as S

    rng = np.random.default_rng(0)
    n_samples, per = cfg.rows // 500, 500
    meta = S.StoreMeta(model="synthetic", layers=(0,), d_model=cfg.d, n_codebooks=4, frame_rate=50.0,
                       sampling_rate=32000, dtype="float32", mode="generate", n_samples=n_samples,
                       n_rows=n_samples * per, n_units=1)
    samples = [{"index": i, "prompt": f"s{i}", "source_id": f"s{i}", "tags": [], "n_frames": per}
               for i in range(n_samples)]
    store = S.create_store(path, meta, samples, [per] * n_samples)
    directions = rng.normal(size=(1024, cfg.d)).astype(np.float32)
    for start in range(0, meta.n_rows, 65_536):
        n = min(65_536, meta.n_rows - start)
        codes = (rng.random((n, 1024)) < 0.01).astype(np.float32) * rng.exponential(size=(n, 1024)).astype(np.float32)
        store.write_rows(S.acts_name(0), start, codes @ directions)
    store.commit_unit(0, "shard-0-of-1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(cfg: ReadShareConfig, store: Path, out: Path, processes: int,
           val_split: str = "chunks") -> tuple[list[int], float, int]:
    """(bytes read per process, wall seconds, training tokens) of one run."""
    args = [sys.executable, "-m", "jax_sae.train", "--store", str(store), "--layer_idx", "0", "--hidden_dim",
            str(cfg.hidden_dim), "--top_k", "32", "--batch_size", str(cfg.batch_size), "--epochs", str(cfg.epochs),
            "--mesh_data", "2", "--data_lanes", "2", "--out", str(out), "--overwrite", "--no-progress",
            "--val_split", val_split]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}
    port = _free_port()
    extra = (lambda i: ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                        "--process_id", str(i)]) if processes > 1 else (lambda i: [])
    started = time.perf_counter()
    procs = [subprocess.Popen(args + extra(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"training failed:\n{err[-2000:]}")
    seconds = time.perf_counter() - started
    stats = json.loads(next(out.rglob("training_stats.json")).read_text())
    return stats["bytes_read_per_process"], seconds, stats["steps"] * cfg.batch_size


def run(cfg: ReadShareConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="read-share-") as tmp:
        store = Path(tmp) / "store"
        _store(cfg, store)
        figures, read, speed, shares = {}, {}, {}, []
        for repeat in range(cfg.repeats):
            for processes in (1, 2):  # alternate, so drift in the machine's load hits both
                per, seconds, tokens = _train(cfg, store, Path(tmp) / f"run{processes}-{repeat}", processes)
                read.setdefault(processes, []).append(per)
                speed.setdefault(processes, []).append(tokens / processes / seconds)
                print(f"P={processes} repeat {repeat}: bytes read per process {per}, {seconds:.1f} s", flush=True)
            shares.append(max(read[2][-1]) / read[1][-1][0])
            if cfg.compare_samples:
                per, seconds, _ = _train(cfg, store, Path(tmp) / f"run-samples-{repeat}", 1, "samples")
                read.setdefault("samples", []).append(per)
                print(f"P=1 --val_split samples repeat {repeat}: bytes read {per}, {seconds:.1f} s", flush=True)
    for processes in (1, 2):
        figures[f"P={processes}: MB read per process"] = summarize(
            [n / 1e6 for per in read[processes] for n in per], "MB")
        figures[f"P={processes}: tokens/s per process"] = summarize(speed[processes], "tok/s")
    figures["largest P=2 share of the same repeat's P=1 bytes"] = summarize(shares, "ratio")
    if cfg.compare_samples:
        figures["P=1, --val_split samples: MB read"] = summarize([per[0] / 1e6 for per in read["samples"]], "MB")
    share = max(shares)
    speed_ratio = figures["P=2: tokens/s per process"]["median"] / figures["P=1: tokens/s per process"]["median"]
    derived = {"tokens/s per process, P=2 / P=1 (one shared machine)": speed_ratio}
    if cfg.compare_samples:
        derived["P=1 bytes, --val_split chunks / samples"] = read[1][0][0] / read["samples"][0][0]
    return report("read_share_bench", figures, params=vars(cfg) | {"store_mb": cfg.rows * cfg.d * 4 / 1e6},
                  derived=derived,
                  targets=[target("bytes per process at P=2", share, "<= ~1/2 of P=1 (0.55)", share <= 0.55)])


def main(argv: list[str] | None = None):
    return run_bench(ReadShareConfig, run, argv, "read_share_bench", __doc__.split("\n")[0])


if __name__ == "__main__":
    main()

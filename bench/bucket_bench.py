"""``python -m bench.bucket_bench``: training from a bucket with slow requests against the same run
from a local disk.

One store is written to a local directory and, the same bytes, to a bucket on a local
S3-compatible server (moto) reached through ``bench.faults.proxy`` with a fixed delay added to
every request (``--latencies_ms``). The same SAE is trained from each, in this process, and the
training loop (steps, validations, checkpoints; not the set-up's pass over the rows) is timed:
tokens/s, and per step the bytes read from the store and the requests the bucket answered. The
goal (issue 30): at 50 ms per request, at least 80% of the local run's tokens/s. What hides the
latency: training's batches are read ahead in a thread (3 batches deep, ``data.prefetch``), the
chunks a batch group needs are requested together (``Store._read_ranges``), and validation reads
ahead the same way.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .common import report, run_bench, summarize, target


@dataclass(frozen=True)
class BucketBenchConfig:
    """Options of ``python -m bench.bucket_bench``."""

    latencies_ms: tuple[float, ...] = (0.0, 20.0, 50.0, 100.0)
    """Delay added to every bucket request, one run each."""
    rows: int = 262_144
    """Rows of the store."""
    d_model: int = 256
    hidden_dim: int = 2048
    top_k: int = 32
    batch_size: int = 4096
    epochs: int = 2
    repeats: int = 1
    """Runs per setting (the median is reported)."""


def _train(store: str, out: Path, cfg: BucketBenchConfig):
    from jax_sae.loop import TrainingRun
    from jax_sae.train import TrainConfig

    train_cfg = TrainConfig.of(store=store, layer_idx=0, out=str(out), sae_type="batch_topk", hidden_dim=cfg.hidden_dim,
                               top_k=cfg.top_k, batch_size=cfg.batch_size, epochs=cfg.epochs, progress=False,
                               patience=0, overwrite=True, val_max_tokens=16_384)
    run = TrainingRun.setup(train_cfg)
    read_before = run.data.bytes_read()
    started = time.perf_counter()
    run.run()
    seconds = time.perf_counter() - started
    steps = int(run.state.step)
    read = run.data.bytes_read() - read_before
    run.finish(seconds)
    return steps, seconds, read


def run(cfg: BucketBenchConfig) -> dict:
    from moto.server import ThreadedMotoServer

    from bench.faults.proxy import FaultProxy
    from tests.synthetic import planted_dictionary, sparse_data, write_store

    work = Path(tempfile.mkdtemp(prefix="bucket-bench-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port
    import os

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/bench", method="PUT"), timeout=30).read()
    x = sparse_data(planted_dictionary(cfg.d_model, 4 * cfg.d_model, seed=0), cfg.rows, active=8, noise=0.05, seed=0)
    write_store(work / "local", x, rows_per_sample=256)
    write_store(f"s3://bench/store?endpoint=http://127.0.0.1:{port}", x, rows_per_sample=256)
    figures, derived = {}, {}
    try:
        settings = [("local", None)] + [(f"bucket {ms:g} ms", ms) for ms in cfg.latencies_ms]
        for name, ms in settings:
            rates, bytes_per_step, requests_per_step = [], [], []
            for repeat in range(cfg.repeats):
                proxy = None
                if ms is None:
                    store = str(work / "local")
                else:
                    proxy = FaultProxy(port, latency=(ms / 1000, ms / 1000)).start()
                    store = f"s3://bench/store?endpoint={proxy.endpoint}"
                before = proxy.requests if proxy else 0
                steps, seconds, read = _train(store, work / f"runs-{repeat}", cfg)
                rates.append(steps * cfg.batch_size / seconds)
                bytes_per_step.append(read / steps)
                requests_per_step.append(((proxy.requests - before) / steps) if proxy else 0.0)
                if proxy:
                    proxy.stop()
                shutil.rmtree(work / f"runs-{repeat}", ignore_errors=True)
            figures[name] = summarize(rates, "tokens/s")
            derived[name] = {"bytes_read_per_step": bytes_per_step[0], "requests_per_step": requests_per_step[0]}
            print(f"{name:>16}: {figures[name]['median']:.0f} tokens/s, {bytes_per_step[0] / 2**20:.2f} MiB and "
                  f"{requests_per_step[0]:.2f} requests per step")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    local = figures["local"]["median"]
    for name in figures:
        derived[name]["ratio_to_local"] = figures[name]["median"] / local
    at_50 = figures.get("bucket 50 ms", {}).get("median", float("nan")) / local
    return report("bucket_bench", figures, params=vars(cfg), derived=derived,
                  targets=[target("tokens/s from a bucket at 50 ms per request, as a fraction of local", at_50,
                                  ">= 0.8", at_50 >= 0.8)])


def main(argv: list[str] | None = None):
    return run_bench(BucketBenchConfig, run, argv, "bucket_bench",
                     "Training from a bucket with slow requests against the same run from a local disk.")


if __name__ == "__main__":
    main()

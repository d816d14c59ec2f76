"""``python -m bench.train_memory_bench``: the trainer's peak resident memory on stores of three
sizes. Training streams from the store (chunk-shuffled, bounded prefetch) and validates by
streaming too, so peak RSS should stay flat as the store grows.

Each size: a synthetic float32 store written chunk by chunk, then ``jax_sae.train`` for one
epoch in a fresh process (so its ``ru_maxrss`` is its own), run ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .common import report, summarize

CHILD = """
import json, resource, sys, time
from jax_sae.train import TrainConfig, train
cfg = TrainConfig.of(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
stats = train(cfg)
print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, "fvu": stats["final_val"]["fvu"]}))
"""


def write_store(path: Path, rows: int, d: int, rows_per_sample: int = 500, chunk: int = 100_000, seed: int = 0):
    """A complete one-layer store of ``rows`` low-rank-plus-noise rows, written in chunks."""
    from sae_core.store import StoreMeta, acts_name, create_store

    n_samples = rows // rows_per_sample
    meta = StoreMeta(model="synthetic", layers=(0,), d_model=d, n_codebooks=4, frame_rate=50.0,
                     sampling_rate=32000, dtype="float32", mode="generate", n_samples=n_samples,
                     n_rows=n_samples * rows_per_sample, n_units=1)
    samples = [{"index": i, "prompt": f"sample {i}", "source_id": f"syn-{i}", "tags": [],
                "n_frames": rows_per_sample} for i in range(n_samples)]
    store = create_store(path, meta, samples, [rows_per_sample] * n_samples)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, d)).astype(np.float32)
    for start in range(0, meta.n_rows, chunk):
        n = min(chunk, meta.n_rows - start)
        x = (rng.standard_normal((n, 64), dtype=np.float32) @ basis
             + 0.1 * rng.standard_normal((n, d), dtype=np.float32))
        store.write_rows(acts_name(0), start, x)
    store.commit_unit(0, "shard-0-of-1")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_memory_bench", description=__doc__)
    parser.add_argument("--rows", default="100000,400000,1600000", help="store sizes (rows), comma-separated")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--hidden_dim", type=int, default=4096)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="train-mem-"))
    figures, derived = {}, {}
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            store = root / f"store-{rows}"
            if not store.exists():
                print(f"writing {rows} x {args.d} store ({rows * args.d * 4 / 2**30:.2f} GiB)", flush=True)
                write_store(store, rows, args.d)
            runs = []
            for repeat in range(args.repeats):
                cfg = dict(sae_type="batch_topk", layer_idx=0, hidden_dim=args.hidden_dim, top_k=args.top_k,
                           batch_size=args.batch_size, epochs=1, store=str(store), out=str(root / f"models-{repeat}"),
                           progress=False, patience=0, overwrite=True, val_fraction=0.05)
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"training on {rows} rows failed:\n{out.stderr[-2000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{rows} rows, run {repeat}: {runs[-1]}", flush=True)
            figures[f"{rows} rows: peak RSS"] = summarize([r["rss_mib"] for r in runs], "MiB")
            figures[f"{rows} rows: tokens/s"] = summarize([rows / r["seconds"] for r in runs], "tok/s")
        sizes = [int(r) for r in args.rows.split(",")]
        small, large = figures[f"{sizes[0]} rows: peak RSS"], figures[f"{sizes[-1]} rows: peak RSS"]
        derived["peak RSS growth, largest vs smallest store (MiB)"] = large["median"] - small["median"]
        derived["store size ratio"] = sizes[-1] / sizes[0]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    report("train_memory_bench", figures, params=vars(args), derived=derived)


if __name__ == "__main__":
    main()

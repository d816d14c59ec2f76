"""``python -m bench``: every CPU benchmark in turn, each in its own process with its default
settings (about 75 minutes on 2 cores); ``--only train_bench,aux_bench`` picks some. Each prints
its table and writes ``bench/results/<name>.json``; BENCHMARKS.md records them with their
commands. The fault-injection suite runs only when named (``--only faults``): it checks what
the stages survive rather than measuring them, and mounts a tmpfs where it may. The GPU check is
separate: ``bench/gpu_check.sh`` on a GPU machine."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SUITE = ("store_bench", "extract_bench", "train_bench", "step_pieces", "aux_bench", "train_memory_bench",
         "discovery_bench", "quality_bench", "report_bench")
ON_REQUEST = ("faults",)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(SUITE), help="comma-separated benchmarks to run")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SUITE + ON_REQUEST]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITE + ON_REQUEST)}")
    failed = []
    for name in names:
        print(f"\n### python -m bench.{name}", flush=True)
        started = time.time()
        if subprocess.run([sys.executable, "-m", f"bench.{name}"]).returncode:
            failed.append(name)
        print(f"### {name}: {time.time() - started:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

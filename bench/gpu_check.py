"""``python -m bench.gpu_check``: everything an accelerator machine should show, in one JSON.

Run by ``bench/gpu_check.sh`` with the machine's own jax and torch; installs nothing. Each part
runs in its own process with its own time limit, and the JSON is rewritten after each part, so
a part that fails or runs out of time still leaves the others' results:

1. ``environment``: nvidia-smi, what JAX and torch see;
2. ``gpu_tests``: the ``gpu``-marked tests (sparse gradients vs autodiff, bfloat16 vs float32);
3. ``train_step``: ``bench.gpu_bench`` (BatchTopK step at d=2048, h=65536, k=64, batch 8192);
4. ``extract``: ``bench.extract_bench`` on CUDA in float16 with ``random:musicgen-small``
   (musicgen-small's widths, random weights): capture overhead vs plain ``generate()`` and the
   teacher-forced speed-up;
5. ``pipeline``: extract -> train -> discover -> report on ``tiny-random`` through
   ``python -m launch --platform gpu``, and where each stage ran (the ``runtime`` records that
   train and discover write);
6. ``sweep``: ``bench.sweep_bench --sizes gpu``: 8 SAEs at d=1,024, h=8,192 as one sweep against
   the same 8 one after another (goal: at least 3x faster);
7. ``study``: ``python -m launch.study`` on ``random:musicgen-small`` (layers 6 and 12, TopK
   x4, k = 32; 4 features steered per SAE over 6 seeds against 4 controls; ``tiny-random-clap``,
   as the machine reaches no model hub): every stage on the GPU, and how long each took; then
   ``--plan --plan_timing`` for the paper's study of musicgen-small (5,521 prompts of 10 s, its 5
   layers and 20 SAEs): the hours each stage would take on this GPU;
8. ``synthbench``: ``bench.synthbench`` at the published scale: BatchTopK and Matryoshka, width
   4,096, k = 25, on 200M samples of SynthSAEBench-16k drawn on the GPU, scored on 500,000 fresh
   samples, beside the published rows (``--no_synthbench`` leaves it out: it is the long part).

``--quick --allow_cpu`` runs every part at toy sizes on a CPU, which is how it is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sae_core.files import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _run(name: str, argv: list[str], timeout: int, env: dict | None = None) -> dict:
    """Run one part; its status, seconds and the tail of its output."""
    print(f"[gpu_check] {name}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        status, output = ("ok" if proc.returncode == 0 else f"failed ({proc.returncode})"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status, output = f"timed out after {timeout} s", (err.stdout or b"").decode() + (err.stderr or b"").decode()
    seconds = time.perf_counter() - started
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s", flush=True)
    if status != "ok":
        print(output[-3000:], flush=True)
    return {"status": status, "seconds": round(seconds, 1), "output_tail": output[-2000:]}


def _environment() -> dict:
    probe = ("import json, jax, torch; print(json.dumps({'jax': jax.__version__, 'jax_backend': jax.default_backend(), "
             "'jax_devices': [str(d) for d in jax.devices()], 'torch': torch.__version__, "
             "'torch_cuda': torch.cuda.is_available(), 'torch_device': torch.cuda.get_device_name(0) "
             "if torch.cuda.is_available() else 'cpu'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    env = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-1000:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        env["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    return env


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pipeline_runtime(out: Path) -> dict:
    """Where each pipeline stage ran, read through each stage's own reader."""
    from discovery.feature_files import FeatureFiles
    from sae_core.store import Store, StoreError
    from jax_sae.run_dir import RunDir
    from launch.pipeline import read_paths

    paths = read_paths(out)
    if paths is None:
        return {}
    where = {}
    try:
        where["extract"] = {"model": Store(paths["store"]).meta.model}
    except StoreError as err:
        where["extract"] = {"error": str(err)}
    where["train"] = (RunDir(paths["run"]).read_stats() or {}).get("runtime")
    where["discover"] = (FeatureFiles(paths["features"]).read_summary() or {}).get("runtime")
    where["report"] = {"index": str(paths["report"] / "index.html")}
    return where


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes everywhere (checks the script runs)")
    parser.add_argument("--allow_cpu", action="store_true", help="run even where JAX sees no GPU")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"), help="the JSON of results")
    parser.add_argument("--no_synthbench", action="store_true", help="leave out the 200M-sample SynthSAEBench runs")
    args = parser.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick}

    def save() -> None:
        write_json(out_path, results)

    results["environment"] = _environment()
    save()
    on_gpu = results["environment"].get("jax_backend") == "gpu"
    if not on_gpu and not args.allow_cpu:
        sys.exit("error: JAX sees no GPU here (see bench/results/gpu_check.json); install the CUDA build "
                 "(SAE_MUSIC_ACCEL=cuda12 scripts/install.sh) or pass --allow_cpu to run on the CPU anyway")
    py = sys.executable
    quick = args.quick
    platform = "gpu" if on_gpu else "cpu"
    device = "cuda" if results["environment"].get("torch_cuda") else "cpu"

    results["gpu_tests"] = _run("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                                              "addopts=--strict-markers", "-m", "gpu", "tests/test_gpu.py"], 150)
    save()

    bench_args = (["--d", "64", "--h", "1024", "--k", "8", "--batch", "256", "--steps", "1", "--matmul_n", "256"]
                  if quick else [])
    step = _run("train_step", [py, "-m", "bench.gpu_bench", "--types", "batch_topk", *bench_args], 200)
    step["results"] = _read(RESULTS / "gpu_bench.json")
    results["train_step"] = step
    save()

    extract_args = (["--models", "tiny-random", "--n_frames", "10", "--batch", "2", "--quick"] if quick else
                    ["--models", "random:musicgen-small", "--small_repeats", "2", "--teacher_repeats", "2"])
    dtype = "float16" if device == "cuda" else "float32"
    extract = _run("extract", [py, "-m", "bench.extract_bench", *extract_args, "--device", device,
                               "--model_dtype", dtype, "--threads", "0"], 240)
    extract["results"] = _read(RESULTS / "extract_bench.json")
    results["extract"] = extract
    save()

    work = Path(tempfile.mkdtemp(prefix="sae-gpu-check-"))
    try:
        size = ["--duration", "0.4", "--epochs", "2", "--max_features", "3"] if quick else ["--duration", "4"]
        pipeline = _run("pipeline", [py, "-m", "launch", "--platform", platform, "pipeline", "--out", str(work),
                                     "--device", device, *size], 240)
        pipeline["where"] = _pipeline_runtime(work)
        results["pipeline"] = pipeline
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    sweep_args = ["--sizes", "tiny", "--repeats", "1"] if quick else ["--sizes", "gpu", "--repeats", "2"]
    sweep = _run("sweep", [py, "-m", "bench.sweep_bench", *sweep_args], 240 if quick else 1200)
    sweep["results"] = _read(RESULTS / "sweep_bench.json")
    results["sweep"] = sweep
    save()
    study_dir = Path(tempfile.mkdtemp(prefix="sae-gpu-study-"))
    try:
        study_args = (["--model", "tiny-random", "--layers", "2", "--duration", "0.5", "--expansions", "4",
                       "--top_ks", "4", "--epochs", "1", "--train_batch_size", "64", "--max_features", "8",
                       "--steer_features", "2", "--seeds", "2", "--controls", "3", "--strengths", "1",
                       "--steer_duration", "0.3", "--label_random", "3"] if quick else
                      ["--model", "random:musicgen-small", "--layers", "6,12", "--duration", "4", "--expansions", "4",
                       "--top_ks", "32", "--epochs", "1", "--steer_features", "4", "--seeds", "6", "--controls",
                       "4", "--steer_duration", "4"])
        study = _run("study", [py, "-m", "launch.study", *study_args, "--clap", "tiny-random-clap", "--device", device,
                               "--out", str(study_dir)], 240 if quick else 1500)
        study["results"] = _read(study_dir / "study.json")
        # The paper's study of musicgen-small timed here (--plan --plan_timing): 5,521 prompts, MusicCaps's
        # count (the plan only counts them), 10 s each, its layers and grid.
        prompts = study_dir / "count.txt"
        prompts.write_text("".join(f"prompt {i}\n" for i in range(48 if quick else 5521)))
        plan_args = (["--layers", "6", "--expansions", "1", "--top_ks", "8"] if quick else
                     ["--layers", "2,6,12,18,22", "--duration", "10"])
        study["plan"] = _run("study plan", [py, "-m", "launch.study", "--model", "facebook/musicgen-small", *plan_args,
                                            "--prompt_file", str(prompts), "--plan", "--plan_timing", "--device",
                                            device, "--out", str(study_dir / "plan")], 600)
        results["study"] = study
    finally:
        shutil.rmtree(study_dir, ignore_errors=True)
    save()
    if not args.no_synthbench:
        synth_args = (["--model", "synthsaebench-tiny", "--samples", "20480", "--hidden_dim", "256", "--top_k", "8",
                       "--batch_size", "1024", "--eval_samples", "4096"] if quick else
                      ["--samples", "200000000", "--eval_samples", "500000"])
        model = "synthsaebench-tiny" if quick else "synthsaebench-16k"
        synth = _run("synthbench", [py, "-m", "bench.synthbench", *synth_args, "--out", str(work / "synthbench"),
                                    "--train_flags=--no-progress"], 240 if quick else 5400)
        synth["results"] = _read(RESULTS / f"synthbench-{model}.json")
        results["synthbench"] = synth
        shutil.rmtree(work, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("status", "ok") != "ok"]
    print(f"[gpu_check] wrote {out_path}; {'all parts ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

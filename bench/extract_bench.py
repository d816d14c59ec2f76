"""``python -m bench.extract_bench``: what capturing activations costs, and teacher forcing's gain.

For each model, on the same prompts, seed and sampling arguments:

* plain    - ``model.generate()`` alone, as a user would sample audio;
* capture  - ``extractor.extract._run_unit`` in generate mode: ``generate_batch`` with a hook on
  the middle layer, then the rows and codes written to a store (the exact work of extraction);
* teacher  - ``_run_unit`` in teacher-forced mode on the codes the capture run produced.

Plain and capture runs alternate (plain first on even repeats) so drift hits both alike. Runs
are split by timers wrapped around ``model.generate`` and ``store.write_rows`` and by forward
hooks on the text encoder and EnCodec's decoder; what capture spends outside ``generate()`` and
the writes is tokenizing, stacking the per-step hook outputs and converting them to numpy.

Models: ``tiny-random`` and ``random:musicgen-small``, a MusicGen with musicgen-small's dimensions
and seeded random weights (``extractor.families``), built once and loaded through
``extractor.models.load_model``.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from sae_core.errors import UsageError

from .common import report, run_bench, summarize, target, timed

NAME = "extract_bench"
SMALL_RANDOM = "random:musicgen-small"
OVERHEAD_TARGET = 0.10
SPEEDUP_TARGET = 10.0


@dataclass(frozen=True)
class ExtractBenchConfig:
    """Options of ``python -m bench.extract_bench``."""

    models: str = f"tiny-random,{SMALL_RANDOM}"
    """Comma-separated models: tiny-random, random:musicgen-small (musicgen-small dims, random weights)."""
    n_frames: int = 100
    """Audio frames per prompt (100 = 2 s at 50 frames/s)."""
    batch: int = 4
    """Prompts per batch (the first bundled prompts)."""
    repeats: int = 7
    """Timed plain/capture pairs for tiny-random (a run is ~0.4 s and noisy, so more of them)."""
    small_repeats: int = 3
    """Timed plain/capture pairs for random:musicgen-small (each pair is two full generations)."""
    teacher_repeats: int = 5
    """Timed teacher-forced runs per model."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    top_k: int = 250
    """Top-k sampling."""
    seed: int = 0
    """Sampling seed of every run."""
    threads: int = 1
    """torch intra-op threads (0: torch's default, one per core). 1 because on the 2-vCPU bench VM
    2-thread runs of the same generation intermittently took 1.6-3x longer (BENCHMARKS.md)."""
    quick: bool = False
    """Two pairs and two teacher-forced runs per model, to check the script runs."""
    device: str = "cpu"
    """cpu | cuda (bench/gpu_check.sh measures on the GPU)."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute dtype of the model (float16 on a GPU, as extraction's auto picks there)."""

    def __post_init__(self) -> None:
        sizes = (self.n_frames, self.batch, self.repeats, self.small_repeats, self.teacher_repeats)
        if min(sizes) <= 0 or self.threads < 0:
            raise UsageError("frames, batch and repeats must be positive, threads >= 0")
        unknown = set(self.model_names) - {"tiny-random", SMALL_RANDOM}
        if unknown:
            raise UsageError(f"unknown bench model(s) {sorted(unknown)}; use tiny-random and/or {SMALL_RANDOM}")

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


@contextmanager
def _call_seconds(obj, attr: str, spent: list[float]):
    """Wrap the bound method ``obj.attr`` so each call adds its seconds to ``spent``."""
    original = getattr(obj, attr)

    def wrapper(*args, **kwargs):
        result, seconds = timed(original, *args, **kwargs)
        spent.append(seconds)
        return result

    setattr(obj, attr, wrapper)
    try:
        yield
    finally:
        delattr(obj, attr)  # the class's method shows again


@contextmanager
def _forward_seconds(module, spent: list[float]):
    """Add the seconds of every forward of ``module`` to ``spent`` (pre and post hooks)."""
    starts: list[float] = []
    pre = module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    post = module.register_forward_hook(lambda *_: spent.append(time.perf_counter() - starts.pop()))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _measured(fn, loaded, store=None) -> dict:
    """Run ``fn()`` once; split its seconds into generate(), text encoder, EnCodec decoding and
    store writes (each where it happens), and the rest."""
    spent: dict[str, list[float]] = {k: [] for k in ("generate", "text_encoder", "encodec_decode", "writes")}
    with ExitStack() as stack:
        stack.enter_context(_call_seconds(loaded.model, "generate", spent["generate"]))
        stack.enter_context(_forward_seconds(loaded.model.text_encoder, spent["text_encoder"]))
        stack.enter_context(_forward_seconds(loaded.model.audio_encoder.decoder, spent["encodec_decode"]))
        if store is not None:
            stack.enter_context(_call_seconds(store, "write_rows", spent["writes"]))
        _, total = timed(fn)
    out = {"total": total, **{k: sum(v) for k, v in spent.items()}}
    # rest: outside generate() when it ran, else outside the text encoder (teacher forcing)
    inner = out["generate"] if spent["generate"] else out["text_encoder"]
    out["rest"] = total - out["writes"] - inner
    return out


def _run_unit_measured(cfg, loaded, store, layer: int) -> dict:
    """Unit 0 of ``_run_unit`` (extraction's own per-batch work), measured, then committed."""
    from extractor.extract import _run_unit

    result = _measured(lambda: _run_unit(cfg, loaded, store, 0, (layer,)), loaded, store)
    store.commit_unit(0, "bench")
    return result


def _plain(loaded, texts, cfg: ExtractBenchConfig, n_frames: int) -> dict:
    """Plain sampling with the arguments and seed generate_batch uses, measured."""
    import torch

    from extractor.capture import model_inputs

    n_positions = n_frames + loaded.info.max_delay

    def run():
        inputs = model_inputs(loaded, texts)
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            loaded.model.generate(**inputs, do_sample=True, guidance_scale=cfg.guidance_scale, top_k=cfg.top_k,
                                  temperature=1.0, max_new_tokens=n_positions, min_new_tokens=n_positions)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    return _measured(run, loaded)


def _stores(cfg: ExtractBenchConfig, loaded, model: str, layer: int, root: Path):
    """The generate-mode extract config and its store, planned as extraction plans it."""
    from extractor.extract import ExtractConfig, _plan_generate, _store_meta, open_or_create

    gen_cfg = ExtractConfig(
        model=model, layers=str(layer), prompt_file="bundled", batch_size=cfg.batch,
        duration=cfg.n_frames / loaded.info.frame_rate, out=str(root / "generate"), device=cfg.device, mode="generate",
        guidance_scale=cfg.guidance_scale, top_k=cfg.top_k, temperature=1.0, seed=cfg.seed, dtype="float16",
        model_dtype=cfg.model_dtype, max_prompts=cfg.batch,
    )
    plan = _plan_generate(gen_cfg, loaded)
    store = open_or_create(gen_cfg, _store_meta(gen_cfg, loaded.info, (layer,), plan), plan)
    return gen_cfg, store


def _teacher_store(gen_cfg, loaded, layer: int, root: Path):
    from extractor.extract import _plan_from_store, _store_meta, open_or_create

    tf_cfg = replace(gen_cfg, mode="teacher_forced", codes_from=gen_cfg.out, out=str(root / "teacher"))
    plan = _plan_from_store(tf_cfg, loaded.model.config)
    return tf_cfg, open_or_create(tf_cfg, _store_meta(tf_cfg, loaded.info, (layer,), plan), plan)


@dataclass
class ModelRuns:
    """Every measured run of one model (dicts from ``_measured``) and the rows' agreement."""

    plain: list[dict]
    capture: list[dict]
    teacher: list[dict]
    max_row_diff: float
    max_row_abs: float


def _pairs(cfg: ExtractBenchConfig, loaded, texts, gen_cfg, gen_store, layer: int, repeats: int):
    """Alternating plain and capture runs (plain first on even repeats)."""
    plain, capture = [], []
    for r in range(repeats):
        for kind in ("plain", "capture") if r % 2 == 0 else ("capture", "plain"):
            if kind == "plain":
                p = _plain(loaded, texts, cfg, cfg.n_frames)
                plain.append(p)
                print(f"  pair {r + 1}/{repeats} plain   {p['total']:7.2f} s (text encoder "
                      f"{p['text_encoder']:.3f}, EnCodec decode {p['encodec_decode']:.3f})", flush=True)
            else:
                c = _run_unit_measured(gen_cfg, loaded, gen_store, layer)
                capture.append(c)
                print(f"  pair {r + 1}/{repeats} capture {c['total']:7.2f} s (generate {c['generate']:.2f}, "
                      f"writes {c['writes']:.3f}, rest {c['rest']:.3f})", flush=True)
    return plain, capture


def _runs(cfg: ExtractBenchConfig, loaded, model: str, layer: int, repeats: int, root: Path) -> ModelRuns:
    from extractor.capture import generate_batch

    gen_cfg, gen_store = _stores(cfg, loaded, model, layer, root)
    texts = [s["prompt"] for s in gen_store.samples]
    warm_frames = min(cfg.n_frames, 5)  # first-call setup, not worth a full generation
    _plain(loaded, texts, cfg, warm_frames)
    generate_batch(loaded, texts, warm_frames, (layer,), guidance_scale=cfg.guidance_scale, top_k=cfg.top_k,
                   temperature=1.0, seed=cfg.seed)
    plain, capture = _pairs(cfg, loaded, texts, gen_cfg, gen_store, layer, repeats)
    tf_cfg, tf_store = _teacher_store(gen_cfg, loaded, layer, root)  # on the codes capture wrote
    _run_unit_measured(tf_cfg, loaded, tf_store, layer)  # warm-up
    teacher = []
    for r in range(cfg.teacher_repeats):
        t = _run_unit_measured(tf_cfg, loaded, tf_store, layer)
        teacher.append(t)
        print(f"  teacher-forced {r + 1}/{cfg.teacher_repeats} {t['total']:7.3f} s (text encoder "
              f"{t['text_encoder']:.3f}, writes {t['writes']:.3f}, decoder + rest {t['rest']:.3f})", flush=True)
    gen_rows = np.asarray(gen_store.acts(layer).read().result(), dtype=np.float32)
    tf_rows = np.asarray(tf_store.acts(layer).read().result(), dtype=np.float32)
    return ModelRuns(plain, capture, teacher, float(np.abs(gen_rows - tf_rows).max()), float(np.abs(gen_rows).max()))


def _bench_model(cfg: ExtractBenchConfig, model: str, figures: dict, derived: dict, targets: list) -> None:
    from extractor.models import load_model

    loaded, load_s = timed(load_model, model, cfg.device, cfg.model_dtype)
    layer = loaded.info.num_layers // 2
    repeats = cfg.small_repeats if model == SMALL_RANDOM else cfg.repeats
    print(f"\n[{model}] loaded in {load_s:.1f} s: {loaded.info.num_layers} layers, d_model {loaded.info.d_model}; "
          f"capturing layer {layer}; {cfg.batch} prompts x {cfg.n_frames} frames; {repeats} pairs", flush=True)
    root = Path(tempfile.mkdtemp(prefix="sae-extract-bench-"))
    try:
        runs = _runs(cfg, loaded, model, layer, repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        del loaded
        gc.collect()
    _summarize_model(model, runs, figures, derived, targets)
    derived[f"{model}: load seconds"] = load_s


def _summarize_model(model: str, runs: ModelRuns, figures: dict, derived: dict, targets: list) -> None:
    def add(label: str, measured: list[dict], key: str) -> float:
        figures[f"{model}: {label}"] = summarize([m[key] for m in measured])
        return figures[f"{model}: {label}"]["median"]

    plain = add("plain generate()", runs.plain, "total")
    add("  text encoder", runs.plain, "text_encoder")
    add("  EnCodec decode", runs.plain, "encodec_decode")
    capture = add("capture + store (_run_unit)", runs.capture, "total")
    hooked = add("  generate() with hook", runs.capture, "generate")
    add("  store writes", runs.capture, "writes")
    add("  tokenize + stack + to numpy", runs.capture, "rest")
    teacher = add("teacher-forced + store (_run_unit)", runs.teacher, "total")
    add("  TF text encoder", runs.teacher, "text_encoder")
    add("  TF decoder, codes read, tokenize, to numpy", runs.teacher, "rest")
    add("  TF store writes", runs.teacher, "writes")
    overhead, speedup = capture / plain - 1, capture / teacher
    pair = [c["total"] / p["total"] - 1 for c, p in zip(runs.capture, runs.plain, strict=True)]
    derived[f"{model}: capture overhead (median capture / median plain - 1)"] = overhead
    derived[f"{model}: capture overhead per pair (median, min, max)"] = [float(np.median(pair)), min(pair), max(pair)]
    derived[f"{model}: hook overhead (median generate-with-hook / median plain - 1)"] = hooked / plain - 1
    derived[f"{model}: teacher-forced speed-up (median capture / median teacher)"] = speedup
    derived[f"{model}: teacher-forced speed-up over plain (median plain / median teacher)"] = plain / teacher
    derived[f"{model}: max |generate rows - teacher rows| (float16 store)"] = runs.max_row_diff
    derived[f"{model}: max |generate rows|"] = runs.max_row_abs
    targets.append(target(f"{model} capture overhead", overhead, f"<= {OVERHEAD_TARGET:.0%}",
                          overhead <= OVERHEAD_TARGET))
    targets.append(target(f"{model} teacher-forced speed-up", speedup, f">= {SPEEDUP_TARGET:.0f}x",
                          speedup >= SPEEDUP_TARGET))


def run(cfg: ExtractBenchConfig) -> dict:
    import torch

    if cfg.quick:
        cfg = replace(cfg, repeats=2, small_repeats=2, teacher_repeats=2, quick=False)
    start = time.perf_counter()
    figures: dict[str, dict] = {}
    derived: dict = {}
    targets: list[dict] = []
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for model in cfg.model_names:
        _bench_model(cfg, model, figures, derived, targets)
    derived["bench wall seconds"] = time.perf_counter() - start
    params = {**cfg.__dict__, "torch_threads": torch.get_num_threads(), "store_dtype": "float16",
              "layer": "num_layers // 2"}
    return report(NAME, figures, params=params, derived=derived, targets=targets)


def main(argv: list[str] | None = None):
    return run_bench(ExtractBenchConfig, run, argv, NAME,
                     ("Capture overhead vs plain generate(), and teacher forcing vs generation "
                      "(measured, never asserted)."))


if __name__ == "__main__":
    main()

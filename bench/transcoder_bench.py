"""``python -m bench.transcoder_bench``: transcoders, on a planted MLP and inside a MusicGen.

1. **Planted MLP** (always): an MLP computed by a known sparse dictionary (``tests.synthetic.planted_mlp``:
   d = 32, 64 features, about 3 active per row, each reaching the output as 2 relu(a - 1) along
   its own output direction). Each requested type is trained as a plain and a skip transcoder;
   the table gives the held-out FVU on the MLP output, the best linear map's FVU, inference L0,
   dead latents and the mean best cosine of the planted output directions to the decoder rows
   (the issue's check: >= 0.9).
2. **Inside a model** (``--model``, e.g. ``random:musicgen-small:2``): ``--prompts`` prompts are
   extracted with ``--mlp`` at layer ``--layer``; an SAE of the layer's residual stream and a
   plain and a skip transcoder of its MLP, of the same width and k, are trained on them and
   spliced back in (``extractor.evaluate``, the replaced output being the layer's, or its MLP's):
   FVU, loss recovered against zero and mean ablation, KL, and training tokens/s.
3. **The step** (``--step_only``): an SAE's and a skip transcoder's compiled training step at
   d = 1,024, h = 16,384, k = 32, batch 2,048 (BatchTopK), the sparse backward (``--backward
   auto`` at these widths) against the dense one, median of 4 steps after a warm-up each.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_core.errors import UsageError

from .common import report, run_bench, summarize, target


@dataclass(frozen=True)
class TranscoderBenchConfig:
    """Options of ``python -m bench.transcoder_bench``."""

    types: tuple[str, ...] = ("topk", "batch_topk", "matryoshka", "jumprelu", "vanilla")
    """SAE types trained on the planted MLP, each as a plain and a skip transcoder."""
    epochs: int = 12
    """Epochs over the planted MLP's 40,000 rows (batch 512)."""
    model: str | None = None
    """A MusicGen to extract from and splice into (e.g. random:musicgen-small:2); none: the planted part only."""
    layer: int = 1
    """Its decoder layer."""
    prompt_file: str | None = None
    """Prompts for the model part (default: the bundled prompts)."""
    prompts: int = 48
    """How many of them."""
    duration: float = 5.0
    """Seconds generated per prompt."""
    hidden_dim: int = 4096
    """Latents of the model part's SAE and transcoders."""
    top_k: int = 32
    """Their k."""
    model_epochs: int = 5
    """Their epochs."""
    step_only: bool = False
    """Time the training step only (part 3), nothing else."""
    work: str = "bench/results/transcoder"
    """Where the stores and runs go (reused: an extracted store is not extracted again)."""


def _fvu_linear(x: np.ndarray, y: np.ndarray) -> float:
    X = np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    residual = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
    return float((residual**2).sum() / ((y - y.mean(0)) ** 2).sum())


def planted_part(cfg: TranscoderBenchConfig, work: Path) -> dict:
    import jax_sae
    from jax_sae.train import TrainConfig, train
    from tests.synthetic import mean_max_cosine, planted_mlp, write_store

    x, y, directions = planted_mlp(32, 64, 40_000, active=3.0, seed=0)
    store = work / "planted-store"
    if not store.exists():
        write_store(store, x, mlp={0: (x, y)})
    rows = {"linear map": {"fvu": _fvu_linear(x, y)}}
    for sae_type in cfg.types:
        for transcoder in ("plain", "skip"):
            run_cfg = TrainConfig.of(store=str(store), layer_idx=0, out=str(work / "planted-runs"), sae_type=sae_type,
                                     hidden_dim=128, top_k=4, transcoder=transcoder, epochs=cfg.epochs, batch_size=512,
                                     progress=False, overwrite=True)
            started = time.time()
            stats = train(run_cfg)
            sae = jax_sae.load(run_cfg.run_dir() / "final")
            val = stats["final_val"]
            rows[f"{sae_type} {transcoder}"] = {
                "fvu": val["fvu"], "l0": val["l0"], "dead_fraction": val["dead_fraction"],
                "cosine": mean_max_cosine(directions, np.asarray(sae.params.W_dec_HD)), "seconds": time.time() - started}
    return rows


def model_part(cfg: TranscoderBenchConfig, work: Path) -> dict:
    from extractor.evaluate import main as evaluate
    from extractor.extract import ExtractConfig, extract
    from jax_sae.export import main as export
    from jax_sae.train import TrainConfig, train

    store = work / f"store-{cfg.model.replace(':', '_')}-l{cfg.layer}-{cfg.prompts}x{cfg.duration:g}"
    extract_seconds = None
    if not (store / "store.json").exists():
        prompts = work / "prompts.txt"
        source = Path(cfg.prompt_file) if cfg.prompt_file else None
        if source is not None:
            lines = [line for line in source.read_text().splitlines() if line.strip()]
        else:
            bundled = Path(__file__).resolve().parents[1] / "extractor" / "data" / "bundled_prompts.jsonl"
            lines = [json.loads(line)["prompt"] for line in bundled.read_text().splitlines() if line.strip()]
        if len(lines) < cfg.prompts:
            raise UsageError(f"--prompts {cfg.prompts} but only {len(lines)} prompts are available; pass --prompt_file")
        prompts.write_text("\n".join(lines[: cfg.prompts]) + "\n")
        started = time.time()
        extract(ExtractConfig(model=cfg.model, layers=str(cfg.layer), prompt_file=str(prompts), batch_size=8,
                              duration=cfg.duration, out=str(store), device="cpu", dtype="float32", mlp=True))
        extract_seconds = time.time() - started
    rows = {}
    for transcoder in ("none", "plain", "skip"):
        run_cfg = TrainConfig.of(store=str(store), layer_idx=cfg.layer, out=str(work / "model-runs"),
                                 sae_type="batch_topk", hidden_dim=cfg.hidden_dim, top_k=cfg.top_k,
                                 transcoder=transcoder, epochs=cfg.model_epochs, batch_size=1024, overwrite=True)
        started = time.time()
        stats = train(run_cfg)
        seconds = time.time() - started
        exported = work / f"model-{transcoder}.pt"
        export(["--checkpoint", str(run_cfg.run_dir() / "final"), "--format", "torch", "--out", str(exported)])
        out = work / f"eval-{transcoder}.json"
        evaluate(["--model", cfg.model, "--sae", str(exported), "--store", str(store), "--out", str(out),
                  "--device", "cpu", "--no-progress"])
        overall = json.loads(out.read_text())["overall"]
        rows[{"none": "SAE (residual)", "plain": "transcoder", "skip": "skip transcoder"}[transcoder]] = {
            "fvu": stats["final_val"]["fvu"], "l0": stats["final_val"]["l0"],
            "dead_fraction": stats["final_val"]["dead_fraction"],
            "loss_recovered_zero": overall["loss_recovered_zero"], "loss_recovered_mean": overall["loss_recovered_mean"],
            "kl": overall["kl_sae"], "train_seconds": seconds,
            "tokens_per_second": stats["steps"] * 1024 / seconds}
    return {"store": str(store), "rows": int(json.loads((store / "store.json").read_text())["n_rows"]),
            "extract_seconds": extract_seconds, "runs": rows}


def step_part() -> dict:
    import time

    import jax
    import numpy as np

    from jax_sae.sharding import make_mesh
    from jax_sae.step import build_step, fresh_state
    from jax_sae.train import TrainConfig

    d, h, k, batch = 1024, 16384, 32, 2048
    figures = {}
    for transcoder in ("none", "skip"):
        for backward in ("auto", "dense"):
            train_cfg = TrainConfig.of(sae_type="batch_topk", hidden_dim=h, top_k=k, batch_size=batch,
                                       transcoder=transcoder, backward=backward)
            sae = train_cfg.sae_config(d)
            step = build_step(train_cfg, sae, make_mesh(1, 1), 1000, 10**9)
            state = fresh_state(step, jax.random.PRNGKey(0), np.zeros(d, np.float32), 1.0, "transpose", 1.0)
            z = jax.random.normal(jax.random.PRNGKey(1), (batch, sae.batch_width))
            state, _ = step.fn(state, z)
            jax.block_until_ready(state)
            seconds = []
            for _ in range(4):
                started = time.perf_counter()
                state, _ = step.fn(state, z)
                jax.block_until_ready(state)
                seconds.append(time.perf_counter() - started)
            name = f"{'SAE' if transcoder == 'none' else 'skip transcoder'}, {'sparse' if backward == 'auto' else 'dense'}"
            figures[name] = summarize([batch / t for t in seconds], "tokens/s")
            print(f"{name:>24}: {figures[name]['median']:.0f} tokens/s", flush=True)
    return figures


def run(cfg: TranscoderBenchConfig) -> dict:
    if cfg.step_only:
        figures = step_part()
        ratio = figures["skip transcoder, sparse"]["median"] / figures["skip transcoder, dense"]["median"]
        return report("transcoder_bench", figures, params=vars(cfg), file_name="transcoder_bench-step",
                      derived={"skip transcoder: sparse over dense": ratio,
                               "skip transcoder over SAE (sparse)": figures["skip transcoder, sparse"]["median"]
                               / figures["SAE, sparse"]["median"]})
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    planted = planted_part(cfg, work)
    for name, row in planted.items():
        extra = (f", L0 {row['l0']:.1f}, dead {row['dead_fraction']:.3f}, cosine {row['cosine']:.3f}, "
                 f"{row['seconds']:.1f} s") if "cosine" in row else ""
        print(f"planted {name:>22}: FVU {row['fvu']:.3f}{extra}")
    derived = {"planted": planted}
    if cfg.model:
        derived["model"] = model_part(cfg, work)
        for name, row in derived["model"]["runs"].items():
            print(f"{cfg.model} layer {cfg.layer} {name:>16}: FVU {row['fvu']:.3f}, L0 {row['l0']:.1f}, loss recovered "
                  f"{row['loss_recovered_zero']:.3f} (zero) {row['loss_recovered_mean']:.3f} (mean), KL {row['kl']:.4f}, "
                  f"{row['tokens_per_second']:.0f} tokens/s")
    worst = min(row["cosine"] for name, row in planted.items() if name.endswith(" plain"))
    shutil.rmtree(work / "planted-runs", ignore_errors=True)
    name = "transcoder_bench" + (f"-{cfg.model.replace(':', '_')}" if cfg.model else "")
    return report("transcoder_bench", {}, params={k: v for k, v in vars(cfg).items()}, derived=derived,
                  file_name=name,
                  targets=[target("planted output directions recovered by every plain transcoder (mean best cosine; "
                                  "a skip term takes the output's linear part, so skip transcoders sit lower)", worst,
                                  ">= 0.9", worst >= 0.9)])


def main(argv: list[str] | None = None):
    return run_bench(TranscoderBenchConfig, run, argv, "transcoder_bench",
                     "Transcoders on a planted MLP and, with --model, inside a MusicGen.")


if __name__ == "__main__":
    main()

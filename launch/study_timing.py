"""Time estimates for ``python -m launch.study --plan --plan_timing``: the heavy stages timed on this
machine at the model's real widths, then scaled to the study's work.

- **Generation** (extraction and steering): ``random:FAMILY:1`` and ``random:FAMILY:3`` (the
  family's released widths, seeded random weights, one and three decoder layers) generate a short
  and a longer clip at each batch size the study uses, with guidance as the study runs it. The
  difference between the lengths gives the seconds per generated step, the rest the fixed cost
  (text encoder, set-up); the difference between one and three layers gives each decoder layer's
  share, extrapolated linearly to the model's layers. Sampling decides no timing: every step
  costs the same whatever code it draws.
- **Training** (the sweep): the trainer's own compiled step (``jax_sae.step``) for each width and
  k of the grid, a few steps after compilation, at the study's batch size.

Not timed: discovery, the label scores and CLAP (each a fraction of the above: one encode pass over
the store per SAE; a few hundred short clips through CLAP). Each part runs in its own process
(torch and JAX never share one); ``python -m launch.study_timing generate|train`` prints one JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

from sae_core.errors import UsageError

SHORT, LONG = 4, 48  # generated frames of the two timed clips
LAYERS = (1, 3)  # decoder layers of the two timed builds


def time_generation(family: str, batches: list[int], device: str) -> dict:
    """Per batch size: seconds per generated step and fixed seconds, at each of ``LAYERS`` decoder layers."""
    import torch

    from extractor.capture import generate_batch
    from extractor.models import load_model

    out: dict = {}
    for layers in LAYERS:
        loaded = load_model(f"random:{family}:{layers}", device, "auto")
        for batch in batches:
            seconds = {SHORT: math.inf, LONG: math.inf}
            for frames in (SHORT, SHORT, LONG, SHORT, LONG):  # the first call warms up; then the best of two
                started = time.perf_counter()
                generate_batch(loaded, ["Simple melody"] * batch, frames, [0], guidance_scale=3.0, top_k=250,
                               temperature=1.0, seed=0)
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[frames] = min(seconds[frames], time.perf_counter() - started)
            per_step = max((seconds[LONG] - seconds[SHORT]) / (LONG - SHORT), 0.0)
            out.setdefault(str(batch), {})[str(layers)] = {
                "per_step": per_step, "fixed": max(seconds[SHORT] - per_step * (SHORT + loaded.info.max_delay), 0.0)}
        kind, max_delay = loaded.device.type, loaded.info.max_delay
        del loaded
    return {"device": kind, "family": family, "batches": out, "max_delay": max_delay}


def time_training(d: int, latents: list[int], top_ks: list[int], batch: int, steps: int = 3) -> dict:
    """Seconds per optimizer step of a TopK SAE for each (latents, k), median of ``steps``, and the
    seconds its first step took beyond that (compilation)."""
    import jax
    import numpy as np

    from jax_sae.config import TrainConfig
    from jax_sae.sharding import make_mesh
    from jax_sae.step import build_step, fresh_state

    x = jax.device_put(np.random.default_rng(0).normal(size=(batch, d)).astype(np.float32))
    out, compile_s = {}, {}
    for h in latents:
        for k in top_ks:
            cfg = TrainConfig.of(sae_type="topk", hidden_dim=h, top_k=k, batch_size=batch, lr=1e-4)
            built = build_step(cfg, cfg.sae_config(d), make_mesh(1, 1), total_steps=1000, dead_tokens=10**7)
            state = fresh_state(built, jax.random.PRNGKey(0), np.zeros(d, np.float32), 1.0, "transpose", 1.0)
            times = []
            for _ in range(steps + 1):  # the first compiles
                started = time.perf_counter()
                state, _ = built.fn(state, x)
                jax.block_until_ready(state.params)
                times.append(time.perf_counter() - started)
            out[f"{h}x{k}"] = float(np.median(times[1:]))
            compile_s[f"{h}x{k}"] = float(times[0] - np.median(times[1:]))
    return {"device": str(jax.devices()[0].platform), "batch": batch, "per_step": out, "compile": compile_s}


def _child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-m", "launch.study_timing", *args], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"--plan_timing: timing {args[0]} failed: {tail.removeprefix('error: ')}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(family: str, layers_total: int, d: int, latents: list[int], top_ks: list[int], *, extract_batch: int,
            steer_batch: int, train_batch: int, device: str) -> dict:
    """Both timings, each in its own process; per-step generation seconds extrapolated to
    ``layers_total`` decoder layers."""
    gen = _child(["generate", family, ",".join(map(str, sorted({extract_batch, steer_batch}))), device])
    train = _child(["train", str(d), ",".join(map(str, latents)), ",".join(map(str, top_ks)), str(train_batch)])
    at_full = {}
    low, high = LAYERS
    for batch, by_layers in gen["batches"].items():
        one, two = by_layers[str(low)], by_layers[str(high)]
        per_layer = max(two["per_step"] - one["per_step"], 0.0) / (high - low)
        at_full[int(batch)] = {"per_step": one["per_step"] + per_layer * (layers_total - low),
                               "fixed": max(one["fixed"], two["fixed"]), "per_layer_step": per_layer}
    return {"generation": at_full, "training": train["per_step"], "compile": train["compile"], "torch_device": gen["device"],
            "jax_device": train["device"], "max_delay": gen["max_delay"]}


def generation_seconds(timing: dict, batch: int, outputs: int, steps: int) -> float:
    """Seconds to generate ``outputs`` clips of ``steps`` generated steps, ``batch`` at a time."""
    at = timing["generation"][batch]
    return math.ceil(outputs / batch) * (at["fixed"] + steps * at["per_step"])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["generate"]:
            result = time_generation(args[1], [int(b) for b in args[2].split(",")], args[3])
        elif args[:1] == ["train"]:
            result = time_training(int(args[1]), [int(h) for h in args[2].split(",")],
                                   [int(k) for k in args[3].split(",")], int(args[4]))
        else:
            raise UsageError("usage: python -m launch.study_timing generate FAMILY BATCHES DEVICE | train D LATENTS "
                             "TOP_KS BATCH (called by python -m launch.study --plan --plan_timing)")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()

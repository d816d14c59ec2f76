"""``python -m bench.aux_bench``: the train step's cost while some latents are dead (AuxK on),
with AuxK through the dead latents' columns alone (the trainer's default while at most h/2 are
dead) and through all h (``forward.AUX_FEW_DEAD = ()``), in the same run. Dead latents are made
by a very negative encoder bias, so they stay dead."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import report, summarize


def step_times(sae_type: str, d: int, h: int, k: int, batch: int, dead: float, steps: int) -> tuple[list, float]:
    import jax
    import jax.numpy as jnp

    from jax_sae import model as M
    from jax_sae.config import TrainConfig
    from jax_sae.sharding import make_mesh
    from jax_sae.step import build_step, init_state

    cfg = TrainConfig.of(sae_type=sae_type, hidden_dim=h, top_k=k, batch_size=batch, lr=1e-4)
    built = build_step(cfg, cfg.sae_config(d), make_mesh(1, 1), total_steps=1000, dead_tokens=10**7)
    dead_H = jnp.arange(h) < int(dead * h)
    params = M.init_params(jax.random.PRNGKey(0), built.settings.sae, np.zeros(d, np.float32))
    state = init_state(params.replace(b_enc_H=jnp.where(dead_H, -1e3, 0.0)), built.optimizer, 1.0)
    state = state.replace(tokens_since_fired_H=jnp.where(dead_H, 10**8, 0).astype(jnp.int32))
    state = jax.device_put(state, built.shardings)
    step = built.fn
    x = jax.device_put(np.random.default_rng(0).normal(size=(batch, d)).astype(np.float32))
    state, metrics = step(state, x)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, x)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
    return times, float(metrics["dead_fraction"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aux_bench", description=__doc__)
    parser.add_argument("--sae_type", default="topk")
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--h", type=int, default=6144)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dead", default="0,0.05,0.3", help="fractions of dead latents")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from jax_sae import forward

    figures, derived = {}, {}
    default = forward.AUX_FEW_DEAD
    for dead in (float(v) for v in args.dead.split(",")):
        for label, few in (("dead columns only", default), ("all columns", ())):
            if dead == 0 and not few:
                continue  # AuxK is off without dead latents: nothing to compare
            forward.AUX_FEW_DEAD = few
            times, measured = step_times(args.sae_type, args.d, args.h, args.k, args.batch, dead, args.steps)
            figures[f"{dead:.0%} dead, {label}" if dead else "no dead latents"] = summarize(
                [args.batch / t for t in times], "tok/s")
            derived[f"{dead:.0%} dead: measured dead fraction"] = measured
        if dead:
            derived[f"{dead:.0%} dead: dead columns only / all columns"] = (
                figures[f"{dead:.0%} dead, dead columns only"]["median"] / figures[f"{dead:.0%} dead, all columns"]["median"])
    forward.AUX_FEW_DEAD = default
    report("aux_bench", figures, params=vars(args), derived=derived)


if __name__ == "__main__":
    main()

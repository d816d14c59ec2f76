"""``python -m bench.train_bench``: SAE train-step throughput, ours against a PyTorch reference
and against the encoder-GEMM bound, measured in the same run.

- ours: ``jax_sae.step.compile_train_step`` on a 1x1 mesh (the trainer's exact step, with
  ``--backward auto``: the sparse reconstruction and backward at these widths), and the same
  step with the dense backward forced ("ours dense").
- reference: the same math written as the original does it in PyTorch: dense encode, dense
  decode, ``torch.topk`` (per row, or over the flattened batch for BatchTopK/Matryoshka),
  AdamW, gradient clipping, decoder-gradient projection and renormalisation.
- bound: tokens/s if the step cost only its encoder forward (2*d*h FLOPs per token) at the
  float32 GEMM rate measured here (``jnp.dot`` of the same [B, d] x [d, h] shapes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import device_seconds, report, summarize, target

SETTINGS = {
    "medium": dict(d=1536, h=6144, k=64, batch=4096),
    "wide": dict(d=1024, h=32768, k=32, batch=2048),
}
TYPES = ("topk", "batch_topk", "matryoshka", "vanilla")


def _data(d: int, batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch, d)).astype(np.float32)


def _time_steps(step, state, x, steps: int):
    """Median seconds per step after one warm-up (compilation) step."""
    state = step(state, x)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = step(state, x)
        times.append(time.perf_counter() - t0)
    return times


def ours(sae_type: str, d: int, h: int, k: int, batch: int, steps: int, backward: str = "auto",
         compute_dtype: str = "float32"):
    import jax

    from jax_sae.config import TrainConfig
    from jax_sae.sharding import make_mesh
    from jax_sae.step import build_step, fresh_state

    cfg = TrainConfig.of(sae_type=sae_type, hidden_dim=h, top_k=k, batch_size=batch, lr=1e-4, backward=backward,
                         compute_dtype=compute_dtype)
    built = build_step(cfg, cfg.sae_config(d), make_mesh(1, 1), total_steps=1000, dead_tokens=10**7)
    state = fresh_state(built, jax.random.PRNGKey(0), np.zeros(d, np.float32), 1.0, "transpose", 1.0)
    step_fn = built.fn
    x = jax.device_put(_data(d, batch))

    def step(st, x):
        st, metrics = step_fn(st, x)
        jax.block_until_ready(st.params)
        return st

    return _time_steps(step, state, x, steps)


def _path(sae_type: str, d: int, h: int, k: int) -> str:
    """Which backward ``--backward auto`` takes for this shape on this machine."""
    from jax_sae.config import SAEConfig
    from jax_sae.forward import LossSettings, use_sparse
    from jax_sae.sparse import tuning_for

    settings = LossSettings(SAEConfig(sae_type=sae_type, d_model=d, hidden_dim=h, top_k=k,
                                      group_sizes=(h,) if sae_type == "matryoshka" else ()), 1.0, 50, 1 / 32, 10**7)
    return "sparse" if use_sparse(settings, h, tuning_for("cpu")) else "dense"


def reference(sae_type: str, d: int, h: int, k: int, batch: int, steps: int):
    import torch

    torch.manual_seed(0)
    W_dec = torch.randn(h, d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(h, requires_grad=True),
              "W_dec": W_dec.requires_grad_(), "b_dec": torch.zeros(d, requires_grad=True)}
    opt = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.0)
    x = torch.from_numpy(_data(d, batch))
    groups = np.cumsum([h // 16, h // 16, h // 8, h // 4, h - h // 16 * 2 - h // 8 - h // 4])

    def step(_state, x):
        p = params
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if sae_type == "vanilla":
            f = torch.relu(pre)
        elif sae_type == "topk":
            vals, idx = torch.topk(pre, k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        else:
            vals, idx = torch.topk(torch.relu(pre).flatten(), k * batch)
            f = torch.zeros_like(pre).flatten().scatter(0, idx, vals).reshape(pre.shape)
        if sae_type == "matryoshka":
            losses = [((x - (f[:, :m] @ p["W_dec"][:m] + p["b_dec"])) ** 2).sum(-1).mean() for m in groups]
            loss = torch.stack(losses).mean()
        else:
            loss = ((x - (f @ p["W_dec"] + p["b_dec"])) ** 2).sum(-1).mean()
            if sae_type == "vanilla":
                loss = loss + (f * p["W_dec"].norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = p["W_dec"].grad, p["W_dec"]
            g -= (g * w).sum(1, keepdim=True) * w
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True)
        return None

    return _time_steps(step, None, x, steps)


def gemm_rate(d: int, h: int, batch: int, repeats: int = 5) -> list[float]:
    """Measured float32 GEMM rate (FLOP/s) for the encoder's shapes, in JAX."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(_data(d, batch))
    b = jnp.asarray(np.random.default_rng(1).normal(size=(d, h)).astype(np.float32))
    return [2 * batch * d * h / t for t in device_seconds(jax.jit(jnp.dot), a, b, repeats=repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__)
    parser.add_argument("--settings", default="medium,wide", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--types", default=",".join(TYPES), help="SAE types to measure")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after a warm-up)")
    parser.add_argument("--no-dense", dest="dense", action="store_false",
                        help="skip timing our step with the dense backward forced (--backward dense)")
    args = parser.parse_args()
    figures, derived, targets = {}, {}, []
    for name in args.settings.split(","):
        s = SETTINGS[name]
        d, h, k, batch = s["d"], s["h"], s["k"], s["batch"]
        rate = summarize(gemm_rate(d, h, batch), "FLOP/s")
        figures[f"{name}: float32 GEMM rate"] = summarize([r / 1e9 for r in rate["values"]], "GF/s")
        bound = rate["median"] / (2 * d * h)
        derived[f"{name}: encoder-GEMM bound (tokens/s)"] = bound
        for sae_type in args.types.split(","):
            print(f"[{name}] {sae_type} (d={d}, h={h}, k={k}, batch={batch})", flush=True)
            runs = [("ours", lambda *a: ours(*a, backward="auto"))]
            if args.dense:
                runs.append(("ours dense", lambda *a: ours(*a, backward="dense")))
            if sae_type != "jumprelu":  # no PyTorch reference of JumpReLU training here
                runs.append(("pytorch", reference))
            for impl, fn in runs:
                times = fn(sae_type, d, h, k, batch, args.steps)
                figures[f"{name} {sae_type}: {impl}"] = summarize([batch / t for t in times], "tok/s")
            ours_tps = figures[f"{name} {sae_type}: ours"]["median"]
            derived[f"{name} {sae_type}: ours path"] = _path(sae_type, d, h, k)
            if sae_type != "jumprelu":
                derived[f"{name} {sae_type}: ours / pytorch"] = ours_tps / figures[f"{name} {sae_type}: pytorch"]["median"]
            derived[f"{name} {sae_type}: ours / bound"] = ours_tps / bound
            if args.dense:
                derived[f"{name} {sae_type}: ours / ours dense"] = ours_tps / figures[f"{name} {sae_type}: ours dense"]["median"]
            if sae_type in ("topk", "batch_topk"):
                vs_torch = derived[f"{name} {sae_type}: ours / pytorch"]
                targets.append(target(f"{name} {sae_type} vs pytorch", vs_torch, ">= 1.5x", vs_torch >= 1.5))
                targets.append(target(f"{name} {sae_type} vs bound", ours_tps / bound, ">= 0.5",
                                      ours_tps / bound >= 0.5))
    report("train_bench", figures, params=vars(args) | {"settings": {k: SETTINGS[k] for k in args.settings.split(",")}},
           derived=derived, targets=targets)


if __name__ == "__main__":
    main()

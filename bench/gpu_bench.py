"""``python -m bench.gpu_bench``: the trainer's step on one accelerator at a large width
(default d=2048, h=65536, k=64, batch 8192), in float32 and bfloat16 compute, with the
backward ``auto`` chooses and with the dense one forced; tokens/s, and the encoder's achieved
FLOP rate as a fraction of the chip's bfloat16 matmul rate measured in the same run.

Run by ``bench/gpu_check.sh``; works on a CPU too (slowly), which is how it is tested.
"""

from __future__ import annotations

import argparse

from .common import device_seconds, report, summarize
from .train_bench import ours


def matmul_rate(dtype: str, n: int, repeats: int = 10) -> list[float]:
    """FLOP/s of an n x n x n ``jnp.dot`` in ``dtype`` (float32 accumulation for bfloat16)."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return [2 * n**3 / t for t in device_seconds(dot, a, b, repeats=repeats, warmup=3)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--h", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--types", default="topk,batch_topk", help="SAE types to measure")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to measure")
    parser.add_argument("--backward", default="auto,dense", help="backward paths to measure")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after a warm-up)")
    parser.add_argument("--matmul_n", type=int, default=8192, help="size of the square matmul for the chip's rate")
    args = parser.parse_args()

    import jax

    figures, derived = {}, {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    for dtype in ("bfloat16", "float32"):
        rates = matmul_rate(dtype, args.matmul_n)
        figures[f"{dtype} matmul rate"] = summarize([r / 1e12 for r in rates], "TF/s")
    peak = figures["bfloat16 matmul rate"]["median"] * 1e12
    flops_per_token = 2 * args.d * args.h  # the encoder's forward GEMM
    for sae_type in args.types.split(","):
        for dtype in args.dtypes.split(","):
            for backward in args.backward.split(","):
                label = f"{sae_type} {dtype} {backward}"
                print(f"[gpu_bench] {label} (d={args.d}, h={args.h}, k={args.k}, batch={args.batch})", flush=True)
                times = ours(sae_type, args.d, args.h, args.k, args.batch, args.steps, backward=backward,
                             compute_dtype=dtype)
                fig = summarize([args.batch / t for t in times], "tok/s")
                figures[label] = fig
                derived[f"{label}: encoder FLOP rate / bf16 matmul rate"] = fig["median"] * flops_per_token / peak
    report("gpu_bench", figures, params=vars(args), derived=derived)


if __name__ == "__main__":
    main()

"""``python -m bench.step_pieces``: where a sparse TopK train step's time goes. Each piece of the
step is jitted and timed on its own at the step's shapes (default: medium, d=1536, h=6144,
k=64, batch 4096), beside the whole step."""

from __future__ import annotations

import argparse

import numpy as np

from .common import device_seconds, report, summarize


def _sparse_passes(B: int, d: int, h: int, k: int, mesh, tuning) -> dict:
    """The sparse step's two passes over the selected codes, each jitted per shard: the gather
    (reconstruction and code gradients) and the scatter-add of both weight gradients."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from jax_sae import model as M
    from jax_sae import sparse

    specs = (M.SAEParams(P(None, "model"), P("model"), P("model", None), P()), P("data"), P("data"), P("data"))

    def per_shard(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))

    def decode_pass(p, idx, val, x):
        block = sparse._divisor_at_most(B, tuning.block_bytes // (4 * k * d))
        blocked = [a.reshape((B // block, block) + a.shape[1:]) for a in (val, idx, jnp.zeros_like(idx), x)]
        out = lax.map(sparse._decode_block(p.W_dec_HD, p.b_dec_D, (1.0,), 1.0), blocked)
        return jnp.sum(out[0]) + jnp.sum(out[2])

    def scatter_pass(p, idx, val, x):
        token = jnp.arange(B * k, dtype=jnp.int32) // k
        accs = sparse._row_scatter(h, idx.reshape(-1), [(val.reshape(-1), x, token), (val.reshape(-1), x, token)],
                                   tuning)
        return sum(jnp.sum(a) for a in accs)

    return {"gather, reconstruct, code gradients": per_shard(decode_pass),
            "sorted scatter-add of both weight gradients": per_shard(scatter_pass)}


def _pieces(B: int, d: int, h: int, k: int) -> dict:
    """Each piece of the step: name -> (jitted function, its arguments)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    from jax_sae import model as M
    from jax_sae import sparse
    from jax_sae.config import SAEConfig
    from jax_sae.sharding import make_mesh
    from jax_sae.step import make_optimizer

    cfg = SAEConfig(sae_type="topk", d_model=d, hidden_dim=h, top_k=k)
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(d, np.float32))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, d)).astype(np.float32))
    pre = jax.jit(lambda p, x: x @ p.W_enc_DH)(params, x)
    val, idx = jax.jit(lambda p: lax.top_k(p, k))(pre)
    val = jnp.maximum(val, 0.0)
    passes = _sparse_passes(B, d, h, k, make_mesh(1, 1), sparse.tuning_for("cpu"))
    optimizer = make_optimizer(1e-4, 1000, 0.0)

    @jax.jit
    def update(p, state):
        updates, state = optimizer.update(p, state, p)
        return M.normalize_decoder(optax.apply_updates(p, updates)), state

    return {
        "encoder GEMM": (jax.jit(lambda p, x: x @ p.W_enc_DH), (params, x)),
        "lax.top_k": (jax.jit(lambda p: lax.top_k(p, k)), (pre,)),
        **{name: (fn, (params, idx, val, x)) for name, fn in passes.items()},
        "AdamW + decoder renormalisation": (update, (params, optimizer.init(params))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_pieces", description=__doc__)
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--h", type=int, default=6144)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from .train_bench import ours

    B, d, h, k = args.batch, args.d, args.h, args.k
    pieces = _pieces(B, d, h, k)
    figures = {name: summarize([t * 1e3 for t in device_seconds(fn, *a, repeats=args.repeats)], "ms")
               for name, (fn, a) in pieces.items()}
    figures["whole step (ours, topk)"] = summarize(
        [t * 1e3 for t in ours("topk", d, h, k, B, args.repeats)], "ms")
    total = sum(figures[name]["median"] for name in pieces)
    report("step_pieces", figures, params=vars(args),
           derived={"sum of pieces / whole step": total / figures["whole step (ours, topk)"]["median"]})


if __name__ == "__main__":
    main()

"""Sparse reconstruction and its gradient, written by hand, for the TopK family.

With k of h latents active per token, only the encoder's forward GEMM has to be dense. Here the
decoder gathers the k active rows of W_dec per token, and the backward pass never forms a
[B, h] array: the gradient of each active activation is a dot product with the same gathered
rows, and the two weight gradients are scatter-adds of k rows per token (W_dec's rows, and
W_enc's columns written as rows of its transpose). Cost per token: O(k*d) instead of O(h*d).

Shapes: B tokens (this shard), C candidates per token, D model width, H latents (this shard),
G Matryoshka groups (1 otherwise). Runs per shard inside ``shard_map``: partial reconstructions
are summed over the model axis, weight gradients over the data axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import sharding as S
from .model import SAEParams


class Active(NamedTuple):
    """The latents a token may use: local index, activation (0 where not kept), group."""

    idx_BC: jax.Array
    val_BC: jax.Array
    group_BC: jax.Array | None


class SparseResult(NamedTuple):
    recon: jax.Array
    x_hat_BD: jax.Array
    grads: SAEParams


@dataclass(frozen=True)
class Tuning:
    """Work sizes: decoder rows gathered per block, and update rows per scatter chunk (bytes).
    Small on a CPU (a block stays in cache), large on an accelerator (few, wide kernels)."""

    block_bytes: int
    chunk_bytes: int
    # Sparse wins when h >= min_ratio * k: the dense alternative costs ~3 more GEMMs of O(h*d)
    # per token, the sparse one a few memory-bound passes over the k used rows of O(d).
    min_ratio: int


def tuning_for(platform: str) -> Tuning:
    if platform == "cpu":
        # Measured on a 2-core CPU (d=1024, B=2048, k=32): dense is faster at h/k = 32,
        # sparse at h/k = 64, for TopK and BatchTopK alike.
        return Tuning(block_bytes=3 << 20, chunk_bytes=12 << 20, min_ratio=48)
    # Accelerators run dense GEMMs far faster per byte moved than gathers: an estimate, to be
    # replaced by what bench/gpu_check.sh measures (it times both paths).
    return Tuning(block_bytes=1 << 30, chunk_bytes=4 << 30, min_ratio=256)


def _divisor_at_most(n: int, limit: int) -> int:
    for size in range(max(1, min(n, limit)), 0, -1):
        if n % size == 0:
            return size
    return 1


def _decode_block(W_dec_HD, b_dec_D, weights: tuple[float, ...], scale: float):
    """One block's reconstruction, error and activation gradients, from one gather of rows.
    ``weights``: each prefix's share of the loss (Matryoshka; a single 1.0 otherwise)."""
    groups = len(weights)

    def body(args):
        val_bC, idx_bC, group_bC, x_bD = args
        rows_bCD = W_dec_HD[idx_bC]
        if groups == 1:  # the common case, kept to plain contractions
            x_hat_bD = b_dec_D + lax.psum(jnp.einsum("bc,bcd->bd", val_bC, rows_bCD), S.MODEL)
            err_bD = x_hat_bD - x_bD
            d_parts_bD = scale * err_bD
            d_val_bC = jnp.einsum("bcd,bd->bc", rows_bCD, d_parts_bD)
            return x_hat_bD, d_parts_bD[:, None], d_val_bC, jnp.sum(err_bD**2)[None]
        onehot_bCG = (group_bC[..., None] == jnp.arange(groups)).astype(val_bC.dtype)
        parts_bGD = lax.psum(jnp.einsum("bcg,bcd->bgd", val_bC[..., None] * onehot_bCG, rows_bCD), S.MODEL)
        x_hat_bGD = b_dec_D + jnp.cumsum(parts_bGD, axis=1)  # nested prefixes (Matryoshka)
        err_bGD = x_hat_bGD - x_bD[:, None]
        w_G = jnp.asarray(weights, jnp.float32)
        sq_G = w_G * jnp.sum(err_bGD**2, axis=(0, 2))
        # d loss / d parts_g: every prefix that includes group g, each with its weight.
        d_parts_bGD = scale * jnp.flip(jnp.cumsum(jnp.flip(w_G[:, None] * err_bGD, 1), axis=1), 1)
        d_val_bC = jnp.sum(jnp.einsum("bcd,bgd->bcg", rows_bCD, d_parts_bGD) * onehot_bCG, axis=-1)
        return x_hat_bGD[:, -1], d_parts_bGD, d_val_bC, sq_G

    return body


def _sorted_pairs(keys_P: jax.Array, hidden: int):
    """(sorted keys, original positions): one integer sort when key and position fit 32 bits."""
    n = keys_P.shape[0]
    if (hidden + 1) * n < 2**32:
        packed = jnp.sort(keys_P.astype(jnp.uint32) * jnp.uint32(n) + jnp.arange(n, dtype=jnp.uint32))
        return (packed // n).astype(jnp.int32), (packed % n).astype(jnp.int32)
    return lax.sort_key_val(keys_P, jnp.arange(n, dtype=jnp.int32), is_stable=False)


def _row_scatter(hidden: int, keys_P, sources, tuning: Tuning) -> list[jax.Array]:
    """Per source (coef_P, table_ND, rows_P): the [hidden, D] sum of coef[p] * table[rows[p]]
    into row keys[p] (keys == hidden are dropped). Pairs are sorted by key so a chunk's target
    rows stay in cache; chunks of dropped pairs (sorted last) are skipped. One scatter per
    source in the same loop: on a CPU that beats one scatter of concatenated rows."""
    n = keys_P.shape[0]
    width = sum(table.shape[1] for _, table, _ in sources)
    keys, order = _sorted_pairs(keys_P, hidden)
    chunk = max(1, min(n, tuning.chunk_bytes // (4 * width)))
    pad = -n % chunk
    keys = jnp.concatenate([keys, jnp.full((pad,), hidden, jnp.int32)])
    order = jnp.concatenate([order, jnp.zeros((pad,), jnp.int32)])

    def body(accs, args):
        key_c, order_c = args

        def add():
            return [acc.at[key_c].add(coef[order_c][:, None] * table[rows[order_c]], mode="drop",
                                      indices_are_sorted=True)
                    for acc, (coef, table, rows) in zip(accs, sources)]

        return lax.cond(key_c[0] < hidden, add, lambda: accs), None

    # The sums vary over both mesh axes (they are this shard's part until reduced).
    zeros = [lax.pcast(jnp.zeros((hidden, table.shape[1]), jnp.float32), (S.DATA, S.MODEL), to="varying")
             for _, table, _ in sources]
    accs, _ = lax.scan(body, zeros, (keys.reshape(-1, chunk), order.reshape(-1, chunk)))
    return accs


def recon_and_grads(params: SAEParams, x_BD: jax.Array, active: Active, *, weights: tuple[float, ...],
                    global_batch: int,
                    tuning: Tuning, in_BD: jax.Array | None = None) -> SparseResult:
    """Reconstruction loss (Matryoshka: the ``weights``-weighted sum over prefixes, weights summing
    to 1; plain for a single weight), the full reconstruction, and the loss's gradient for every
    parameter (already summed over shards). A transcoder passes its input ``in_BD`` (the encoder's
    input, not centred) and, as ``x_BD``, its target less any skip term: the reconstruction comes
    back without the skip term, and W_skip's gradient is in^T times the reconstruction's gradient."""
    B, C = active.idx_BC.shape
    H, D = params.W_dec_HD.shape
    groups = len(weights)
    scale = 2.0 / global_batch
    block = _divisor_at_most(B, tuning.block_bytes // (4 * C * D))
    group_BC = active.group_BC if active.group_BC is not None else jnp.zeros_like(active.idx_BC)
    # Unkept candidates (value 0) all read decoder row 0 instead of their own: a row that stays
    # in cache, so the gather moves only the rows that are used. (Not the row's first
    # candidate: slicing top_k's indices stops XLA from using its TopK kernel - a full sort.)
    gather_BC = jnp.where(active.val_BC > 0, active.idx_BC, 0)
    blocked = [a.reshape((B // block, block) + a.shape[1:]) for a in (active.val_BC, gather_BC, group_BC, x_BD)]
    x_hat, d_parts, d_val, sq = lax.map(_decode_block(params.W_dec_HD, params.b_dec_D, weights, scale), blocked)
    x_hat_BD, d_parts_BGD, d_val_BC = x_hat.reshape(B, D), d_parts.reshape(B, groups, D), d_val.reshape(B, C)
    recon = lax.psum(jnp.sum(sq), S.DATA) / global_batch

    kept_BC = active.val_BC > 0  # kept and on the ReLU's positive side
    d_pre_BC = jnp.where(kept_BC, d_val_BC, 0.0)
    keys_P = jnp.where(kept_BC, active.idx_BC, H).reshape(-1)
    token_P = jnp.arange(B * C, dtype=jnp.int32) // C
    rows_P = token_P * groups + group_BC.reshape(-1)
    encoder_in_BD = x_BD - params.b_dec_D if in_BD is None else in_BD
    d_W_dec_HD, d_W_enc_HD = _row_scatter(H, keys_P, [
        (active.val_BC.reshape(-1), d_parts_BGD.reshape(B * groups, D), rows_P),  # d loss / d part of its group
        (d_pre_BC.reshape(-1), encoder_in_BD, token_P),  # the encoder's input
    ], tuning)
    d_W_dec_HD, d_W_enc_HD = lax.psum(d_W_dec_HD, S.DATA), lax.psum(d_W_enc_HD, S.DATA)
    d_b_enc_H = lax.psum(jnp.zeros((H,), jnp.float32).at[keys_P].add(d_pre_BC.reshape(-1), mode="drop"), S.DATA)
    # b_dec enters the reconstruction once and (not a transcoder's) the encoder as -b_dec @ W_enc.
    d_b_dec_D = lax.psum(jnp.sum(d_parts_BGD[:, 0], axis=0), S.DATA)
    if in_BD is None:
        d_b_dec_D = d_b_dec_D - lax.psum(params.W_enc_DH @ d_b_enc_H, S.MODEL)
    # The skip term enters every prefix's reconstruction, as b_dec does.
    d_W_skip_DD = None if params.W_skip_DD is None else lax.psum(in_BD.T @ d_parts_BGD[:, 0], S.DATA)
    grads = SAEParams(W_enc_DH=d_W_enc_HD.T, b_enc_H=d_b_enc_H, W_dec_HD=d_W_dec_HD, b_dec_D=d_b_dec_D,
                      W_skip_DD=d_W_skip_DD)
    return SparseResult(recon, x_hat_BD, grads)

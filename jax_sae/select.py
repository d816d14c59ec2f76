"""Exact top-k selection across shards, without sorting B*h values.

Over a whole batch (BatchTopK), the k-th largest of non-negative float32 values is found by
bisection on their bit patterns (for non-negative floats, integer order of the bits is numeric
order): 31 rounds of "how many values are >= mid?", each a compare-and-count plus one scalar
all-reduce across shards. It runs over each row's few top candidates and is checked exact
(else it reruns over everything); no activation value crosses devices. Per row (TopK), each
shard's top-k values are gathered and merged: k values per row per shard. Values equal to the
threshold are kept in a fixed order (shard, then position) until exactly k are kept.

The sparse step takes the same selections as per-row candidate lists: ``top_candidates`` (per
row), ``batch_candidates`` then ``with_overflow_rows`` (over the batch, with heavy rows taken
out whole).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_INF_BITS = 0x7F800000


def _psum(x, axes: Sequence[str]):
    return lax.psum(x, tuple(axes)) if axes else x


def kth_largest_bits(bits: jax.Array, k, count_axes: Sequence[str], row_wise: bool) -> jax.Array:
    """Bits of the k-th largest value (0 when fewer than k values are positive).

    ``bits`` are int32 views of non-negative floats; per row when ``row_wise``, else over all.
    """
    def count_ge(t):
        ge = bits >= (t[..., None] if row_wise else t)
        return _psum(jnp.sum(ge, axis=-1) if row_wise else jnp.sum(ge), count_axes)

    # Row-wise bounds are built from ``bits`` so that, inside shard_map, they vary over the
    # same mesh axes as the rows do.
    like = bits[..., 0] if row_wise else jnp.zeros((), jnp.int32)
    lo = jnp.zeros_like(like)  # invariant: count(>= lo) >= k (all values are >= 0)
    hi = jnp.full_like(like, _INF_BITS + 1)  # invariant: count(>= hi) < k

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count_ge(mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, 31, body, (lo, hi))
    return lo


def _shard_offset(local_count, axes: Sequence[str]):
    """How many tied values shards before this one hold (shards ordered by mesh position)."""
    offset = jnp.zeros_like(local_count)
    stride_total = local_count
    for axis in reversed(axes):
        gathered = lax.all_gather(stride_total, axis)  # [n_axis, ...]
        index = lax.axis_index(axis)
        before = jnp.sum(jnp.where((jnp.arange(gathered.shape[0]) < index).reshape(
            (-1,) + (1,) * (gathered.ndim - 1)), gathered, 0), axis=0)
        offset = offset + before
        stride_total = jnp.sum(gathered, axis=0)
    return offset


def _row_kth_bits(values: jax.Array, k: int, axes: Sequence[str]) -> jax.Array:
    """Per-row k-th largest: each shard's top-k candidates, merged across ``axes``."""
    return _merge_row_kth(lax.top_k(values, min(k, values.shape[-1]))[0], k, axes)


def _merge_row_kth(local: jax.Array, k: int, axes: Sequence[str]) -> jax.Array:
    """Bits of the per-row k-th largest, given each shard's top values in descending order."""
    for axis in axes:
        local = lax.all_gather(local, axis, axis=local.ndim - 1, tiled=True)
    return lax.bitcast_convert_type(lax.top_k(local, k)[0][..., k - 1], jnp.int32)


def _batch_kth_bits(values: jax.Array, bits: jax.Array, k, axes: Sequence[str], row_candidates: int) -> jax.Array:
    """Batch-wide k-th largest. Bisection runs over each row's top ``row_candidates`` only; if any
    row may hold more values above the result than it offered, the exact full bisection reruns."""
    width = values.shape[-1]
    if row_candidates >= width:
        return kth_largest_bits(bits, k, axes, row_wise=False)
    candidates = lax.top_k(values, row_candidates)[0]
    cand_bits = lax.bitcast_convert_type(candidates, jnp.int32)
    tau = kth_largest_bits(cand_bits, k, axes, row_wise=False)
    # Every value above tau is a candidate unless a row's smallest candidate reaches tau.
    spill = _psum(jnp.sum(cand_bits[..., -1] >= tau), axes)
    return lax.cond(spill == 0, lambda: tau, lambda: kth_largest_bits(bits, k, axes, row_wise=False))


def _keep(bits: jax.Array, tau: jax.Array, k, axes: Sequence[str], row_wise: bool) -> jax.Array:
    """Values above the threshold, plus tied values in (shard, position) order until k are kept."""
    tau_b = tau[..., None] if row_wise else tau
    above = bits > tau_b
    tied = (bits == tau_b) & (tau_b > 0)

    def count(m):
        return _psum(jnp.sum(m, axis=-1) if row_wise else jnp.sum(m), axes)

    room = k - count(above)  # tied values still to keep

    def ranked():
        flat_tied = tied if row_wise else tied.reshape(-1)
        rank = jnp.cumsum(flat_tied, axis=-1) - flat_tied  # rank among local ties, in position order
        local = jnp.sum(flat_tied, axis=-1)
        if axes:
            rank = rank + (_shard_offset(local, axes)[..., None] if row_wise else _shard_offset(local, axes))
        keep = flat_tied & (rank < (room[..., None] if row_wise else room))
        return above | (keep if row_wise else keep.reshape(tied.shape))

    # Usually every tie fits (a single value sits at the threshold): no ranking pass needed.
    fits = jnp.all(count(tied) <= room)
    return lax.cond(fits, lambda: above | tied, ranked)


def top_mask(values: jax.Array, k, axes: Sequence[str], row_wise: bool,
             row_candidates: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Mask of the k largest positive ``values`` (per row, or over the whole array) across the
    shards along ``axes``; returns (mask, k-th largest value). Per row, each shard's top-k is
    merged; over the whole array, a count bisection on each row's top ``row_candidates`` (all
    values when None), verified exact."""
    values = jnp.maximum(values, 0.0).astype(jnp.float32)
    bits = lax.bitcast_convert_type(values, jnp.int32)
    if row_wise:
        tau = _row_kth_bits(values, k, axes)
    else:
        tau = _batch_kth_bits(values, bits, k, axes, row_candidates or values.shape[-1])
    return _keep(bits, tau, k, axes, row_wise), lax.bitcast_convert_type(tau, jnp.float32)


class Candidates(NamedTuple):
    """Each row's top candidates: latent index, value (ReLU'd), whether it is kept."""

    idx_BC: jax.Array
    val_BC: jax.Array
    keep_BC: jax.Array


def top_candidates(values: jax.Array, k: int, axes: Sequence[str]) -> Candidates:
    """Per-row top-k in sparse form ([B, k]): the kept set of ``top_mask(row_wise=True)``, ties
    ranked in the same order (equal candidates come in position order)."""
    width = min(k, values.shape[-1])
    val_BC, idx_BC = lax.top_k(values, width)
    val_BC = jnp.maximum(val_BC, 0.0)  # only positive values are kept
    bits = lax.bitcast_convert_type(val_BC, jnp.int32)
    tau = _merge_row_kth(val_BC, k, axes)
    keep = _keep(bits, tau, k, axes, row_wise=True)
    return Candidates(idx_BC, val_BC, keep)


class BatchCandidates(NamedTuple):
    """First stage of a batch-wide selection in sparse form: each row's top C candidates and
    the threshold bisected over them. Rows whose C-th candidate reaches it (heavy tokens) may
    hold more kept values than they offered: ``overflow_B`` marks them, the same on every
    shard of the latent axes, and ``overflow_count`` counts them on this shard."""

    idx_BC: jax.Array
    val_BC: jax.Array
    kth: jax.Array
    overflow_B: jax.Array
    overflow_count: jax.Array

    def select(self, k, axes: Sequence[str]) -> Candidates:
        """The exact selection when no row of any shard overflows."""
        bits = lax.bitcast_convert_type(self.val_BC, jnp.int32)
        tau = lax.bitcast_convert_type(self.kth, jnp.int32)
        return Candidates(self.idx_BC, self.val_BC, _keep(bits, tau, k, axes, row_wise=False))


def batch_candidates(values: jax.Array, k, axes: Sequence[str], row_candidates: int,
                     latent_axes: Sequence[str] = ()) -> BatchCandidates:
    """Each row's top ``row_candidates`` of ``values`` (ReLU'd) and the k-th largest of them
    over the batch and ``axes``, bisected on their bits."""
    B, H = values.shape
    C = min(row_candidates, H)
    val_BC, idx_BC = lax.top_k(values, C)
    val_BC = jnp.maximum(val_BC, 0.0)
    bits = lax.bitcast_convert_type(val_BC, jnp.int32)
    tau = kth_largest_bits(bits, k, axes, row_wise=False)
    last_B = bits[:, -1]
    overflow_B = (last_B >= tau) & (last_B > 0) & (C < H)
    overflow_B = _psum(overflow_B.astype(jnp.int32), latent_axes) > 0
    return BatchCandidates(idx_BC, val_BC, lax.bitcast_convert_type(tau, jnp.float32), overflow_B,
                           jnp.sum(overflow_B).astype(jnp.int32))


class OverflowSelection(NamedTuple):
    """The exact batch-wide selection with heavy rows taken out of the candidate lists:
    ``main`` for the other rows, and a dense [R, H] mask for rows ``rows_R`` (B: unused)."""

    main: Candidates
    rows_R: jax.Array
    keep_RH: jax.Array
    kth: jax.Array


def with_overflow_rows(values: jax.Array, first: BatchCandidates, k, axes: Sequence[str],
                       rows: int) -> OverflowSelection:
    """Re-bisect the threshold over the other rows' candidates plus the overflow rows' whole
    rows (at most ``rows`` of them per shard; the caller checks ``first.overflow_count``).
    Exact; ties are kept in the order main rows, then overflow rows."""
    B, C = first.idx_BC.shape
    rows_R = jnp.nonzero(first.overflow_B, size=rows, fill_value=B)[0]
    used_R = rows_R < B
    values_RH = jnp.where(used_R[:, None], jnp.maximum(values[jnp.minimum(rows_R, B - 1)], 0.0), 0.0)
    main_bits = jnp.where(first.overflow_B[:, None], 0, lax.bitcast_convert_type(first.val_BC, jnp.int32))
    all_bits = jnp.concatenate([main_bits.reshape(-1), lax.bitcast_convert_type(values_RH, jnp.int32).reshape(-1)])
    tau = kth_largest_bits(all_bits, k, axes, row_wise=False)
    keep = _keep(all_bits, tau, k, axes, row_wise=False)
    kth = lax.bitcast_convert_type(tau, jnp.float32)
    main = Candidates(first.idx_BC, first.val_BC, keep[: B * C].reshape(B, C))
    return OverflowSelection(main, rows_R, keep[B * C:].reshape(rows, -1), kth)

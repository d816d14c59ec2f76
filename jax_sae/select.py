"""Exact top-k selection without sorting, across shards.

The k-th largest of non-negative float32 values is found by bisection on their bit patterns
(for non-negative floats, integer order of the bits is numeric order): 31 rounds of "how many
values are >= mid?", each a compare-and-count plus one scalar all-reduce across shards. No
candidate values are gathered, nothing of size [B, h] leaves its device. Values equal to the
threshold are kept in a fixed order (shard, then position) until exactly k are kept.
"""

from __future__ import annotations

from typing import Sequence

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


def top_mask(values: jax.Array, k, axes: Sequence[str], row_wise: bool) -> tuple[jax.Array, jax.Array]:
    """Mask of the k largest positive ``values`` (per row, or over the whole array) across the
    shards along ``axes``; returns (mask, k-th largest value)."""
    bits = lax.bitcast_convert_type(jnp.maximum(values, 0.0).astype(jnp.float32), jnp.int32)
    tau = kth_largest_bits(bits, k, axes, row_wise)
    tau_b = tau[..., None] if row_wise else tau
    above = bits > tau_b
    tied = (bits == tau_b) & (tau_b > 0)
    n_above = _psum(jnp.sum(above, axis=-1) if row_wise else jnp.sum(above), axes)
    room = k - n_above  # tied values still to keep
    flat_tied = tied if row_wise else tied.reshape(-1)
    rank = jnp.cumsum(flat_tied, axis=-1) - flat_tied  # rank among local ties, in position order
    local = jnp.sum(flat_tied, axis=-1)
    if axes:
        rank = rank + (_shard_offset(local, axes)[..., None] if row_wise else _shard_offset(local, axes))
    keep_tied = flat_tied & (rank < (room[..., None] if row_wise else room))
    mask = above | (keep_tied if row_wise else keep_tied.reshape(tied.shape))
    return mask, lax.bitcast_convert_type(tau, jnp.float32)

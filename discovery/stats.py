"""One streaming pass over a store layer: per-feature statistics and top examples, in JAX.

State is O(features x examples): nothing of size rows x features is ever materialised beyond
one block. Blocks hold whole samples so sample-level scores (max and mean over a sample's
frames) are exact. The only larger output is the sample-level score matrix [samples, features]
(float16) that tag alignment needs; it grows with samples, not with rows.

Non-finite rows (NaN or Inf anywhere in the row) are skipped, not fed to the SAE: they count as
padding, so a sample's scores come from its finite rows alone (a sample with none scores 0 and
is marked in ``PassResult.finite_rows_per_sample``). Their global indices come back in
``PassResult.nonfinite_rows`` for the caller to report; a layer with no finite row at all stops
with a usage error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import PartitionSpec as P

from extractor.errors import UsageError
from jax_sae import model as M
from jax_sae.api import SAE
from jax_sae.config import SAEConfig
from jax_sae.sharding import DATA, make_mesh


@struct.dataclass
class FeatureState:
    """Running per-feature statistics (H features, E examples each)."""

    token_count_H: jax.Array
    sample_count_H: jax.Array
    max_H: jax.Array
    sum_H: jax.Array
    top_max_HE: jax.Array  # best per-sample max activations
    top_max_sample_HE: jax.Array
    top_mean_HE: jax.Array  # best per-sample mean activations
    top_mean_sample_HE: jax.Array
    top_token_HE: jax.Array  # best single-token activations
    top_token_row_HE: jax.Array


def init_state(hidden: int, examples: int) -> FeatureState:
    def neg():  # a fresh buffer per field: the state is donated leaf by leaf
        return jnp.full((hidden, examples), -jnp.inf, jnp.float32)

    def none():
        return jnp.full((hidden, examples), -1, jnp.int32)

    return FeatureState(jnp.zeros((hidden,), jnp.int32), jnp.zeros((hidden,), jnp.int32),
                        jnp.zeros((hidden,), jnp.float32), jnp.zeros((hidden,), jnp.float32),
                        neg(), none(), neg(), none(), neg(), none())


def _merge(vals_HE, ids_HE, new_vals_HN, new_ids_HN, examples: int):
    """Keep the ``examples`` largest of carried and new candidates, per feature."""
    vals = jnp.concatenate([vals_HE, new_vals_HN], axis=1)
    ids = jnp.concatenate([ids_HE, new_ids_HN], axis=1)
    top, where = lax.top_k(vals, examples)
    return top, jnp.take_along_axis(ids, where, axis=1)


def _block_stats(cfg: SAEConfig, examples: int, max_samples: int, token_examples: bool, params, threshold, scale,
                 x_RD, segment_R, row_R, length_S):
    """One device's rows of a block -> statistics merged across the data axis (replicated)."""
    valid_R = row_R >= 0
    f_RH = M.encode_infer(cfg, params, threshold, x_RD * scale)
    f_RH = jnp.where(valid_R[:, None], f_RH, 0.0)
    smax_SH = lax.pmax(jax.ops.segment_max(f_RH, segment_R, num_segments=max_samples + 1)[:max_samples], DATA)
    smax_SH = jnp.where((length_S > 0)[:, None], jnp.maximum(smax_SH, 0.0), 0.0)
    ssum_SH = lax.psum(jax.ops.segment_sum(f_RH, segment_R, num_segments=max_samples + 1)[:max_samples], DATA)
    if token_examples:  # the top single tokens ("moments"); the costliest statistic, so on request
        local_top, where = lax.top_k(jnp.where(valid_R[None, :], f_RH.T, -jnp.inf), examples)
        candidates = lax.all_gather(local_top, DATA, axis=1, tiled=True)  # [H, devices * E] candidates
        candidate_rows = lax.all_gather(row_R[where], DATA, axis=1, tiled=True)
        top, pick = lax.top_k(candidates, examples)
        top_rows = jnp.take_along_axis(candidate_rows, pick, axis=1)
    else:
        top = jnp.full((f_RH.shape[1], examples), -jnp.inf, jnp.float32)
        top_rows = jnp.full((f_RH.shape[1], examples), -1, jnp.int32)
    return (lax.psum(jnp.sum(f_RH > 0, axis=0, dtype=jnp.int32), DATA), lax.psum(jnp.sum(f_RH, axis=0), DATA),
            lax.pmax(jnp.max(f_RH, axis=0), DATA), smax_SH, ssum_SH / jnp.maximum(length_S, 1)[:, None],
            top, top_rows)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=5)
def update(cfg: SAEConfig, examples: int, max_samples: int, mesh, token_examples: bool, state: FeatureState, params,
           threshold, scale, x_RD, segment_R, row_R, sample_S, length_S):
    """Fold one block of whole samples into the state; rows are split over the mesh's data axis.

    ``segment_R`` maps each row to its sample's slot in the block (``max_samples`` for padding),
    ``row_R`` is the global row index (-1 padding), ``sample_S`` the global sample index of each
    slot (-1 padding) and ``length_S`` its row count. Returns the new state and the block's
    per-sample (max, mean) scores [S, H].
    """
    stats = jax.shard_map(functools.partial(_block_stats, cfg, examples, max_samples, token_examples), mesh=mesh,
                          in_specs=(P(), P(), P(), P(DATA), P(DATA), P(DATA), P()), out_specs=(P(),) * 7,
                          check_vma=False)  # every output comes out of a psum/pmax/all_gather: replicated
    token_count, total, peak, smax_SH, smean_SH, block_top, block_rows = stats(
        params, threshold, scale, x_RD, segment_R, row_R, length_S)
    slot_ok = (sample_S >= 0)[None, :]
    sample_HS = jnp.broadcast_to(sample_S[None, :], (smax_SH.shape[1], max_samples))
    top_max, top_max_s = _merge(state.top_max_HE, state.top_max_sample_HE,
                                jnp.where(slot_ok, smax_SH.T, -jnp.inf), sample_HS, examples)
    top_mean, top_mean_s = _merge(state.top_mean_HE, state.top_mean_sample_HE,
                                  jnp.where(slot_ok, smean_SH.T, -jnp.inf), sample_HS, examples)
    top_tok, top_tok_row = _merge(state.top_token_HE, state.top_token_row_HE, block_top, block_rows, examples)
    new = FeatureState(
        token_count_H=state.token_count_H + token_count,
        sample_count_H=state.sample_count_H + jnp.sum((smax_SH > 0) & slot_ok.T, axis=0, dtype=jnp.int32),
        max_H=jnp.maximum(state.max_H, peak),
        sum_H=state.sum_H + total,
        top_max_HE=top_max, top_max_sample_HE=top_max_s,
        top_mean_HE=top_mean, top_mean_sample_HE=top_mean_s,
        top_token_HE=top_tok, top_token_row_HE=top_tok_row,
    )
    return new, smax_SH, smean_SH


@dataclass
class PassResult:
    """Host copies of the final statistics plus the sample-level score matrices."""

    token_count: np.ndarray
    sample_count: np.ndarray
    max: np.ndarray
    sum: np.ndarray
    top: dict[str, tuple[np.ndarray, np.ndarray]]  # aggregation -> (values [H, E], ids [H, E])
    sample_max: np.ndarray  # [n_samples, H] float16
    sample_mean: np.ndarray
    n_rows: int  # every row of the layer, skipped ones included
    n_samples: int
    nonfinite_rows: np.ndarray  # global indices of the skipped NaN/Inf rows, ascending
    finite_rows_per_sample: np.ndarray  # [n_samples]: the rows each sample's scores come from

    @property
    def finite_rows(self) -> int:
        """Rows the statistics describe: the layer's rows less the skipped ones."""
        return self.n_rows - len(self.nonfinite_rows)


def _block_rows(samples: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Global row indices of a block of whole samples, in block order."""
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in samples])


def _pad_block(samples: np.ndarray, x: np.ndarray, offsets: np.ndarray, block_rows: int, max_samples: int,
               finite: np.ndarray | None = None):
    """The block padded to fixed shapes; rows that are not ``finite`` (default: NaN/Inf-free) become
    padding: zeros, row -1, left out of their sample's length."""
    finite = np.isfinite(x).all(axis=1) if finite is None else finite
    n = len(x)
    x_pad = np.zeros((block_rows, x.shape[1]), np.float32)
    x_pad[:n] = x if finite.all() else np.where(finite[:, None], x, 0.0)
    segment = np.full(block_rows, max_samples, np.int32)
    segment[:n] = np.repeat(np.arange(len(samples), dtype=np.int32),
                            (offsets[samples + 1] - offsets[samples]).astype(np.int32))
    rows = np.full(block_rows, -1, np.int32)
    rows[:n] = np.where(finite, _block_rows(samples, offsets), -1)
    sample_ids = np.full(max_samples, -1, np.int32)
    sample_ids[: len(samples)] = samples
    length_pad = np.zeros(max_samples, np.int32)
    length_pad[: len(samples)] = np.bincount(segment[:n][finite], minlength=len(samples))
    return x_pad, segment, rows, sample_ids, length_pad


def feature_pass(sae: SAE, store, layer: int, *, examples: int = 20, block_rows: int = 4096,
                 progress: bool = True, devices: int | None = None, token_examples: bool = True) -> PassResult:
    """Stream every sample of ``layer`` through the SAE once, rows split over ``devices``
    (default: all local devices). ``token_examples=False`` skips the top single tokens (the
    "moments" examples), the pass's costliest statistic, when they are not wanted."""
    from tqdm import tqdm

    mesh = make_mesh(devices or jax.local_device_count(), 1)

    if store.d_model != sae.cfg.d_model:
        raise UsageError(f"store width {store.d_model} does not match the SAE's d_model {sae.cfg.d_model}")
    store.check_layer(layer)
    offsets = store.offsets
    longest = int(np.max(offsets[1:] - offsets[:-1])) if store.n_samples else 0
    block_rows = max(block_rows, longest)
    block_rows = -(-block_rows // mesh.size) * mesh.size  # rows split evenly over the devices
    max_samples = int(min(store.n_samples, max(1, block_rows // max(1, int(np.min(offsets[1:] - offsets[:-1]))))))
    hidden = sae.cfg.hidden_dim
    examples = min(examples, max(1, store.n_samples))
    state = init_state(hidden, max(examples, 1))
    sample_max = np.zeros((store.n_samples, hidden), np.float16)
    sample_mean = np.zeros((store.n_samples, hidden), np.float16)
    finite_per_sample = np.zeros(store.n_samples, np.int64)
    nonfinite = []
    with tqdm(total=store.n_rows, desc=f"discover layer {layer}", unit="row", disable=not progress) as bar:
        for samples, x in store.iter_sample_blocks(layer, block_rows):
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                nonfinite.append(_block_rows(samples, offsets)[~finite])
            padded = _pad_block(samples, x, offsets, block_rows, max_samples, finite)
            finite_per_sample[samples] = padded[4][: len(samples)]
            state, smax, smean = update(sae.cfg, examples, max_samples, mesh, token_examples, state, sae.params,
                                        sae.threshold, sae.input_scale, *map(jnp.asarray, padded))
            sample_max[samples] = np.asarray(smax[: len(samples)])
            sample_mean[samples] = np.asarray(smean[: len(samples)])
            bar.update(len(x))
    nonfinite_rows = np.concatenate(nonfinite) if nonfinite else np.zeros(0, np.int64)
    if store.n_rows and len(nonfinite_rows) == store.n_rows:
        raise UsageError(f"every row of layer {layer} of {store.path} is non-finite (NaN/Inf): there is nothing to "
                         "discover; re-extract the store")
    host = jax.device_get(state)
    return PassResult(
        token_count=host.token_count_H, sample_count=host.sample_count_H, max=host.max_H, sum=host.sum_H,
        top={"max": (host.top_max_HE, host.top_max_sample_HE), "mean": (host.top_mean_HE, host.top_mean_sample_HE),
             "moments": (host.top_token_HE, host.top_token_row_HE)},
        sample_max=sample_max, sample_mean=sample_mean, n_rows=store.n_rows, n_samples=store.n_samples,
        nonfinite_rows=nonfinite_rows, finite_rows_per_sample=finite_per_sample,
    )

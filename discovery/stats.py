"""One streaming pass over a store layer: per-feature statistics and top examples, in JAX.

State is O(features x examples): nothing of size rows x features is ever materialised beyond
one block. Blocks hold whole samples so sample-level scores (max and mean over a sample's
frames) are exact. The only larger output is the sample-level score matrix [samples, features]
(float16) that tag alignment needs; it grows with samples, not with rows, and goes to disk
(``discovery.scores``), so the pass's memory does not grow with either.

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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae_core.errors import UsageError
from sae_core.store import acts_name, sample_blocks
from jax_sae import model as M
from jax_sae.api import SAE
from jax_sae.config import SAEConfig
from jax_sae.distributed import gather_host
from jax_sae.sharding import DATA, make_mesh

from .scores import SampleScores


# Edges of each feature's activation histogram: half-octaves from 2^-8 to 2^8 (activations are of
# the SAE's scaled inputs; the first and last bins catch what falls outside).
HIST_EDGES = 2.0 ** (np.arange(-16, 17) / 2.0)


def histogram_counts(token_count_H: np.ndarray, above_HE: np.ndarray) -> np.ndarray:
    """[H, len(HIST_EDGES) + 1] rows per bin: below the first edge, between each pair, above the last;
    from the rows firing and the rows above each edge."""
    cumulative = np.concatenate([token_count_H[:, None], above_HE], axis=1).astype(np.int64)
    return np.concatenate([cumulative[:, :-1] - cumulative[:, 1:], cumulative[:, -1:]], axis=1)


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
    above_HE: jax.Array  # rows whose activation is above each of HIST_EDGES


def init_state(hidden: int, examples: int) -> FeatureState:
    def neg():  # a fresh buffer per field: the state is donated leaf by leaf
        return jnp.full((hidden, examples), -jnp.inf, jnp.float32)

    def none():
        return jnp.full((hidden, examples), -1, jnp.int32)

    return FeatureState(jnp.zeros((hidden,), jnp.int32), jnp.zeros((hidden,), jnp.int32),
                        jnp.zeros((hidden,), jnp.float32), jnp.zeros((hidden,), jnp.float32),
                        neg(), none(), neg(), none(), neg(), none(),
                        jnp.zeros((hidden, len(HIST_EDGES)), jnp.int32))


def _merge(vals_HE, ids_HE, new_vals_HN, new_ids_HN, examples: int):
    """Keep the ``examples`` largest of carried and new candidates, per feature."""
    vals = jnp.concatenate([vals_HE, new_vals_HN], axis=1)
    ids = jnp.concatenate([ids_HE, new_ids_HN], axis=1)
    top, where = lax.top_k(vals, examples)
    return top, jnp.take_along_axis(ids, where, axis=1)


@dataclass(frozen=True)
class PassShape:
    """What the compiled update is specialised on: the SAE, the block's sample slots, the mesh and
    whether the top single tokens are collected (the costliest statistic, so on request)."""

    cfg: SAEConfig
    examples: int
    max_samples: int
    mesh: jax.sharding.Mesh
    token_examples: bool


def _top_tokens(shape: PassShape, f_RH, valid_R, row_R):
    """The block's ``examples`` best single tokens per feature, merged across the data axis."""
    if not shape.token_examples:
        return (jnp.full((f_RH.shape[1], shape.examples), -jnp.inf, jnp.float32),
                jnp.full((f_RH.shape[1], shape.examples), -1, jnp.int32))
    local_top, where = lax.top_k(jnp.where(valid_R[None, :], f_RH.T, -jnp.inf), shape.examples)
    candidates = lax.all_gather(local_top, DATA, axis=1, tiled=True)  # [H, devices * E] candidates
    candidate_rows = lax.all_gather(row_R[where], DATA, axis=1, tiled=True)
    top, pick = lax.top_k(candidates, shape.examples)
    return top, jnp.take_along_axis(candidate_rows, pick, axis=1)


def _block_stats(shape: PassShape, params, threshold, scale, x_RD, segment_R, row_R):
    """One device's rows of a block -> statistics merged across the data axis (replicated).
    Rows with ``row_R`` -1 are padding; rows with a NaN/Inf are skipped like padding and come
    back flagged in the (replicated) ``bad`` mask of the whole block."""
    slots = shape.max_samples + 1  # the last slot collects the padding
    finite_R = jnp.all(jnp.isfinite(x_RD), axis=1)
    valid_R = (row_R >= 0) & finite_R
    bad_R = lax.all_gather((row_R >= 0) & ~finite_R, DATA, tiled=True)
    row_R = jnp.where(valid_R, row_R, -1)
    length_S = lax.psum(jax.ops.segment_sum(valid_R.astype(jnp.int32), segment_R, num_segments=slots)[:-1], DATA)
    f_RH = M.encode_infer(shape.cfg, params, threshold, jnp.where(valid_R[:, None], x_RD, 0.0) * scale)
    f_RH = jnp.where(valid_R[:, None], f_RH, 0.0)
    smax_SH = lax.pmax(jax.ops.segment_max(f_RH, segment_R, num_segments=slots)[:-1], DATA)
    smax_SH = jnp.where((length_S > 0)[:, None], jnp.maximum(smax_SH, 0.0), 0.0)
    ssum_SH = lax.psum(jax.ops.segment_sum(f_RH, segment_R, num_segments=slots)[:-1], DATA)
    top, top_rows = _top_tokens(shape, f_RH, valid_R, row_R)
    # One compare-and-count per edge, one edge at a time (lax.map): written as 33 separate sums, XLA
    # kept every edge's [R, H] int32 mask alive at once (17 GB at R = 4,096, H = 32,768).
    above_HE = lax.map(lambda edge: jnp.sum(f_RH > edge, axis=0, dtype=jnp.int32),
                       jnp.asarray(HIST_EDGES, jnp.float32)).T
    return (lax.psum(jnp.sum(f_RH > 0, axis=0, dtype=jnp.int32), DATA), lax.psum(jnp.sum(f_RH, axis=0), DATA),
            lax.pmax(jnp.max(f_RH, axis=0), DATA), smax_SH, ssum_SH / jnp.maximum(length_S, 1)[:, None],
            top, top_rows, length_S, bad_R, lax.psum(above_HE, DATA))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def update(shape: PassShape, state: FeatureState, params, threshold, scale, x_RD, segment_R, row_R, sample_S):
    """Fold one block of whole samples into the state; rows are split over the mesh's data axis
    (the mesh may span processes: each one holds only its devices' rows).

    ``segment_R`` maps each row to its sample's slot in the block (``max_samples`` for padding),
    ``row_R`` is the global row index (-1 padding) and ``sample_S`` the global sample index of
    each slot (-1 padding). Returns the new state, the block's per-sample (max, mean) scores
    [S, H], each slot's finite row count [S] and the block's NaN/Inf row mask [R], all replicated.
    """
    stats = jax.shard_map(functools.partial(_block_stats, shape), mesh=shape.mesh,
                          in_specs=(P(), P(), P(), P(DATA), P(DATA), P(DATA)), out_specs=(P(),) * 10,
                          check_vma=False)  # every output comes out of a psum/pmax/all_gather: replicated
    token_count, total, peak, smax_SH, smean_SH, block_top, block_rows, length_S, bad_R, above_HE = stats(
        params, threshold, scale, x_RD, segment_R, row_R)
    slot_ok = (sample_S >= 0)[None, :]
    sample_HS = jnp.broadcast_to(sample_S[None, :], (smax_SH.shape[1], shape.max_samples))

    def merged(vals_HE, ids_HE, new_vals_HN, new_ids_HN):
        return _merge(vals_HE, ids_HE, new_vals_HN, new_ids_HN, shape.examples)

    top_max, top_max_s = merged(state.top_max_HE, state.top_max_sample_HE, jnp.where(slot_ok, smax_SH.T, -jnp.inf),
                                sample_HS)
    top_mean, top_mean_s = merged(state.top_mean_HE, state.top_mean_sample_HE,
                                  jnp.where(slot_ok, smean_SH.T, -jnp.inf), sample_HS)
    top_tok, top_tok_row = merged(state.top_token_HE, state.top_token_row_HE, block_top, block_rows)
    new = FeatureState(
        token_count_H=state.token_count_H + token_count,
        sample_count_H=state.sample_count_H + jnp.sum((smax_SH > 0) & slot_ok.T, axis=0, dtype=jnp.int32),
        max_H=jnp.maximum(state.max_H, peak),
        sum_H=state.sum_H + total,
        top_max_HE=top_max, top_max_sample_HE=top_max_s,
        top_mean_HE=top_mean, top_mean_sample_HE=top_mean_s,
        top_token_HE=top_tok, top_token_row_HE=top_tok_row,
        above_HE=state.above_HE + above_HE,
    )
    return new, smax_SH, smean_SH, length_S, bad_R


@dataclass
class PassResult:
    """Host copies of the final statistics plus the sample-level score matrices."""

    token_count: np.ndarray
    sample_count: np.ndarray
    max: np.ndarray
    sum: np.ndarray
    top: dict[str, tuple[np.ndarray, np.ndarray]]  # aggregation -> (values [H, E], ids [H, E])
    sample_max: SampleScores | None  # [n_samples, H] float16 on disk (``.dense()`` for an array)
    sample_mean: SampleScores | None  # None unless asked for (``scores=``)
    n_rows: int  # every row of the layer, skipped ones included
    n_samples: int
    nonfinite_rows: np.ndarray  # global indices of the skipped NaN/Inf rows, ascending
    finite_rows_per_sample: np.ndarray  # [n_samples]: the rows each sample's scores come from
    rows_read_per_process: tuple[int, ...] = ()  # store rows each process read (its devices' share)
    histogram: np.ndarray | None = None  # [H, len(HIST_EDGES) + 1] rows per activation bin (HIST_EDGES)

    def close(self) -> None:
        """Remove the score files now (they go anyway when the result is collected)."""
        for scores in (self.sample_max, self.sample_mean):
            if scores is not None:
                scores.close()

    @property
    def finite_rows(self) -> int:
        """Rows the statistics describe: the layer's rows less the skipped ones."""
        return self.n_rows - len(self.nonfinite_rows)


def _block_layout(samples: np.ndarray, offsets: np.ndarray, block_rows: int, max_samples: int):
    """The fixed-shape bookkeeping of a block of consecutive samples: each row's slot (``max_samples``
    for padding) and global index (-1 padding), and each slot's global sample index (-1 padding)."""
    lengths = (offsets[samples + 1] - offsets[samples]).astype(np.int64)
    n = int(lengths.sum())
    segment = np.full(block_rows, max_samples, np.int32)
    segment[:n] = np.repeat(np.arange(len(samples), dtype=np.int32), lengths)
    rows = np.full(block_rows, -1, np.int32)
    rows[:n] = np.arange(offsets[samples[0]], offsets[samples[0]] + n)
    sample_ids = np.full(max_samples, -1, np.int32)
    sample_ids[: len(samples)] = samples
    return segment, rows, sample_ids


def _local(x: jax.Array) -> np.ndarray:
    """A host copy of a replicated (possibly multi-process) array."""
    return np.asarray(x.addressable_data(0))


class _BlockReader:
    """Reads, for one block of rows, only the rows that land on this process's devices (padded to
    ``block_rows`` with zeros), and counts the rows it read."""

    def __init__(self, store, layer: int, block_rows: int, sharding: NamedSharding, stream: str = "cond"):
        self.store, self.name, self.block_rows, self.sharding = store, acts_name(layer, stream), block_rows, sharding
        self.rows_read = 0

    def __call__(self, lo: int, hi: int) -> jax.Array:
        def read(index):  # this device's rows of the padded block [lo, lo + block_rows)
            part = index[0]
            start, stop = part.start or 0, part.stop if part.stop is not None else self.block_rows
            x = np.zeros((stop - start, self.store.d_model), np.float32)
            a, b = lo + start, min(lo + stop, hi)
            if b > a:
                x[: b - a] = self.store.read_rows(self.name, a, b)
                self.rows_read += b - a
            return x
        return jax.make_array_from_callback((self.block_rows, self.store.d_model), self.sharding, read)


class _SampleScores:
    """The host side of the pass: per-sample scores (on disk, ``discovery.scores``), finite rows per
    sample, the skipped rows."""

    def __init__(self, n_samples: int, hidden: int, kinds: tuple[str, ...], directory):
        self.max, self.mean = (SampleScores.create(directory, f"sample-{kind}", n_samples, hidden) if kind in kinds
                               else None for kind in ("max", "mean"))
        self.finite_per_sample = np.zeros(n_samples, np.int64)
        self.nonfinite: list[np.ndarray] = []

    def add(self, samples: np.ndarray, lo: int, smax, smean, length, bad) -> None:
        for scores, values in ((self.max, smax), (self.mean, smean)):
            if scores is not None:
                scores.write(samples, _local(values)[: len(samples)])
        self.finite_per_sample[samples] = _local(length)[: len(samples)]
        bad_rows = np.flatnonzero(_local(bad))
        if len(bad_rows):
            self.nonfinite.append(lo + bad_rows)

    def nonfinite_rows(self) -> np.ndarray:
        return np.concatenate(self.nonfinite) if self.nonfinite else np.zeros(0, np.int64)


BLOCK_VALUES = 1 << 25  # a block's activations [rows, features] at most (128 MiB of float32 per device copy)


def _block_sizes(offsets: np.ndarray, block_rows: int, devices: int, hidden: int | None = None) -> tuple[int, int]:
    """Rows per block (at most ``BLOCK_VALUES / hidden`` per device, so the pass's memory does not
    grow with the SAE's width, but at least the longest sample, split evenly over the devices) and
    the most samples a block can hold."""
    lengths = offsets[1:] - offsets[:-1]
    if hidden:
        block_rows = min(block_rows, max(1, BLOCK_VALUES // hidden) * devices)
    block_rows = max(block_rows, int(np.max(lengths)) if len(lengths) else 0)
    block_rows = -(-block_rows // devices) * devices
    max_samples = int(min(len(lengths), max(1, block_rows // max(1, int(np.min(lengths)) if len(lengths) else 1))))
    return block_rows, max_samples


def feature_pass(sae: SAE, store, layer: int, *, examples: int = 20, block_rows: int = 4096,
                 progress: bool = True, devices: int | None = None, token_examples: bool = True,
                 scores: tuple[str, ...] = ("max", "mean"), scores_dir=None) -> PassResult:
    """Stream every sample of ``layer`` through the SAE once, rows split over ``devices``
    (default: every device of every process). ``token_examples=False`` skips the top single
    tokens (the "moments" examples), the pass's costliest statistic, when they are not wanted.
    ``scores``: which per-sample score matrices to keep, in files under ``scores_dir`` (default
    the temporary directory) removed when the result is collected: memory stays flat as the
    samples grow.

    Under ``jax.distributed`` every process runs this with the same arguments: each reads from
    the store only the rows of each block that land on its own devices, the statistics are merged
    by the step's collectives, and every process returns the same result."""
    from tqdm import tqdm

    if store.d_model != sae.cfg.d_model:
        raise UsageError(f"store width {store.d_model} does not match the SAE's d_model {sae.cfg.d_model}")
    store.check_layer(layer, sae.cfg.input_stream)
    mesh = make_mesh(devices or jax.device_count(), 1)
    rows_on_devices, replicated = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())

    def put(value, sharding=replicated):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    offsets = store.offsets
    block_rows, max_samples = _block_sizes(offsets, block_rows, mesh.size, sae.cfg.hidden_dim)
    shape = PassShape(sae.cfg, min(examples, max(1, store.n_samples)), max_samples, mesh, token_examples)
    state = jax.tree.map(put, init_state(sae.cfg.hidden_dim, max(shape.examples, 1)))
    constants = jax.tree.map(put, (sae.params, sae.threshold, np.float32(sae.input_scale)))
    unknown = set(scores) - {"max", "mean"}
    if unknown:
        raise UsageError(f"unknown sample scores {sorted(unknown)}: choose from max, mean")
    read = _BlockReader(store, layer, block_rows, rows_on_devices, sae.cfg.input_stream)
    sample_scores = _SampleScores(store.n_samples, sae.cfg.hidden_dim, tuple(scores), scores_dir)
    with tqdm(total=store.n_rows, desc=f"discover layer {layer}", unit="row",
              disable=not (progress and jax.process_index() == 0)) as bar:
        for samples in sample_blocks(offsets, block_rows):
            lo, hi = int(offsets[samples[0]]), int(offsets[samples[-1] + 1])
            segment, rows, sample_ids = _block_layout(samples, offsets, block_rows, max_samples)
            state, *block = update(shape, state, *constants, read(lo, hi), put(segment, rows_on_devices),
                                   put(rows, rows_on_devices), put(sample_ids))
            sample_scores.add(samples, lo, *block)
            bar.update(hi - lo)
    return _result(store, layer, jax.tree.map(_local, state), sample_scores, read.rows_read)


def _result(store, layer: int, host: FeatureState, scores: _SampleScores, rows_read: int) -> PassResult:
    nonfinite_rows = scores.nonfinite_rows()
    if store.n_rows and len(nonfinite_rows) == store.n_rows:
        raise UsageError(f"every row of layer {layer} of {store.path} is non-finite (NaN/Inf): there is nothing to "
                         "discover; re-extract the store")
    for kept in (scores.max, scores.mean):
        if kept is not None:
            kept.seal()
    read_per_process = tuple(int(n) for n in gather_host(np.array([rows_read], np.int64)).ravel())
    return PassResult(
        token_count=host.token_count_H, sample_count=host.sample_count_H, max=host.max_H, sum=host.sum_H,
        top={"max": (host.top_max_HE, host.top_max_sample_HE), "mean": (host.top_mean_HE, host.top_mean_sample_HE),
             "moments": (host.top_token_HE, host.top_token_row_HE)},
        sample_max=scores.max, sample_mean=scores.mean, n_rows=store.n_rows, n_samples=store.n_samples,
        nonfinite_rows=nonfinite_rows, finite_rows_per_sample=scores.finite_per_sample,
        rows_read_per_process=read_per_process, histogram=histogram_counts(host.token_count_H, host.above_HE),
    )

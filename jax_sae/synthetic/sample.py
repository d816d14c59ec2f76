"""Drawing samples of a synthetic model on the device, from a key alone.

The distribution is SynthSAEBench's (``config``): feature i's latent normal is a shared low-rank
part s plus its own noise, and it fires when the latent exceeds its threshold; its magnitude is
ReLU(mean + std * normal); then, level by level down the trees, a child keeps firing only where its
parent fires (scaled by the parent's value over the parent's mean) and among siblings still firing
one, chosen uniformly, survives; x = magnitudes @ directions + bias.

Drawn cheaply on a CPU, and exactly so. Given s, feature i fires with probability
q = Phi((s - threshold) / own_scale), so one uniform U per feature decides it (U < q), and U / q is
then a fresh uniform, independent across features, that picks the surviving sibling. Only what can
fire is drawn:

- the features with children (the first levels of the trees, a sixth of the 16k model) densely;
- the leaves only under the parents that fire (about 17 of the 16k model's 2,048 per sample, at
  most ``parent_slots``), one family of siblings per such parent;
- the features outside the trees from one random byte each (four to a 32-bit word: the generator's
  bits are most of a dense draw's cost): a byte below floor(256 q) fires, a byte equal to it is a
  candidate that fires when a fine uniform falls below the remainder (rate q exactly), and each
  candidate (about 27 per sample at 16k, at most ``free_slots``) draws its own uniform and normal.

A parent or candidate beyond those caps (ten standard deviations above the mean count) is dropped
and counted as ``overflow``; x is the dense part's product plus the batch's events' directions, gathered once.
On one core of a 2-vCPU Xeon a batch of 1,024 samples of the 16k model takes 0.45 s against 2.0 s
when every feature drew a dense uniform (BENCHMARKS.md, "Drawing samples")."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from .build import SynthModel, zipf_probabilities
from .config import SynthConfig


def key(seed: int) -> jax.Array:
    """A sampling key. The RngBitGenerator implementation: its bits cost a quarter of threefry's on
    a CPU; a seed gives the same batches on the same platform and JAX version."""
    return jax.random.key(seed, impl="rbg")


class Layout(NamedTuple):
    """Where a model's features sit, for drawing (all static)."""

    split: int  # features [0, split) have children: drawn densely
    leaf_parents: tuple[int, int]  # the leaves' parents [p0, p1) (empty without leaves)
    free: int  # features [free, N) lie outside the trees
    parent_slots: int  # at most this many leaf parents fire per sample
    free_slots: int  # at most this many free features are candidates per sample (fire, or may: 1/256 more)


def _slots(expected: float) -> int:
    """Room for a Poisson-like count of mean ``expected`` (from the Zipf rates, taken 25% higher: the
    hierarchy's compensation can lift a rate a few per cent above its target), ten standard
    deviations up, in steps of 8."""
    mean = 1.25 * expected
    return 8 * math.ceil((mean + 10 * math.sqrt(mean) + 8) / 8)


@functools.lru_cache(maxsize=None)
def layout(cfg: SynthConfig) -> Layout:
    p = zipf_probabilities(cfg)  # each feature's firing rate after the hierarchy
    starts = cfg.level_starts()
    if cfg.roots and cfg.depth:
        split, p0 = starts[cfg.depth], starts[cfg.depth - 1]
        free = cfg.tree_features
    else:
        split = p0 = free = 0
    return Layout(split, (p0, split), free, min(split - p0, _slots(float(p[p0:split].sum()))),
                  min(cfg.n_features - free, _slots(float(p[free:].sum() + (cfg.n_features - free) / 256))))


class Draw(NamedTuple):
    """One batch, the dense part and the sparse events: magnitudes of features [0, split) densely;
    leaf and free events as (feature, magnitude) pairs, magnitude 0 for an empty slot."""

    dense: jax.Array  # [B, split]
    index: jax.Array  # [B, E] feature of each event
    value: jax.Array  # [B, E]
    overflow: jax.Array  # parents and candidates dropped beyond the slots: at least the events lost


def draw(model: SynthModel, key: jax.Array, batch: int) -> Draw:
    cfg, lay = model.cfg, layout(model.cfg)
    k_shared, k_dense, k_dense_normal, k_leaf, k_leaf_normal, k_free, k_free_normal = jax.random.split(key, 7)
    shared = jax.random.normal(k_shared, (batch, cfg.corr_rank))

    def chance(columns):  # q of ``columns`` (a slice or an index array) given the shared part
        lin = shared @ model.factor[columns].T if isinstance(columns, slice) else jnp.einsum(
            "br,b...r->b...", shared, model.factor[columns])
        return ndtr((lin - model.threshold[columns]) / model.noise_scale[columns])

    # features with children, densely, then the hierarchy among them, top down
    head = slice(0, lay.split)
    q = chance(head)
    u = jax.random.uniform(k_dense, q.shape)
    fire = u < q
    pick = jnp.where(fire, u / q, -1.0)  # uniform given fire: which sibling survives
    dense = _magnitudes(model, head, fire, jax.random.normal(k_dense_normal, q.shape))
    dense = _parent_levels(model, dense, pick)

    index, value, overflow = [], [], jnp.zeros((), jnp.int32)
    p0, p1 = lay.leaf_parents
    if p1 > p0:  # each firing leaf parent's family: its children drawn, gated and thinned to one
        slot, n = _compact(dense[:, p0:p1] > 0, lay.parent_slots)
        overflow += jnp.sum(jnp.maximum(n - lay.parent_slots, 0))
        valid = slot < p1 - p0
        parent = p0 + jnp.minimum(slot, p1 - p0 - 1)  # [B, P]
        strength = jnp.where(valid, jnp.take_along_axis(dense, parent, axis=1) / model.mean[parent], 0.0)
        b = cfg.branching
        child = lay.split + (parent - p0)[..., None] * b + jnp.arange(b)  # [B, P, b]
        q = chance(child)
        u = jax.random.uniform(k_leaf, q.shape)
        fire = (u < q) & valid[..., None]
        magnitude = _magnitudes(model, child, fire, jax.random.normal(k_leaf_normal, q.shape)) * strength[..., None]
        keep = _one_sibling(magnitude > 0, jnp.where(fire, u / q, -1.0))
        index.append(jnp.sum(jnp.where(keep, child, 0), axis=-1) + jnp.where(jnp.any(keep, -1), 0, child[..., 0]))
        value.append(jnp.sum(jnp.where(keep, magnitude, 0.0), axis=-1))
    if cfg.n_features > lay.free:  # features outside the trees: candidates from coarse uniforms, then exact
        rest = slice(lay.free, cfg.n_features)
        q = chance(rest)
        level = jnp.floor(q * 256.0)
        coarse = _bytes(k_free, q.shape)  # U8 < level fires; U8 == level fires with chance 256 q - level
        slot, n = _compact((coarse < level) | (coarse == level), lay.free_slots)
        overflow += jnp.sum(jnp.maximum(n - lay.free_slots, 0))
        column = jnp.minimum(slot, q.shape[1] - 1)
        at = functools.partial(jnp.take_along_axis, indices=column, axis=1)
        k_free_fine, k_free_normal = jax.random.split(k_free_normal)
        fine = jax.random.uniform(k_free_fine, column.shape)
        fire = (slot < q.shape[1]) & ((at(coarse) < at(level)) | (fine < at(q) * 256.0 - at(level)))
        feature = lay.free + column
        index.append(feature)
        value.append(_magnitudes(model, feature, fire, jax.random.normal(k_free_normal, feature.shape)))
    if not index:
        index, value = [jnp.zeros((batch, 0), jnp.int32)], [jnp.zeros((batch, 0))]
    return Draw(dense, jnp.concatenate(index, axis=1), jnp.concatenate(value, axis=1), overflow)


def _bytes(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """[B, n] uniform integers 0..255 (as float32), four to each 32-bit word drawn: the generator's
    bits are most of a dense draw's cost on a CPU."""
    batch, n = shape
    words = jax.random.bits(key, (batch, -(-n // 4)), jnp.uint32)
    shifted = words[:, :, None] >> jnp.arange(0, 32, 8, dtype=jnp.uint32)
    return (shifted & 0xFF).reshape(batch, -1)[:, :n].astype(jnp.float32)


def _compact(fire: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """([B, slots] the columns where each row fires, in order, padded with the row's width; [B] how
    many fire). The row packed into 32-bit words, a binary search of each slot in the words' running
    count, then the slot's bit within its word: one pass over the row, no scatter, no sort."""
    batch, n = fire.shape
    width = -(-n // 32)
    padded = jnp.pad(fire, ((0, 0), (0, width * 32 - n))).reshape(batch, width, 32)
    words = jnp.sum(padded.astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    ones = jax.lax.population_count(words).astype(jnp.int32)
    count = jnp.cumsum(ones, axis=1)
    wanted = jnp.arange(slots, dtype=jnp.int32)
    word = jnp.minimum(jax.vmap(lambda c: jnp.searchsorted(c, wanted + 1, side="left"))(count), width - 1)
    bits = jnp.take_along_axis(words, word, axis=1)
    rank = wanted - (jnp.take_along_axis(count, word, axis=1) - jnp.take_along_axis(ones, word, axis=1))
    for i in range(31):  # clear the word's ``rank`` lowest set bits
        bits = jnp.where(i < rank, bits & (bits - 1), bits)
    column = word * 32 + 31 - jax.lax.clz(bits & (~bits + 1)).astype(jnp.int32)
    total = count[:, -1]
    return jnp.where(wanted < total[:, None], column, n), total


def activations(model: SynthModel, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """([batch, N] true magnitudes, 0 where a feature does not fire; the number of firing events
    dropped beyond the slots of ``layout``)."""
    d = draw(model, key, batch)
    return _dense(model, d), d.overflow


def _dense(model: SynthModel, d: Draw) -> jax.Array:
    batch, split = d.dense.shape
    rest = jnp.zeros((batch, model.cfg.n_features - split), d.value.dtype)
    rest = rest.at[jnp.arange(batch)[:, None], d.index - split].add(d.value)  # empty slots add 0
    return jnp.concatenate([d.dense, rest], axis=1)


def _x(model: SynthModel, d: Draw) -> jax.Array:
    """x without the dense [B, N] magnitudes: the dense part's product plus, for the batch's events
    gathered into one list (room for ``event_slots``), each one's direction times its magnitude."""
    batch, split = d.dense.shape
    x = d.dense @ model.directions[:split] + model.bias
    slots = min(d.value.size, event_slots(model.cfg, batch))
    (flat,) = jnp.nonzero(d.value.reshape(-1) != 0, size=slots, fill_value=0)
    value = jnp.where(jnp.arange(slots) < jnp.sum(d.value != 0), d.value.reshape(-1)[flat], 0.0)
    terms = value[:, None] * model.directions[d.index.reshape(-1)[flat]]
    return x + jax.ops.segment_sum(terms, flat // d.value.shape[1], num_segments=batch)


def event_slots(cfg: SynthConfig, batch: int) -> int:
    """Room for a batch's leaf and free events (ten standard deviations above their mean count)."""
    return _slots(batch * float(zipf_probabilities(cfg)[layout(cfg).split:].sum()))


def _magnitudes(model: SynthModel, columns, fire: jax.Array, xi: jax.Array) -> jax.Array:
    return jnp.where(fire, jnp.maximum(model.mean[columns] + model.std[columns] * xi, 0.0), 0.0)


def _children(model: SynthModel, level: int):
    """(first parent, first child, one past the last child, parents) of ``level``'s children."""
    starts = model.cfg.level_starts()
    return starts[level - 1], starts[level], starts[level + 1], starts[level] - starts[level - 1]


def _one_sibling(firing: jax.Array, pick: jax.Array) -> jax.Array:
    """[..., b]: of the siblings firing, the one with the largest pick."""
    b = firing.shape[-1]
    return firing & (jnp.arange(b) == jnp.argmax(jnp.where(firing, pick, -1.0), axis=-1)[..., None])


def _family(model: SynthModel, a_parents: jax.Array, children: jax.Array, level: int, pick: jax.Array) -> jax.Array:
    """``level``'s children's magnitudes [B, children] after their parents: zero where the parent
    does not fire, scaled by the parent's value over its mean, one sibling kept per family."""
    p0, c0, c1, n = _children(model, level)
    batch = children.shape[0]
    parent = a_parents[:, p0:c0]
    strength = jnp.where(parent > 0, parent / model.mean[p0:c0], 0.0)[:, :, None]
    child = children.reshape(batch, n, model.cfg.branching) * strength
    keep = _one_sibling(child > 0, pick[:, c0:c1].reshape(child.shape))
    return jnp.where(keep, child, 0.0).reshape(batch, c1 - c0)


def _parent_levels(model: SynthModel, a: jax.Array, pick: jax.Array) -> jax.Array:
    """The hierarchy applied to the features with children (levels 1..depth-1), top down."""
    for level in range(1, model.cfg.depth if model.cfg.roots else 0):
        _, c0, c1, _ = _children(model, level)
        a = a.at[:, c0:c1].set(_family(model, a, a[:, c0:c1], level, pick))
    return a


def samples(model: SynthModel, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x [batch, D], the true magnitudes [batch, N], events dropped beyond the slots)."""
    d = draw(model, key, batch)
    a = _dense(model, d)
    return a @ model.directions + model.bias, a, d.overflow


def x_only(model: SynthModel, key: jax.Array, batch: int) -> jax.Array:
    """The batch's x alone, as ``samples`` draws it, without forming the [batch, N] magnitudes."""
    return _x(model, draw(model, key, batch))


@functools.partial(jax.jit, static_argnums=2)
def batch_x(model: SynthModel, key: jax.Array, batch: int) -> jax.Array:
    """Only the activations x of a batch."""
    return x_only(model, key, batch)

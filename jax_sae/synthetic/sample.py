"""Drawing samples of a synthetic model on the device, from a key alone.

The distribution is SynthSAEBench's (``config``): feature i's latent normal is a shared low-rank
part s plus its own noise, and it fires when the latent exceeds its threshold; its magnitude is
ReLU(mean + std * normal); then, level by level down the trees, a child keeps firing only where its
parent fires (scaled by the parent's value over the parent's mean) and among siblings still firing
one, chosen uniformly, survives; x = magnitudes @ directions + bias.

Drawn cheaply on a CPU, and exactly so: given s, feature i fires with probability
q = Phi((s - threshold) / own_scale), so one uniform U per feature decides it (U < q), and U / q is
then a fresh uniform, independent across features, that picks the surviving sibling. Magnitudes
are drawn densely only for features with children (their value scales the children); the others
(leaves and features outside the trees) draw one normal per firing event that survives the
hierarchy, about 30 per sample at 16k, at most ``EVENTS_PER_ROW`` per row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from .build import SynthModel

EVENTS_PER_ROW = 256
"""Normals drawn per sample for the leaves' and free features' firing events (the 16k model has
about 30; a row with more reuses its last normal, which ``overflow`` counts)."""


def key(seed: int) -> jax.Array:
    """A sampling key. The RngBitGenerator implementation: its bits cost a quarter of threefry's on
    a CPU; a seed gives the same batches on the same platform and JAX version."""
    return jax.random.key(seed, impl="rbg")


def activations(model: SynthModel, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """([batch, N] true magnitudes, 0 where a feature does not fire; the number of firing events that
    reused a normal because their row had more than ``EVENTS_PER_ROW``)."""
    cfg = model.cfg
    k_shared, k_fire, k_parent, k_rest = jax.random.split(key, 4)
    shared = jax.random.normal(k_shared, (batch, cfg.corr_rank)) @ model.factor.T
    q = ndtr((shared - model.threshold) / model.noise_scale)
    u = jax.random.uniform(k_fire, (batch, cfg.n_features))
    fire = u < q
    pick = jnp.where(fire, u / q, -1.0)  # uniform given fire: which sibling survives
    split = cfg.level_starts()[cfg.depth] if cfg.roots else 0  # features with children come first
    a_parents = _magnitudes(model, slice(0, split), fire[:, :split], jax.random.normal(k_parent, (batch, split)))
    a_parents = _parent_levels(model, a_parents, pick)
    rest = _gate_leaves(model, a_parents, fire[:, split:])
    rank = jnp.cumsum(rest, axis=1) - 1  # each firing event's normal: the rank-th of its row
    normals = jax.random.normal(k_rest, (batch, min(EVENTS_PER_ROW, cfg.n_features - split)))
    xi = jnp.take_along_axis(normals, jnp.clip(rank, 0, normals.shape[1] - 1), axis=1)
    a_rest = _magnitudes(model, slice(split, cfg.n_features), rest, xi)
    overflow = jnp.sum(rest & (rank >= normals.shape[1]))
    return jnp.concatenate([a_parents, _one_leaf_per_family(model, a_parents, a_rest, pick)], axis=1), overflow


def _magnitudes(model: SynthModel, columns: slice, fire: jax.Array, xi: jax.Array) -> jax.Array:
    return jnp.where(fire, jnp.maximum(model.mean[columns] + model.std[columns] * xi, 0.0), 0.0)


def _children(model: SynthModel, level: int):
    """(first parent, first child, one past the last child, parents) of ``level``'s children."""
    starts = model.cfg.level_starts()
    return starts[level - 1], starts[level], starts[level + 1], starts[level] - starts[level - 1]


def _one_sibling(firing: jax.Array, pick: jax.Array) -> jax.Array:
    """[B, parents, b]: of the siblings firing, the one with the largest pick."""
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


def _gate_leaves(model: SynthModel, a_parents: jax.Array, fire_rest: jax.Array) -> jax.Array:
    """The leaves' firing (``fire_rest``'s first columns) where their parent fires."""
    cfg = model.cfg
    if not cfg.roots or cfg.depth == 0:
        return fire_rest
    p0, c0, c1, n = _children(model, cfg.depth)
    leaves = fire_rest[:, : c1 - c0].reshape(-1, n, cfg.branching) & (a_parents[:, p0:c0] > 0)[:, :, None]
    return fire_rest.at[:, : c1 - c0].set(leaves.reshape(-1, c1 - c0))


def _one_leaf_per_family(model: SynthModel, a_parents: jax.Array, a_rest: jax.Array, pick: jax.Array) -> jax.Array:
    cfg = model.cfg
    if not cfg.roots or cfg.depth == 0:
        return a_rest
    _, c0, c1, _ = _children(model, cfg.depth)
    return a_rest.at[:, : c1 - c0].set(_family(model, a_parents, a_rest[:, : c1 - c0], cfg.depth, pick))


def samples(model: SynthModel, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x [batch, D], the true magnitudes [batch, N], events beyond ``EVENTS_PER_ROW``)."""
    a, overflow = activations(model, key, batch)
    return a @ model.directions + model.bias, a, overflow


@functools.partial(jax.jit, static_argnums=2)
def batch_x(model: SynthModel, key: jax.Array, batch: int) -> jax.Array:
    """Only the activations x of a batch."""
    return samples(model, key, batch)[0]

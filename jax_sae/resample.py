"""Resampling the latents that rarely fire (``--resamples N``, Anthropic's "Towards Monosemanticity",
2023): at N points evenly over the first half of a run, every latent that fired in fewer than
``--resample_below`` of the batches since the last resample starts again from a poorly reconstructed
recent training row. Its decoder row becomes that row's unit residual, its encoder column the same
direction (a transcoder's: the unit input row) at the live latents' mean norm, its bias zero and its
Adam moments zero. Rows are drawn without replacement, with probability proportional to their
squared loss, so no two latents start from the same row while the pool lasts.

AuxK reaches only the latents that have not fired for the dead-latent window; a latent that fires
a few times in 100,000 tokens is never dead by it and never learns either (docs/synthbench.md,
"surplus"). Resampling is what reaches those."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import model as M
from . import sharding as S
from .config import SAEConfig

POOL_ROWS = 16384
"""At least this many recent training rows are the candidates a resample draws from (fewer when
fewer were trained on since the previous resample)."""


def resample_points(total_steps: int, count: int, until: float = 0.5) -> tuple[int, ...]:
    """The steps after which the ``count`` resamples happen: evenly over the first ``until`` of the run."""
    return tuple(sorted({max(1, round(total_steps * until * i / count)) for i in range(1, count + 1)}))


def _reset_rows(tree: M.SAEParams, rare_H: jax.Array) -> M.SAEParams:
    """Zero every per-latent entry of ``rare_H``'s latents in a params-shaped tree (Adam's moments)."""
    col, row = rare_H[None, :], rare_H[:, None]
    return tree.replace(
        W_enc_DH=jnp.where(col, 0.0, tree.W_enc_DH), b_enc_H=jnp.where(rare_H, 0.0, tree.b_enc_H),
        W_dec_HD=jnp.where(row, 0.0, tree.W_dec_HD),
        threshold_H=None if tree.threshold_H is None else jnp.where(rare_H, 0.0, tree.threshold_H))


def resample(state, pool_ZD: jax.Array, key: jax.Array, below: jax.Array, *, sae: SAEConfig, free_decoder: bool):
    """Resample the latents of ``state`` that fired in fewer than ``below`` batches since the last
    resample, from the rows of ``pool_ZD`` (raw training rows). Pure: returns (state, how many)."""
    rare_H = state.fires_H < below
    params = state.params
    unit = M.effective(params) if free_decoder else params
    x_ZD = pool_ZD.astype(jnp.float32) * state.input_scale
    in_ZD, target_ZD = M.split_batch(sae, x_ZD)
    f_ZH = M.encode_infer(sae, unit, state.threshold, in_ZD)
    resid_ZD = target_ZD - M.decode(unit, f_ZH, in_ZD)
    loss_Z = jnp.sum(resid_ZD * resid_ZD, axis=1)
    # Gumbel top-k: an ordered draw without replacement, each row with probability proportional to loss^2
    scores_Z = 2.0 * jnp.log(jnp.maximum(loss_Z, 1e-30)) + jax.random.gumbel(key, loss_Z.shape)
    order_Z = jnp.argsort(-scores_Z)
    rank_H = jnp.cumsum(rare_H) - 1
    pick_H = order_Z[jnp.where(rare_H, rank_H, 0) % order_Z.shape[0]]

    def unit_rows(a_HD):
        return a_HD / jnp.maximum(jnp.linalg.norm(a_HD, axis=1, keepdims=True), 1e-8)

    dec_dir_HD = unit_rows(resid_ZD[pick_H])
    enc_dir_HD = unit_rows(in_ZD[pick_H]) if sae.is_transcoder else dec_dir_HD
    live_H = ~rare_H
    n_live = jnp.maximum(jnp.sum(live_H), 1)

    def live_mean(v_H):
        return jnp.where(jnp.any(live_H), jnp.sum(jnp.where(live_H, v_H, 0.0)) / n_live, jnp.mean(v_H))

    enc_norm = live_mean(jnp.linalg.norm(unit.W_enc_DH, axis=0))
    row_norm = live_mean(jnp.linalg.norm(params.W_dec_HD, axis=1)) if free_decoder else 1.0
    # a free row of norm n scales its latent's effective encoder by n: store enc_norm / n
    new = params.replace(
        W_dec_HD=jnp.where(rare_H[:, None], dec_dir_HD * row_norm, params.W_dec_HD),
        W_enc_DH=jnp.where(rare_H[None, :], enc_dir_HD.T * (enc_norm / row_norm), params.W_enc_DH),
        b_enc_H=jnp.where(rare_H, 0.0, params.b_enc_H))
    opt_state = jax.tree.map(lambda t: _reset_rows(t, rare_H) if isinstance(t, M.SAEParams) else t,
                             state.opt_state, is_leaf=lambda t: isinstance(t, M.SAEParams))
    out = state.replace(params=new, opt_state=opt_state, fires_H=jnp.zeros_like(state.fires_H),
                        tokens_since_fired_H=jnp.where(rare_H, 0, state.tokens_since_fired_H))
    return out, jnp.sum(rare_H)


@dataclass(frozen=True)
class Resampler:
    """When to resample and the compiled resample; the run hands it the batches before each point."""

    points: tuple[int, ...]
    pool_batches: int
    """How many of the batches before a point are the pool (the epoch's, as far back as it goes)."""
    below_fraction: float
    seed: int
    fn: object

    @classmethod
    def build(cls, step, total_steps: int, count: int, until: float, below_fraction: float, batch_size: int, seed: int,
              mesh):
        """The resampler of a run whose compiled step is ``step`` (its state counts firings)."""
        settings = step.settings
        fn = jax.jit(lambda state, pool, key, below: resample(state, pool, key, below, sae=settings.sae,
                                                             free_decoder=settings.free_decoder),
                     in_shardings=(step.shardings, NamedSharding(mesh, S.BATCH), None, None),
                     out_shardings=(step.shardings, NamedSharding(mesh, P())), donate_argnums=0)
        return cls(resample_points(total_steps, count, until), max(1, math.ceil(POOL_ROWS / batch_size)), below_fraction,
                   seed, fn)

    def due(self, step: int) -> bool:
        return step in self.points

    def previous(self, step: int) -> int:
        """The resample before the one at ``step`` (0: none)."""
        return max((p for p in self.points if p < step), default=0)

    def pool_size(self, step: int) -> int:
        """Batches in the pool of the resample at ``step``: ``pool_batches``, or the batches since the
        previous resample when fewer (a short run reads no more rows than it trained on meanwhile)."""
        return min(self.pool_batches, step - self.previous(step))

    def run(self, step: int, state, batches: list):
        """Resample after ``step`` from ``batches`` (the training batches that led to it, read again
        from the data, so a resumed run resamples as the uninterrupted one did); returns (state, how
        many were resampled)."""
        below = math.ceil(self.below_fraction * (step - self.previous(step)))
        pool = jnp.concatenate(batches, axis=0) if len(batches) > 1 else batches[0]
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        state, count = self.fn(state, pool, key, np.int32(below))
        return state, int(count)

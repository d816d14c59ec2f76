"""The training forward pass and loss, written per shard with explicit collectives.

Inside ``shard_map`` each device holds a [B/data, d] slice of the batch and an [h/model] slice
of the latents. Reconstructions are summed over the model axis, losses over the data axis, and
TopK / BatchTopK select exactly with ``select.top_mask`` (counts all-reduced, never a gather
of activations). On a 1x1 mesh every collective is the identity, so one code path serves one
device and a pod.

The step takes gradients from ``shard_loss_and_grads``: for TopK, BatchTopK and Matryoshka at
widths where it pays (``backward="auto"``), the reconstruction and its gradient come from
``sparse`` (k rows per token, no [B, h] backward); otherwise from autodiff of the dense loss.
Both give the same selection and the same gradients up to float rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from . import model as M
from . import sharding as S
from .config import SAEConfig
from .model import SAEParams
from .select import batch_candidates, top_candidates, top_mask, with_overflow_rows
from .sparse import Active, Tuning, recon_and_grads, tuning_for

BOTH = (S.DATA, S.MODEL)
# AuxK's matmuls use only the dead latents' columns while at most one of these fractions of a
# shard's latents is dead (compiled per fraction), else all h (bench.aux_bench sets () to compare).
AUX_FEW_DEAD = (1 / 8, 1 / 2)


@dataclass(frozen=True)
class LossSettings:
    """Static hyperparameters of the loss."""

    sae: SAEConfig
    sparsity_coef: float
    sparsity_warmup_steps: int
    aux_penalty: float
    dead_tokens: int
    backward: Literal["auto", "sparse", "dense"] = "auto"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    aux_k: int = 0  # AuxK's latents per token (0: d/2)
    prefix_weights: tuple[float, ...] = ()  # Matryoshka prefix-loss weights summing to 1 (empty: equal)
    jumprelu_sparsity: Literal["quadratic", "step", "tanh"] = "quadratic"  # JumpReLU's sparsity loss
    target_l0: int = 0  # JumpReLU's quadratic target (0: the SAE's top_k)
    bandwidth: float = 0.05  # JumpReLU's straight-through kernel width
    tanh_scale: float = 4.0  # JumpReLU's tanh loss scale
    ste_to_input: bool = False  # JumpReLU's straight-through gradient also reaches the pre-activations
    threshold_lr: float = 10.0  # JumpReLU's thresholds' learning rate, as a multiple of the others'
    aux_activation: Literal["relu", "pre"] = "relu"  # how AuxK's dead latents enter (see _aux_loss)
    aux_loss: Literal["normalised", "sum"] = "normalised"  # AuxK's error over the residual's variance, or SAELens's sum
    free_decoder: bool = False  # the state holds free-norm decoder rows (model.effective); the loss sees unit rows

    def weights(self) -> tuple[float, ...]:
        """Matryoshka's prefix-loss weights (one per group, summing to 1); (1.0,) for the other types."""
        groups = len(self.sae.group_sizes) if self.sae.nested else 1
        if groups == 1 or not self.prefix_weights:
            return (1.0 / groups,) * groups
        return self.prefix_weights

    def batch_candidates(self) -> int:
        """Per-row candidates for the batch-wide selection (BatchTopK, Matryoshka)."""
        return 2 * self.sae.top_k


def _mm(a, b, dtype: str):
    """a @ b with inputs in ``dtype`` (bfloat16 on accelerators) and float32 accumulation."""
    if dtype == "float32":
        return a @ b
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _group_parts(cfg: SAEConfig, f_BH, W_dec_HD, dtype: str):
    """Each Matryoshka group's share of the reconstruction from this shard's latents. Unsplit
    latents take static slices (one decoder GEMM in all); split ones mask by group."""
    if lax.axis_size(S.MODEL) == 1:
        starts = (0,) + cfg.prefix_ends[:-1]
        return [_mm(f_BH[:, a:b], W_dec_HD[a:b], dtype) for a, b in zip(starts, cfg.prefix_ends)]
    groups = _group_ids(cfg, f_BH.shape[1])
    return [_mm(jnp.where(groups == g, f_BH, 0.0), W_dec_HD, dtype) for g in range(len(cfg.group_sizes))]


def _group_ids(cfg: SAEConfig, hidden_local: int) -> jax.Array:
    """Matryoshka group of each local latent (latents are split over model in contiguous blocks)."""
    first = lax.axis_index(S.MODEL) * hidden_local
    index = first + jnp.arange(hidden_local)
    return jnp.sum(index[:, None] >= jnp.asarray(cfg.prefix_ends)[None, :-1], axis=1)


class Main(NamedTuple):
    """The reconstruction term's value and what the rest of the step needs from it."""

    recon: jax.Array
    l1: jax.Array
    x_hat_BD: jax.Array
    fired_H: jax.Array  # this shard's latents that fired on this shard's tokens
    l0: jax.Array
    smallest: jax.Array


def _pre(params: SAEParams, x_BD, dtype: str, transcoder: bool = False):
    # (x - b_dec) W_enc written as x W_enc - b_dec W_enc: the data term needs no input gradient,
    # so b_dec's gradient is a vector-matrix product instead of a [B, h] x [h, d] GEMM. A
    # transcoder's input is not centred (b_dec is in the output's space).
    if transcoder:
        return _mm(x_BD, params.W_enc_DH, dtype) + params.b_enc_H
    return _mm(x_BD, params.W_enc_DH, dtype) + (params.b_enc_H - params.b_dec_D @ params.W_enc_DH)


def _base(params: SAEParams, in_BD, dtype: str):
    """What the output is before any latent: b_dec, plus a skip transcoder's in @ W_skip."""
    if params.W_skip_DD is None:
        return params.b_dec_D
    return params.b_dec_D + _mm(in_BD, params.W_skip_DD, dtype)


def _dense_recon(params: SAEParams, x_BD, f_BH, *, cfg: SAEConfig, global_batch: int, dtype: str,
                 weights: tuple[float, ...], in_BD=None):
    """Reconstruction loss of target ``x_BD`` by codes ``f_BH`` (Matryoshka: the ``weights``-weighted
    sum over prefixes) and the reconstruction; ``in_BD``, a skip transcoder's input."""

    def per_data_mean(value):
        return lax.psum(value, S.DATA) / global_batch

    base = _base(params, in_BD, dtype)
    if cfg.nested:
        x_hat_BD = base + jnp.zeros_like(x_BD)
        prefix_losses = []
        for part in _group_parts(cfg, f_BH, params.W_dec_HD, dtype):
            x_hat_BD = x_hat_BD + lax.psum(part, S.MODEL)
            prefix_losses.append(per_data_mean(jnp.sum((x_BD - x_hat_BD) ** 2)))
        return jnp.stack(prefix_losses) @ jnp.asarray(weights, jnp.float32), x_hat_BD
    x_hat_BD = lax.psum(_mm(f_BH, params.W_dec_HD, dtype), S.MODEL) + base
    return per_data_mean(jnp.sum((x_BD - x_hat_BD) ** 2)), x_hat_BD


def _jumprelu_sparsity(params: SAEParams, pre_BH, f_BH, threshold_H, s: LossSettings, global_batch: int):
    """JumpReLU's sparsity loss, averaged over the global batch: each row's L0 (step), its squared
    distance to the target scaled by 2 / target (quadratic), or the sum of tanh(c f |W_dec|)."""
    if s.jumprelu_sparsity == "tanh":
        per_row = jnp.sum(jnp.tanh(s.tanh_scale * f_BH * jnp.linalg.norm(params.W_dec_HD, axis=1)), axis=1)
        return lax.psum(jnp.sum(lax.psum(per_row, S.MODEL)), S.DATA) / global_batch
    l0_B = lax.psum(jnp.sum(M.step_ste(pre_BH, threshold_H, s.bandwidth, s.ste_to_input), axis=1), S.MODEL)
    if s.jumprelu_sparsity == "quadratic":
        target = s.target_l0 or s.sae.top_k
        l0_B = 2.0 / target * (l0_B - target) ** 2
    return lax.psum(jnp.sum(l0_B), S.DATA) / global_batch


def _dense_main(params: SAEParams, step, z_BZ, *, s: LossSettings, global_batch: int):
    """Reconstruction loss (plus L1 for Vanilla, the sparsity loss for JumpReLU) by dense matmuls, for
    autodiff, of a batch of training rows (a transcoder's: its input and target side by side)."""
    cfg = s.sae
    in_BD, x_BD = M.split_batch(cfg, z_BZ)
    recon_of = functools.partial(_dense_recon, cfg=cfg, global_batch=global_batch, dtype=s.compute_dtype,
                                 weights=s.weights(), in_BD=in_BD)
    if cfg.learned_threshold:
        pre_BH = _pre(params, in_BD, s.compute_dtype, cfg.is_transcoder)
        # The same thresholds on every data shard: made varying over data, so that their gradient
        # (a sum over this shard's rows) is summed over the shards on the way back.
        threshold_H = lax.pcast(params.threshold_H, (S.DATA,), to="varying")
        f_BH = M.jumprelu_ste(pre_BH, threshold_H, s.bandwidth, s.ste_to_input)
        recon, x_hat_BD = recon_of(params, x_BD, f_BH)
        sparsity = _jumprelu_sparsity(params, pre_BH, f_BH, threshold_H, s, global_batch)
        loss = recon + s.sparsity_coef * jnp.minimum(1.0, (step + 1) / s.sparsity_warmup_steps) * sparsity
        l0 = lax.psum(jnp.sum(f_BH > 0), BOTH) / global_batch
        return loss, Main(recon, sparsity, x_hat_BD, jnp.any(f_BH > 0, axis=0), l0, jnp.float32(0.0))
    act_BH = jax.nn.relu(_pre(params, in_BD, s.compute_dtype, cfg.is_transcoder))
    smallest = jnp.float32(0.0)
    if cfg.l1:
        f_BH = act_BH
    elif cfg.row_topk:
        mask, _ = top_mask(lax.stop_gradient(act_BH), cfg.top_k, (S.MODEL,), row_wise=True)
        f_BH = jnp.where(mask, act_BH, 0.0)
    else:
        mask, smallest = top_mask(lax.stop_gradient(act_BH), cfg.top_k * global_batch, BOTH, row_wise=False,
                                  row_candidates=s.batch_candidates())
        f_BH = jnp.where(mask, act_BH, 0.0)

    recon, x_hat_BD = recon_of(params, x_BD, f_BH)
    loss, l1 = recon, jnp.float32(0.0)
    if cfg.l1:
        l1 = lax.psum(jnp.sum(f_BH * jnp.linalg.norm(params.W_dec_HD, axis=1)), BOTH) / global_batch
        loss = loss + s.sparsity_coef * jnp.minimum(1.0, (step + 1) / s.sparsity_warmup_steps) * l1
    l0 = lax.psum(jnp.sum(f_BH > 0), BOTH) / global_batch
    return loss, Main(recon, l1, x_hat_BD, jnp.any(f_BH > 0, axis=0), l0, smallest)


def use_sparse(s: LossSettings, hidden_local: int, tuning: Tuning) -> bool:
    """Whether this step takes the sparse reconstruction and backward."""
    if not s.sae.uses_k or s.backward == "dense":
        return False
    return s.backward == "sparse" or hidden_local >= tuning.min_ratio * s.sae.top_k


def _sparse_part(params: SAEParams, x_BD, cand, *, cfg: SAEConfig, weights: tuple[float, ...], global_batch: int,
                 tuning: Tuning, in_BD=None):
    """Reconstruction and gradients of one candidate list (rows without kept values must have
    x = b_dec there, so they add nothing), plus what the metrics need."""
    hidden_local = params.b_enc_H.shape[0]
    val_BC = jnp.where(cand.keep_BC, cand.val_BC, 0.0)
    groups = _group_ids(cfg, hidden_local)[cand.idx_BC] if cfg.nested else None
    result = recon_and_grads(params, x_BD, Active(cand.idx_BC, val_BC, groups), weights=weights,
                             global_batch=global_batch, tuning=tuning, in_BD=in_BD)
    kept = val_BC > 0
    fired_H = jnp.zeros((hidden_local,), bool).at[cand.idx_BC].max(kept)
    return result, fired_H, jnp.sum(kept)


def _overflow_tiers(batch_local: int) -> tuple[int, ...]:
    """Static numbers of overflow rows per shard the step is compiled for (a few, then many)."""
    return tuple(sorted({max(1, batch_local // 32), max(1, batch_local // 4)}))


def _sparse_main(params: SAEParams, step, z_BZ, *, s: LossSettings, global_batch: int, tuning: Tuning):
    """(Main, grads, fallback): the sparse path. For the batch-wide selection, rows whose
    candidates may not hold all their kept latents (heavy tokens) are done densely, as a block
    of R rows (R from ``_overflow_tiers``); beyond the largest tier the whole step is dense
    (counted in the ``dense_fallback`` metric). A transcoder's rows are its input and target: the
    sparse part reconstructs the target less the skip term, which is added back to the result."""
    cfg = s.sae
    in_BD, y_BD = M.split_batch(cfg, z_BZ)
    skip_BD = None if params.W_skip_DD is None else _mm(in_BD, params.W_skip_DD, s.compute_dtype)
    x_BD = y_BD if skip_BD is None else y_BD - skip_BD
    sparse_in = in_BD if cfg.is_transcoder else None
    part = functools.partial(_sparse_part, cfg=cfg, weights=s.weights(), global_batch=global_batch, tuning=tuning,
                             in_BD=sparse_in)
    pre_BH = _pre(params, in_BD, s.compute_dtype, cfg.is_transcoder)

    def with_skip(main_grads):
        main, grads = main_grads
        return (main if skip_BD is None else main._replace(x_hat_BD=main.x_hat_BD + skip_BD)), grads

    if cfg.row_topk:
        result, fired_H, kept = part(params, x_BD, top_candidates(pre_BH, cfg.top_k, (S.MODEL,)))
        main, grads = with_skip(_sparse_result(result.recon, result.x_hat_BD, result.grads, fired_H, kept,
                                               jnp.float32(0.0), global_batch))
        return main, grads, jnp.float32(0.0)

    k_total = cfg.top_k * global_batch
    first = batch_candidates(pre_BH, k_total, BOTH, s.batch_candidates(), latent_axes=(S.MODEL,))

    def no_overflow():
        main, fired_H, kept = part(params, x_BD, first.select(k_total, BOTH))
        return with_skip(_sparse_result(main.recon, main.x_hat_BD, main.grads, fired_H, kept, first.kth, global_batch))

    def overflow(rows: int):
        def run():
            return with_skip(_with_dense_overflow_rows(params, x_BD, pre_BH, first, rows, part=part, s=s,
                                                       global_batch=global_batch, in_BD=sparse_in, skip_BD=skip_BD))
        return run

    def dense():
        (_, main), grads = jax.value_and_grad(_dense_main, has_aux=True)(
            params, step, z_BZ, s=s, global_batch=global_batch)
        return main, grads

    tiers = _overflow_tiers(x_BD.shape[0])
    # The same branch on every shard: the largest overflow count of any shard picks it.
    branch = _overflow_branch(lax.pmax(first.overflow_count, S.DATA), tiers)
    main, grads = lax.switch(branch, [no_overflow] + [overflow(r) for r in tiers] + [dense])
    return main, grads, (branch == len(tiers) + 1).astype(jnp.float32)


def _sparse_result(recon, x_hat_BD, grads, fired_H, kept, kth, global_batch: int):
    """(Main, grads) of a sparse pass from its summed reconstruction loss and kept-latent count."""
    l0 = lax.psum(kept, BOTH) / global_batch
    return Main(recon, jnp.float32(0.0), x_hat_BD, fired_H, l0, kth), grads


def _tier(count, limits: tuple[int, ...]):
    """The index of the first of ``limits`` (ascending) that ``count`` fits under, len(limits) if none."""
    return jnp.sum(count > jnp.asarray(limits, jnp.int32)).astype(jnp.int32)


def _overflow_branch(count, tiers: tuple[int, ...]):
    """Which branch handles ``count`` overflow rows: 0 none, i + 1 the i-th tier, len(tiers) + 1 dense."""
    return jnp.where(count == 0, 0, 1 + _tier(count, tiers))


def _with_dense_overflow_rows(params: SAEParams, x_BD, pre_BH, first, rows: int, *, part, s: LossSettings,
                              global_batch: int, in_BD=None, skip_BD=None):
    """(Main, grads) of the batch-wide selection with up to ``rows`` overflow rows per shard done
    densely, as a block beside the sparse main list. A transcoder's ``x_BD`` is its target less
    the skip term ``skip_BD`` and ``in_BD`` its input: the dense block works on the true target
    (its skip term and W_skip's gradient through autodiff) and hands back its rows without it."""
    cfg, B = s.sae, x_BD.shape[0]
    sel = with_overflow_rows(pre_BH, first, cfg.top_k * global_batch, BOTH, rows)
    used_R = (sel.rows_R < B)[:, None]
    # Overflow rows leave the main list (x = b_dec there adds nothing) for a dense block.
    main, fired_H, kept = part(params, x_BD.at[sel.rows_R].set(params.b_dec_D, mode="drop"), sel.main)
    take = jnp.minimum(sel.rows_R, B - 1)
    x_RD = jnp.where(used_R, x_BD[take], params.b_dec_D)  # unused rows: zero error
    in_RD = None if in_BD is None else jnp.where(used_R, in_BD[take], 0.0)
    skip_RD = None if skip_BD is None else jnp.where(used_R, skip_BD[take], 0.0)
    target_RD = x_RD if skip_RD is None else x_RD + skip_RD

    def rows_loss(p):
        pre = _pre(p, x_RD if in_RD is None else in_RD, s.compute_dtype, cfg.is_transcoder)
        f_RH = jnp.where(sel.keep_RH, jax.nn.relu(pre), 0.0)
        return _dense_recon(p, target_RD, f_RH, cfg=cfg, global_batch=global_batch,
                            dtype=s.compute_dtype, weights=s.weights(), in_BD=in_RD)

    (recon_R, x_hat_RD), grads_R = jax.value_and_grad(rows_loss, has_aux=True)(params)
    if skip_RD is not None:
        x_hat_RD = x_hat_RD - skip_RD  # the caller adds every row's skip term back
    x_hat_BD = main.x_hat_BD.at[sel.rows_R].set(x_hat_RD, mode="drop")
    grads = jax.tree.map(jnp.add, main.grads, grads_R)
    return _sparse_result(main.recon + recon_R, x_hat_BD, grads, fired_H | jnp.any(sel.keep_RH, axis=0),
                          kept + jnp.sum(sel.keep_RH), sel.kth, global_batch)


def _aux_loss(params: SAEParams, in_BD, x_BD, x_hat_BD, dead_H, s: LossSettings, global_batch: int,
              cap: int | None = None):
    """AuxK: the detached residual of target ``x_BD`` reconstructed from the top min(aux_k or d/2,
    dead) dead latents of input ``in_BD``, normalised by the residual's variance (``aux_loss`` sum:
    the squared error per row times min(dead / aux_k, 1), SAELens's AuxK). With ``cap``, only
    the (at most ``cap`` per shard) dead latents' columns enter the matmuls, instead of all h. The
    dead latents enter ReLU'd, or (``aux_activation`` pre) as their pre-activations, so that a latent
    whose every pre-activation is negative still gets a gradient (SAELens's AuxK)."""
    cfg = s.sae
    k_aux = s.aux_k or cfg.d_model // 2
    k = min(k_aux, cfg.hidden_dim)
    if cap is None:
        pre_BN = _pre(params, in_BD, s.compute_dtype, cfg.is_transcoder)
        used_N = dead_H
        W_dec_ND = params.W_dec_HD
    else:
        idx_N = jnp.nonzero(dead_H, size=cap, fill_value=0)[0]
        used_N = jnp.arange(cap) < jnp.sum(dead_H)
        few = SAEParams(params.W_enc_DH[:, idx_N], params.b_enc_H[idx_N], params.W_dec_HD[idx_N], params.b_dec_D)
        pre_BN = _pre(few, in_BD, s.compute_dtype, cfg.is_transcoder)
        W_dec_ND = few.W_dec_HD
        k = min(k, cap * lax.axis_size(S.MODEL))
    act_BN = jnp.where(used_N, jax.nn.relu(pre_BN) if s.aux_activation == "relu" else pre_BN, 0.0)
    if k >= act_BN.shape[1] * lax.axis_size(S.MODEL):
        code_BN = act_BN  # every dead latent fits: no selection
    else:  # the largest; top_mask keeps positive values: pre-activations are ranked from 1 above the row's least
        score_BN = lax.stop_gradient(act_BN)
        if s.aux_activation == "pre":
            least_B = lax.pmin(jnp.min(jnp.where(used_N, score_BN, jnp.inf), axis=1), S.MODEL)
            score_BN = jnp.where(used_N, score_BN - least_B[:, None] + 1.0, 0.0)
        mask, _ = top_mask(score_BN, k, (S.MODEL,), row_wise=True)
        code_BN = jnp.where(mask, act_BN, 0.0)
    e_hat_BD = lax.psum(_mm(code_BN, W_dec_ND, s.compute_dtype), S.MODEL)
    residual_BD = x_BD - x_hat_BD
    err = lax.psum(jnp.sum((residual_BD - e_hat_BD) ** 2), S.DATA)
    if s.aux_loss == "sum":
        dead = lax.psum(jnp.sum(dead_H), S.MODEL)
        return err / global_batch * jnp.minimum(dead / k_aux, 1.0)
    mean_D = lax.psum(jnp.sum(residual_BD, axis=0), S.DATA) / global_batch
    var = lax.psum(jnp.sum((residual_BD - mean_D) ** 2), S.DATA)
    return err / jnp.maximum(var, 1e-12)


def _aux_value_and_grad(params: SAEParams, in_BD, x_BD, x_hat_BD, dead_H, s: LossSettings, global_batch: int):
    """AuxK and its gradient, through the dead latents' columns alone while at most a fraction
    ``AUX_FEW_DEAD`` of a shard's latents are dead (the smallest that fits), else through all h."""
    hidden = dead_H.shape[0]
    caps = sorted({c for c in (int(hidden * f) for f in AUX_FEW_DEAD) if 0 < c < hidden})
    branch = _tier(lax.pmax(jnp.sum(dead_H), S.MODEL), tuple(caps))  # past the last cap: all h

    def run(cap):
        return lambda: jax.value_and_grad(_aux_loss)(params, in_BD, x_BD, x_hat_BD, dead_H, s, global_batch, cap)

    return lax.switch(branch, [run(c) for c in caps] + [run(None)])


def _any_dead(counters_H, s: LossSettings):
    dead_H = counters_H >= s.dead_tokens
    return dead_H, lax.psum(jnp.sum(dead_H), S.MODEL) > 0


def _metrics(main: Main, aux_loss, x_BD, global_batch: int, **extra):
    x_mean_D = lax.psum(jnp.sum(x_BD, axis=0), S.DATA) / global_batch
    total_var = lax.psum(jnp.sum((x_BD - x_mean_D) ** 2), S.DATA)
    err = lax.psum(jnp.sum((x_BD - main.x_hat_BD) ** 2), S.DATA)
    fired_H = lax.psum(main.fired_H.astype(jnp.int32), S.DATA) > 0
    metrics = {"recon": main.recon, "aux_loss": aux_loss, "l1": main.l1,
               "fvu": err / jnp.maximum(total_var, 1e-12), "l0": main.l0, "smallest": main.smallest, **extra}
    return metrics, fired_H


def _shard_loss(params: SAEParams, counters_H, step, z_BZ, *, s: LossSettings, global_batch: int):
    """The whole loss, differentiable: reconstruction (+ L1) + AuxK while latents are dead."""
    loss, main = _dense_main(params, step, z_BZ, s=s, global_batch=global_batch)
    in_BD, x_BD = M.split_batch(s.sae, z_BZ)
    aux_loss = jnp.float32(0.0)
    if s.sae.aux_k:
        dead_H, any_dead = _any_dead(counters_H, s)
        x_hat_BD = lax.stop_gradient(main.x_hat_BD)
        aux_loss = lax.cond(any_dead, lambda: _aux_loss(params, in_BD, x_BD, x_hat_BD, dead_H, s, global_batch),
                            lambda: jnp.float32(0.0))
        loss = loss + s.aux_penalty * aux_loss
    return loss, _metrics(main, aux_loss, x_BD, global_batch)


def _shard_loss_and_grads(params: SAEParams, counters_H, step, z_BZ, *, s: LossSettings, global_batch: int,
                          tuning: Tuning):
    """(loss, grads, metrics, fired_H). AuxK's dense gradient is computed only while some
    latent is dead (inside a ``cond``), so it costs nothing in the common case."""
    cfg = s.sae
    kwargs = dict(s=s, global_batch=global_batch)
    fallback = jnp.float32(0.0)
    in_BD, x_BD = M.split_batch(cfg, z_BZ)
    if use_sparse(s, params.b_enc_H.shape[0], tuning):
        main, grads, fallback = _sparse_main(params, step, z_BZ, tuning=tuning, **kwargs)
        loss = main.recon
    else:
        (loss, main), grads = jax.value_and_grad(_dense_main, has_aux=True)(params, step, z_BZ, **kwargs)
    aux_loss = jnp.float32(0.0)
    if cfg.aux_k:
        dead_H, any_dead = _any_dead(counters_H, s)
        x_hat_BD = lax.stop_gradient(main.x_hat_BD)

        def with_aux(grads):
            aux, aux_grads = _aux_value_and_grad(params, in_BD, x_BD, x_hat_BD, dead_H, s, global_batch)
            return aux, jax.tree.map(lambda g, a: g + s.aux_penalty * a, grads, aux_grads)

        aux_loss, grads = lax.cond(any_dead, with_aux, lambda g: (jnp.float32(0.0), g), grads)
        loss = loss + s.aux_penalty * aux_loss
    metrics, fired_H = _metrics(main, aux_loss, x_BD, global_batch, dense_fallback=fallback)
    return loss, grads, metrics, fired_H


def _param_specs(sae: SAEConfig) -> SAEParams:
    fields = (("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D") + (("threshold_H",) if sae.learned_threshold else ())
              + (("W_skip_DD",) if sae.skip else ()))
    return SAEParams(**{f: S.FIELD_SPECS[f] for f in fields})


METRICS = ("recon", "aux_loss", "l1", "fvu", "l0", "smallest")


def sharded_loss(settings: LossSettings, mesh: Mesh, global_batch: int):
    """``loss(params, counters, step, x) -> (loss, (metrics, fired_H))`` over the mesh (dense,
    differentiable: the reference the sparse gradients are tested against)."""

    def local(params, counters_H, step, x_BD):
        return _shard_loss(params, counters_H, step, x_BD, s=settings, global_batch=global_batch)

    return jax.shard_map(local, mesh=mesh, in_specs=(_param_specs(settings.sae), P(S.MODEL), P(), S.BATCH),
                         out_specs=(P(), ({k: P() for k in METRICS}, P(S.MODEL))))


def sharded_loss_and_grads(settings: LossSettings, mesh: Mesh, global_batch: int):
    """``fn(params, counters, step, x) -> (loss, grads, metrics, fired_H)`` over the mesh."""
    tuning = tuning_for(mesh.devices.flat[0].platform)

    def local(params, counters_H, step, x_BD):
        return _shard_loss_and_grads(params, counters_H, step, x_BD, s=settings, global_batch=global_batch, tuning=tuning)

    metric_specs = {k: P() for k in METRICS + ("dense_fallback",)}
    specs = _param_specs(settings.sae)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(S.MODEL), P(), S.BATCH),
                         out_specs=(P(), specs, metric_specs, P(S.MODEL)))

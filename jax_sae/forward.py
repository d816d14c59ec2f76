"""The training forward pass and loss, written per shard with explicit collectives.

Inside ``shard_map`` each device holds a [B/data, d] slice of the batch and an [h/model] slice
of the latents. Reconstructions are summed over the model axis, losses over the data axis, and
TopK / BatchTopK select exactly with ``select.top_mask`` (counts all-reduced, never a gather
of activations). On a 1x1 mesh every collective is the identity, so one code path serves one
device and a pod.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from . import sharding as S
from .config import SAEConfig
from .model import SAEParams
from .select import top_mask

BOTH = (S.DATA, S.MODEL)


@dataclass(frozen=True)
class LossSettings:
    """Static hyperparameters of the loss."""

    sae: SAEConfig
    sparsity_coef: float
    sparsity_warmup_steps: int
    aux_penalty: float
    dead_tokens: int


def _group_parts(cfg: SAEConfig, f_BH, W_dec_HD, model_shards: int):
    """Each Matryoshka group's share of the reconstruction from this shard's latents. Unsplit
    latents take static slices (one decoder GEMM in all); split ones mask by group."""
    if model_shards == 1:
        starts = (0,) + cfg.prefix_ends[:-1]
        return [f_BH[:, a:b] @ W_dec_HD[a:b] for a, b in zip(starts, cfg.prefix_ends)]
    groups = _group_ids(cfg, f_BH.shape[1])
    return [jnp.where(groups == g, f_BH, 0.0) @ W_dec_HD for g in range(len(cfg.group_sizes))]


def _group_ids(cfg: SAEConfig, hidden_local: int) -> jax.Array:
    """Matryoshka group of each local latent (latents are split over model in contiguous blocks)."""
    first = lax.axis_index(S.MODEL) * hidden_local
    index = first + jnp.arange(hidden_local)
    return jnp.sum(index[:, None] >= jnp.asarray(cfg.prefix_ends)[None, :-1], axis=1)


def _shard_loss(params: SAEParams, counters_H, step, x_BD, *, s: LossSettings, global_batch: int,
                model_shards: int):
    cfg = s.sae
    # (x - b_dec) W_enc written as x W_enc - b_dec W_enc: the data term needs no input gradient,
    # so b_dec's gradient is a vector-matrix product instead of a [B, h] x [h, d] GEMM.
    pre_BH = x_BD @ params.W_enc_DH + (params.b_enc_H - params.b_dec_D @ params.W_enc_DH)
    act_BH = jax.nn.relu(pre_BH)
    smallest = jnp.float32(0.0)
    if cfg.sae_type == "vanilla":
        f_BH = act_BH
    elif cfg.sae_type == "topk":
        mask, _ = top_mask(lax.stop_gradient(pre_BH), cfg.top_k, (S.MODEL,), row_wise=True)
        f_BH = jnp.where(mask, act_BH, 0.0)
    else:
        mask, smallest = top_mask(lax.stop_gradient(pre_BH), cfg.top_k * global_batch, BOTH, row_wise=False,
                                  row_candidates=2 * cfg.top_k)
        f_BH = jnp.where(mask, act_BH, 0.0)

    def per_data_mean(value):
        return lax.psum(value, S.DATA) / global_batch

    if cfg.sae_type == "matryoshka":
        x_hat_BD = params.b_dec_D + jnp.zeros_like(x_BD)
        prefix_losses = []
        for part in _group_parts(cfg, f_BH, params.W_dec_HD, model_shards):
            x_hat_BD = x_hat_BD + lax.psum(part, S.MODEL)
            prefix_losses.append(per_data_mean(jnp.sum((x_BD - x_hat_BD) ** 2)))
        recon = jnp.mean(jnp.stack(prefix_losses))
    else:
        x_hat_BD = lax.psum(f_BH @ params.W_dec_HD, S.MODEL) + params.b_dec_D
        recon = per_data_mean(jnp.sum((x_BD - x_hat_BD) ** 2))
    loss = recon
    l1 = aux_loss = jnp.float32(0.0)
    if cfg.sae_type == "vanilla":
        l1 = lax.psum(jnp.sum(f_BH * jnp.linalg.norm(params.W_dec_HD, axis=1)), BOTH) / global_batch
        loss = loss + s.sparsity_coef * jnp.minimum(1.0, (step + 1) / s.sparsity_warmup_steps) * l1
    else:
        aux_loss = _aux_k(params, x_BD, lax.stop_gradient(x_hat_BD), act_BH, counters_H, s, global_batch)
        loss = loss + s.aux_penalty * aux_loss
    x_mean_D = lax.psum(jnp.sum(x_BD, axis=0), S.DATA) / global_batch
    total_var = lax.psum(jnp.sum((x_BD - x_mean_D) ** 2), S.DATA)
    err = lax.psum(jnp.sum((x_BD - x_hat_BD) ** 2), S.DATA)
    fired_H = lax.psum(jnp.any(f_BH > 0, axis=0).astype(jnp.int32), S.DATA) > 0
    metrics = {
        "recon": recon, "aux_loss": aux_loss, "l1": l1,
        "fvu": err / jnp.maximum(total_var, 1e-12),
        "l0": lax.psum(jnp.sum(f_BH > 0), BOTH) / global_batch,
        "smallest": smallest,
    }
    return loss, (metrics, fired_H)


def _aux_k(params, x_BD, x_hat_BD, act_BH, counters_H, s: LossSettings, global_batch: int):
    """AuxK: the detached residual reconstructed from the top min(d/2, dead) dead latents,
    normalised by the residual's variance; zero when nothing is dead."""
    cfg = s.sae
    dead_H = counters_H >= s.dead_tokens
    any_dead = lax.psum(jnp.sum(dead_H), S.MODEL) > 0

    def loss():
        dead_act_BH = jnp.where(dead_H, act_BH, 0.0)
        mask, _ = top_mask(lax.stop_gradient(dead_act_BH), min(cfg.d_model // 2, cfg.hidden_dim), (S.MODEL,),
                           row_wise=True)
        e_hat_BD = lax.psum(jnp.where(mask, dead_act_BH, 0.0) @ params.W_dec_HD, S.MODEL)
        residual_BD = x_BD - x_hat_BD
        err = lax.psum(jnp.sum((residual_BD - e_hat_BD) ** 2), S.DATA)
        mean_D = lax.psum(jnp.sum(residual_BD, axis=0), S.DATA) / global_batch
        var = lax.psum(jnp.sum((residual_BD - mean_D) ** 2), S.DATA)
        return err / jnp.maximum(var, 1e-12)

    # Skipped entirely while no latent is dead (the common case once training has settled).
    return lax.cond(any_dead, loss, lambda: jnp.float32(0.0))


def sharded_loss(settings: LossSettings, mesh: Mesh, global_batch: int):
    """``loss(params, counters, step, x) -> (loss, (metrics, fired_H))`` over the mesh."""
    param_specs = SAEParams(*(S.FIELD_SPECS[f] for f in ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D")))

    def local(params, counters_H, step, x_BD):
        return _shard_loss(params, counters_H, step, x_BD, s=settings, global_batch=global_batch,
                           model_shards=mesh.shape[S.MODEL])

    metric_specs = {k: P() for k in ("recon", "aux_loss", "l1", "fvu", "l0", "smallest")}
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, P(S.MODEL), P(), S.BATCH),
                         out_specs=(P(), (metric_specs, P(S.MODEL))))

"""One state pytree and the pure, jitted training step."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import struct

from . import model as M
from .config import SAEConfig

# Counters saturate here instead of overflowing int32.
_COUNTER_CAP = 1 << 30


@struct.dataclass
class TrainState:
    """Everything a run needs to continue: parameters, optimizer, dead-latent counters,
    inference threshold, input scale, step, data position and early-stopping record."""

    step: jax.Array
    params: M.SAEParams
    opt_state: optax.OptState
    threshold: jax.Array
    tokens_since_fired_H: jax.Array
    input_scale: jax.Array
    epoch: jax.Array
    batch_in_epoch: jax.Array
    best_val_fvu: jax.Array
    evals_since_best: jax.Array


@dataclass(frozen=True)
class StepSettings:
    """Static hyperparameters the compiled step closes over."""

    sae: SAEConfig
    total_steps: int
    sparsity_coef: float
    sparsity_warmup_steps: int
    aux_penalty: float
    dead_tokens: int


def lr_warmup_steps(total_steps: int) -> int:
    return max(1, min(1000, total_steps // 10))


def sparsity_warmup_steps(total_steps: int) -> int:
    return max(1, total_steps // 20)


def lr_schedule(lr: float, total_steps: int) -> optax.Schedule:
    """Linear warm-up over min(1000 steps, 10%), then cosine decay to 1% of lr."""
    warmup = lr_warmup_steps(total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=lr * 0.01
    )


def make_optimizer(lr: float, total_steps: int, weight_decay: float) -> optax.GradientTransformation:
    """Clip at global norm 1, then AdamW on ``lr_schedule``."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lr_schedule(lr, total_steps), weight_decay=weight_decay))


def init_state(params: M.SAEParams, optimizer: optax.GradientTransformation, input_scale: float) -> TrainState:
    hidden = params.b_enc_H.shape[0]
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=optimizer.init(params),
        threshold=jnp.float32(0.0),
        tokens_since_fired_H=jnp.zeros((hidden,), jnp.int32),
        input_scale=jnp.float32(input_scale),
        epoch=jnp.int32(0),
        batch_in_epoch=jnp.int32(0),
        best_val_fvu=jnp.float32(jnp.inf),
        evals_since_best=jnp.int32(0),
    )


def _loss(params: M.SAEParams, state: TrainState, x_BD: jax.Array, s: StepSettings):
    cfg = s.sae
    f_BH, pre_BH, smallest = M.encode_train(cfg, params, x_BD)
    aux = {"smallest": smallest, "f_BH": f_BH}
    if cfg.sae_type == "matryoshka":
        recon, x_hat_BD = M.matryoshka_loss(cfg, params, x_BD, f_BH)
    else:
        x_hat_BD = M.decode(params, f_BH)
        recon = M.reconstruction_loss(x_BD, x_hat_BD)
    loss = recon
    if cfg.sae_type == "vanilla":
        l1 = jnp.mean(jnp.sum(f_BH * jnp.linalg.norm(params.W_dec_HD, axis=1), axis=-1))
        warm = jnp.minimum(1.0, (state.step + 1) / max(1, s.sparsity_warmup_steps))
        loss = loss + s.sparsity_coef * warm * l1
        aux["l1"] = l1
    else:
        dead_H = state.tokens_since_fired_H >= s.dead_tokens
        k_aux = min(cfg.d_model // 2, cfg.hidden_dim)
        aux_loss = M.aux_k_loss(params, x_BD, x_hat_BD, pre_BH, dead_H, k_aux)
        loss = loss + s.aux_penalty * aux_loss
        aux["aux_loss"] = aux_loss
    aux["recon"] = recon
    aux["x_hat_BD"] = x_hat_BD
    return loss, aux


def train_step(state: TrainState, x_BD: jax.Array, *, optimizer, settings: StepSettings):
    """Scale the raw batch, take one optimizer step, keep the decoder unit-norm, update the
    dead-latent counters and the inference threshold. Pure: returns (state, metrics)."""
    x_BD = x_BD.astype(jnp.float32) * state.input_scale
    (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state, x_BD, settings)
    grads = grads.replace(W_dec_HD=M.project_decoder_grad(state.params.W_dec_HD, grads.W_dec_HD))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = M.normalize_decoder(optax.apply_updates(state.params, updates))

    f_BH = aux["f_BH"]
    fired_H = jnp.any(f_BH > 0, axis=0)
    batch = x_BD.shape[0]
    counters = jnp.where(fired_H, 0, jnp.minimum(state.tokens_since_fired_H + batch, _COUNTER_CAP))
    threshold = state.threshold
    if settings.sae.uses_threshold:
        threshold = M.update_threshold(state.threshold, aux["smallest"], state.step)
    x_hat_BD = aux["x_hat_BD"]
    total_var = jnp.sum((x_BD - x_BD.mean(axis=0)) ** 2)
    metrics = {
        "loss": loss,
        "recon": aux["recon"],
        "fvu": jnp.sum((x_BD - x_hat_BD) ** 2) / jnp.maximum(total_var, 1e-12),
        "l0": jnp.mean(jnp.sum(f_BH > 0, axis=-1)),
        "dead_fraction": jnp.mean(counters >= settings.dead_tokens),
        "aux_loss": aux.get("aux_loss", jnp.float32(0.0)),
        "l1": aux.get("l1", jnp.float32(0.0)),
        "threshold": threshold,
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        threshold=threshold,
        tokens_since_fired_H=counters,
        batch_in_epoch=state.batch_in_epoch + 1,
    )
    return new_state, metrics


def compile_train_step(optimizer, settings: StepSettings):
    """The step jitted once, with the state donated."""
    return jax.jit(functools.partial(train_step, optimizer=optimizer, settings=settings), donate_argnums=0)

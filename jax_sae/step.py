"""One state pytree and the pure, jitted training step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import model as M
from . import sharding as S
from .forward import LossSettings, sharded_loss_and_grads

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


def lr_warmup_steps(total_steps: int) -> int:
    return max(1, min(1000, total_steps // 10))


def sparsity_warmup_steps(total_steps: int) -> int:
    return max(1, total_steps // 20)


def lr_schedule(lr: float, total_steps: int, kind: str = "cosine") -> optax.Schedule:
    """Linear warm-up over min(1000 steps, 10%), then ``cosine`` decay to 1% of lr, or ``wsd``
    (warm-up, stable): lr held until the last 20% of the steps, then a linear decay to 1%."""
    warmup = lr_warmup_steps(total_steps)
    if kind == "wsd":
        decay = max(1, total_steps // 5)
        stable = max(0, total_steps - warmup - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
             optax.linear_schedule(lr, lr * 0.01, decay)],
            boundaries=[warmup, warmup + stable])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=lr * 0.01
    )


def make_optimizer(lr: float, total_steps: int, weight_decay: float, schedule: str = "cosine",
                   betas: tuple[float, float] = (0.9, 0.999)) -> optax.GradientTransformation:
    """Clip at global norm 1, then AdamW on ``lr_schedule``."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lr_schedule(lr, total_steps, schedule), b1=betas[0], b2=betas[1],
                                   weight_decay=weight_decay))


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


def train_step(state: TrainState, x_BD: jax.Array, *, optimizer, grads_fn, dead_tokens: int, uses_threshold: bool):
    """Scale the raw batch, take one optimizer step, keep the decoder unit-norm, update the
    dead-latent counters and the inference threshold. Pure: returns (state, metrics)."""
    x_BD = x_BD.astype(jnp.float32) * state.input_scale
    loss, grads, metrics, fired_H = grads_fn(state.params, state.tokens_since_fired_H, state.step, x_BD)
    grads = grads.replace(W_dec_HD=M.project_decoder_grad(state.params.W_dec_HD, grads.W_dec_HD))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = M.normalize_decoder(optax.apply_updates(state.params, updates))
    counters = jnp.where(fired_H, 0, jnp.minimum(state.tokens_since_fired_H + x_BD.shape[0], _COUNTER_CAP))
    threshold = M.update_threshold(state.threshold, metrics["smallest"], state.step) if uses_threshold \
        else state.threshold
    out = {k: v for k, v in metrics.items() if k != "smallest"}
    out.update(loss=loss, dead_fraction=jnp.mean(counters >= dead_tokens), threshold=threshold)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, threshold=threshold,
                              tokens_since_fired_H=counters, batch_in_epoch=state.batch_in_epoch + 1)
    return new_state, out


def compile_train_step(optimizer, settings: LossSettings, mesh, state: TrainState, global_batch: int):
    """The step jitted once for this mesh, with explicit shardings and the state donated."""
    state_shardings = S.shardings(state, mesh)
    step = functools.partial(train_step, optimizer=optimizer, grads_fn=sharded_loss_and_grads(settings, mesh, global_batch),
                             dead_tokens=settings.dead_tokens, uses_threshold=settings.sae.uses_threshold)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, NamedSharding(mesh, S.BATCH)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)

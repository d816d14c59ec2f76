"""One state pytree and the pure, jitted training step, built in one place (``build_step``) for
the trainer, ``--compile_only`` and the benchmarks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import model as M
from . import sharding as S
from .config import SAEConfig, TrainConfig, TrainingSettings
from .forward import LossSettings, sharded_loss_and_grads

DEFAULTS = TrainingSettings()
"""The training defaults, the one source of the schedule's and Adam's defaults here too."""
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
    fires_H: jax.Array | None = None
    """With --resamples: the batches each latent fired in since the last resample (None otherwise)."""


def lr_warmup_steps(total_steps: int) -> int:
    return max(1, min(1000, total_steps // 10))


def sparsity_warmup_steps(total_steps: int) -> int:
    return max(1, total_steps // 20)


def lr_schedule(lr: float, total_steps: int, kind: str = DEFAULTS.lr_schedule) -> optax.Schedule:
    """Linear warm-up over min(1000 steps, 10%), then ``cosine`` decay to 1% of lr, ``wsd``
    (warm-up, stable): lr held until the last 20% of the steps, then a linear decay to 1%, or
    ``constant``: lr held to the end (SAELens's SyntheticSAERunner, after our warm-up)."""
    warmup = lr_warmup_steps(total_steps)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    boundaries=[warmup])
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


class RisingAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_weight: jax.Array
    """The weight the second-moment average has gathered, sum of its terms' coefficients (its bias correction)."""


def scale_by_rising_adam(b1: float, b2: float, rise: float, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam whose second moment's memory grows with the step: at step t it averages the squared
    gradients of about the last t / ``rise`` steps, beta2_t = 1 - 1 / H_t with
    H_t = clip(t / rise, 2 / (1 - b1), 1 / (1 - b2)), until it reaches ``b2``'s memory. Plain Adam at b2
    averages every step so far while t < 1 / (1 - b2) (``rise`` = 1), so gradients much larger than
    today's early in a run keep the steps small for about 1 / (1 - b2) steps; here they leave the
    average after a few times t / ``rise``. The floor, twice the first moment's memory (0.95 for
    b1 = 0.9), keeps beta2_t above b1 squared, below which Adam's steps are unbounded. The bias
    correction is exact for any sequence of beta2_t (the second moment divided by the sum of its
    coefficients); with a tiny ``rise`` this is Adam."""
    horizon_min, horizon_max = 2.0 / (1.0 - b1), 1.0 / (1.0 - b2)

    def init(params):
        zeros = optax.tree_utils.tree_zeros_like
        return RisingAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params),
                               jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del params
        t = state.count + 1
        horizon = jnp.clip(t.astype(jnp.float32) / rise, min(horizon_min, horizon_max), horizon_max)
        b2_t = 1.0 - 1.0 / horizon
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2_t * v + (1 - b2_t) * g * g, state.nu, updates)
        weight = b2_t * state.nu_weight + (1 - b2_t)
        first = 1 - b1 ** t.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / first) / (jnp.sqrt(v / weight) + eps), mu, nu)
        return out, RisingAdamState(t, mu, nu, weight)

    return optax.GradientTransformation(init, update)


def make_optimizer(lr: float, total_steps: int, weight_decay: float, schedule: str = DEFAULTS.lr_schedule,
                   betas: tuple[float, ...] = DEFAULTS.adam_betas,
                   clip: float = DEFAULTS.grad_clip, b2_rise: float = DEFAULTS.adam_b2_rise) -> optax.GradientTransformation:
    """Clip at global norm ``clip`` (0: not at all; the state keeps its shape either way), then
    AdamW on ``lr_schedule`` (with ``b2_rise`` > 0, the second moment's memory rising with the step:
    ``scale_by_rising_adam``)."""
    clipping = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    rate = lr_schedule(lr, total_steps, schedule)
    if b2_rise > 0:
        return optax.chain(clipping, scale_by_rising_adam(betas[0], betas[1], b2_rise),
                           optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(rate))
    return optax.chain(clipping, optax.adamw(rate, b1=betas[0], b2=betas[1], weight_decay=weight_decay))


def init_state(params: M.SAEParams, optimizer: optax.GradientTransformation, input_scale: float,
               count_fires: bool = False) -> TrainState:
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
        fires_H=jnp.zeros((hidden,), jnp.int32) if count_fires else None,
    )


def train_step(state: TrainState, x_BD: jax.Array, *, optimizer, grads_fn, dead_tokens: int, uses_threshold: bool,
               threshold_lr: float = 10.0, free_decoder: bool = False):
    """Scale the raw batch, take one optimizer step, keep the decoder unit-norm (or, with
    ``free_decoder``, step the free rows), update the dead-latent counters and the inference
    threshold. Pure: returns (state, metrics)."""
    x_BD = x_BD.astype(jnp.float32) * state.input_scale
    if free_decoder:  # the loss sees the unit-row model; its gradients reach the free rows through that map
        unit, pull_back = jax.vjp(M.effective, state.params)
        loss, grads, metrics, fired_H = grads_fn(unit, state.tokens_since_fired_H, state.step, x_BD)
        (grads,) = pull_back(grads)
    else:
        loss, grads, metrics, fired_H = grads_fn(state.params, state.tokens_since_fired_H, state.step, x_BD)
        grads = grads.replace(W_dec_HD=M.project_decoder_grad(state.params.W_dec_HD, grads.W_dec_HD))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if updates.threshold_H is not None and threshold_lr != 1.0:  # JumpReLU's thresholds at their own rate
        updates = updates.replace(threshold_H=updates.threshold_H * threshold_lr)
    params = optax.apply_updates(state.params, updates)
    params = params if free_decoder else M.normalize_decoder(params)
    if params.threshold_H is not None:  # JumpReLU: kept non-negative by projection, not by a clamp in the graph
        params = params.replace(threshold_H=jnp.maximum(params.threshold_H, 0.0))
    counters = jnp.where(fired_H, 0, jnp.minimum(state.tokens_since_fired_H + x_BD.shape[0], _COUNTER_CAP))
    threshold = M.update_threshold(state.threshold, metrics["smallest"], state.step) if uses_threshold \
        else state.threshold
    out = {k: v for k, v in metrics.items() if k != "smallest"}
    out.update(loss=loss, dead_fraction=jnp.mean(counters >= dead_tokens), threshold=threshold)
    fires = None if state.fires_H is None else jnp.minimum(state.fires_H + fired_H, _COUNTER_CAP)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, threshold=threshold,
                              tokens_since_fired_H=counters, batch_in_epoch=state.batch_in_epoch + 1, fires_H=fires)
    return new_state, out


def pure_train_step(optimizer, settings: LossSettings, mesh, global_batch: int) -> Callable:
    """``train_step`` bound to its optimizer and loss on this mesh, not yet jitted (a sweep jits
    several of them as one program)."""
    return functools.partial(train_step, optimizer=optimizer, grads_fn=sharded_loss_and_grads(settings, mesh, global_batch),
                             dead_tokens=settings.dead_tokens, uses_threshold=settings.sae.uses_threshold,
                             threshold_lr=settings.threshold_lr, free_decoder=settings.free_decoder)


def compile_train_step(optimizer, settings: LossSettings, mesh, state: TrainState, global_batch: int):
    """The step jitted once for this mesh, with explicit shardings and the state donated."""
    state_shardings = S.shardings(state, mesh)
    step = pure_train_step(optimizer, settings, mesh, global_batch)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, NamedSharding(mesh, S.BATCH)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


@dataclass(frozen=True)
class Step:
    """The train step of one configuration on one mesh, with what it was built from."""

    optimizer: optax.GradientTransformation
    settings: LossSettings
    shardings: TrainState
    """Where each leaf of the state lives on the mesh."""
    abstract: TrainState
    """The state's shapes and dtypes, with their shardings (nothing allocated)."""
    fn: Callable
    """``(state, batch) -> (state, metrics)``, jitted once, the state donated."""
    pure: Callable
    """The same step before jit."""
    count_fires: bool = False
    """Whether the state counts each latent's firings for resampling (``TrainState.fires_H``)."""


def build_step(cfg: TrainConfig, sae: SAEConfig, mesh, total_steps: int, dead_tokens: int) -> Step:
    """The step ``cfg`` trains ``sae`` with on ``mesh`` over ``total_steps`` (the schedules' length),
    a latent counting as dead after ``dead_tokens``: its optimizer and loss settings from the
    config, and the state's shardings from its abstract shapes."""
    train, runtime = cfg.train, cfg.runtime
    optimizer = make_optimizer(cfg.peak_lr, total_steps, train.weight_decay, train.lr_schedule, train.adam_betas,
                               train.grad_clip, train.adam_b2_rise)
    settings = LossSettings(sae, train.sparsity_coef, sparsity_warmup_steps(total_steps), train.aux_penalty,
                            dead_tokens, runtime.backward, runtime.compute_dtype, train.aux_k, cfg.prefix_weights(),
                            train.jumprelu_sparsity, cfg.target_l0, train.jumprelu_bandwidth,
                            train.jumprelu_tanh_scale, train.jumprelu_ste_to_input, train.jumprelu_threshold_lr,
                            aux_activation=train.aux_activation, aux_loss=train.aux_loss, free_decoder=train.decoder_norm == "free")
    count_fires = cfg.resample_count > 0
    abstract = jax.eval_shape(lambda: init_state(
        M.init_params(jax.random.PRNGKey(0), sae, jnp.zeros(sae.d_model, jnp.float32)), optimizer, 1.0, count_fires))
    shardings = S.shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Step(optimizer, settings, shardings, abstract,
                compile_train_step(optimizer, settings, mesh, abstract, train.batch_size),
                pure_train_step(optimizer, settings, mesh, train.batch_size), count_fires)


def fresh_state(step: Step, key: jax.Array, b_dec_D, input_scale: float, enc_init: str, enc_scale: float,
                decoder_init_norm: float = 1.0) -> TrainState:
    """A new state made where it lives: initialised by one jitted call whose outputs are already
    sharded, so nothing the size of the dictionary passes through one host. A free-norm decoder
    (``step.settings.free_decoder``) starts with rows of ``decoder_init_norm`` and the encoder scaled
    alike (the same model as unit rows with the encoder times its square)."""
    sae = step.settings.sae
    scale = decoder_init_norm if step.settings.free_decoder else 1.0

    def make(b_dec):
        params = M.init_params(key, sae, b_dec, enc_init=enc_init, enc_scale=enc_scale * scale)
        params = params.replace(W_dec_HD=params.W_dec_HD * scale)
        return init_state(params, step.optimizer, input_scale, step.count_fires)

    return jax.jit(make, out_shardings=step.shardings)(jnp.asarray(b_dec_D, jnp.float32))

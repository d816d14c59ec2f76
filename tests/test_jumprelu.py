"""JumpReLU trained end to end: its straight-through gradients equal autodiff of an independent
formulation of the same estimator on every mesh, for each sparsity loss; the threshold learns
from them; the trainer starts it at the target L0 and keeps it non-negative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae import model as M
from jax_sae.config import ConfigError, SAEConfig, TrainConfig
from jax_sae.forward import LossSettings, sharded_loss_and_grads
from jax_sae.sharding import make_mesh

FIELDS = ("W_enc_DH", "b_enc_H", "W_dec_HD", "b_dec_D", "threshold_H")
BANDWIDTH, TARGET, TANH = 0.5, 6, 4.0


def _setup(d=16, h=64, batch=64):
    cfg = SAEConfig(sae_type="jumprelu", d_model=d, hidden_dim=h, top_k=TARGET)
    params = M.init_params(jax.random.PRNGKey(0), cfg, np.zeros(d, np.float32))
    rng = np.random.default_rng(0)
    # Thresholds spread over the pre-activations' range, so that many fall within a bandwidth of one.
    params = params.replace(b_enc_H=jnp.asarray(0.1 * rng.normal(size=h), jnp.float32),
                            b_dec_D=jnp.full((d,), 0.3), threshold_H=jnp.asarray(rng.uniform(0.2, 2.0, h), jnp.float32))
    x = jnp.asarray(rng.normal(size=(batch, d)) * 1.5 + 0.2, jnp.float32)
    return cfg, params, x


def _reference_loss(params: M.SAEParams, x, mode: str, coef: float, to_input: bool = False):
    """The estimator written another way, for plain autodiff: the step's value with a ramp's
    gradient in the threshold, ramp(t) = clip((stop(pre) - t) / eps + 1/2, 0, 1), whose derivative
    is -(1 / eps) K((pre - t) / eps) exactly; JumpReLU's threshold term is stop(t) x ramp(t).
    ``to_input``: the ramp's pre is not stopped, so pre gets the negated threshold gradient."""
    sg = jax.lax.stop_gradient
    pre = (x - params.b_dec_D) @ params.W_enc_DH + params.b_enc_H
    t = params.threshold_H
    fires = (pre > t).astype(jnp.float32)
    ramp = jnp.clip(((pre if to_input else sg(pre)) - t) / BANDWIDTH + 0.5, 0.0, 1.0)
    step = sg(fires) + ramp - sg(ramp)  # value H, d/dt -K/eps, nothing to pre
    f = pre * sg(fires) + sg(t) * (ramp - sg(ramp))  # value pre H, d/dpre H, d/dt -t K/eps
    x_hat = f @ params.W_dec_HD + params.b_dec_D
    recon = jnp.mean(jnp.sum((x - x_hat) ** 2, axis=1))
    if mode == "tanh":
        sparsity = jnp.mean(jnp.sum(jnp.tanh(TANH * f * jnp.linalg.norm(params.W_dec_HD, axis=1)), axis=1))
    else:
        l0 = jnp.sum(step, axis=1)
        sparsity = jnp.mean(2.0 / TARGET * (l0 - TARGET) ** 2 if mode == "quadratic" else l0)
    return recon + coef * sparsity


_MESHES = [(1, 1), (2, 2), (1, 4)]


@pytest.mark.parametrize("mode, mesh_shape, to_input", [
    pytest.param(mode, mesh, to_input, marks=() if i == j else pytest.mark.slow)
    for to_input in (False, True) for i, mode in enumerate(("quadratic", "step", "tanh"))
    for j, mesh in enumerate(_MESHES)])
def test_straight_through_gradients_equal_autodiff_of_the_estimator_written_another_way(mode, mesh_shape, to_input):
    cfg, params, x = _setup()
    coef = 0.3
    settings = LossSettings(cfg, coef, 1, 1 / 32, 10**9, jumprelu_sparsity=mode, target_l0=TARGET,
                            bandwidth=BANDWIDTH, tanh_scale=TANH, ste_to_input=to_input)
    counters = jnp.zeros(cfg.hidden_dim, jnp.int32)
    loss, grads, metrics, _ = jax.jit(sharded_loss_and_grads(settings, make_mesh(*mesh_shape), x.shape[0]))(
        params, counters, jnp.int32(0), x)
    ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(params, x, mode, coef, to_input)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for name in FIELDS:
        ref, got = np.asarray(getattr(ref_grads, name)), np.asarray(getattr(grads, name))
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), err_msg=name)
    if mode != "tanh":  # the threshold learns from the L0 term (tanh reaches it through f alone)
        assert np.count_nonzero(np.asarray(grads.threshold_H)) > cfg.hidden_dim // 4
    pre = (x - params.b_dec_D) @ params.W_enc_DH + params.b_enc_H
    assert float(metrics["l0"]) == pytest.approx(float(jnp.mean(jnp.sum(pre > params.threshold_H, axis=1))))


def test_the_step_keeps_thresholds_non_negative_and_the_other_types_have_none():
    from jax_sae.step import build_step, fresh_state

    cfg = TrainConfig.of(sae_type="jumprelu", hidden_dim=64, top_k=4, batch_size=64, lr=0.5)
    built = build_step(cfg, cfg.sae_config(16), make_mesh(1, 1), total_steps=10, dead_tokens=10**7)
    state = fresh_state(built, jax.random.PRNGKey(0), np.zeros(16, np.float32), 1.0, "transpose", 1.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    for _ in range(5):  # a rate this large drives thresholds below zero without the projection
        state, _ = built.fn(state, x)
    assert float(jnp.min(state.params.threshold_H)) >= 0.0
    other = M.init_params(jax.random.PRNGKey(0), SAEConfig("batch_topk", 16, 64, 4), np.zeros(16, np.float32))
    assert other.threshold_H is None


def test_a_target_l0_beyond_the_latents_is_refused():
    with pytest.raises(ConfigError, match="--target_l0 80 must be at most --hidden_dim 64"):
        TrainConfig.of(sae_type="jumprelu", hidden_dim=64, target_l0=80)

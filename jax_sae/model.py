"""SAE computation shared by all four types: one parameter set, pure functions.

Shapes are suffixed: B batch, D model width, H latents. All inputs here are already scaled by
the dataset's input scale (see ``data.input_scale``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from .config import SAEConfig

# Running-average weight of the batch's smallest kept activation in the inference threshold.
THRESHOLD_DECAY = 0.99


@struct.dataclass
class SAEParams:
    """Weights of every SAE type: encode (x - b_dec) @ W_enc + b_enc, decode f @ W_dec + b_dec;
    JumpReLU's learned per-latent threshold in training (None for the other types). A transcoder
    encodes its input x @ W_enc + b_enc (b_dec lives in the output's space) and decodes
    f @ W_dec + b_dec (+ x @ W_skip for a skip transcoder; None otherwise)."""

    W_enc_DH: jax.Array
    b_enc_H: jax.Array
    W_dec_HD: jax.Array
    b_dec_D: jax.Array
    threshold_H: jax.Array | None = None
    W_skip_DD: jax.Array | None = None


TENSOR_FIELDS = {"W_enc": "W_enc_DH", "b_enc": "b_enc_H", "W_dec": "W_dec_HD", "b_dec": "b_dec_D"}
"""Each parameter's name in files (checkpoints, and both export formats: ``sae_core.formats``) and
its field of ``SAEParams``: the one table between them."""
SKIP_FIELD = ("W_skip", "W_skip_DD")
"""A skip transcoder's extra parameter: its file name and field ([in, out] like the others)."""


def named_params(params: SAEParams) -> dict:
    """The parameters under their file names (W_skip for a skip transcoder)."""
    named = {name: getattr(params, field) for name, field in TENSOR_FIELDS.items()}
    if params.W_skip_DD is not None:
        named[SKIP_FIELD[0]] = params.W_skip_DD
    return named


def params_from_named(arrays) -> SAEParams:
    """``SAEParams`` from arrays under their file names."""
    skip = arrays.get(SKIP_FIELD[0]) if hasattr(arrays, "get") else None
    return SAEParams(**{field: jnp.asarray(arrays[name]) for name, field in TENSOR_FIELDS.items()},
                     W_skip_DD=None if skip is None else jnp.asarray(skip))


def init_params(key: jax.Array, cfg: SAEConfig, b_dec_D: np.ndarray | jax.Array, *, enc_init: str = "transpose",
                enc_scale: float = 1.0) -> SAEParams:
    """Decoder rows random unit vectors; the encoder their transpose (or, with ``enc_init``
    "independent", its own random unit columns), times ``enc_scale``; b_dec from the data."""
    W_dec_HD = _unit_rows(key, cfg.hidden_dim, cfg.d_model)
    W_enc_DH = W_dec_HD.T if enc_init == "transpose" else _unit_rows(jax.random.fold_in(key, 1), cfg.hidden_dim,
                                                                       cfg.d_model).T
    return SAEParams(
        W_enc_DH=enc_scale * W_enc_DH,
        b_enc_H=jnp.zeros((cfg.hidden_dim,), jnp.float32),
        W_dec_HD=W_dec_HD,
        b_dec_D=jnp.asarray(b_dec_D, jnp.float32),
        threshold_H=jnp.zeros((cfg.hidden_dim,), jnp.float32) if cfg.learned_threshold else None,
        W_skip_DD=jnp.zeros((cfg.d_model, cfg.d_model), jnp.float32) if cfg.skip else None,
    )


def _unit_rows(key: jax.Array, rows: int, width: int) -> jax.Array:
    W = jax.random.normal(key, (rows, width), jnp.float32)
    return W / jnp.linalg.norm(W, axis=1, keepdims=True)


def pre_activations(params: SAEParams, x_BD: jax.Array, transcoder: bool = False) -> jax.Array:
    """(x - b_dec) @ W_enc + b_enc; a transcoder's x @ W_enc + b_enc."""
    centred = x_BD if transcoder else x_BD - params.b_dec_D
    return centred @ params.W_enc_DH + params.b_enc_H


def decode(params: SAEParams, f_BH: jax.Array, x_BD: jax.Array | None = None) -> jax.Array:
    """f @ W_dec + b_dec, plus a skip transcoder's x @ W_skip (it needs the input ``x_BD``)."""
    out = f_BH @ params.W_dec_HD + params.b_dec_D
    if params.W_skip_DD is not None:
        if x_BD is None:
            raise ValueError("a skip transcoder's output needs its input: pass x_BD")
        out = out + x_BD @ params.W_skip_DD
    return out


def split_batch(cfg: SAEConfig, z_BZ: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(input, target) of a batch of training rows: the same rows for an SAE; a transcoder's rows are
    [MLP input | MLP output] side by side (the store's "mlp" stream)."""
    if not cfg.is_transcoder:
        return z_BZ, z_BZ
    return z_BZ[..., : cfg.d_model], z_BZ[..., cfg.d_model :]


def _scatter_rows(shape, idx_BK: jax.Array, vals_BK: jax.Array) -> jax.Array:
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, vals_BK.dtype).at[rows, idx_BK].set(vals_BK)


def topk_rows(pre_BH: jax.Array, k: int) -> jax.Array:
    """Per-row top-k of the pre-activations, ReLU'd; everything else zero."""
    vals_BK, idx_BK = lax.top_k(pre_BH, k)
    return _scatter_rows(pre_BH.shape, idx_BK, jax.nn.relu(vals_BK))


def jumprelu(pre_BH: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(pre_BH > threshold, pre_BH, 0.0)


def encode_infer(cfg: SAEConfig, params: SAEParams, threshold: jax.Array, x_BD: jax.Array) -> jax.Array:
    """Inference codes: per-row top-k for TopK, a JumpReLU threshold for the BatchTopK family
    (one number) and for JumpReLU (one per latent). (Training codes are made per shard in ``forward``.)"""
    pre_BH = pre_activations(params, x_BD, cfg.is_transcoder)
    if cfg.l1:
        return jax.nn.relu(pre_BH)
    if cfg.row_topk:
        return topk_rows(pre_BH, cfg.top_k)
    return jumprelu(pre_BH, threshold)


def update_threshold(threshold: jax.Array, smallest: jax.Array, step: jax.Array) -> jax.Array:
    """Running average of the smallest kept activation; the first step takes it as is."""
    return jnp.where(step == 0, smallest, THRESHOLD_DECAY * threshold + (1 - THRESHOLD_DECAY) * smallest)


def calibrated_threshold(cfg: SAEConfig, params: SAEParams, x_ND: np.ndarray, max_values: int = 1 << 25) -> float:
    """The JumpReLU threshold at which the mean L0 on the (scaled) inputs ``x_ND`` is exactly k, over
    at most ``max_values`` // h of the rows: halfway between the (k*N+1)-th and the k*N-th largest
    pre-activation, so that pre-activations recomputed another way (eagerly, on another CPU, a
    rounding off) still keep exactly k*N."""
    rows = max(1, min(len(x_ND), max_values // cfg.hidden_dim))
    pre = np.asarray(jax.jit(pre_activations, static_argnums=2)(params, jnp.asarray(x_ND[:rows], jnp.float32),
                                                                 cfg.is_transcoder)).ravel()
    kept = cfg.top_k * rows
    if kept >= pre.size:
        return 0.0
    ordered = np.partition(pre, pre.size - kept - 1)  # one pass; the kept values lie above position n-kept-1
    below, lowest_kept = ordered[pre.size - kept - 1], ordered[pre.size - kept:].min()
    halfway = np.float32((np.float64(below) + np.float64(lowest_kept)) / 2)
    return max(0.0, float(halfway if halfway < lowest_kept else below))  # adjacent floats: no room halfway


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu_ste(pre_BH: jax.Array, threshold_H: jax.Array, bandwidth: float, to_input: bool = False) -> jax.Array:
    """JumpReLU whose threshold learns through a straight-through estimator (Rajamanoharan et al.
    2024): pre x H(pre - t). Its gradient to ``t`` is the rectangle kernel's pseudo-derivative
    -(t / eps) K((pre - t) / eps), K(u) = 1 for |u| < 1/2; to ``pre``, the step H(pre - t), plus
    the negated threshold term with ``to_input`` (the function depends on pre - t; Anthropic's setting)."""
    return jnp.where(pre_BH > threshold_H, pre_BH, 0.0)


def _jumprelu_fwd(pre_BH, threshold_H, bandwidth, to_input):
    return jumprelu_ste(pre_BH, threshold_H, bandwidth, to_input), (pre_BH, threshold_H)


def _jumprelu_bwd(bandwidth, to_input, res, g_BH):
    pre_BH, threshold_H = res
    ste_BH = g_BH * (threshold_H / bandwidth) * _rectangle((pre_BH - threshold_H) / bandwidth)
    d_pre_BH = g_BH * (pre_BH > threshold_H) + (ste_BH if to_input else 0.0)
    return d_pre_BH, -jnp.sum(ste_BH, axis=0)


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step_ste(pre_BH: jax.Array, threshold_H: jax.Array, bandwidth: float, to_input: bool = False) -> jax.Array:
    """H(pre - t), 1 where a latent fires: the L0 counted differentiably in ``t`` through the same
    pseudo-derivative, -(1 / eps) K((pre - t) / eps); to ``pre`` its negation with ``to_input``,
    else nothing (DeepMind's setting)."""
    return (pre_BH > threshold_H).astype(pre_BH.dtype)


def _step_fwd(pre_BH, threshold_H, bandwidth, to_input):
    return step_ste(pre_BH, threshold_H, bandwidth, to_input), (pre_BH, threshold_H)


def _step_bwd(bandwidth, to_input, res, g_BH):
    pre_BH, threshold_H = res
    ste_BH = g_BH * _rectangle((pre_BH - threshold_H) / bandwidth) / bandwidth
    return (ste_BH if to_input else jnp.zeros_like(pre_BH)), -jnp.sum(ste_BH, axis=0)


step_ste.defvjp(_step_fwd, _step_bwd)


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def project_decoder_grad(W_dec_HD: jax.Array, grad_HD: jax.Array) -> jax.Array:
    """Remove each row's gradient component parallel to that (unit-norm) row."""
    return grad_HD - jnp.sum(grad_HD * W_dec_HD, axis=1, keepdims=True) * W_dec_HD


def effective(params: SAEParams) -> SAEParams:
    """The unit-row parameters of a free-norm decoder (``--decoder_norm free``): with n each decoder
    row's norm, the encoder's columns and biases times n and the rows over n. The pre-activations
    become pre x n and the reconstruction is unchanged: SAELens's rescale_acts_by_decoder_norm."""
    n_H = jnp.maximum(jnp.linalg.norm(params.W_dec_HD, axis=1), 1e-8)
    return params.replace(W_enc_DH=params.W_enc_DH * n_H, b_enc_H=params.b_enc_H * n_H,
                          W_dec_HD=params.W_dec_HD / n_H[:, None])


def normalize_decoder(params: SAEParams) -> SAEParams:
    norms = jnp.linalg.norm(params.W_dec_HD, axis=1, keepdims=True)
    return params.replace(W_dec_HD=params.W_dec_HD / jnp.maximum(norms, 1e-8))

"""The user-facing SAE: load a checkpoint, encode and decode any leading shape, evaluate on a store.

Exports are read through ``sae_core.formats`` (torch-free, like the other helpers of
``extractor/`` the JAX side may import: store, CLI runner, formats, files); only a ``.pt`` file
needs torch, imported when one is loaded."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sae_core.errors import UsageError

from . import model as M
from .checkpoint import load_model_tree, params_from_tree
from .config import SAEConfig
from .metrics import evaluate_batches


@functools.partial(jax.jit, static_argnums=0)
def _encode(cfg: SAEConfig, params, threshold, scale, x_ND):
    return M.encode_infer(cfg, params, threshold, x_ND.astype(jnp.float32) * scale)


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg: SAEConfig, params, scale, f_NH, x_ND=None):
    inputs = None if x_ND is None else x_ND.astype(jnp.float32) * scale
    return M.decode(params, f_NH.astype(jnp.float32), inputs) / scale


class SAE:
    """A trained SAE. Inputs and reconstructions are in the store's units; the input scale is
    applied inside. Features are the inference-mode codes (JumpReLU threshold for BatchTopK). A
    transcoder encodes its layer's MLP input and decodes to the MLP output (a skip transcoder's
    decode needs the input too)."""

    def __init__(self, cfg: SAEConfig, params: M.SAEParams, threshold, input_scale, info: dict | None = None):
        self.cfg = cfg
        self.params = params
        self.threshold = jnp.asarray(threshold, jnp.float32)
        self.input_scale = jnp.asarray(input_scale, jnp.float32)
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path) -> "SAE":
        """A JAX checkpoint directory, a torch-format ``.pt`` export or a SAELens directory."""
        from sae_core.formats import is_saelens_dir

        path = Path(path)
        if path.is_file():
            from .torch_side import torch_module

            torch_sae = torch_module("torch_sae", "reading a .pt export needs PyTorch",
                                     "export it with --format saelens, which needs no torch")
            config, arrays = torch_sae.read_torch_export(path)
            cfg = SAEConfig.from_json(config)
            return cls(cfg, M.params_from_named(arrays), arrays.get("threshold", config["threshold"]),
                       config["input_scale"], {"format": "torch"})
        if is_saelens_dir(path):
            return _from_saelens(path)
        cfg, tree, info = load_model_tree(path)
        return cls(cfg, params_from_tree(tree), tree["threshold"], tree["input_scale"], info)

    def _check(self, x) -> None:
        if x.shape[-1] != self.cfg.d_model:
            raise UsageError(f"input width {x.shape[-1]} does not match the SAE's d_model {self.cfg.d_model}")

    def encode(self, x) -> jax.Array:
        """[..., d_model] -> [..., hidden_dim]."""
        x = jnp.asarray(x)
        self._check(x)
        f = _encode(self.cfg, self.params, self.threshold, self.input_scale, x.reshape(-1, x.shape[-1]))
        return f.reshape(*x.shape[:-1], self.cfg.hidden_dim)

    def decode(self, f, x=None) -> jax.Array:
        """[..., hidden_dim] -> [..., d_model]; a skip transcoder also takes its input ``x`` [..., d_model]."""
        f = jnp.asarray(f)
        if self.cfg.skip and x is None:
            raise UsageError("a skip transcoder's output needs its input: call decode(f, x)")
        flat_x = None if x is None or not self.cfg.skip else jnp.asarray(x).reshape(-1, self.cfg.d_model)
        out = _decode(self.cfg, self.params, self.input_scale, f.reshape(-1, f.shape[-1]), flat_x)
        return out.reshape(*f.shape[:-1], self.cfg.d_model)

    def __call__(self, x) -> jax.Array:
        """The reconstruction of ``x`` (a transcoder's prediction of the MLP output from its input ``x``)."""
        return self.decode(self.encode(x), x)

    def encode_batches(self, batches: Iterable) -> Iterator[np.ndarray]:
        """Encode an iterable of arrays (e.g. ``store.iter_rows``), yielding numpy codes."""
        for x in batches:
            yield np.asarray(self.encode(x))


def _from_saelens(path: Path) -> SAE:
    """SAELens weights act on raw activations (scale folded): input scale 1; JumpReLU keeps its
    per-feature threshold."""
    from sae_core.formats import read_saelens

    lens = read_saelens(path)
    threshold = lens.arrays.get("threshold", np.zeros((), np.float32))
    return SAE(SAEConfig.from_json(lens.config), M.params_from_named(lens.arrays), threshold, 1.0, {"format": "saelens"})


def load(path: str | Path) -> SAE:
    """Load an SAE: a model checkpoint directory (``best/``, ``final/``), a torch ``.pt`` export,
    or a SAELens directory."""
    return SAE.load(path)


def evaluate(sae: SAE, store, layer: int, *, batch_size: int = 4096, samples: np.ndarray | None = None) -> dict:
    """FVU, explained variance, MSE, L0, dead and dense fractions, cosine and l2 ratio on a store layer
    (a transcoder's: of its MLP output predicted from its MLP input, both read from the store)."""
    from sae_core.store import Store

    store = store if isinstance(store, Store) else Store(store)
    store.require_complete()
    if store.d_model != sae.cfg.d_model:
        raise UsageError(f"store width {store.d_model} does not match the SAE's d_model {sae.cfg.d_model}")
    store.check_layer(layer, sae.cfg.stream)
    batches = store.iter_rows(layer, batch_size, samples=samples, stream=sae.cfg.stream)
    return evaluate_batches(sae.cfg, sae.params, sae.threshold, sae.input_scale, batches).result()

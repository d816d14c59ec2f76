"""The whole sharding policy: a ("data", "model") mesh; batches split over data, latents over model.

W_enc [d, h] and W_dec [h, d] are split on h (so is everything indexed by latent: b_enc, the
dead-latent counters and the optimizer moments); b_dec, a skip transcoder's W_skip [d, d] and
scalars are replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_core.errors import UsageError

DATA, MODEL = "data", "model"
# Leaves named like these fields get these specs wherever they sit (params, Adam moments, state).
FIELD_SPECS = {
    "W_enc_DH": P(None, MODEL),
    "b_enc_H": P(MODEL),
    "W_dec_HD": P(MODEL, None),
    "b_dec_D": P(),
    "threshold_H": P(MODEL),
    "W_skip_DD": P(),
    "tokens_since_fired_H": P(MODEL),
    "fires_H": P(MODEL),
}
BATCH = P(DATA, None)


def make_mesh(data: int | None = None, model: int = 1) -> Mesh:
    """A data x model mesh over the visible devices (all of them on data by default).

    Axis types are Auto on purpose: the step is written per shard inside ``shard_map`` and the
    rest (optimizer, normalisation) is left to the partitioner.
    """
    n = jax.device_count()
    if model < 1 or (data is not None and data < 1):
        raise UsageError(f"--mesh_data and --mesh_model must be positive, got {data} and {model}")
    if model > n:
        raise UsageError(f"--mesh_model {model} needs at least {model} devices; {n} are visible")
    data = data or n // model
    if data * model > n:
        raise UsageError(f"a {data}x{model} mesh needs {data * model} devices; {n} are visible: lower --mesh_data "
                         "or --mesh_model")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[: data * model])


def _leaf_spec(path, leaf) -> P:
    names = [getattr(k, "name", None) for k in path]
    for name in reversed(names):
        if name in FIELD_SPECS:
            return FIELD_SPECS[name] if len(getattr(leaf, "shape", ())) else P()
    return P()


def specs(tree):
    """PartitionSpecs for any pytree holding our params or train state."""
    return jax.tree_util.tree_map_with_path(_leaf_spec, tree)


def shardings(tree, mesh: Mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs(tree))


def check_divisible(mesh: Mesh, batch_size: int, hidden_dim: int) -> None:
    data, model = mesh.shape[DATA], mesh.shape[MODEL]
    if batch_size % data:
        raise UsageError(f"--batch_size {batch_size} must be divisible by the data axis ({data})")
    if hidden_dim % model:
        raise UsageError(f"--hidden_dim {hidden_dim} must be divisible by the model axis ({model})")

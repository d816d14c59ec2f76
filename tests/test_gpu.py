"""On a GPU: the sparse and dense steps agree there too, and bfloat16 compute stays close to
float32. Run by bench/gpu_check.sh (``-m gpu``); skipped without a GPU."""

import jax
import numpy as np
import pytest

from .test_sparse import _compare, _setup

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU visible to JAX (run bench/gpu_check.sh on one)")
    # Exact float32 matmuls (the default allows TF32) for comparisons at 1e-5.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("sae_type", ["topk", "batch_topk", "matryoshka"])
def test_sparse_gradients_equal_autodiff_on_the_gpu(sae_type):
    from jax_sae.sharding import make_mesh

    cfg, params, x = _setup(sae_type, heavy_rows=1)
    metrics = _compare(cfg, params, x, make_mesh(1, 1), 10**9)
    assert float(metrics["dense_fallback"]) == 0.0


def test_bfloat16_compute_stays_close_to_float32():
    from .test_sparse import bf16_vs_f32

    loss32, loss16 = bf16_vs_f32()
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert np.isfinite(loss16)

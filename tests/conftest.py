"""Shared fixtures. The tiny-random MusicGen is built once into the repo's .cache and reused."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SAE_MUSIC_CACHE", str(REPO / ".cache" / "test-models"))
# Four CPU devices for the multi-device tests (set before JAX is imported anywhere).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
MUSICCAPS_CSV = Path(os.environ.get("MUSICCAPS_CSV", REPO.parent / "shared" / "data" / "musiccaps-public.csv"))


def assert_same_rows(actual, expected, what: str = "rows") -> None:
    """Activations computed by two paths (KV-cached generation in padded batches against teacher
    forcing one sample at a time) agree to float32 rounding, which depends on the CPU's kernels:
    within 1e-5 of the rows' largest magnitude (2.7e-6 measured at |x| <= 5.9 on an AVX-512 CPU).
    Rows of another prompt or stream differ by more than 1e-2."""
    import numpy as np

    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def cli(*args: str) -> list[str]:
    """Argv for running a module of this project in a fresh interpreter."""
    return [sys.executable, "-m", *args]


@pytest.fixture(scope="session")
def tiny_model():
    """tiny-random in float32 on the CPU, loaded through the same path as any model."""
    from extractor.models import load_model

    return load_model("tiny-random", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def musiccaps_csv() -> Path:
    if not MUSICCAPS_CSV.exists():
        pytest.skip(f"MusicCaps CSV not found at {MUSICCAPS_CSV}; set MUSICCAPS_CSV to run this test")
    return MUSICCAPS_CSV


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto) on 127.0.0.1 with one bucket, and AWS keys in the environment
    (inherited by subprocesses). Returns a function giving the URL of a fresh prefix in the bucket."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    import itertools
    import urllib.request

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/sae-test", method="PUT"), timeout=30).read()
    names = itertools.count()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        yield lambda name: f"s3://sae-test/{name}-{next(names)}?endpoint={endpoint}"
    server.stop()


@pytest.fixture
def faulty(s3_server, monkeypatch):
    """(url of a fresh prefix reached through a fault-injecting proxy, the proxy, the same prefix's
    direct url); retries fast, so that a test's faults are survived in milliseconds."""
    from bench.faults.proxy import FaultProxy

    monkeypatch.setenv("SAE_MUSIC_BUCKET_RETRIES", "8,0.01,0.1")
    proxies = []

    def make(name, **options):
        direct = s3_server(name)
        endpoint = direct.split("endpoint=")[1]
        proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]), **options).start()
        proxies.append(proxy)
        return direct.replace(endpoint, proxy.endpoint), proxy, direct

    yield make
    for proxy in proxies:
        proxy.stop()

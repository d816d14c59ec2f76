"""The persistent compilation cache: a JAX stage keeps its compiled programs in a folder of its
own per jax version and CPU, the next process reads them back, and it can be turned off or moved."""

import subprocess
import sys

PROBE = """
import jax, jax.numpy as jnp
from jax_sae.runtime import use_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
folder = use_compilation_cache()
jax.jit(lambda x: jnp.tanh(x) * 3)(jnp.ones(7)).block_until_ready()
print(folder, len(hits))
"""


def _probe(env: dict) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder, hits = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return folder, int(hits)


def test_compiled_programs_are_kept_per_cpu_and_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    folder, hits = _probe(env | {"SAE_MUSIC_JAX_CACHE": str(tmp_path / "cache")})
    assert folder.startswith(str(tmp_path / "cache" / "jax-")) and hits == 0
    assert list((tmp_path / "cache").glob("*/*")), "the compiled program was not written"
    again, hits = _probe(env | {"SAE_MUSIC_JAX_CACHE": str(tmp_path / "cache")})
    assert again == folder and hits >= 1, "the next process reads its programs back"
    assert _probe(env | {"SAE_MUSIC_JAX_CACHE": "off"}) == ("None", 0)
    assert _probe(env | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})[0] == str(tmp_path / "mine")
    # Off on a host split into several devices (see use_compilation_cache).
    fake = env | {"SAE_MUSIC_JAX_CACHE": str(tmp_path / "cache"), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert _probe(fake) == ("None", 0)

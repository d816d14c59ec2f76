"""``python -m jax_sae.train --compile_only``: will this configuration fit this accelerator?

Compiles the real train step for the config and mesh from abstract shapes (no parameter is
allocated, so a dictionary far larger than this machine compiles fine) and prints XLA's
memory analysis per device and the step's FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .config import ConfigError, TrainConfig
from .runtime import announce
from .sharding import BATCH, check_divisible, make_mesh
from .step import build_step

_GIB = 1024**3
SCHEDULE_STEPS = 1000
"""The learning-rate and sparsity schedules' length for the compile (without a store there is no
run length): it changes constants in the program, not its memory or FLOPs."""


def compile_report(cfg: TrainConfig) -> dict:
    mesh = make_mesh(cfg.runtime.mesh_data or None, cfg.runtime.mesh_model)
    check_divisible(mesh, cfg.train.batch_size, cfg.sae.hidden_dim)
    runtime = announce(mesh, "train --compile_only")
    d_model = cfg.runtime.d_model
    if d_model is None:
        from sae_core.store import open_store

        d_model = open_store(cfg.train.store).d_model
    if d_model <= 0:
        raise ConfigError(f"--d_model must be positive, got {d_model}")
    sae = cfg.sae_config(d_model)
    step = build_step(cfg, sae, mesh, SCHEDULE_STEPS, cfg.train.dead_tokens)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, sae.batch_width), jnp.float32, sharding=NamedSharding(mesh, BATCH))
    abstract = step.abstract
    compiled = step.fn.lower(abstract, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    report = {f: int(getattr(memory, f, 0) or 0) for f in fields}
    report["peak_estimate_bytes"] = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
                                     - report["alias_size_in_bytes"] + report["temp_size_in_bytes"])
    report["flops_per_step"] = float((cost or {}).get("flops", float("nan")))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    report.update(mesh=dict(mesh.shape), devices=[str(d) for d in mesh.devices.flat], parameters=params,
                  sae=sae.to_json(), batch_size=cfg.train.batch_size, runtime=runtime)
    print(f"compiled {sae.sae_type} d={d_model} h={cfg.sae.hidden_dim} k={cfg.sae.top_k} batch={cfg.train.batch_size} on a "
          f"{mesh.shape['data']}x{mesh.shape['model']} mesh ({mesh.devices.flat[0].platform}): "
          f"{params / 1e6:.1f} M parameters")
    print("per device (XLA memory analysis):")
    for f in fields:
        print(f"  {f.replace('_in_bytes', '').replace('_', ' '):<22} {report[f] / _GIB:10.3f} GiB")
    print(f"  {'peak estimate':<22} {report['peak_estimate_bytes'] / _GIB:10.3f} GiB  (arguments + outputs - aliased + temporaries)")
    print(f"  flops per step          {report['flops_per_step']:.3e}")
    return report

"""Orbax checkpoints. A model checkpoint (``best/``, ``final/``) is a directory with the
parameters, threshold and input scale under ``state/`` and ``config.json``; a run checkpoint
(``ckpt/<step>/``) holds the whole train state. Both restore into trees built by code from
the saved config, never into unpickled structure."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sae_core.errors import UsageError, disk_full_error
from sae_core.files import publish_dir, write_json
from sae_core.formats import tensor_shapes

from . import model as M
from .config import SAEConfig


class CheckpointError(UsageError):
    """A checkpoint that is missing, unfinished, or of another kind."""


class NonFiniteError(CheckpointError):
    """Parameters that are not finite: no checkpoint is ever saved from them."""


ROOM_MARGIN = 1 << 20
"""Bytes a save needs beyond its arrays' (orbax's metadata and manifests)."""


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _room_needed(nbytes: int, directory: Path) -> str | None:
    """Why ``nbytes`` cannot be written under ``directory`` now (too little free space, or a file
    size limit below it), or None when they fit."""
    import resource

    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < nbytes + ROOM_MARGIN:
        return f"{free / 2**20:.1f} MiB free, {nbytes / 2**20:.1f} MiB needed"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < nbytes + ROOM_MARGIN:
        return f"files may not exceed {limit / 2**20:.1f} MiB, {nbytes / 2**20:.1f} MiB needed"
    return None


def _out_of_space(what: str, directory: Path, resumes: str) -> CheckpointError:
    return CheckpointError(f"out of disk space saving {what} in {directory}: free space and rerun the same "
                           f"command; {resumes}")


@contextlib.contextmanager
def _saving(what: str, directory: Path, tree, partial: Callable[[], list[Path]],
            resumes: str = "it resumes from the last checkpoint"):
    """The one way every checkpoint is saved: refuse non-finite parameters, check there is room for
    the tree before writing anything, then run the write. A disk that fills during the write
    still ends with the same line, after the half-written directories ``partial()`` lists are
    removed to free their space (orbax may print its own reports of that failure first)."""
    if not all_finite(tree):
        raise NonFiniteError(f"refusing to save non-finite parameters as {what} in {directory}")
    if _room_needed(_tree_bytes(tree), directory) is not None:
        raise _out_of_space(what, directory, resumes)
    try:
        yield
    except Exception as err:
        if disk_full_error(err) is None:
            raise
        for half_written in partial():
            shutil.rmtree(half_written, ignore_errors=True)
        raise _out_of_space(what, directory, resumes) from None


def _abstract(tree):
    """Shapes, dtypes and shardings of ``tree``: restoring lands each array where it will be used."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def model_tree(params: M.SAEParams, threshold, input_scale) -> dict:
    return {**M.named_params(params), "threshold": jnp.asarray(threshold, jnp.float32),
            "input_scale": jnp.asarray(input_scale, jnp.float32)}


def abstract_model_tree(cfg: SAEConfig) -> dict:
    threshold = (cfg.hidden_dim,) if cfg.learned_threshold else ()  # JumpReLU's is per latent
    shapes = tensor_shapes(cfg.d_model, cfg.hidden_dim) | {"threshold": threshold, "input_scale": ()}
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_model, cfg.d_model)
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}


@jax.jit
def _finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree) -> bool:
    """Whether every float in ``tree`` is finite (works on sharded, multi-host arrays)."""
    return bool(_finite(jax.tree.leaves(tree)))


def save_model(path: str | Path, cfg: SAEConfig, tree: dict, info: dict) -> None:
    """Write a model checkpoint (host arrays) atomically; a non-finite tree is refused so no
    checkpoint is ever poisoned. Every process calls it; process 0 writes the files."""
    from .distributed import barrier, is_primary

    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.saving")  # the same name in every process: they write one checkpoint
    with _saving(path.name + "/", path.parent, tree, lambda: [tmp] if is_primary() else []):
        tree = jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), tree)  # host copies, written once
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(f"save-model-start-{path.name}")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "state", tree)
        checkpointer.wait_until_finished()
    if is_primary():
        write_json(tmp / "config.json", {"sae": cfg.to_json(), **info}, default=float)
        publish_dir(tmp, path, replace=True)
    barrier(f"save-model-end-{path.name}")


def _damaged(what: str, why: str) -> CheckpointError:
    return CheckpointError(f"cannot read {what} ({why}): the checkpoint is corrupt or unfinished; point at best/ or "
                           "final/ of a finished run, or retrain")


def read_config(path: str | Path) -> tuple[SAEConfig, dict]:
    """The SAE config and the rest of ``config.json``; a CheckpointError naming the file if unusable."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists() or not (path / "state").exists():
        raise CheckpointError(
            f"{path} is not a finished sae-music-jax checkpoint (needs config.json and state/); "
            "point at a best/ or final/ directory"
        )
    try:
        info = json.loads(config_file.read_text())
        return SAEConfig.from_json(info["sae"]), info
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(str(config_file), " ".join(str(err).split())) from None
    except (KeyError, TypeError, ValueError) as err:  # no "sae" object, or one SAEConfig refuses
        raise _damaged(str(config_file), f"no valid SAE config: {type(err).__name__} {err}") from None


def load_model_tree(path: str | Path) -> tuple[SAEConfig, dict, dict]:
    """Restore (config, tree, info) from a model checkpoint directory."""
    cfg, info = read_config(path)
    state = (Path(path) / "state").absolute()
    try:
        tree = ocp.StandardCheckpointer().restore(state, abstract_model_tree(cfg))
    except Exception as err:  # noqa: BLE001 - orbax raises many types for a damaged or truncated state
        raise _damaged(str(state), type(err).__name__) from None
    return cfg, tree, info


def params_from_tree(tree: dict) -> M.SAEParams:
    return M.params_from_named(tree)


class Resumed(NamedTuple):
    """A restored run checkpoint, and the newer ones that were damaged (``(step, why)``, newest first)."""

    state: object
    meta: dict
    step: int
    damaged: tuple[tuple[int, str], ...]


def _damage(err: Exception) -> Exception | None:
    """The cause of a failed restore when it is damage (truncated, garbled, half-deleted files):
    tensorstore's ValueError, a missing file, bad JSON, a missing key, however orbax wraps it
    (a plain Exception around tensorstore's error); None for anything else."""
    while err is not None:
        if isinstance(err, (ValueError, OSError, KeyError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _why(err: Exception) -> str:
    """The error in a few words: its type and message, less the path (the line names the directory)."""
    text = re.sub(r' (in OCDBT database )?at local file "[^"]*"', "", " ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


class RunCheckpoints:
    """Periodic whole-state checkpoints of one run, for resumption. A damaged checkpoint is skipped:
    resumption falls back to the newest one that restores."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def latest_meta(self) -> dict | None:
        """The JSON saved beside the newest checkpoint whose JSON reads (settings, width), without
        restoring the state; None without checkpoints, a CheckpointError when none reads."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as err:
                if _damage(err) is None:
                    raise
                continue
            if isinstance(meta, dict):
                return meta
        if steps:
            raise self._all_damaged(steps)
        return None

    def restore_latest(self, like_state) -> Resumed | None:
        """The newest checkpoint that restores into ``like_state``'s structure and placement (None
        without checkpoints). Newer damaged ones are deleted, so the run saves those steps again; a
        CheckpointError when every one is damaged."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, like_state)
            except Exception as err:
                cause = _damage(err)
                if cause is None:
                    raise
                damaged.append((step, _why(cause)))
                continue
            for bad, _ in damaged:
                self.manager.delete(bad)
            return Resumed(state, meta, step, tuple(damaged))
        if damaged:
            raise self._all_damaged([step for step, _ in damaged], damaged[0][1])
        return None

    def delete_all(self) -> None:
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def _all_damaged(self, steps: list[int], why: str = "unreadable") -> CheckpointError:
        return CheckpointError(f"every checkpoint in {self.directory} is damaged (steps {', '.join(map(str, steps))}; "
                               f"newest: {why}): pass --overwrite to start the run over")

    def save(self, step: int, state, meta: dict) -> bool:
        """Save unless this step is saved already (returns whether it saved); non-finite parameters
        are refused (NonFiniteError), as every save refuses them."""
        if step in self.manager.all_steps():
            return False
        last = self.manager.latest_step()
        resumes = (f"it resumes from step {last}" if last is not None
                   else "it starts over (no checkpoint was complete yet)")
        from .distributed import is_primary

        def partial() -> list[Path]:
            return [*self.directory.glob(f"{step}.orbax-checkpoint-tmp*")] if is_primary() else []

        with _saving(f"checkpoint step {step}", self.directory, state.params, partial, resumes):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        return True

    def restore(self, step: int, like_state) -> tuple[object, dict]:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)),
                                          meta=ocp.args.JsonRestore())
        )
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()

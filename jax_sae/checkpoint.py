"""Orbax checkpoints. A model checkpoint (``best/``, ``final/``) is a directory with the
parameters, threshold and input scale under ``state/`` and ``config.json``; a run checkpoint
(``ckpt/<step>/``) holds the whole train state. Both restore into trees built by code from
the saved config, never into unpickled structure."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sae_core.errors import UsageError, disk_full_error
from sae_core.files import publish_dir, write_json

from . import model as M
from .config import SAEConfig


class CheckpointError(UsageError):
    """A checkpoint that is missing, unfinished, or of another kind."""


class _BackgroundErrors:
    """Orbax writes from background threads; when one write fails (a full disk) the others fail too
    and report it themselves: absl and asyncio ERROR records with tracebacks, and tensorstore
    callbacks into orbax's closed event loop (unraisable exceptions). While a save runs these are
    held back. They are printed after all when the save succeeds or fails for another reason, and
    dropped (for a minute, while the other writes fail) when it failed on a full disk: that ends
    the run with one line naming the checkpoint."""

    _LOGGERS = ("absl", "asyncio")
    STRAGGLERS_S = 60.0  # how long reports of a failed save are dropped after it returned

    def __init__(self):
        self.records: list[logging.LogRecord] = []
        self.unraisable: list = []
        self.dropping = False
        self._lock = threading.Lock()
        self._hook = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and not self.dropping:
            with self._lock:
                self.records.append(record)
        return record.levelno < logging.ERROR

    def _unraisable(self, info) -> None:
        if not self.dropping:
            with self._lock:
                self.unraisable.append(info)
        elif not (isinstance(info.exc_value, RuntimeError) and "loop is closed" in str(info.exc_value)):
            self._hook(info)

    @contextlib.contextmanager
    def held(self):
        loggers = [logging.getLogger(name) for name in self._LOGGERS]
        for logger in loggers:
            logger.addFilter(self)
        sys.unraisablehook = self._unraisable
        try:
            yield
        except BaseException as err:
            if disk_full_error(err) is not None:
                self.dropping = True  # the other writes keep failing for a while after the save returned
                timer = threading.Timer(self.STRAGGLERS_S, self._release, (loggers,))
                timer.daemon = True  # never holds the process open
                timer.start()
                raise
            self._release(loggers)
            raise
        self._release(loggers)

    def _release(self, loggers) -> None:
        for logger in loggers:
            logger.removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._hook
        if self.dropping:
            return
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        for info in self.unraisable:
            self._hook(info)


@contextlib.contextmanager
def _saving(what: str, directory: Path, partial: Callable[[], list[Path]],
            resumes: str = "it resumes from the last checkpoint"):
    """Run an orbax save. A full disk becomes one CheckpointError naming ``directory``; the
    half-written directories ``partial()`` lists are removed to free their space, and orbax's own
    reports of the failure are dropped."""
    try:
        with _BackgroundErrors().held():
            yield
    except Exception as err:
        if disk_full_error(err) is None:
            raise
        for half_written in partial():
            shutil.rmtree(half_written, ignore_errors=True)
        raise CheckpointError(f"out of disk space saving {what} in {directory}: free space and rerun the same "
                              f"command; {resumes}") from None


def _abstract(tree):
    """Shapes, dtypes and shardings of ``tree``: restoring lands each array where it will be used."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def model_tree(params: M.SAEParams, threshold, input_scale) -> dict:
    return {
        "W_enc": params.W_enc_DH, "b_enc": params.b_enc_H, "W_dec": params.W_dec_HD, "b_dec": params.b_dec_D,
        "threshold": jnp.asarray(threshold, jnp.float32), "input_scale": jnp.asarray(input_scale, jnp.float32),
    }


def abstract_model_tree(cfg: SAEConfig) -> dict:
    d, h = cfg.d_model, cfg.hidden_dim
    f32 = jnp.float32
    return {
        "W_enc": jax.ShapeDtypeStruct((d, h), f32), "b_enc": jax.ShapeDtypeStruct((h,), f32),
        "W_dec": jax.ShapeDtypeStruct((h, d), f32), "b_dec": jax.ShapeDtypeStruct((d,), f32),
        "threshold": jax.ShapeDtypeStruct((), f32), "input_scale": jax.ShapeDtypeStruct((), f32),
    }


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

    if not all_finite(tree):
        raise CheckpointError(f"refusing to save non-finite parameters to {path}")
    tree = jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), tree)  # host copies, written once
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.saving")  # the same name in every process: they write one checkpoint
    if is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"save-model-start-{path.name}")
    with _saving(path.name + "/", path.parent, lambda: [tmp] if is_primary() else []):
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
    return M.SAEParams(W_enc_DH=tree["W_enc"], b_enc_H=tree["b_enc"], W_dec_HD=tree["W_dec"], b_dec_D=tree["b_dec"])


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
        """Save unless the state is non-finite or this step is saved already; returns whether it saved."""
        if step in self.manager.all_steps() or not all_finite(state.params):
            return False
        last = self.manager.latest_step()
        resumes = (f"it resumes from step {last}" if last is not None
                   else "it starts over (no checkpoint was complete yet)")
        from .distributed import is_primary

        def partial() -> list[Path]:
            return [*self.directory.glob(f"{step}.orbax-checkpoint-tmp*")] if is_primary() else []

        with _saving(f"checkpoint step {step}", self.directory, partial, resumes):
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

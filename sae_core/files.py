"""Atomic output, the one way every stage writes a file or a directory: a reader (or a rerun after
SIGKILL) sees the old version, the new one, or nothing, never half of one. Torch-free; the JAX
side uses it too."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``path`` (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}")


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_all(contents: Mapping[str | os.PathLike, str | bytes]) -> None:
    """Writes every file to a temp sibling first, then renames each into place."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in contents.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append((temp_sibling(path), path))
            # "x" mode honours the umask (tempfile.mkstemp's 0600 would stick to the final file).
            if isinstance(data, bytes):
                with temps[-1][0].open("xb") as f:
                    f.write(data)
            else:
                with temps[-1][0].open("x", encoding="utf-8", newline="\n") as f:
                    f.write(data)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, data: str | bytes) -> None:
    write_all({path: data})


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    """``obj`` as indented JSON with a final newline, atomically."""
    write_all({path: json.dumps(obj, indent=2, **dumps_kwargs) + "\n"})


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = False) -> bool:
    """Renames the finished directory ``tmp`` to ``path``. With ``replace`` an existing ``path`` is
    removed first; without, a ``path`` that another process published meanwhile wins (``tmp`` is
    dropped and False returned)."""
    tmp, path = Path(tmp), Path(path)
    if replace:
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rename(tmp, path)
        return True
    except OSError:
        if replace or not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


@contextmanager
def staged_dir(path: str | os.PathLike, replace: bool = False, tag: str = "building") -> Iterator[Path]:
    """Yields an empty temp directory beside ``path``; on success it is published there (see
    ``publish_dir``), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, tag)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, path, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

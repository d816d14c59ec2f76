"""Command lines built from frozen config dataclasses: one flag per field, the field's
docstring as its help, ``Literal`` fields as choices. Shared by every entry point."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Callable, Literal, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring: the string literal right below the field."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):  # no source (frozen build): help goes without docs
        return {}
    return {
        node.target.id: doc.value.value
        for node, doc in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per dataclass field of ``cls``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict = {"default": default, "help": docs.get(f.name, " ").replace("%", "%%")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            raise TypeError(f"config field {f.name} has a type the CLI cannot parse: {tp}")
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def run_main(
    cls: type[T],
    argv: list[str] | None,
    prog: str,
    description: str,
    run: Callable[[T], object],
    errors: tuple[type[BaseException], ...] = (ValueError,),
):
    """Parse flags into ``cls`` and call ``run``; known errors exit with one line, no traceback."""
    parser = build_parser(cls, prog, description)
    args = parser.parse_args(argv)
    try:
        return run(cls(**vars(args)))
    except errors as err:
        message = " ".join(str(err).split())
        sys.exit(f"error: {message}")
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            sys.exit(f"error: out of disk space ({err.filename or 'while writing'}); free space and rerun to resume")
        raise

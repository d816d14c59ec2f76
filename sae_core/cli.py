"""Command lines built from frozen config dataclasses: one flag per field, the field's
docstring as its help, ``Literal`` fields as choices, optional fields that also take ``none``,
tuple fields as lists. Shared by every entry point (torch-free; the JAX side uses it too)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from .errors import UsageError, disk_full_error, exit_usage

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


def _unwrap_optional(tp) -> tuple[object, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar(tp, name: str) -> dict:
    """argparse ``type``/``choices`` for one value of type ``tp``."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if tp in (int, float, str, Path):
        return {"type": tp}
    raise TypeError(f"config field {name} has a type the CLI cannot parse: {tp}")


def _none_or(convert: Callable) -> Callable:
    """Accepts ``none`` as well, so an optional setting with a default can be switched off."""

    def parse(text: str):
        return None if text.strip().lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


class _SplitCommas(argparse.Action):
    """``--sizes 1 2 3`` and ``--sizes 1,2,3`` both give (1, 2, 3)."""

    def __call__(self, parser, namespace, values, option_string=None):
        convert, choices = self.const
        items = [part for value in values for part in value.split(",") if part.strip()]
        if [item.strip().lower() for item in items] == ["none"]:  # the empty list, as the help writes it
            items = []
        try:
            parsed = tuple(convert(item.strip()) for item in items)
        except ValueError:
            parser.error(f"{option_string}: {' '.join(values)!r} is not a list of {convert.__name__} values")
        bad = [item for item in parsed if choices is not None and item not in choices]
        if bad:
            parser.error(f"{option_string}: {bad[0]!r} is not one of {', '.join(map(str, choices))}")
        setattr(namespace, self.dest, parsed)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults as they are typed: a list as ``a,b,c``, an empty one as ``none``."""

    def _get_help_string(self, action):
        if isinstance(action, _SplitCommas):
            return f"{action.help} (default: {','.join(map(str, action.default)) or 'none'})"
        return super()._get_help_string(action)


def _word_or(words: tuple[str, ...], convert: Callable) -> Callable:
    """A value of ``convert``'s type, or one of ``words`` (``float | Literal["auto"]``)."""

    def parse(text: str):
        return text.strip().lower() if text.strip().lower() in words else convert(text)

    parse.__name__ = f"{' or '.join(words)} or {getattr(convert, '__name__', 'value')}"
    return parse


def _words_and_scalar(tp) -> tuple[tuple[str, ...], type] | None:
    """``X | Literal["a", ...]`` -> (("a", ...), X); None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    words = [a for a in args if typing.get_origin(a) is Literal]
    scalars = [a for a in args if a in (int, float)]
    if len(words) == 1 and len(scalars) == 1 and len(args) == 2:
        return typing.get_args(words[0]), scalars[0]
    return None


def _argument(name: str, hint, default) -> dict:
    """argparse keyword arguments for one field of type ``hint``."""
    tp, optional = _unwrap_optional(hint)
    mixed = _words_and_scalar(tp)
    if mixed is not None:
        words, scalar = mixed
        return {"type": _word_or(words, scalar), "metavar": f"{name.upper()}|{'|'.join(words)}"}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        scalar = _scalar(item, name)
        return {"nargs": "+", "action": _SplitCommas, "const": (scalar["type"], scalar.get("choices")),
                "metavar": name.upper()}
    kwargs = _scalar(tp, name)
    if optional:
        kwargs["type"] = _none_or(kwargs["type"])
        kwargs["metavar"] = f"{name.upper()}|none" if default is not None else name.upper()
    return kwargs


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flag_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, object]]:
    """(path, field, type) of every flag of ``cls``: its own fields, and the fields of each field
    that is itself a config dataclass (a nested group of settings), depth first. Flag names are
    the fields' own names, so they must be unique across the groups."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_config(hints[f.name]):
            found += [((f.name, *path), sub, tp) for path, sub, tp in flag_fields(hints[f.name])]
        else:
            found.append(((f.name,), f, hints[f.name]))
    names = [path[-1] for path, _, _ in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{cls.__name__}: settings {repeated} appear in more than one group; flags must be unique")
    return found


def from_flags(cls: type[T], values: dict) -> T:
    """An instance of ``cls`` from flat ``{flag: value}`` (as ``build_parser`` parses them): each
    nested group built from its own fields; a setting not given keeps its default."""
    hints = typing.get_type_hints(cls)
    names = {path[-1] for path, _, _ in flag_fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting(s) {', '.join(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_config(hints[f.name]):
            mine = {path[-1] for path, _, _ in flag_fields(hints[f.name])}
            kwargs[f.name] = from_flags(hints[f.name], {k: v for k, v in values.items() if k in mine})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def to_flags(config) -> dict:
    """A config's settings as flat ``{flag: value}``, nested groups included (the inverse of ``from_flags``)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(to_flags(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else
                   {f.name: value})
    return out


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per dataclass field of ``cls`` (the fields of a
    nested config dataclass in a group of their own, under their own names): bools as
    ``--x/--no-x``, ``Literal`` as choices, ``X | None`` also accepting ``none``,
    ``float | Literal["auto"]`` a number or the word, and ``tuple[X, ...]`` as a list (space- or
    comma-separated)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter
    )
    _add_flags(parser, cls, parser)
    return parser


def _add_flags(parser: argparse.ArgumentParser, cls: type, group) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_config(hints[f.name]):
            title = (hints[f.name].__doc__ or f.name).strip().splitlines()[0]
            _add_flags(parser, hints[f.name], parser.add_argument_group(f.name, docs.get(f.name, title)))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, " ").replace("%", "%%")
        if _unwrap_optional(hints[f.name])[1] and default is not None:
            help_text += " (none switches it off)"
        group.add_argument(f"--{f.name}", default=default, help=help_text, **_argument(f.name, hints[f.name], default))


def run_main(cls: type[T], argv: list[str] | None, prog: str, description: str, run: Callable[[T], object]):
    """Parse flags into ``cls`` and call ``run``. A ``UsageError`` (from the config's checks or
    anywhere in the run) or a full disk ends it with one line on stderr and exit status 2."""
    args = build_parser(cls, prog, description).parse_args(argv)
    try:
        return run(from_flags(cls, vars(args)))
    except UsageError as err:
        exit_usage(err)
    except Exception as err:  # a full disk arrives as OSError, or inside tensorstore's or orbax's errors
        full = disk_full_error(err)
        if full is None:
            raise
        exit_usage(full)

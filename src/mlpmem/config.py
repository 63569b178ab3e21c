"""Typed configs from dicts (recipes) and from the command line.

Dataclass fields are the single source of truth: a recipe section and a CLI
verb's flags are both derived from them, and both are checked the same way
(every unknown or ill-typed key is reported at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from mlpmem.errors import MlpmemError


def _types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts(tp, value) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(inner, v) for v in value)
    if tp is Any:
        return True
    return isinstance(value, tp)


def type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_dict(cls, data: dict[str, Any], where: str) -> list[str]:
    """Problems of ``data`` as a ``cls`` config (empty list when fine)."""
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping, got {type(data).__name__}"]
    hints = _types(cls)
    problems = []
    for key, value in data.items():
        if key not in hints:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(hints)})")
        elif not _accepts(hints[key], value):
            problems.append(f"{where}.{key}: expected {type_name(hints[key])}, got {value!r}")
    return problems


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    problems = check_dict(cls, data, where)
    if problems:
        raise MlpmemError("invalid configuration:\n  " + "\n  ".join(problems), "fix these keys")
    return cls(**data)


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field (booleans as --x/--no-x, never type=bool)."""
    hints = _types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        args = typing.get_args(tp)
        base = next((t for t in args if t is not type(None)), tp) if args and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        help_ = f"(default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, dest=f.name, nargs="*", type=typing.get_args(base)[0], default=default, help=help_)
        elif base in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=_optional(base), default=default, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=default, help=help_)


def _optional(base):
    def parse(text: str):
        if text.lower() in ("none", "null", "auto") and base is not str:
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def from_args(cls, ns: argparse.Namespace, **override):
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values.update(override)
    return cls(**values)

"""Typed configs from dicts (recipes) and from the command line.

Dataclass fields are the single source of truth: a recipe section and a CLI
verb's flags are both derived from them, and both are checked the same way
(every unknown or ill-typed key is reported at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
import warnings
from typing import Any

from mlpmem.errors import MlpmemError

# settings renamed so that a concept has one name (old -> new); the old name is accepted, with a deprecation
# warning, for one release: in recipes, overrides and verb flags alike
RENAMED_SETTINGS: dict[str, str] = {"lam": "lambda_"}


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


# a number written as text: YAML 1.1 (PyYAML) reads 1e-4 and 5E-4 as strings, since its floats need a dot (1.0e-4)
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _as_type(tp, value):
    """``value``, with a number written as text read as a float where ``tp`` takes a float and not the text
    (also inside a list of floats): ``train.lr: 1e-4`` in a recipe or an override means 0.0001."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and _accepts(tp, 0.5) and not _accepts(tp, value):
        return float(value)
    if isinstance(value, list):
        inner = [
            typing.get_args(t)[0]
            for t in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
            if typing.get_origin(t) in (list, tuple) and typing.get_args(t)
        ]
        if inner:
            return [_as_type(inner[0], v) for v in value]
    return value


def coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the numbers written as text of ``cls``'s float fields as floats (see :func:`_as_type`)."""
    hints = _types(cls)
    return {k: _as_type(hints[k], v) if k in hints else v for k, v in data.items()}


def type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def deprecation(message: str) -> None:
    """Say once that an old spelling was used: a DeprecationWarning, and a log line a command-line user sees."""
    import logging

    warnings.warn(message, DeprecationWarning, stacklevel=3)
    logging.getLogger("mlpmem").warning("%s", message)


def renamed(cls, data: Any, where: str) -> Any:
    """``data`` (a section of ``cls``) with each old name of :data:`RENAMED_SETTINGS` under its new one; both set is an error."""
    if not isinstance(data, dict):
        return data
    hints = _types(cls)
    out = dict(data)
    for old, new in RENAMED_SETTINGS.items():
        if old in out and old not in hints and new in hints:
            if new in out or setting_name(new) in out:
                raise MlpmemError(f"{where}: both {old} (its old name) and {setting_name(new)} are set", f"keep {setting_name(new)} only")
            deprecation(f"{where}.{old} is deprecated and will be removed in the next release: write {where}.{setting_name(new)}")
            out[new] = out.pop(old)
    return out


def setting_name(field: str) -> str:
    """A field's name in recipes and reports: ``lambda_`` (a Python keyword) is ``lambda``."""
    return field.rstrip("_")


def _field_keys(hints: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` keyed by field names: a setting written without a field's trailing ``_`` (``lambda:`` in YAML) is that field."""
    return {(k + "_" if k + "_" in hints and k not in hints else k): v for k, v in data.items()}


def check_dict(cls, data: dict[str, Any], where: str) -> list[str]:
    """Problems of ``data`` as a ``cls`` config (empty list when fine)."""
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping, got {type(data).__name__}"]
    hints = _types(cls)
    problems = []
    data = _field_keys(hints, data)
    for key, value in data.items():
        if key not in hints:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(hints)})")
        elif not _accepts(hints[key], _as_type(hints[key], value)):
            problems.append(f"{where}.{key}: expected {type_name(hints[key])}, got {value!r}")
    return problems


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    data = renamed(cls, data, where)
    problems = check_dict(cls, data, where)
    if problems:
        raise MlpmemError("invalid configuration:\n  " + "\n  ".join(problems), "fix these keys")
    obj = build(cls, data, where)
    validate(obj, where)
    return obj


def build(cls, data: dict[str, Any], where: str):
    """``cls(**data)`` for type-checked ``data``; a constructor's own refusal becomes an error naming ``where``."""
    data = _field_keys(_types(cls), data)
    try:
        return cls(**coerce(cls, data))
    except MlpmemError as e:
        raise MlpmemError(f"{where}: {e.problem}", e.fix or "fix these settings")


# ---------------------------------------------------------------- ranges and consistency


def need(ok: bool, key: str, message: str) -> list[str]:
    """``["key: message"]`` when ``ok`` is false: one line of a config's ``problems()``."""
    return [] if ok else [f"{key}: {message}"]


def positive(obj, *keys: str, allow_none: bool = False, zero: bool = False) -> list[str]:
    out = []
    for k in keys:
        v = getattr(obj, k)
        if v is None and allow_none:
            continue
        ok = v is not None and (v >= 0 if zero else v > 0) and v == v and v != float("inf")
        out += need(ok, k, f"must be a finite number {'>= 0' if zero else '> 0'}{' or null' if allow_none else ''}, got {v!r}")
    return out


def one_of(obj, key: str, choices, allow_none: bool = False) -> list[str]:
    v = getattr(obj, key)
    return need((v is None and allow_none) or v in choices, key, f"must be one of {', '.join(map(str, choices))}, got {v!r}")


def in_range(obj, key: str, lo: float, hi: float, allow_none: bool = False, hi_open: bool = False) -> list[str]:
    v = getattr(obj, key)
    if v is None and allow_none:
        return []
    ok = v is not None and lo <= v and (v < hi if hi_open else v <= hi)
    return need(ok, key, f"must lie in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")


def _knn_problems(c) -> list[str]:
    temps = list(c.temperatures or [])
    return (
        positive(c, "k", "batch_size")
        + positive(c, "temperature", allow_none=True)
        + in_range(c, "lambda_", 0.0, 1.0, allow_none=True)
        + need(
            bool(temps) and all(t > 0 and t != float("inf") for t in temps),
            "temperatures",
            f"must be a non-empty list of positive numbers, got {temps!r}",
        )
    )


def _generate_problems(c) -> list[str]:
    return (
        positive(c, "max_new_tokens", "temperature", "num_beams")
        + positive(c, "top_k", zero=True)
        + in_range(c, "lambda_", 0.0, 1.0, allow_none=True)
        + need(c.top_p is not None and 0 < c.top_p <= 1, "top_p", f"must lie in (0, 1], got {c.top_p!r}")
    )


# checks for configs whose modules define no ``problems()`` (by class name, so that this module imports none of them)
RULES = {"KnnConfig": _knn_problems, "GenerateConfig": _generate_problems}


def problems_of(obj) -> list[str]:
    """Range and consistency problems of a config object, as ``"key: message"`` lines (empty when fine)."""
    if hasattr(obj, "problems"):
        return list(obj.problems())
    rule = RULES.get(type(obj).__name__)
    return rule(obj) if rule else []


def validate(obj, where: str = "") -> None:
    """Raise one MlpmemError listing every problem of ``obj`` (``where`` prefixes each key)."""
    found = [f"{where}.{p}" if where else p for p in problems_of(obj)]
    if found:
        raise MlpmemError("invalid settings:\n  " + "\n  ".join(found), "fix these settings")


def setting_line(line: str) -> str:
    """``"lambda_: ..."`` -> ``"lambda: ..."``: a problem line in a recipe's terms."""
    key, sep, rest = line.partition(":")
    return f"{setting_name(key)}{sep}{rest}" if sep and key.isidentifier() else line


def flag_name(line: str) -> str:
    """``"width: ..."`` -> ``"--width: ..."``: a problem line in the CLI's terms."""
    key, sep, rest = line.partition(":")
    return f"--{key.rstrip('_').replace('_', '-')}{sep}{rest}" if sep and key.isidentifier() else line


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field (booleans as --x/--no-x, never type=bool)."""
    hints = _types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.rstrip("_").replace("_", "-")  # lambda_ -> --lambda
        args = typing.get_args(tp)
        base = (
            next((t for t in args if t is not type(None)), tp) if args and typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        )
        help_ = f"(default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, dest=f.name, nargs="*", type=typing.get_args(base)[0], default=default, help=help_)
        elif base in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=_optional(base), default=default, help=help_)
            for old in (o for o, n in RENAMED_SETTINGS.items() if n == f.name):
                add_deprecated_flag(parser, "--" + old.replace("_", "-"), flag, dest=f.name, type=_optional(base))
        else:
            parser.add_argument(flag, dest=f.name, default=default, help=help_)


def add_deprecated_flag(parser: argparse.ArgumentParser, old: str, new: str, dest: str, type=None) -> None:
    """An old flag that sets ``dest`` as ``new`` does, with a deprecation warning; hidden from --help. Both on one
    command line is an error, as both spellings in a recipe are (``new`` must be added first): which value was meant?"""
    seen = f"_spelled_{dest}"  # the spellings of dest this command line used, on its namespace

    def spelled(parser, namespace, flag):
        setattr(namespace, seen, getattr(namespace, seen, ()) + (flag,))
        if {old, new} <= set(getattr(namespace, seen)):
            parser.error(f"{old} (its old name) and {new} are both given: keep {new} only")

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            spelled(parser, namespace, old)
            deprecation(f"{option_string} is deprecated and will be removed in the next release: use {new}")
            setattr(namespace, self.dest, values)

    parser.add_argument(old, dest=dest, type=type, action=Deprecated, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    current = parser._option_string_actions.get(new)
    if current is not None:  # the new flag records its use too (its own action, unchanged otherwise)

        class Recorded(current.__class__):
            def __call__(self, parser, namespace, values, option_string=None):
                spelled(parser, namespace, new)
                super().__call__(parser, namespace, values, option_string)

        current.__class__ = Recorded


def add_device_arguments(parser: argparse.ArgumentParser, dtype: bool = False) -> None:
    """--device (and --dtype) for a verb that runs a model; resolved by models.resolve_device."""
    parser.add_argument(
        "--device", default="auto", help="where the model runs: auto (cuda if there is a GPU, else cpu) | cpu | cuda | cuda:N | mps"
    )
    if dtype:
        parser.add_argument(
            "--dtype",
            default="float32",
            help="precision of the LM: float32 | bfloat16 | float16 (GPU only) | auto (bfloat16 on a GPU that has it, else float32)",
        )


def _optional(base):
    def parse(text: str):
        if text.lower() in ("none", "null", "auto") and base is not str:
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def from_args(cls, ns: argparse.Namespace, **override):
    """The config of a verb's flags, type- and range-checked like a recipe section (all problems at once)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values = coerce(cls, {**values, **override})
    problems = [flag_name(p.partition(".")[2]) for p in check_dict(cls, values, "x")]
    if problems:
        raise MlpmemError("invalid options:\n  " + "\n  ".join(problems), "fix these options (see --help)")
    try:
        obj = cls(**values)
    except MlpmemError as e:
        raise MlpmemError(f"invalid options: {e.problem}", e.fix or "fix these options (see --help)")
    problems = [flag_name(p) for p in problems_of(obj)]
    if problems:
        raise MlpmemError("invalid options:\n  " + "\n  ".join(problems), "fix these options (see --help)")
    return obj

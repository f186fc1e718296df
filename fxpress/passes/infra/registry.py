"""Passes by name, and text pipelines such as `"a{x=1,y=two},b"`.

`register_pass` adds a Pass class under its `name`.  `parse_pipeline`
turns text into pass instances, converting each option to the type its
dataclass field declares; `format_pipeline` prints them back, so
`parse_pipeline(format_pipeline(p)) == p`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Iterable

from fxpress.errors import OptionError, PipelineError

_REGISTRY: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
# An option value that is one bracketed list, `r=[4,8]`: a sweep grid's axis (fxpress.recipes.sweep), not a value.
_GRID_AXIS = re.compile(r"=\s*(\[[^\[\]{}]*\])\s*(?=[,}])")


def register_pass(cls: type) -> type:
    """Class decorator: make a Pass available by its `name` in pipelines."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PipelineError(f"{cls.__name__} needs a kebab-case class attribute `name`, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise PipelineError(f"pass name {name!r} is taken by {_REGISTRY[name].__qualname__}")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise PipelineError(f"pass {name!r} ({cls.__name__}) must be a frozen dataclass "
                            "(@dataclass(frozen=True)) so its options are typed and fixed")
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type]:
    """Every registered pass class by name, sorted by name."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def pass_class(name: str) -> type:
    passes = registered_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise PipelineError(f"unknown pass '{name}': {hint}known passes: {', '.join(passes)}")
    return passes[name]


def pass_options(cls: type) -> list[dataclasses.Field]:
    """The typed, user-settable options of a pass class."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


# -- parsing --------------------------------------------------------------------------
def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_pipeline(text: str) -> list[Any]:
    """Parse `"a{x=1},b"` into pass instances, checking names, options and values."""
    if not text or not text.strip():
        return []
    axis = _GRID_AXIS.search(text)
    if axis:
        raise PipelineError(f"pipeline {text!r}: {axis.group(1)} is a sweep grid of values to try; run it with "
                            f"fxpress sweep MODEL --pipeline ..., or write one value (a list option is "
                            f"written x=1;2)")
    passes = []
    for item in _split_top_level(text.strip()):
        if not item:
            raise PipelineError(f"empty pass in pipeline {text!r} (a doubled or trailing comma?)")
        match = re.fullmatch(r"([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?", item, flags=re.S)
        if not match:
            raise PipelineError(f"cannot read pass {item!r}; write name or name{{option=value,...}}")
        passes.append(make_pass(match.group(1), _parse_options(match.group(1), match.group(2) or "")))
    return passes


def _parse_options(pass_name: str, body: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for entry in _split_top_level(body) if body.strip() else []:
        key, eq, value = entry.partition("=")
        if not eq or not key.strip():
            raise PipelineError(f"pass '{pass_name}': option {entry!r} must be written key=value")
        options[key.strip()] = value.strip()
    return options


def make_pass(name: str, options: dict[str, Any]) -> Any:
    """Instantiate pass `name` from option strings (or already-typed values)."""
    cls = pass_class(name)
    fields = {f.name: f for f in pass_options(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PipelineError(f"pass '{name}' has no option '{key}' (its options: {known})")
        kwargs[key] = convert_option(name, key, hints[key], raw)
    try:
        return cls(**kwargs)
    except OptionError:
        raise
    except (TypeError, ValueError) as err:
        raise PipelineError(f"pass '{name}': {err}") from err


def convert_option(pass_name: str, key: str, hint: Any, raw: Any) -> Any:
    """Convert option text to the field's declared type, or raise a PipelineError."""
    if not isinstance(raw, str):
        return raw
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin in (typing.Union, types.UnionType):
            if raw.lower() == "none" and type(None) in args:
                return None
            errors = []
            for option in (a for a in args if a is not type(None)):
                try:
                    return convert_option(pass_name, key, option, raw)
                except PipelineError as err:
                    errors.append(str(err))
            raise ValueError(" / ".join(errors))
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError(f"choose one of {', '.join(map(str, args))}")
            return raw
        if origin in (tuple, list):
            items = [] if raw == "" else raw.split(";")
            item_type = args[0] if args else str
            return origin(convert_option(pass_name, key, item_type, i.strip()) for i in items)
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if hint in (int, float, str):
            return hint(raw)
    except ValueError as err:
        raise PipelineError(f"pass '{pass_name}': bad value {raw!r} for option '{key}' "
                            f"({format_type(hint)}): {err}") from err
    raise PipelineError(f"pass '{pass_name}': option '{key}' has type {hint} that pipelines cannot spell")


def format_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(format_type(a) for a in args)
    if origin in (tuple, list):
        return f"{format_type(args[0]) if args else 'str'};..."
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ";".join(format_value(v) for v in value)
    return str(value)


def format_pass(instance: Any) -> str:
    """`name{opt=value,...}` with every option, in field order; bare name if none."""
    options = [f"{f.name}={format_value(getattr(instance, f.name))}" for f in pass_options(type(instance))]
    return f"{instance.name}{{{','.join(options)}}}" if options else instance.name


def format_pipeline(passes: Iterable[Any]) -> str:
    return ",".join(format_pass(p) for p in passes)


def _load_builtin_passes() -> None:
    import fxpress.passes  # noqa: F401  (importing registers the built-in passes)

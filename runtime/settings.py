"""One validated dataclass per configuration: the base class that checks every field once, in
`__post_init__`, against its type hint (`Literal[...]` lists the choices) and the class's own `check()`.

Recipes (compressor.recipe) and graph options (exporter.onnx_graph) build on it, so a bad value anywhere gets
one error line, `section.field=value: what is wrong`, from this one place. Hand-written because dataclasses
do not validate and a schema library (pydantic) would be a dependency of the runtime for ~60 lines.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import ClassVar, Literal

from runtime.errors import EdgepackError


def _choices(hint) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) type hint, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [_choices(a) if a is not type(None) else (None,) for a in typing.get_args(hint)]
        if all(f is not None for f in found):
            return tuple(c for f in found for c in f)
    return None


def _type_error(hint, value) -> str | None:
    """What is wrong with a plain int / float / bool / str / list[str] value, or None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected a whole number"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if typing.get_origin(hint) is list:
        return (
            None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "expected a list of strings"
        )
    return None


class Settings:
    """Base of every recipe dataclass: `__post_init__` checks each field against its type hint (a `Literal`
    lists the choices) and then the class's own `check()` (ranges, relations); every bad value becomes one
    EdgepackError line that names `section.field`. Callers add where the value came from."""

    section: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            choices = _choices(hint)
            if choices is not None:
                if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
                    raise self.error(f.name, value, "expected " + " or ".join(repr(c) for c in choices))
            elif problem := _type_error(hint, value):
                raise self.error(f.name, value, problem)
        self.check()

    def check(self) -> None:
        """Checks beyond the type hints; subclasses raise self.error(...)."""

    def error(self, name: str, value, problem: str) -> EdgepackError:
        prefix = f"{self.section}." if self.section else ""
        return EdgepackError(f"{prefix}{name}={value!r}: {problem}")

    def at_least(self, minimum, *names: str) -> None:
        for name in names:
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                raise self.error(name, getattr(self, name), f"must be at least {minimum}")

"""Plugin options: every registered object is a factory whose keyword parameters are its options.

The recommended factory is a dataclass (as the samplers are): its init fields, each with a type and a
default, are the options, and ``__post_init__`` validates them, raising :class:`AnexaError` with the
fix. A plain function works the same way through its parameters; a factory without parameters (a
class with no fields, a function of no arguments) takes no options.

Option types are ``bool``, ``int``, ``float``, ``str``, ``typing.Literal[...]`` of those, or any of
them ``| None``. Values arrive in one of two forms and go through one conversion: text from the
command line (``-o attention.window=64``, ``-s top_p=0.9``) or typed values from a TOML table or a
checkpoint's JSON metadata. Whatever was given, :func:`create` returns the instance together with
*every* option's value (defaults included), which is what a checkpoint stores, so a later change of a
default never changes what a saved model means.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from anexa_core.errors import AnexaError, choose_one_of

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class Option:
    """One option of a plugin: its name, type, default and a help line (``field(metadata={"help": …})``)."""

    name: str
    type: Any
    default: Any
    help: str = ""

    def type_name(self) -> str:
        """``int``, ``float | None``, ``'swiglu' | 'relu2'`` — how ``anexa plugins`` shows the type."""
        choices, nullable = _choices(self.type), _nullable(self.type)
        if choices is not None:
            text = " | ".join(repr(choice) for choice in choices)
        else:
            text = getattr(_base(self.type), "__name__", str(self.type))
        return f"{text} | None" if nullable else text

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name(), "default": self.default, "help": self.help}


def _nullable(kind: Any) -> bool:
    return type(None) in typing.get_args(kind) and _is_union(kind)


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _base(kind: Any) -> Any:
    """``int | None`` → ``int``; anything else unchanged."""
    if _is_union(kind):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _choices(kind: Any) -> tuple[Any, ...] | None:
    base = _base(kind)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else None


def describe(factory: Callable[..., Any]) -> list[Option]:
    """The options of ``factory``, in declaration order. A parameter without a default is a plugin bug."""
    if dataclasses.is_dataclass(factory) and isinstance(factory, type):
        hints = _hints(factory)
        found = []
        for field in dataclasses.fields(factory):
            if not field.init:
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                raise AnexaError(f"plugin option {field.name!r} of {factory.__name__} has no default: give it one")
            kind = _annotation(hints.get(field.name, field.type), default, factory)
            found.append(Option(field.name, kind, default, field.metadata.get("help", "")))
        return found
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    hints = _hints(factory.__init__ if isinstance(factory, type) else factory)  # type: ignore[misc]
    found = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            name = getattr(factory, "__name__", repr(factory))
            raise AnexaError(
                f"{name} is not a plugin factory: its parameter {parameter.name!r} has no default (a plugin "
                "registers a factory whose keyword parameters are its options; see docs/plugins.md)"
            )
        kind = hints.get(parameter.name, parameter.annotation)
        kind = None if kind is parameter.empty else kind
        found.append(Option(parameter.name, _annotation(kind, parameter.default, factory), parameter.default))
    return found


def _hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations, or ``{}`` when one of them does not resolve (then each is tried alone)."""
    try:
        return typing.get_type_hints(obj)
    except Exception:
        return {}


def _annotation(kind: Any, default: Any, owner: Any) -> Any:
    """An option's type: its annotation, evaluated alone if it is still a string (another annotation of the
    class may have failed to resolve), else the type of its default (``bool``, ``int``, ``float``, ``str``)."""
    if isinstance(kind, str):
        module = inspect.getmodule(owner)
        try:
            kind = eval(kind, vars(module) if module else {}, {})
        except Exception:
            kind = None
    if kind is None:
        return type(default) if isinstance(default, _SCALARS) else str
    return kind


def convert(owner: str, option: Option, value: Any) -> Any:  # noqa: C901 - one branch per option type, read top to bottom
    """``value`` (command-line text, or a TOML/JSON value) as the option's type, or a one-line error."""
    # Why complex: one branch per option type (choices, bool, int, float, str), each accepting both command-line
    # text and TOML's or JSON's own value and refusing the rest; read top to bottom.
    base, choices = _base(option.type), _choices(option.type)
    if value is None or (isinstance(value, str) and value.lower() == "none" and _nullable(option.type)):
        if _nullable(option.type) or option.default is None:
            return None
        raise AnexaError(f"{owner} option {option.name} needs a value")
    if choices is not None:
        for choice in choices:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        allowed = ", ".join(map(str, choices))
        raise AnexaError(f"{owner} option {option.name} must be one of {allowed}, got {value!r}")
    wanted = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if base not in _SCALARS:
        return value  # an annotation Anexa does not convert: the plugin validates it
    given = value
    try:
        if isinstance(value, str):
            if base is bool:
                lowered = value.strip().lower()
                if lowered not in _TRUE | _FALSE:
                    raise ValueError
                return lowered in _TRUE
            value = base(value.strip()) if base is not str else value
            if base is float and not math.isfinite(value):
                raise ValueError
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        raise ValueError
    except (ValueError, OverflowError):
        raise AnexaError(f"{owner} option {option.name} must be {wanted[base]}, got {given!r}") from None


def create(owner: str, factory: Callable[..., Any], given: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Call ``factory`` with the ``given`` options converted; return the object and all option values.

    ``owner`` names the plugin in errors (``attention sliding``). Unknown option names are an error
    listing the known ones; the factory's own validation errors pass through.
    """
    known = {option.name: option for option in describe(factory)}
    values = {}
    for name, value in given.items():
        if name not in known:
            if not known:
                raise AnexaError(f"{owner} takes no options, got {name!r}")
            raise AnexaError(f"{owner} has no option {name!r}: {choose_one_of(name, known)}")
        values[name] = convert(owner, known[name], value)
    try:
        obj = factory(**values)
    except TypeError as exc:
        raise AnexaError(f"{owner} could not be created ({exc}): check its options") from None
    # A dataclass may normalise its fields in __post_init__: store what it kept, not what was typed.
    from_object = dataclasses.is_dataclass(obj)
    resolved = {
        name: getattr(obj, name) if from_object else values.get(name, option.default) for name, option in known.items()
    }
    return obj, resolved


def parse_assignments(specs: list[str] | tuple[str, ...], flag: str) -> dict[str, dict[str, str]]:
    """``["attention.window=64", "blocks.rope_theta=5e5"]`` → ``{"attention": {"window": "64"}, …}``.

    Raises :class:`AnexaError` for a malformed spec and for an option given twice (one value would be
    dropped without a word)."""
    parsed: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, equals, value = spec.partition("=")
        kind, dot, name = target.strip().partition(".")
        if not equals or not dot or not kind or not name.isidentifier():
            raise AnexaError(f"bad {flag} {spec!r}: use {flag} KIND.OPTION=VALUE, e.g. {flag} attention.window=64")
        if name in parsed.get(kind, {}):
            raise AnexaError(f"{flag} {kind}.{name} is given twice: give it once")
        parsed.setdefault(kind, {})[name] = value.strip()
    return parsed

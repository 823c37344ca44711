"""The one validation grammar of every configuration object (env, patch env, parallel backend, run configs): typed
dataclass fields declared with :func:`setting` carry their limits, and :func:`validate` checks them all at creation.

An error names the field (``section.field`` for a nested section such as ``parallel``) and what is allowed: a
``TypeError`` for a value of the wrong type, a ``ValueError`` for one out of range or not among the choices.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

Config = TypeVar("Config")
NoneType = type(None)


@dataclass(frozen=True)
class Limits:
    """What a field allows beyond its type.

    :ivar low: smallest allowed value (numbers).
    :ivar high: largest allowed value (numbers).
    :ivar low_open: exclude ``low`` itself.
    :ivar high_open: exclude ``high`` itself.
    :ivar choices: the allowed values (then the type is not described).
    :ivar what: the allowed values in words, replacing the type's description (the range is still appended).
    :ivar check: a further test of a well-typed value: None when it passes, else the reason (may be empty).
    :ivar merge: mapping fields read from a file: the given keys update the default mapping (loaders).
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Sequence[Any]] = None
    what: Optional[str] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    merge: bool = False

    def range_text(self) -> str:
        """``"in (0, 1)"``, ``">= 1"`` or ``""``."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            return f"in {'(' if self.low_open else '['}{low:g}, {high:g}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{'>' if self.low_open else '>='} {low:g}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {high:g}"
        return ""

    def in_range(self, value: float) -> bool:
        """Whether a number lies within ``low`` / ``high``."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **limits: Any) -> Any:
    """A dataclass field with its :class:`Limits`, checked by :func:`validate`.

    :param default: the default value.
    :param default_factory: alternatively, a function making the default (mutable defaults).
    :param limits: the fields of :class:`Limits` (``low``, ``high``, ``low_open``, ``high_open``, ``choices``,
        ``what``, ``check``, ``merge``).
    """
    return field(default=default, default_factory=default_factory, metadata={"limits": Limits(**limits)})


class UnknownSettingError(TypeError, ValueError):
    """A setting name the configuration does not have (a ``TypeError`` like an unexpected keyword argument, and a
    ``ValueError`` like any other bad configuration)."""


def limits_of(f: dataclasses.Field) -> Limits:
    """The limits declared on a field (none for a plain field)."""
    return f.metadata.get("limits", Limits())


def section_of(cls: type) -> Optional[str]:
    """The dotted name errors give a configuration class's fields (its ``section`` class attribute)."""
    return getattr(cls, "section", None)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(hint: Any, limits: Limits = Limits()) -> str:
    """The allowed values of a field in words, e.g. ``"None or an integer >= 1"``.

    :param hint: the field's type.
    :param limits: its limits.
    """
    if limits.choices is not None:
        return f"one of ({', '.join(map(repr, limits.choices))})"
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is Union and NoneType in args
    if optional:
        rest = [a for a in args if a is not NoneType]
        hint = rest[0] if len(rest) == 1 else Union[tuple(rest)]
    text = limits.what or _type_words(hint)
    text = " ".join(filter(None, [text, limits.range_text()]))
    return f"None or {text}" if optional and not (limits.what or "").startswith("None") else text


def _type_words(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_words(a) for a in typing.get_args(hint))
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if origin in (tuple, list):
        inner = typing.get_args(hint)[:1]
        return f"a list of {_type_words(inner[0])[2:]}s" if inner and inner[0] is not Any else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields (or a {hint.__name__})"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (ints count as floats, bools as neither)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_accepts(value, a) for a in typing.get_args(hint))
    if hint is NoneType:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    if origin in (tuple, list):
        inner = typing.get_args(hint)[:1]
        return (isinstance(value, (tuple, list))
                and all(_accepts(v, inner[0]) for v in value) if inner and inner[0] is not Any else True)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _is_choice(value: Any, choices: Sequence[Any]) -> bool:
    # identity for None and bools, equality otherwise (True is not the choice 1, nor None the choice "none")
    def plain(v: Any) -> bool:
        return v is not None and not isinstance(v, bool)

    return any(value is c or (plain(value) and plain(c) and value == c) for c in choices)


def check_value(name: str, value: Any, hint: Any, limits: Limits = Limits()) -> Any:
    """``value`` checked against a field's type and limits; returns it normalised (a list for a tuple field
    becomes a tuple, a mapping for a nested configuration becomes that configuration).

    :param name: the field's name in messages (dotted for a nested section).
    :param value: the value given.
    :param hint: the field's type.
    :param limits: its limits.
    :raises TypeError: wrong type. :raises ValueError: out of range, not a choice, or refused by ``check``.
    """
    allowed = describe(hint, limits)
    if limits.choices is not None:
        if not _is_choice(value, limits.choices):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
        return value
    nested = _nested_config(hint)
    if nested is not None and isinstance(value, Mapping):
        return from_mapping(nested, value)
    if not _accepts(value, hint):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)) or not limits.in_range(float(value)):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if limits.check is not None and value is not None:
        problem = limits.check(value)
        if problem is not None:
            raise ValueError(f"{name} must be {allowed}, got {value!r}" + (f": {problem}" if problem else ""))
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _nested_config(hint: Any) -> Optional[type]:
    arms = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    return next((a for a in arms if dataclasses.is_dataclass(a)), None)


def validate(config: Any) -> None:
    """Check every field of a configuration dataclass against its type and :func:`setting` limits (call it from
    ``__post_init__``); normalised values (tuples, nested configurations) are written back.

    :param config: a dataclass instance; its class's ``section`` (e.g. ``"parallel"``) prefixes field names.
    """
    cls = type(config)
    section = section_of(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name}" if section else f.name
        value = check_value(name, getattr(config, f.name), hints[f.name], limits_of(f))
        if value is not getattr(config, f.name):
            object.__setattr__(config, f.name, value)


def field_names(cls: type) -> tuple:
    """Names of a configuration class's fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(given: Iterable[str], allowed: Iterable[str], label: str) -> None:
    """Refuse names that are not settings, listing the valid ones.

    :param given: the names given.
    :param allowed: the valid names.
    :param label: what a name is, for the message, e.g. ``"PruneEnv setting"``.
    :raises UnknownSettingError: naming the unknown names.
    """
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UnknownSettingError(f"unknown {label}(s) {unknown}; valid: {', '.join(allowed)}")


def from_mapping(cls: Type[Config], values: Union[Config, Mapping[str, Any], None],
                 label: Optional[str] = None) -> Config:
    """A configuration from a mapping (a YAML section, keyword arguments), naming any unknown key.

    :param cls: the configuration class.
    :param values: the mapping; None gives the defaults, an instance of ``cls`` is returned as is.
    :param label: what a key is in messages (default the class's ``key_label``, else ``"{section} key"`` or
        ``"{cls} setting"``).
    """
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    section = section_of(cls)
    if not isinstance(values, Mapping):
        raise TypeError(f"{section or cls.__name__} must be {_type_words(cls)}, got {values!r}")
    label = label or getattr(cls, "key_label", None) or (f"{section} key" if section else f"{cls.__name__} setting")
    check_keys(values, field_names(cls), label)
    return cls(**dict(values))


class Settings:
    """Base of every configuration dataclass: checked by :func:`validate` on creation, built from keyword
    arguments or a mapping with unknown names refused. A subclass that checks more (settings that must fit
    together) extends ``__post_init__`` after calling this one."""

    #: dotted prefix of the field names in errors (``"parallel"``: ``parallel.backend must be ...``)
    section: ClassVar[Optional[str]] = None
    #: what a setting is called in unknown-name errors (default ``"{section} key"`` / ``"{class} setting"``)
    key_label: ClassVar[Optional[str]] = None

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """Names of the settings, in declaration order."""
        return field_names(cls)

    @classmethod
    def from_dict(cls: Type[Config], values: Union[Config, Mapping[str, Any], None]) -> Config:
        """A checked configuration from a mapping (a YAML section; None: the defaults; an instance as is)."""
        return from_mapping(cls, values)

    @classmethod
    def from_kwargs(cls: Type[Config], **kwargs: Any) -> Config:
        """A checked configuration from keyword arguments; an unknown name is refused, listing the valid ones."""
        return from_mapping(cls, kwargs)


def merged(cls: Type[Config], config: Optional[Config], overrides: Mapping[str, Any],
           label: Optional[str] = None) -> Config:
    """The configuration an object's constructor gets as ``(config=None, **overrides)``: ``config`` (default the
    defaults) with ``overrides`` applied, checked again; a ``config`` of another type is a ``TypeError``.

    :param cls: the configuration class.
    :param config: a ``cls`` instance or None.
    :param overrides: settings by name.
    :param label: as for :func:`from_mapping`.
    """
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__} (or pass settings by name), got {type(config).__name__}")
    if config is not None and not overrides:
        return config
    base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    return from_mapping(cls, {**base, **overrides}, label)


__all__ = ["Settings", "Limits", "merged", "setting", "validate", "check_value", "describe", "check_keys",
           "from_mapping",
           "field_names", "limits_of", "section_of", "UnknownSettingError"]

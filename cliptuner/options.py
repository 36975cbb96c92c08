"""User-facing options, declared once on the config dataclasses and derived from there.

A config field that users may set is declared with :func:`option`: its default, its help text, and where it is
reachable — ``cli`` (a ``cliptuner train`` flag) and ``request`` (a ``/train`` parameter). Everything else is
derived from the fields:

- :func:`add_arguments` turns them into argparse flags, typed from the annotations: ``int``, ``float``, ``str``
  (with ``choices``), ``bool`` (``store_true``, or ``--x/--no-x`` when the default is True), ``Optional[...]``
  (``none`` on the command line gives None), ``Sequence[...]`` (``nargs="*"``). Flags default to "not given", so
  :func:`given_options` returns exactly the options typed on the command line and a config file can sit below
  them; the help text shows each field's default.
- :func:`cli_names` and :func:`request_names` list the names reachable from each side.
- :func:`read_options_file` reads a YAML or JSON mapping of those names (``--config``, ``parameters['config']``).
- :func:`cast_value` turns a loosely typed value (protobuf sends every number as a float; YAML and JSON have
  no tuples) into the field's type, or names the field and what it expected.
- :func:`config_dataclass` makes such a class a pydantic dataclass (a JSON Schema, ``extra="forbid"``) whose
  fields go through :func:`cast_value` first: as strict as the casts (a bool is not an int, 5.0 is 5, 5.5 is
  refused), and every error a plain ``ValueError`` that names the field.

Torch-free and jina-free: the CLI and the Executors both use it.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import json
import numbers
import os
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import pydantic
import pydantic.dataclasses
import yaml

HELP = "help"  # metadata key: the help text (required for every user-facing field)
CLI = "cli"  # metadata key: False keeps the field off the command line
REQUEST = "request"  # metadata key: False keeps the field out of /train's parameters
FLAGS = "flags"  # metadata key: the option strings, first one shown first (default: --field-name)
CHOICES = "choices"  # metadata key: the allowed values of a str field

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_NONE = "none"  # a command-line value of an Optional field that means None


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    flags: Sequence[str] = (),
    choices: Optional[Sequence[str]] = None,
    cli: bool = True,
    request: bool = True,
) -> Any:
    """A dataclass field that users may set, with its help text and where it is reachable.

    Args:
        default: the default value.
        help: what the option does, shown by ``--help`` (the default is appended there).
        default_factory: instead of ``default``, for mutable defaults.
        flags: option strings on the command line; default ``--`` + the field name with dashes.
        choices: the allowed values (a str field).
        cli: whether ``cliptuner train`` has a flag for it.
        request: whether ``/train`` accepts it as a parameter.

    Returns:
        A ``dataclasses.field`` carrying this in its metadata.
    """
    if not help.strip():
        raise ValueError("an option needs a help text")
    # "description" and "json_schema_extra" are read by pydantic: they land in the JSON Schema
    metadata: dict[str, Any] = {HELP: help, CLI: cli, REQUEST: request, "description": help}
    if flags:
        metadata[FLAGS] = tuple(flags)
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
        metadata["json_schema_extra"] = {"enum": list(choices)}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def is_option(f: dataclasses.Field) -> bool:
    """Whether a field was declared user-facing (with a help text)."""
    return bool(f.metadata.get(HELP))


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if is_option(f) and f.metadata.get(CLI, True)]


def cli_names(cls: type) -> tuple[str, ...]:
    """Names of the fields of ``cls`` that are command-line flags."""
    return tuple(f.name for f in cli_fields(cls))


def request_names(cls: type) -> tuple[str, ...]:
    """Names of the fields of ``cls`` that a request may set."""
    return tuple(f.name for f in dataclasses.fields(cls) if is_option(f) and f.metadata.get(REQUEST, True))


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The option strings of a field's flag (``--batch-size`` for ``batch_size`` unless declared)."""
    return tuple(f.metadata.get(FLAGS, ())) or ("--" + f.name.replace("_", "-"),)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field's annotation says its values are."""

    base: type  # int, float, str or bool (the element type of a sequence)
    optional: bool  # None allowed
    sequence: bool  # a sequence of ``base``


def kind_of(cls: type, name: str) -> _Kind:
    """Read the annotation of field ``name`` of ``cls`` (string annotations resolved)."""
    return _kind_of(cls, name)


@functools.cache
def _kind_of(cls: type, name: str) -> _Kind:
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else Any
    origin = typing.get_origin(hint)
    if origin in (collections.abc.Sequence, list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return _Kind(args[0] if args else Any, optional, True)
    return _Kind(hint, optional, False)


_WORDS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def _describe(kind: _Kind) -> str:
    singular, plural = _WORDS.get(kind.base, (f"a {getattr(kind.base, '__name__', kind.base)}",) * 2)
    return (f"a list of {plural}" if kind.sequence else singular) + (" or null" if kind.optional else "")


def _cast_scalar(name: str, kind: _Kind, value: Any) -> Any:
    base = kind.base
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            if not float(value).is_integer():
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}")
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}")
        value = float(value)
    elif base is str:
        if isinstance(value, os.PathLike):  # a path given where a path string is expected
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}")
    return value


def cast_value(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` expects it: whole floats → int, ints → float, lists → tuples.

    Raises:
        ValueError: the value has the wrong type (names the field and what it expects).
    """
    kind = kind_of(cls, name)
    if value is None:
        if kind.optional:
            return None
        raise ValueError(f"{name} must be {_describe(kind)}, got None")
    if kind.sequence:
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}")
        element = _Kind(kind.base, optional=False, sequence=False)
        try:
            return tuple(_cast_scalar(name, element, v) for v in value)
        except ValueError:
            raise ValueError(f"{name} must be {_describe(kind)}, got {value!r}") from None
    return _cast_scalar(name, kind, value)


def validation_message(exc: pydantic.ValidationError, cls: type) -> str:
    """One line for a pydantic error of a config class: the messages of its checks, joined by ``; ``.

    A check that raised ``ValueError`` gives its own message (it names the field and what is allowed); an unknown
    keyword names the unknown keys and the known ones; any other error names the field and pydantic's message.
    """
    messages: list[str] = []
    unknown: list[str] = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error.get("loc", ()))
        cause = error.get("ctx", {}).get("error")
        if error["type"] == "unexpected_keyword_argument":
            unknown.append(loc)
        elif isinstance(cause, Exception):
            messages.append(str(cause))
        else:
            text = str(error.get("msg", "is not valid"))
            messages.append(f"{loc or cls.__name__}: {text[:1].lower() + text[1:]}, got {error.get('input')!r}")
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(cls))
        messages.insert(0, f"unknown {cls.__name__} option(s) {sorted(unknown)}; known: {known}")
    return "; ".join(messages)


def _cast_field(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
    return cast_value(cls, info.field_name, value)


def config_dataclass(cls: type) -> type:
    """Make ``cls`` (a plain class body with annotated fields) a strict pydantic dataclass.

    Every field is cast by :func:`cast_value` before pydantic validates it; unknown keywords are refused; the
    class's ``__post_init__`` checks run after. Any error comes out as one ``ValueError`` whose text is
    :func:`validation_message` (not pydantic's multi-line report), so a CLI prints it on one line. The result is a
    real dataclass: ``dataclasses.fields``/``replace``/``asdict`` work, and ``pydantic.TypeAdapter(cls)`` gives
    its JSON Schema.
    """
    cls._cast_fields = pydantic.field_validator("*", mode="before")(classmethod(_cast_field))
    built = pydantic.dataclasses.dataclass(cls, config=pydantic.ConfigDict(extra="forbid"))
    validate = built.__init__

    @functools.wraps(validate)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ValueError(validation_message(exc, built)) from None

    built.__init__ = __init__
    return built


def _command_line_type(base: type, optional: bool) -> Callable[[str], Any]:
    if base is str and not optional:
        return str

    def convert(text: str) -> Any:
        if optional and text.strip().lower() == _NONE:
            return None
        return base(text)

    convert.__name__ = f"{base.__name__}{' or none' if optional else ''}"  # argparse: "invalid float value: 'x'"
    return convert


def _shown(value: Any) -> str:
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return _NONE
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def add_arguments(parser: Union[argparse.ArgumentParser, Any], cls: type) -> None:
    """Add a flag for every command-line field of ``cls`` to ``parser`` (a parser or an argument group).

    A flag that is not given leaves no attribute on the namespace (its default is ``argparse.SUPPRESS``), so
    :func:`given_options` can tell typed values from defaults; the help text shows the field's default.

    Raises:
        TypeError: a field whose annotation has no command-line form (declare it with ``cli=False``).
    """
    for f in cli_fields(cls):
        kind = kind_of(cls, f.name)
        if kind.base not in (int, float, str, bool) or (kind.base is bool and (kind.optional or kind.sequence)):
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {f.type!r}; declare it cli=False")
        default = default_of(f)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata[HELP]} (default: {_shown(default)})".replace("%", "%%"),
        }
        if kind.base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = _command_line_type(kind.base, kind.optional)
            if kind.sequence:
                kwargs["nargs"] = "*"
            if CHOICES in f.metadata:
                kwargs["choices"] = f.metadata[CHOICES]
            elif kind.optional:
                kwargs["metavar"] = f"{f.name.upper()}|{_NONE}"
        parser.add_argument(*flags_of(f), **kwargs)


def given_options(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (parsed by a parser built with :func:`add_arguments`)."""
    return {name: getattr(namespace, name) for name in cli_names(cls) if hasattr(namespace, name)}


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; option files are written as YAML 1.2 reads them."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_options_file(path: Union[str, Path], allowed: Iterable[str], label: Optional[str] = None) -> dict[str, Any]:
    """Option values from a YAML (``.yaml``/``.yml``) or JSON (``.json``) file holding one mapping of names.

    Args:
        path: the file.
        allowed: the option names the file may set.
        label: how errors name the file (default: ``path``); a service passes the name its client gave.

    Returns:
        name → value, as written (cast and validated later by the config that takes them).

    Raises:
        ValueError: an unreadable file, another suffix, invalid YAML/JSON, not a mapping, or unknown names (all
            named).
    """
    path = Path(path)
    label = str(path) if label is None else label
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise ValueError(f"config file {label!r} must be YAML or JSON ({', '.join(CONFIG_SUFFIXES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read config file {label!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_Yaml12Loader)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {label!r} is not valid {path.suffix.lower()[1:].upper()}: {exc}") from None
    if values is None:  # an empty YAML file
        values = {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ValueError(
            f"config file {label!r} must hold a mapping of option names to values, got {type(values).__name__}"
        )
    allowed = set(allowed)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in config file {label!r}; known: {sorted(allowed)}")
    return values

"""Config dataclasses <-> command-line options and TOML, and the checks every config shares.

Each stage's config is a frozen dataclass whose fields carry ``metadata={"help": ...}``; the
help doubles as the CLI help and as docs/config.md, so options are written down once.
:func:`build` layers mappings (preset, file, command line) into one config with type checks;
:func:`read_toml` and :func:`parse_set` read those mappings; :func:`check_range`,
:func:`check_int`, :func:`check_one_of` and :func:`check_unit` are the field checks that
every config's ``__post_init__`` uses, so a bad value reads the same in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from tli.errors import TLIError

T = TypeVar("T")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a field annotation."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _converter(tp: Any, name: str):
    base, optional = _base_type(tp)

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if get_origin(base) is Literal:
            choices = get_args(base)
            if text not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice: {text!r} is not one of {', '.join(map(str, choices))}"
                )
            return text
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")
        if get_origin(base) is tuple or base is tuple:
            items = tuple(s.strip() for s in text.split(",") if s.strip())
            args = get_args(base)
            item = args[0] if args else str
            item, _ = _base_type(item)
            if item in (int, float):
                try:
                    return tuple(item(s) for s in items)
                except ValueError:
                    raise argparse.ArgumentTypeError(
                        f"{text!r} is not a comma-separated list of {item.__name__} values"
                    ) from None
            return items
        try:
            return base(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid {getattr(base, '__name__', base)}"
            ) from None

    convert.__name__ = name  # argparse names the type in its error message
    return convert


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Add one ``--field-name`` option per field of ``cls`` (default: unset, so presets apply)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        base, _ = _base_type(hints[f.name])
        if base is bool and default is False:
            group.add_argument(
                _option(f.name),
                dest=f.name,
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: off)",
            )
            continue
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(
            _option(f.name),
            dest=f.name,
            type=_converter(hints[f.name], f.name),
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{help_text} (default: {shown})",
        )


def overrides_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def build(cls: type[T], *layers: dict[str, Any]) -> T:
    """``cls`` built from its defaults, updated by each mapping in turn (preset, file, CLI)."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise TLIError(
                    f"unknown {cls.__name__} key {key!r}; known: {', '.join(sorted(names))}"
                )
            value = tuple(value) if isinstance(value, list) else value
            wanted = _type_problem(value, hints[key])
            if wanted:
                raise TLIError(f"{key} must be {wanted}, got {_short(value)}")
            values[key] = value
    try:
        return cls(**values)
    except TypeError as err:
        raise TLIError(f"{cls.__name__}: {err}") from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(tp: Any) -> str:
    """A type annotation in words, for error messages."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        words = " or ".join(_describe(a) for a in args)
        return words + (", or none" if type(None) in get_args(tp) else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if origin is tuple:
        args = get_args(tp)
        return "a list of values, each " + _describe(args[0]) if args else "a list"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


def _type_problem(value: Any, tp: Any) -> str | None:
    """None when ``value`` fits the field annotation ``tp``, else what was expected, in words.

    Config files and ``--set`` give values of any TOML type; a value of the wrong type would
    otherwise fail deep inside a stage (e.g. ``epochs = 1.5`` in ``range``), not as one line.
    """
    return None if _fits(value, tp) else _describe(tp)


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in get_args(tp))
    if origin is Literal:
        return any(type(value) is type(c) and value == c for c in get_args(tp))
    if origin is tuple or tp is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = get_args(tp)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(
            _fits(v, a) for v, a in zip(value, args, strict=True)
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # a type this check does not know: the dataclass checks it


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of a config dataclass (tuples become lists, None dropped)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def check_range(
    name: str,
    value: float | int | None,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
) -> None:
    """Raise TLIError naming ``name`` when ``value`` is outside [lo, hi] (or (lo, hi]).

    NaN and infinity are never in range: every numeric option of tli is finite.
    """
    if value is None:
        return
    if isinstance(value, float) and value != value:
        raise TLIError(f"{name} must be a number, got nan")
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        raise TLIError(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise TLIError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise TLIError(f"{name} must be <= {hi}, got {value}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Raise TLIError unless ``value`` is an integer (not a bool) in [low, high] (where given)."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise TLIError(f"{name} must be an integer{bound}, got {value!r}")
    if high is not None and value > high:
        raise TLIError(f"{name} must be <= {high}, got {value!r}")


#: Upper bounds shared by every config: no real setting comes near them, and a value above one
#: is a typo that would otherwise exhaust memory or time (``batch_size = 10^9``).
MAX_BATCH = 65536
MAX_SEED = 2**32 - 1
MAX_RESAMPLES = 1_000_000
MAX_STEPS = 10_000_000


def check_seed(name: str, value: Any) -> None:
    """Raise TLIError unless ``value`` is a seed: an integer in 0..2^32-1 (numpy's range)."""
    check_int(name, value, 0, MAX_SEED)


def check_unit(name: str, value: Any) -> None:
    """Raise TLIError unless ``value`` is a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise TLIError(f"{name} must be in (0, 1), got {value!r}")


def check_one_of(name: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    """Raise TLIError naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise TLIError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


# --- TOML and --set ---------------------------------------------------------------------------


def toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML text (tomllib, or tomli before Python 3.11)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(text)


def read_toml(path: Path | str) -> dict[str, Any]:
    """A TOML file as a dict; a TLIError naming the file (and line) when it is bad."""
    from tli.io import read_text

    text = read_text(path).removeprefix("\ufeff")  # a byte-order mark, as some editors write
    try:
        return toml_loads(text)
    except Exception as err:  # tomllib.TOMLDecodeError
        raise TLIError(f"{path}: bad TOML: {err}") from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` overrides as a nested dict (values parsed as TOML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = [part.strip() for part in key.split(".")]
        if not sep or not key or len(parts) > 2 or not all(parts):
            raise TLIError(f"--set {item!r}: expected section.key=value")
        try:
            value = toml_loads(f"v = {raw}")["v"]
        except Exception:
            value = raw  # a bare string
        if len(parts) == 1:
            out[parts[0]] = value
        elif not isinstance(out.setdefault(parts[0], {}), dict):
            raise TLIError(f"--set {item!r}: {parts[0]} was set to a value, not a table, before")
        else:
            out[parts[0]][parts[1]] = value
    return out

"""Typed configuration sections read from YAML, TOML or JSON, checked field by field.

A `Section` is a frozen dataclass whose fields are type-checked from their annotations (bool is not
a number, ints are accepted as floats, tuples are written as lists, nested sections as mappings),
then validated by its `_check`. Every problem is a ConfigError naming its key path, e.g.
``analyses.basins.p: must lie in (0, 1), got 1.5``; nothing is silently corrected. Every config
class of diffmem (training, sampling, metric, classification, each analysis stage, executor, study)
is a Section, defined next to the code that reads it.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import reprlib
import tomllib
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Self, get_args, get_origin, get_type_hints

import yaml

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes at most 64 bits


class ConfigError(ValueError):
    """An invalid study configuration. `key` is the offending key path (e.g. 'train.lr') when known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key=key)


_REPR = reprlib.Repr()  # bounded: a value in a message is never printed whole
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 8, 4, 2


def show(value: Any) -> str:
    return f"{_REPR.repr(value)} ({type(value).__name__})"


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def mapping(value: Any, key: str) -> Mapping:
    where = key or "top level"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {show(value)}", key=key or None)
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: keys must be strings, got {show(name)}", key=key or None)
    return value


def reraise(key: str, names, e: ValueError) -> ConfigError:
    """A ValueError of a checked class (TrainConfig, MLPConfig, ...) as a ConfigError prefixed with the
    section's key path; its key names the field when the message names exactly one."""
    message = str(e).removeprefix(f"{key.rpartition('.')[2]}: ")
    named = [n for n in names if re.search(rf"(?<![A-Za-z0-9_]){n}(?![A-Za-z0-9_])", message)]
    return ConfigError(f"{key}: {message}", key=join(key, named[0]) if len(named) == 1 else key)


def check_keys(d: Mapping, allowed: list[str], key: str) -> None:
    for name in d:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise error(join(key, name), f"unknown key{hint}; allowed: {', '.join(allowed)}")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """value checked against a field's type (bool is not a number; ints are accepted as floats)."""
    if isinstance(hint, type) and issubclass(hint, Section):
        return value if isinstance(value, hint) else hint.from_dict(mapping(value, key))
    if hasattr(hint, "from_config"):  # a value type with its own reader, e.g. NetworkConfig (options resolved)
        return hint.from_config(value, key)
    if get_origin(hint) is types.UnionType:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return coerce(value, inner, key)
    if get_origin(hint) is tuple:  # tuple[X, ...], written as a list
        item = get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise error(key, f"expected a list of {SCALAR_NAMES[item]}s, got {show(value)}")
        return tuple(coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is dict:
        return dict(mapping(value, key))
    if hint is bool:
        if not isinstance(value, bool):
            raise error(key, f"expected true or false, got {show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(key, f"expected an integer, got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(key, f"expected a number, got {show(value)}{_yaml_number_hint(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise error(key, f"number too large: {show(value)}") from None
        if not math.isfinite(number):
            raise error(key, f"expected a finite number, got {value}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise error(key, f"expected a string, got {show(value)}")
        return value
    raise TypeError(f"{key}: no check for the field type {hint!r}")


SCALAR_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _yaml_number_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads 1e-3 as text: only 1.0e-3 is a float."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "; write it with a decimal point and a signed exponent, e.g. 1.0e-3, for YAML to read a number"
    return ""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def in_range(key: str, value: float, *, low: float | None = None, high: float | None = None, closed=(True, True)):
    """Fail unless low <= value <= high (or < where that end of `closed` is False)."""
    lo_ok = low is None or (value >= low if closed[0] else value > low)
    hi_ok = high is None or (value <= high if closed[1] else value < high)
    if lo_ok and hi_ok:
        return
    if high is None:
        raise error(key, f"must be {'>=' if closed[0] else '>'} {low}, got {value}")
    if low is None:
        raise error(key, f"must be {'<=' if closed[1] else '<'} {high}, got {value}")
    interval = f"{'[' if closed[0] else '('}{low}, {high}{']' if closed[1] else ')'}"
    raise error(key, f"must lie in {interval}, got {value}")


def choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise error(key, f"unknown value {value!r}; choose one of {', '.join(allowed)}")


def plain(value: Any) -> Any:
    """JSON/YAML form: sections as dicts, tuples as lists."""
    if isinstance(value, Section):
        return value.to_dict()
    if hasattr(value, "to_config"):
        return value.to_config()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Bound:
    """The range a numeric field must lie in; `closed` says whether each end is allowed."""

    low: float | None = None
    high: float | None = None
    closed: tuple[bool, bool] = (True, True)

    def check(self, key: str, value: float) -> None:
        in_range(key, value, low=self.low, high=self.high, closed=self.closed)


AT_LEAST_1 = Bound(1)  # counts
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, closed=(False, True))
UNIT = Bound(0, 1)  # [0, 1]
OPEN_UNIT = Bound(0, 1, (False, False))  # (0, 1): probabilities, quantiles, confidence levels
SEED = Bound(0, MAX_SEED)


class Section:
    """A frozen config section: fields are type-checked from their annotations, numbers checked
    against `_bounds` (field name -> Bound; None values pass), then the section's own `_check` runs.
    `_key` is the section's key path in the file ('' for the top level)."""

    _key = ""
    _bounds: dict[str, Bound] = {}

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], self._at(f.name)))
        for name, bound in self._bounds.items():
            if getattr(self, name) is not None:
                bound.check(self._at(name), getattr(self, name))
        self._check()

    def _check(self) -> None:
        pass

    @classmethod
    def _at(cls, name: str) -> str:
        return join(cls._key, name)

    @classmethod
    def from_dict(cls, d: Mapping) -> Self:
        d = mapping(d, cls._key)
        check_keys(d, [f.name for f in fields(cls)], cls._key)
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
                raise error(cls._at(f.name), "required key missing")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


class Dumper(yaml.SafeDumper):
    pass


Dumper.add_representer(list, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


PARSERS = {"yaml": ("YAML", yaml.safe_load), "toml": ("TOML", tomllib.loads), "json": ("JSON", json.loads)}


def parse_text(text: str, fmt: str, source: str) -> Any:
    """The content of a config text in format fmt ('yaml', 'toml' or 'json'); every parse error is a
    ConfigError naming source (and the line and column where the parser gives them)."""
    if fmt not in PARSERS:
        raise ConfigError(f"{source}: unknown config format {fmt!r}; choose one of yaml, toml, json")
    name, parse = PARSERS[fmt]
    try:
        return parse(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    # TOMLDecodeError, an integer too long to convert, a YAML date like 2024-13-01, ...
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{source}: invalid {name}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid {name}: nested too deeply") from None


def yaml_line(text: str, key: str) -> int | None:
    """1-based line of the key path (or its nearest listed parent) in the YAML text."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    lines: dict[str, int] = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        if node is None or id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    sub = join(path, k.value)
                    lines.setdefault(sub, k.start_mark.line + 1)
                    stack.append((sub, v))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault(f"{path}[{i}]", v.start_mark.line + 1)
                stack.append((f"{path}[{i}]", v))
    while key:
        if key in lines:
            return lines[key]
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = parent if parent != key else ""
    return None


def read_config_file(path: str | Path) -> tuple[Any, str, str]:
    """The parsed content of a .yaml/.yml (yaml.safe_load), .toml or .json file, with its format and
    source name for messages."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    return text, fmt, str(path)


def to_yaml(d: dict) -> str:
    """Sections as blocks in field order, lists on one line; yaml.safe_load reads it back."""
    return yaml.dump(d, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)

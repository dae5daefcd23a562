"""Typed configuration sections read from YAML, TOML or JSON, checked field by field.

A `Section` is a frozen dataclass whose fields are type-checked from their annotations (bool is not
a number, ints are accepted as floats, tuples are written as lists, nested sections as mappings),
then validated by its `_check`. Every problem is a ConfigError naming its key path, e.g.
``analyses.basins.p: must lie in (0, 1), got 1.5``; nothing is silently corrected. Every config
class of diffmem (training, sampling, metric, classification, each analysis stage, executor, study)
is a Section, defined next to the code that reads it.

Config texts are read strictly: a key given twice is an error in every format (YAML and JSON would
keep the last silently), and YAML scalars follow the YAML 1.2 core schema, not PyYAML's YAML 1.1:
numbers are decimal, 0o octal or 0x hex integers and floats such as 1e-3, booleans are true and
false, and everything else (1_000, 0b101, 1:30, yes, off) is text. A decimal with a leading zero
(032) is refused, as the two versions disagree on it (octal 26 or 32). Integers beyond 64 bits are
refused everywhere.
"""

from __future__ import annotations

import difflib
import functools
import json
import json.decoder
import json.scanner
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
MAX_INT = 2**63 - 1  # no count, size or seed of a config is larger; a bigger integer is a typo


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
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer beyond Python's 4300-digit limit for str()
        text = f"<a {value.bit_length()}-bit integer>" if isinstance(value, int) else "<too long to print>"
    return f"{text} ({type(value).__name__})"


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
            raise error(key, f"expected true or false, got {show(value)}{_bool_hint(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(key, f"expected an integer, got {show(value)}{_number_hint(value, int)}")
        if abs(value) > MAX_INT:
            raise error(key, f"integer too large: {show(value)}; a config integer lies within +-(2**63 - 1)")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(key, f"expected a number, got {show(value)}{_number_hint(value, float)}")
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


def _number_hint(value: Any, hint: type) -> str:
    """How to write a number that arrived as text (quoted, or 1_000 / 0b101, which YAML 1.2 reads as text)
    or an integer that arrived as a float (1e3)."""
    if isinstance(value, float) and hint is int and value.is_integer():
        return f"; write {int(value)}, without a decimal point or exponent, for an integer"
    if not isinstance(value, str):
        return ""
    text = value.strip()
    try:
        number = int(text, 0)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return ""
    if not math.isfinite(number) or (hint is int and not float(number).is_integer()):
        return ""
    if _YAML_NUMBER.fullmatch(text) and not _LEADING_ZERO.fullmatch(text):
        return f"; quoted, it is text: write {text} without quotes"
    return f"; {text!r} is text: write {int(number) if hint is int else number!r}"


def _bool_hint(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off"):
        return "; write true or false (YAML 1.2 reads yes, no, on and off as text)"
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


# --- reading config texts --------------------------------------------------------------------------------------------


class _Located(Exception):
    """A problem at a key path (and 1-based line) of a config text; parse_text names the source."""

    def __init__(self, key: str, problem: str, line: int | None = None):
        super().__init__(key, problem, line)
        self.key, self.problem, self.line = key, problem, line


# YAML 1.2 core-schema scalars (yaml.org/spec/1.2.2 section 10.3.2) in place of PyYAML's YAML 1.1 ones, under which
# 032 is octal 26, 1_000, 0b101 and 1:30 (base 60) are numbers, yes/no/on/off booleans and 1e-3 text.
_TAG = "tag:yaml.org,2002:"
_BOOL, _INT, _FLOAT, _STR, _MERGE = (_TAG + t for t in ("bool", "int", "float", "str", "merge"))
_YAML_1_2 = {
    _BOOL: (r"true|True|TRUE|false|False|FALSE", "tTfF"),
    _INT: (r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    _FLOAT: (
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+.0123456789",
    ),
}
_YAML_NUMBER = re.compile(f"{_YAML_1_2[_INT][0]}|{_YAML_1_2[_FLOAT][0]}")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9]+")  # 1.1: octal (or text, with an 8 or 9); 1.2: decimal


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 core-schema booleans, integers and floats; timestamps and null as before.
    The '=' value key of YAML 1.1 is text too."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TAG + "value")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _construct_bool(loader: ConfigLoader, node: yaml.ScalarNode) -> bool:
    text = loader.construct_scalar(node)
    if text.lower() not in ("true", "false"):
        raise yaml.constructor.ConstructorError(None, None, f"expected true or false, got {text!r}", node.start_mark)
    return text.lower() == "true"


def _construct_int(loader: ConfigLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2])
    return int(text[2:], base) if base else int(text, 10)


def _construct_float(loader: ConfigLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.lstrip("+-") in (".inf", ".nan"):
        return float(text.replace(".", ""))
    return float(text)


for _tag, (_pattern, _first) in _YAML_1_2.items():
    ConfigLoader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))
ConfigLoader.add_constructor(_BOOL, _construct_bool)
ConfigLoader.add_constructor(_INT, _construct_int)
ConfigLoader.add_constructor(_FLOAT, _construct_float)


def _check_yaml(root: yaml.Node) -> None:
    """Refuse what YAML would read silently: a key given twice (the last would win) and a number with a leading
    zero. Walks the nodes in document order; an alias is visited once, under its first path."""
    seen: set[int] = set()
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT and _LEADING_ZERO.fullmatch(node.value):
            text = node.value
            digits = text.lstrip("+-")
            old = f"octal {int(text, 8)}" if set(digits) <= set("01234567") else "text"
            problem = f"{text} has a leading zero: YAML 1.1 reads {old}, YAML 1.2 reads {int(text)}"
            raise _Located(path, f"{problem}; write {int(text)} or '{text}'", node.start_mark.line + 1)
        children: list[tuple[str, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                if k.tag == _MERGE:  # '<<: *base': the keys written beside it override the merged ones
                    children.append((path, v))
                    continue
                sub = join(path, k.value if isinstance(k, yaml.ScalarNode) else "?")
                line = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode) and k.tag == _STR:
                    if k.value in first:
                        raise _Located(sub, f"duplicate key (first at line {first[k.value]})", line)
                    first[k.value] = line
                children += [(sub, k), (sub, v)]
        elif isinstance(node, yaml.SequenceNode):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(node.value)]
        stack += reversed(children)


def _parse_yaml(text: str) -> Any:
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _Pairs(list):
    """A JSON object as its (key, value) pairs, duplicates kept, with its span [start, end) in the text."""

    start = end = 0


def _json_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
    """json.decoder.JSONObject, keeping every pair and recording where the object lies."""
    pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, object_hook, _Pairs, memo)
    pairs.start, pairs.end = s_and_end[1] - 1, end
    return pairs, end


class _JSONDecoder(json.JSONDecoder):
    def __init__(self):
        super().__init__()
        self.parse_object = _json_object
        self.scan_once = json.scanner.py_make_scanner(self)


def _objects_in(value: Any) -> list[_Pairs]:
    """The outermost JSON objects in a value (itself, or inside its lists)."""
    if isinstance(value, _Pairs):
        return [value]
    return [o for v in value for o in _objects_in(v)] if isinstance(value, list) else []


def _json_key_lines(text: str, obj: _Pairs, name: str) -> list[int]:
    """The 1-based lines of the key `name` in the object, in order; [] when the text writes it unusually."""
    inner = [(o.start, o.end) for _, v in obj for o in _objects_in(v)]
    pattern = re.compile(re.escape(json.dumps(name, ensure_ascii=False)) + r"\s*:")
    found = [
        m.start() for m in pattern.finditer(text, obj.start, obj.end) if not any(a <= m.start() < b for a, b in inner)
    ]
    if len(found) != sum(k == name for k, _ in obj):
        return []
    return [text.count("\n", 0, i) + 1 for i in found]


def _json_plain(value: Any, path: str, text: str) -> Any:
    """The parsed JSON with objects as dicts, refusing a key given twice (json.loads keeps the last)."""
    if isinstance(value, _Pairs):
        d: dict[str, Any] = {}
        for name, v in value:
            sub = join(path, name)
            if name in d:
                lines = _json_key_lines(text, value, name)
                if lines:
                    raise _Located(sub, f"duplicate key (first at line {lines[0]})", lines[1])
                raise _Located(sub, "duplicate key")
            d[name] = _json_plain(v, sub, text)
        return d
    if isinstance(value, list):
        return [_json_plain(v, f"{path}[{i}]", text) for i, v in enumerate(value)]
    return value


def _parse_json(text: str) -> Any:
    return _json_plain(_JSONDecoder().decode(text), "", text)


PARSERS = {"yaml": ("YAML", _parse_yaml), "toml": ("TOML", tomllib.loads), "json": ("JSON", _parse_json)}


def parse_text(text: str, fmt: str, source: str) -> Any:
    """The content of a config text in format fmt ('yaml', 'toml' or 'json'), read strictly (see the module
    docstring); every parse error is a ConfigError naming source (and the line, and column, where known)."""
    if fmt not in PARSERS:
        raise ConfigError(f"{source}: unknown config format {fmt!r}; choose one of yaml, toml, json")
    name, parse = PARSERS[fmt]
    try:
        return parse(text)
    except _Located as e:
        where = f"{source}:{e.line}" if e.line else source
        raise ConfigError(
            f"{where}: {e.key}: {e.problem}" if e.key else f"{where}: {e.problem}", key=e.key or None
        ) from None
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
        root = yaml.compose(text, Loader=ConfigLoader)
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


def read_config_file(path: str | Path) -> tuple[str, str, str]:
    """The text of a .yaml/.yml, .toml or .json config file, with its format (for parse_text) and its
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


class Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or YAML 1.2 would read as something else ('1e-3', 'yes', '08'), so that
    both ConfigLoader and yaml.safe_load read the text back."""


for _tag, (_pattern, _first) in _YAML_1_2.items():
    Dumper.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))
Dumper.add_representer(list, lambda dumper, v: dumper.represent_sequence(_TAG + "seq", v, flow_style=True))


def to_yaml(d: dict) -> str:
    """Sections as blocks in field order, lists on one line; parse_text and yaml.safe_load read it back."""
    return yaml.dump(d, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)

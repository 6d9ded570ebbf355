"""Typed configuration: frozen dataclasses built from YAML dicts.

`build(cls, data)` turns a plain mapping (from YAML) into the dataclass `cls`,
checking every key against the dataclass fields and every value against the
field's type. All problems are collected and raised at once as a
:class:`ConfigError` whose lines name the key's path (``stages.global.lr``),
so a pipeline file is rejected before any training starts.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Path``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]`` and nested dataclasses.

What YAML 1.1 (PyYAML) does silently is refused here: a key written twice
(PyYAML keeps the last; :func:`load_yaml` reports both lines), ``.nan`` /
``.inf`` where a number is expected, and an unquoted ``yes``/``no``/``on``/``off``
or ``2024-01-01`` where text is expected (read as a boolean or a date: the
message says to quote it).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar, get_args, get_origin, get_type_hints

import yaml

from medcl.config.paths import set_path

__all__ = ["ConfigError", "build", "check", "check_all", "to_dict", "apply_overrides", "load_yaml"]

T = TypeVar("T")

_YAML11_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """One or more configuration problems, one per line, each naming its key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


class _DuplicateKeyLoader(yaml.SafeLoader):
    """A SafeLoader that records every mapping key written twice, with its key path and lines.

    PyYAML keeps the last value of a repeated key without a word; this loader
    composes the same document and lists each repeat in ``duplicates``.
    Keys merged in with ``<<: *anchor`` may be overridden, as YAML intends.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_path: list[str | int | None] = []
        self.duplicates: list[tuple[int, str]] = []  # (line of the repeat, problem)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if isinstance(parent, yaml.MappingNode):
            key = index.value if isinstance(index, yaml.ScalarNode) else None  # None: the key node itself
        else:
            key = index if isinstance(parent, yaml.SequenceNode) else None
        self.key_path.append(key)
        try:
            return super().compose_node(parent, index)
        finally:
            self.key_path.pop()

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        path = ""
        for part in self.key_path:
            path = path if part is None else _join(path, part)
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)
            if key not in first_line:
                first_line[key] = line
                continue
            lines = f"line {line}" if first_line[key] == line else f"lines {first_line[key]} and {line}"
            self.duplicates.append((line, f"{_join(path, key_node.value)}: key written twice ({lines}); "
                                          "YAML keeps only the last value: remove one"))
        return node


def load_yaml(path: str | Path, problems: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file.

    Args:
        path: The YAML file.
        problems: Where to add keys written twice (one line each, with the key path and both
            lines), so that a caller reports them with its other problems; None raises them.

    Raises:
        ConfigError: The file is missing, not YAML, not a mapping, or (without ``problems``)
            repeats a key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], source=str(path))
    loader = _DuplicateKeyLoader(path.read_text())
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(path)) from exc
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source=str(path))
    duplicates = [problem for _, problem in sorted(loader.duplicates)]  # in file order
    if duplicates:
        if problems is None:
            raise ConfigError(duplicates, source=str(path))
        problems.extend(duplicates)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict copy."""
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} must look like key.path=value")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(f"override {item!r} has an empty key")
            continue
        try:
            set_path(out, parts, yaml.safe_load(raw))
        except TypeError as exc:
            problems.append(f"override {item!r}: {exc}")
    if problems:
        raise ConfigError(problems, source="command-line overrides")
    return out


def check(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond``: the range checks of ``__post_init__``.

    Word ``message`` as ``"<field> must ..."``: :func:`build` then reports it at the field's key path.
    """
    if not cond:
        raise ValueError(message)


def check_all(*checks: Callable[[], None]) -> None:
    """Run every check and raise one ``ValueError`` listing each failure on its own line.

    For a ``__post_init__`` with several independent checks: :func:`build` then
    reports all of them at once, each at its key path, instead of the first.
    """
    failures = []
    for run in checks:
        try:
            run()
        except ValueError as exc:
            failures.append(str(exc))
    if failures:
        raise ValueError("\n".join(failures))


def build(cls: type[T], data: Mapping[str, Any] | None, *, path: str = "", source: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; raise one ConfigError listing every problem."""
    problems: list[str] = []
    obj = _build_dataclass(cls, data if data is not None else {}, path, problems)
    if problems:
        raise ConfigError(problems, source=source)
    return obj  # type: ignore[return-value]


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-friendly form of a config dataclass (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _build_dataclass(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    where = path or "<top level>"
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    for key in unknown:
        close = _closest(key, fields)
        hint = f" (did you mean {close!r}?)" if close else f"; known keys: {', '.join(sorted(fields))}"
        problems.append(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {}
    failed = False
    for name, field in fields.items():
        if name in data:
            before = len(problems)
            value = _coerce(hints[name], data[name], _join(path, name), problems)
            if len(problems) == before:
                kwargs[name] = value
            else:
                failed = True  # keep the default in place so that the remaining checks still run
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"{_join(path, name)}: required key is missing")
            failed = True
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        # Range checks in __post_init__ word their message "<field> must ..." (or "<field>[i] must ...",
        # "<field>.<key> must ...", one per line: check_all): report each at its key path.
        if "required positional argument" not in str(exc):
            for line in str(exc).splitlines():
                name, _, rest = line.partition(" ")
                head = re.split(r"[.\[]", name, maxsplit=1)[0]
                problems.append(f"{_join(path, name)}: {rest}" if head in fields and rest else f"{where}: {line}")
        return None
    return None if failed else obj


def _closest(key: str, names: Any) -> str | None:
    """The known key a mistyped ``key`` most likely meant (``max_epoch`` -> ``max_epochs``), or None."""
    norm = key.replace("-", "_").lower()
    match = difflib.get_close_matches(norm, list(names), n=1, cutoff=0.75)
    return match[0] if match else None


def _quote_hint(value: Any) -> str:
    """Why YAML turned text into ``value`` and how to keep it text; "" when it did not."""
    if isinstance(value, bool):
        return ": YAML 1.1 reads unquoted yes/no/on/off/true/false as booleans; quote it if you meant the text"
    if isinstance(value, (datetime.date, datetime.datetime)):
        text = value.isoformat()
        return f": YAML reads an unquoted {text} as a date; quote it ('{text}')"
    return ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, path, problems)
        for alt in non_none:
            trial: list[str] = []
            out = _coerce(alt, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            hint = _quote_hint(value) if all(isinstance(a, str) for a in args) else ""
            problems.append(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if origin in (tuple, list):
        if isinstance(value, str) and "," in value:  # `--set seeds=0,1,2` as well as `seeds=[0,1,2]`
            value = [yaml.safe_load(item) for item in value.split(",")]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return None
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, _join(path, i), problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        val_tp = args[1] if len(args) == 2 else Any
        for key in value:
            if _quote_hint(key):
                problems.append(f"{_join(path, str(key))}: key read as {key!r}{_quote_hint(key)}")
        return {str(k): _coerce(val_tp, v, _join(path, str(k)), problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.match(value.strip()):
            # PyYAML (YAML 1.1) reads 1e-3 (no dot in the mantissa) as a string; take it as the number it is.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{path}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}{_quote_hint(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            problems.append(f"{path}: expected a path, got {value!r}{_quote_hint(value)}")
            return value
        # A URI (s3://bucket/x) stays text: Path would fold its "//" and the scheme would be lost.
        return value if isinstance(value, str) and "://" in value else Path(value)
    raise TypeError(f"the config binder cannot handle field type {tp!r} at {path}")

"""Dotted key paths into nested mappings: the one place that reads ``a.b.c``.

``get_path(tree, "a.b.c")`` is ``tree["a"]["b"]["c"]``; ``set_path`` writes
there, creating the mappings on the way; ``flatten`` / ``unflatten`` convert
between a nested mapping and ``{"a.b.c": value}``. Errors name the part of the
path that failed (``b is not a mapping``), so callers can put them into a
:class:`~medcl.config.binder.ConfigError` line as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["get_path", "set_path", "flatten", "unflatten"]


def _parts(path: str | Sequence[str]) -> list[str]:
    parts = path.split(".") if isinstance(path, str) else [str(p) for p in path]
    if not parts or not all(parts):
        raise ValueError(f"key path {path!r} has an empty part")
    return parts


def get_path(tree: Mapping[str, Any], path: str | Sequence[str]) -> Any:
    """The value at ``path`` (``"a.b.c"`` or ``["a", "b", "c"]``) of nested mappings.

    Raises:
        KeyError: a part is missing; the message names it (``'b' not found in a.b.c``).
        TypeError: a part other than the last holds no mapping (``b is not a mapping``).
    """
    parts = _parts(path)
    node: Any = tree
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            raise TypeError(f"{parts[i - 1]} is not a mapping")
        if part not in node:
            raise KeyError(f"{part!r} not found in {'.'.join(parts)}")
        node = node[part]
    return node


def set_path(tree: MutableMapping[str, Any], path: str | Sequence[str], value: Any) -> None:
    """Store ``value`` at ``path`` in place, creating missing (or null) mappings on the way.

    Raises:
        TypeError: a part other than the last holds something other than a mapping
            (``b is not a mapping``); ``tree`` may then hold the mappings created before it.
    """
    parts = _parts(path)
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, MutableMapping):
            raise TypeError(f"{part} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def flatten(tree: Mapping[str, Any], *, keep: Callable[[Mapping[str, Any]], bool] | None = None,
            prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; empty mappings stay values.

    Args:
        tree: Nested mappings; keys are turned into strings.
        keep: Mappings for which this returns True stay values instead of being descended into.
        prefix: Dotted path of ``tree`` itself (prepended to every key).

    Returns:
        Dotted key -> leaf value. When a key occurs twice (a literal ``"a.b"`` beside
        ``{"a": {"b": ..}}``) the later one wins; a later leaf also moves to the end.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and not (keep is not None and keep(value)):
            out.update(flatten(value, keep=keep, prefix=path))
        else:
            out.pop(path, None)
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}`` (values are not copied).

    Raises:
        TypeError: one key is a prefix of another (``a`` and ``a.b``); names the part.
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        set_path(out, key, value)
    return out
